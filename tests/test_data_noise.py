"""Planted noise in the synthetic instruction set: each kind at its rate with labels that match the records, checked
against the scenes' boxes; noise 0 byte-identical to the clean set; determinism; the validation split; no scorer
reads the labels."""

from __future__ import annotations

import builtins
import collections
import hashlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llava_jax import io as lio
from llava_jax.data import noise, synthetic, validate

REPO = Path(__file__).resolve().parents[1]
NUM, SEED, SHARE = 240, 7, 0.5
CHOICE_WORDS = set(synthetic.COLORS) | set(synthetic.SHAPES) | set(synthetic.COUNT_WORDS) | {"left", "right"}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The clean set and the noisy set (same seed), with their scenes rebuilt from instances.json."""
    root = tmp_path_factory.mktemp("noise")
    synthetic.generate(root / "clean", num=NUM, seed=SEED, num_eval=20)
    meta = synthetic.generate(root / "noisy", num=NUM, seed=SEED, num_eval=20, noise=SHARE, num_val=30)
    return {"clean": root / "clean", "noisy": root / "noisy", "meta": meta, "scenes": _scenes(root / "clean"),
            "records": lio.read_json(root / "noisy" / "stage2.json"),
            "labels": lio.read_json(root / "noisy" / synthetic.NOISE_LABELS)}


def _scenes(root: Path) -> dict[str, list[synthetic.Obj]]:
    """{image file name: its objects}, from the COCO instances file (boxes, shapes, colours, sizes)."""
    inst = lio.read_json(root / "coco" / "instances.json")
    names = {c["id"]: c["name"] for c in inst["categories"]}
    files = {im["id"]: (im["file_name"], im["width"]) for im in inst["images"]}
    out: dict[str, list[synthetic.Obj]] = collections.defaultdict(list)
    for a in inst["annotations"]:
        name, width = files[a["image_id"]]
        x, y, w, h = (int(v) for v in a["bbox"])
        cell = width / synthetic.GRID
        out[name].append(synthetic.Obj(names[a["category_id"]], a["attributes"]["color"], a["attributes"]["size"],
                                       int((x + w / 2) // cell), (x, y, x + w, y + h), int((y + h / 2) // cell)))
    return out


def _holds(question: str, reply: str, objs: list[synthetic.Obj]) -> bool | None:
    """Whether a question turn's reply is true of the scene, judged from the boxes; None for a description turn."""
    q = question.replace("<image>", "").strip()
    words = synthetic._words(reply)
    by_shape = {o.shape: o for o in objs}
    by_color = {o.color: o for o in objs}
    if q.startswith("What color is the "):
        o = by_shape.get(q.split()[-1].rstrip("?"))
        return o is not None and o.color in words and not (set(words) & (set(synthetic.COLORS) - {o.color}))
    if q.startswith("What shape is the "):
        o = by_color.get(q.split()[4])
        return o is not None and words[-1] == o.shape
    if q.startswith("Which side"):
        o = by_shape.get(q.split()[7])
        if o is None:
            return False
        side = ("left", "right")[o.column]  # the 2 x 2 board's cell of the box centre
        height = ("top", "bottom")[o.row]
        others = {"left", "right", "top", "bottom"} - {side, height}
        return {side, height} <= set(words) and others.isdisjoint(words)
    if q.startswith("How many"):
        return synthetic.COUNT_WORDS[len(objs)] in words
    if q.startswith("Which is larger"):
        named = [by_shape.get(w.rstrip("?,")) for w in q.split()[4::3]]  # both objects must be in the scene
        o = by_shape.get(words[-1])
        return None not in named and o is not None and o.size == "large" and \
            any(x.size == "small" for x in named)
    return _description_holds(reply, objs)


_OBJECT = re.compile(r"\b(?:a|an) (\w+) (\w+)(?: is)?(?: in the (top|bottom) (left|right) corner)?"
                     r"(?:, and it is (large|small))?", re.IGNORECASE)


def _description_holds(text: str, objs: list[synthetic.Obj]) -> bool:
    """Whether every object a description names (colour + shape, and place / size where it says them), its count
    and its largest object are as in the scene."""
    by_color = {o.color: o for o in objs}
    for color, shape, row, col, size in _OBJECT.findall(text):
        if color not in synthetic.COLORS:  # "a plain light background"
            continue
        o = by_color.get(color)
        if o is None or o.shape != shape or (size and o.size != size):
            return False
        if row and (("top", "bottom")[o.row], ("left", "right")[o.column]) != (row, col):
            return False
    count = re.search(r"shows (\w+) shapes?\b", text)
    if count and count.group(1) != synthetic.COUNT_WORDS[len(objs)]:
        return False
    largest = re.search(r"largest object is the (\w+) (\w+)", text)
    return not largest or any((o.color, o.shape, o.size) == (*largest.groups(), "large") for o in objs)


def _qa(record):
    conv = record["conversations"]
    return [(conv[i - 1]["value"], conv[i]["value"]) for i in range(1, len(conv), 2)]


def _digest(root: Path, skip=()) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.name not in skip and not p.name.startswith("syn_val_"):
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_exact_counts_and_labels_cover_every_record(sets):
    recs, labels = sets["records"], sets["labels"]
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)) == NUM and set(labels["records"]) == set(ids)
    assert ids == [r["id"] for r in lio.read_json(sets["clean"] / "stage2.json")]
    bad = [i for i, lab in labels["records"].items() if lab["bad"]]
    assert len(bad) == round(SHARE * NUM) == labels["counts"]["bad"]
    kinds = collections.Counter(labels["records"][i]["kind"] for i in bad)
    want = noise.allocate(len(bad), noise.DEFAULT_MIX)
    assert kinds == want and sum(want.values()) == len(bad)
    assert all(labels["counts"][k] == want[k] for k in noise.KINDS)
    assert all(lab["kind"] is None for lab in labels["records"].values() if not lab["bad"])
    assert labels["noise"] == SHARE and sets["meta"]["noise"]["counts"] == labels["counts"]
    assert sets["meta"]["stage2_records"] == NUM
    report = validate.validate_records(recs, [sets["noisy"] / "images"], length=validate.LengthCheck(2048, 576))
    assert report.ok == report.total == NUM, dict(report.errors)  # bad, but every record is well-formed


def test_good_records_are_true_and_bad_ones_are_bad_as_labelled(sets):
    recs, labels, scenes = sets["records"], sets["labels"]["records"], sets["scenes"]
    by_id = {r["id"]: r for r in recs}
    clean = {r["id"]: r for r in lio.read_json(sets["clean"] / "stage2.json")}
    seen = collections.Counter()
    parse = noise.parse_question
    for r in recs:
        lab = labels[r["id"]]
        own = f"{r['id']}.jpg"
        verdicts = [_holds(q, a, scenes[r["image"]]) for q, a in _qa(r)]
        kind = lab["kind"]
        seen[kind] += 1
        if kind is None:
            assert r["image"] == own and all(verdicts), r
            assert _qa(r)[0] == _qa(clean[r["id"]])[0]  # the record starts as the clean one did
        elif kind == "contradiction":
            assert r["image"] == own and False in verdicts, r
            for i in lab["turns"]:  # every changed turn is wrong, fluent, and not the clean reply
                q, a = r["conversations"][i - 1]["value"], r["conversations"][i]["value"]
                assert _holds(q, a, scenes[own]) is False and a[-1] == "."
            seen["contradicted description"] += any(parse(r["conversations"][i - 1]["value"]) is None
                                                    for i in lab["turns"])
        elif kind == "swap":
            assert r["image"] != own and r["image"] == f"{lab['image_of']}.jpg"
            assert all(_holds(q, a, scenes[own]) for q, a in _qa(r))  # true of its own scene
            assert False in verdicts  # the text is wrong for the image it is paired with
        elif kind == "truncated":
            last = r["conversations"][-1]["value"]
            assert last and last[-1] not in ".!?" and lab["turns"] == [len(r["conversations"]) - 1]
        elif kind == "generic":
            for _, a in _qa(r):
                assert a[-1] == "." and not (set(synthetic._words(a)) & CHOICE_WORDS), a
        elif kind == "duplicate":
            other = by_id[lab["of"]]
            assert not labels[lab["of"]]["bad"] and lab["of"] < r["id"]  # the original comes first
            assert (r["image"], r["conversations"]) == (other["image"], other["conversations"])
    assert set(seen) == {None, *noise.KINDS, "contradicted description"} and seen["contradicted description"] > 5


def test_truncated_is_a_strict_prefix_of_the_record_before_noise(sets):
    """Noise only touches bad records: the noise-0 shaping (same rng stream) gives every good record, and each
    truncated answer is a strict prefix of its record's last answer there."""
    clean = lio.read_json(sets["clean"] / "stage2.json")
    scenes = [sets["scenes"][r["image"]] for r in clean]
    shaped, labels0 = noise.make_noisy(clean, scenes, 0.0, seed=SEED)
    assert labels0["counts"]["bad"] == 0
    labels = sets["labels"]["records"]
    n_trunc = 0
    for before, after in zip(shaped, sets["records"], strict=True):
        lab = labels[after["id"]]
        assert lab["detail"] == labels0["records"][after["id"]]["detail"]
        if not lab["bad"]:
            assert after == before
        elif lab["kind"] == "truncated":
            full, cut = before["conversations"][-1]["value"], after["conversations"][-1]["value"]
            assert full.startswith(cut) and len(cut) < len(full) and after["conversations"][:-1] == \
                before["conversations"][:-1]
            n_trunc += 1
    assert n_trunc == sets["labels"]["counts"]["truncated"] > 0


def test_informativeness_ranges_and_follows_length(sets):
    recs, labels = sets["records"], sets["labels"]["records"]
    good = [r for r in recs if not labels[r["id"]]["bad"]]
    details = collections.Counter(labels[r["id"]]["detail"] for r in good)
    assert set(details) == set(noise.LEVELS) and min(details.values()) >= 0.2 * len(good)
    info = np.asarray([labels[r["id"]]["informativeness"] for r in good])
    length = np.asarray([sum(len(a) for _, a in _qa(r)) for r in good])
    assert info.min() > 0 and info.max() == 1.0
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    assert np.corrcoef(rank(info), rank(length))[0, 1] > 0.6
    mean_len = {lv: np.mean([sum(len(a) for _, a in _qa(r)) for r in good if labels[r["id"]]["detail"] == lv])
                for lv in noise.LEVELS}
    assert mean_len["terse"] < mean_len["partial"] < mean_len["complete"]


def test_noise_zero_is_byte_identical_and_noise_touches_only_its_files(sets, tmp_path):
    synthetic.generate(tmp_path / "zero", num=NUM, seed=SEED, num_eval=20, noise=0.0, noise_kinds="swap")
    assert _digest(tmp_path / "zero") == _digest(sets["clean"])
    assert not (tmp_path / "zero" / synthetic.NOISE_LABELS).exists()
    skip = ("stage2.json", synthetic.NOISE_LABELS, "meta.json", "val.jsonl")
    assert _digest(sets["noisy"], skip) == _digest(sets["clean"], skip)


def test_deterministic_for_a_seed(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        synthetic.generate(tmp_path / name, num=40, seed=seed, num_eval=5, noise=0.4, num_val=5)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    la, lc = (lio.read_json(tmp_path / n / synthetic.NOISE_LABELS) for n in ("a", "c"))
    assert la["counts"]["bad"] == lc["counts"]["bad"] == 16 and la["records"] != lc["records"]


def test_validation_split_is_disjoint_and_in_eval_layout(sets):
    out = sets["noisy"]
    val, ev = lio.read_jsonl(out / "val.jsonl"), lio.read_jsonl(out / "eval.jsonl")
    train = {r["image"] for r in lio.read_json(out / "stage1.json")}
    assert len(val) == 30 and sets["meta"]["num_val"] == 30
    assert all(set(r) == set(ev[0]) for r in val)
    val_images = {r["image"] for r in val}
    assert len(val_images) == 30 and all(n.startswith("syn_val_") for n in val_images)
    assert not val_images & train and not val_images & {r["image"] for r in ev}
    assert all((out / "images" / n).exists() for n in val_images)
    assert collections.Counter(r["category"] for r in val) == {c: 6 for c in synthetic.CATEGORIES}
    assert all(r["answer"] in r["choices"] for r in val)
    # eval.jsonl itself is unchanged by the validation split
    assert lio.read_jsonl(sets["clean"] / "eval.jsonl") == ev


def test_kind_mix_flag_rates_and_errors(tmp_path):
    assert noise.parse_kinds("truncated,generic") == {"truncated": 0.5, "generic": 0.5}
    assert noise.parse_kinds("swap=3,contradiction=1") == {"contradiction": 0.25, "swap": 0.75}
    assert noise.allocate(30, {"truncated": 0.25, "generic": 0.75}) == {"truncated": 8, "generic": 22}
    for bad in ("typo", "swap=x", "swap=-1", "swap=0"):
        with pytest.raises(noise.NoiseError):
            noise.parse_kinds(bad)
    meta = synthetic.generate(tmp_path / "s", num=50, seed=1, num_eval=0, noise=0.3, noise_kinds="truncated=1,generic=3")
    assert {k: v for k, v in meta["noise"]["counts"].items() if k in noise.KINDS and v} == {"truncated": 4,
                                                                                            "generic": 11}
    with pytest.raises(noise.NoiseError, match="duplicates need"):
        synthetic.generate(tmp_path / "t", num=5, seed=1, num_eval=0, noise=1.0, noise_kinds="duplicate")
    with pytest.raises(ValueError, match="noise"):
        synthetic.generate(tmp_path / "u", num=5, seed=1, num_eval=0, noise=1.5)


def test_cli_noise_and_one_line_errors(tmp_path):
    cmd = [sys.executable, "-m", "llava_jax.data.synthetic", "--out", str(tmp_path / "s"), "--num", "20",
           "--num-eval", "5", "--seed", "2"]
    ok = subprocess.run([*cmd, "--noise", "0.5", "--num-val", "5", "--noise-kinds", "swap,generic"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    labels = lio.read_json(tmp_path / "s" / synthetic.NOISE_LABELS)
    assert labels["counts"]["swap"] == labels["counts"]["generic"] == 5
    assert len(lio.read_jsonl(tmp_path / "s" / "val.jsonl")) == 5
    for extra in (["--noise", "2"], ["--noise-kinds", "blur"], ["--noise", "x"], ["--num-val", "-1"],
                  ["--noise", "0", "--noise-kinds", "swap=x"]):
        bad = subprocess.run([*cmd, "--noise", "0.2", *extra], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr


def test_selection_never_reads_the_labels(sets, tmp_path, monkeypatch):
    """The selector runs on the noisy set with its labels file gone, and opens no file of that name."""
    from selection.select import run_selection

    spec = importlib.util.spec_from_file_location("select_config", REPO / "configs" / "select.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("length")
    config.cluster.k = 1
    config.plots = False
    data = tmp_path / "noisy.json"
    data.write_bytes((sets["noisy"] / "stage2.json").read_bytes())  # no labels file beside it
    opened = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_os_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    result = run_selection(data, sets["noisy"] / "images", tmp_path / "sel", config, alpha=24)
    assert len(result.selected) == 24 and any("noisy.json" in p for p in opened)
    assert not [p for p in opened if synthetic.NOISE_LABELS in p]
    # and no selector source names the file (the experiment, which reports on the labels, is not a scorer)
    for path in (REPO / "selection").glob("*.py"):
        if path.name not in ("experiment.py", "experiment_report.py", "report.py"):
            assert "noise_labels" not in path.read_text(), path
