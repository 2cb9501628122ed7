"""The bundled synthetic dataset: layout, determinism, honest eval (answers need the image), scoring."""

import collections
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from llava_jax import io as lio
from llava_jax.data import sources, synthetic, validate


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    meta = synthetic.generate(out, num=300, seed=11, num_eval=250, image_size=48)
    return out, meta


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_layout_and_every_record_valid(syn):
    out, meta = syn
    for name in ("stage1.json", "stage2.json"):
        recs = lio.read_json(out / name)
        assert len(recs) == 300
        report = validate.validate_records(recs, [out / "images"], length=validate.LengthCheck(2048, 576))
        assert report.ok == report.total, dict(report.errors)
    evals = lio.read_jsonl(out / "eval.jsonl")
    assert len(evals) == 250 and meta["num_eval"] == 250
    train_images = {r["image"] for r in lio.read_json(out / "stage2.json")}
    assert not train_images & {r["image"] for r in evals}  # held-out images
    for r in evals:
        assert set(r) == {"question_id", "image", "text", "answer", "choices", "category", "num_objects"}
        assert r["num_objects"] in (1, 2, 3) and (r["category"] != "size" or r["num_objects"] >= 2)
        if r["category"] == "count":
            assert r["answer"] == synthetic.COUNT_WORDS[r["num_objects"]]
        assert r["answer"] in r["choices"] and (out / "images" / r["image"]).exists()
    assert sum(meta["eval_per_num_objects"].values()) == 250
    assert meta["chance"] == pytest.approx(np.mean([1 / len(r["choices"]) for r in evals]))
    with Image.open(out / "images" / evals[0]["image"]) as im:
        assert im.size == (48, 48)
    coco = lio.read_json(out / "coco" / "instances.json")
    assert {"images", "annotations", "categories"} <= set(coco)
    assert all(len(a["bbox"]) == 4 for a in coco["annotations"])
    caps = lio.read_json(out / "coco" / "captions.json")
    assert len(caps["annotations"]) == 5 * 300
    mini = sources.JsonRecordSource(out / "cc_sbu_align" / "filter_cap.json", [out / "cc_sbu_align"])
    assert len(mini) == 300
    report = validate.validate_records([mini[i]["record"] for i in range(len(mini))], [out / "cc_sbu_align"])
    assert report.ok == 300


def test_deterministic_per_seed(tmp_path):
    a = synthetic.generate(tmp_path / "a", num=20, seed=4, num_eval=10)
    b = synthetic.generate(tmp_path / "b", num=20, seed=4, num_eval=10)
    c = synthetic.generate(tmp_path / "c", num=20, seed=5, num_eval=10)
    assert a == b
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    assert c["seed"] == 5


def test_text_alone_gives_chance(syn):
    """The best guess from the question text alone (majority answer per question string) stays near chance."""
    out, meta = syn
    train = lio.read_json(out / "stage2.json")
    by_question = collections.defaultdict(collections.Counter)
    for r in train:
        conv = r["conversations"]
        for q, a in zip(conv[::2], conv[1::2], strict=True):
            by_question[q["value"].replace("<image>", "").strip()][a["value"]] += 1
    evals = lio.read_jsonl(out / "eval.jsonl")
    correct = 0
    for r in evals:
        guesses = by_question.get(r["text"])
        guess = guesses.most_common(1)[0][0] if guesses else r["choices"][0]
        correct += synthetic.score_answer(guess, r)
    assert correct / len(evals) < meta["chance"] + 0.15
    assert collections.Counter(r["category"] for r in evals) == {c: 50 for c in synthetic.CATEGORIES}


def test_answers_match_the_pixels(syn):
    """The colour of every object's box centre in the image is the colour its caption names."""
    out, _ = syn
    inst = lio.read_json(out / "coco" / "instances.json")
    images = {im["id"]: im["file_name"] for im in inst["images"]}
    for ann in inst["annotations"][:60]:
        x, y, w, h = ann["bbox"]
        with Image.open(out / "images" / images[ann["image_id"]]) as im:
            px = np.asarray(im.convert("RGB"), np.int32)[int(y + h / 2), int(x + w / 2)]
        want = np.asarray(synthetic.COLORS[ann["attributes"]["color"]])
        assert np.abs(px - want).max() < 40


def test_score_answer():
    rec = {"answer": "two", "choices": ["one", "two", "three"]}
    assert synthetic.score_answer("two", rec)
    assert synthetic.score_answer("There are 2 shapes.", rec)
    assert not synthetic.score_answer("one or two", rec)
    assert not synthetic.score_answer("three", rec)
    assert not synthetic.score_answer("", rec)
    col = {"answer": "red", "choices": list(synthetic.COLORS)}
    assert synthetic.score_answer("Red.", col) and not synthetic.score_answer("reddish", col)


def test_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "llava_jax.data.synthetic", "--out", str(tmp_path / "s"),
                          "--num", "12", "--seed", "2", "--num-eval", "5"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    meta = lio.read_json(tmp_path / "s" / "meta.json")
    assert meta["num_train_images"] == 12 and meta["num_eval"] == 5
    assert len(list((tmp_path / "s" / "images").glob("*.jpg"))) == 17
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["seed"] == 2


def test_side_and_count_answers_follow_the_boxes(syn):
    out, _ = syn
    inst = lio.read_json(out / "coco" / "instances.json")
    names = {c["id"]: c["name"] for c in inst["categories"]}
    by_file = {im["file_name"]: im for im in inst["images"]}
    boxes = collections.defaultdict(list)
    for a in inst["annotations"]:
        boxes[a["image_id"]].append(a)
    checked = collections.Counter()
    for r in lio.read_json(out / "stage2.json"):
        im = by_file[r["image"]]
        objs = boxes[im["id"]]
        conv = r["conversations"]
        for q, a in zip(conv[::2], conv[1::2], strict=True):
            text = q["value"]
            if text.replace("<image>", "").strip().startswith("Which side"):
                shape = text.split("is the ")[1].split()[0]
                (box,) = [o["bbox"] for o in objs if names[o["category_id"]] == shape]
                cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
                corner = f"{'top' if cy < im['height'] / 2 else 'bottom'} {'left' if cx < im['width'] / 2 else 'right'}"
                assert a["value"] == f"The {shape} is in the {corner} corner."
                checked["side"] += 1
            elif "How many" in text:
                assert synthetic.COUNT_WORDS[len(objs)] in synthetic._words(a["value"])
                checked["count"] += 1
    assert checked["side"] > 50 and checked["count"] > 50


def test_two_by_two_board(tmp_path):
    """grid=2: objects in distinct cells, inside their quadrant; places and side answers follow the boxes."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        objs = synthetic.make_scene(rng, 32, grid=2)
        cells = {(o.column, o.row) for o in objs}
        assert len(cells) == len(objs) and 1 <= len(objs) <= 3
        if len(objs) <= 2:
            assert len({o.column for o in objs}) == len(objs)  # one per column when they fit
        for o in objs:
            x0, y0, x1, y1 = o.box
            assert o.column * 16 <= x0 < x1 <= (o.column + 1) * 16 and o.row * 16 <= y0 < y1 <= (o.row + 1) * 16
        text = synthetic.caption(objs, variant=0)
        for o in objs:
            corner = f"{('top', 'bottom')[o.row]} {('left', 'right')[o.column]} corner"
            assert f"{o.shape}, {o.color} and {o.size}, in the {corner}" in text
    meta = synthetic.generate(tmp_path / "g2", num=40, seed=1, num_eval=20, image_size=32, grid=2)
    assert meta["grid"] == 2
    with pytest.raises(ValueError, match="grid"):
        synthetic.generate(tmp_path / "g3", num=4, grid=3)


def test_captions_name_each_attribute_after_its_key():
    """Even variants key each object by shape, odd ones by colour, listed in vocabulary order."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        objs = synthetic.make_scene(rng, 64)
        by_shape = synthetic.caption(objs, variant=0)
        by_color = synthetic.caption(objs, variant=1)
        shapes = sorted(objs, key=lambda o: synthetic.SHAPES.index(o.shape))
        assert [by_shape.index(f"{o.shape}, {o.color} and {o.size}") for o in shapes] == sorted(
            by_shape.index(f"{o.shape}, {o.color} and {o.size}") for o in shapes)
        for o in objs:
            assert f"{o.color} {o.size} {o.shape}" in by_color


def test_later_turns_never_repeat_an_earlier_answer(syn):
    """No reply names an attribute that an earlier turn of its conversation named, so every answer needs the
    image (the single-turn held-out questions cannot be answered from text either)."""
    out, _ = syn
    attributes = set(synthetic.COLORS) | set(synthetic.SHAPES) | set(synthetic.COUNT_WORDS) | {"left", "right"}
    turns = 0
    for r in lio.read_json(out / "stage2.json"):
        said: set[str] = set()
        conv = r["conversations"]
        assert 1 <= len(conv) // 2 <= 3
        for q, a in zip(conv[::2], conv[1::2], strict=True):
            question = set(synthetic._words(q["value"]))
            assert not (set(synthetic._words(a["value"])) & attributes) - question & said
            said |= question | set(synthetic._words(a["value"]))
            turns += 1
    assert turns > 2 * 300


def test_replies_restate_the_object_and_grade_correct(syn):
    """Training replies are sentences that score as correct answers to their question."""
    rng = np.random.default_rng(5)
    for _ in range(100):
        objs = synthetic.make_scene(rng, 32)
        for cat, q in synthetic.questions(objs, rng).items():
            assert q["reply"].endswith(".") and synthetic.score_answer(q["reply"], q), (cat, q)


def test_question_pool_asks_about_every_object():
    rng = np.random.default_rng(7)
    for _ in range(50):
        objs = synthetic.make_scene(rng, 32)
        pool = synthetic.question_pool(objs, rng)
        for o in objs:
            assert {"text": f"What color is the {o.shape}?", "answer": o.color} in [
                {k: q[k] for k in ("text", "answer")} for q in pool]
            assert any(q["text"] == f"What shape is the {o.color} object?" and q["answer"] == o.shape for q in pool)
        assert sum(q["text"].startswith("How many") for q in pool) == 1
        assert all(synthetic.score_answer(q["reply"], q) for q in pool)
