"""The selector end to end on the bundled synthetic set, with a tiny random CLIP and reward model built offline and
the GPT score answered by the local OpenAI-compatible server."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from openai_server import LocalOpenAIServer
from test_selection_gpt import reviewer

from selection.allocate import BudgetError
from selection.clip_score import ClipScorer
from selection.records import load_dataset
from selection.select import SelectionConfigError, run_selection

REPO = Path(__file__).resolve().parents[1]
NUM = 36


def get_config(variant=None):
    """configs/select.py's get_config, loaded by path (configs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("select_config", REPO / "configs" / "select.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic data (LLaVA stage2.json + MiniGPT-4 filter_cap.json), a CLIP dir and a reward-model dir."""
    import torch
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    from llava_jax.data.synthetic import generate
    from llava_jax.tiny import build_tokenizer, make_hf_clip

    root = tmp_path_factory.mktemp("selection")
    generate(root / "syn", num=NUM, seed=0, num_eval=0)
    records = json.loads((root / "syn" / "stage2.json").read_text())
    # Planted low-quality records: an empty answer, a truncated one, and a copy of another record's answers.
    bad = [
        {"id": "bad_empty", "image": records[0]["image"], "conversations": [
            {"from": "human", "value": "<image>\nDescribe the picture."}, {"from": "gpt", "value": ""}]},
        {"id": "bad_copy", "image": records[1]["image"], "conversations": records[2]["conversations"]},
    ]
    (root / "syn" / "planted.json").write_text(json.dumps(records + bad))
    texts = [t["value"] for r in records for t in r["conversations"]]
    captions = json.loads((root / "syn" / "cc_sbu_align" / "filter_cap.json").read_text())["annotations"]
    texts += [a["caption"] for a in captions]
    clip_dir, reward_dir = root / "clip", root / "reward"
    tokenizer = build_tokenizer(texts, vocab_size=300, out_dir=clip_dir)
    make_hf_clip(clip_dir, text_vocab=len(tokenizer), seed=0)
    torch.manual_seed(0)
    cfg = DebertaV2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=128, num_labels=1,
                          pad_token_id=tokenizer.pad_token_id, type_vocab_size=0)
    DebertaV2ForSequenceClassification(cfg).eval().save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    return {"root": root, "syn": root / "syn", "clip": clip_dir, "reward": reward_dir}


def _config(world, variant=None, **overrides):
    c = get_config(variant)
    c.clip.model_dir = str(world["clip"])
    c.clip.batch_size = 8
    c.reward.model_dir = str(world["reward"])
    c.gpt.client.model = "local-test-model"
    c.gpt.client.max_rpm = 0.0
    c.gpt.client.max_tpm = 0.0
    c.gpt.client.progress = False
    c.plots = False
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def test_clip_score_matches_transformers(world, tmp_path):
    import torch
    from transformers import CLIPModel

    from llava_jax.data.images import load_and_preprocess

    ds = load_dataset(world["syn"] / "cc_sbu_align" / "filter_cap.json")
    examples = ds.examples[:5]
    scorer = ClipScorer(str(world["clip"]), str(world["syn"] / "cc_sbu_align" / "image"), tmp_path, batch_size=8)
    ours = scorer.score(examples)
    hf = CLIPModel.from_pretrained(world["clip"]).eval()
    enc = scorer.encoder
    with torch.no_grad():
        for ex, value in zip(examples, ours, strict=True):
            pixels = load_and_preprocess(world["syn"] / "cc_sbu_align" / "image" / ex.image, enc.image_config)
            image = hf.get_image_features(pixel_values=torch.from_numpy(pixels[None]).permute(0, 3, 1, 2))
            image = getattr(image, "pooler_output", image)
            image = torch.nn.functional.normalize(image, dim=-1)[0]
            # These captions exceed the 16-token context: sentence embeddings are averaged.
            from selection.scores import split_sentences

            sentences = split_sentences(ex.answer)[:10]
            assert len(enc.tokenizer(ex.answer)["input_ids"]) > enc.context and len(sentences) > 1
            ids, mask = enc.tokenize(sentences)
            text = hf.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                        attention_mask=torch.from_numpy(mask).long())
            text = getattr(text, "pooler_output", text)
            text = torch.nn.functional.normalize(torch.nn.functional.normalize(text, dim=-1).sum(0), dim=0)
            assert value == pytest.approx(100.0 * float(image @ text), abs=1e-3)


def test_select_llava_sizes_proportions_cache_and_determinism(world, tmp_path):
    data = world["syn"] / "planted.json"
    records = json.loads(data.read_text())
    with LocalOpenAIServer(reviewer) as server:
        common = dict(cache_dir=str(tmp_path / "cache"), **{"gpt.client.base_url": server.base_url})
        first = None
        for alpha, k in [(5, 3), (12, 3), (20, 4), (9, 1)]:
            out = tmp_path / f"a{alpha}k{k}"
            result = run_selection(data, world["syn"] / "images", out, _config(world, **common, **{"cluster.k": k}),
                                   alpha=alpha)
            assert len(result.selected) == alpha
            subset = json.loads((out / "planted.json").read_text())
            assert subset == [records[i] for i in result.selected]  # LLaVA format, records unchanged
            clusters = result.report["clusters"]
            assert sum(c["allocated"] for c in clusters.values()) == alpha
            total = sum(c["size"] for c in clusters.values())
            for c in clusters.values():
                exact = alpha * c["size"] / total
                assert np.floor(exact) <= c["allocated"] <= np.ceil(exact)
            chosen_mask = np.zeros(len(records), bool)
            chosen_mask[result.selected] = True
            for c, info in clusters.items():  # inside each cluster: the best eligible final scores
                in_cluster = (result.labels == int(c)) & result.eligible
                assert (in_cluster & chosen_mask).sum() == info["allocated"]
                if info["allocated"] and (in_cluster & ~chosen_mask).any():
                    assert result.final[in_cluster & chosen_mask].min() >= result.final[in_cluster & ~chosen_mask].max()
            if first is None:
                first = result
                requests_after_first = len(server.chat_requests())
                # one request per distinct (instruction, answer) prompt: "bad_copy" and short synthetic answers
                # that repeat across images share a prompt, which is sent once
                distinct = {(ex.instruction, ex.answer) for ex in load_dataset(data).examples}
                sent = [json.dumps(r.json["messages"]) for r in server.chat_requests()]
                assert len(set(sent)) == len(sent) == requests_after_first == len(distinct) < len(records)
                assert all(v["computed"] == len(records) for v in result.report["score_runs"].values())
            else:
                # Every score came from the cache: no scoring pass, no GPT request.
                assert all(v["computed"] == 0 for v in result.report["score_runs"].values())
                assert len(server.chat_requests()) == requests_after_first
        # Planted records: the empty answer ranks last under length and GPT, the copied answer is not eligible.
        keys = first.keys
        for name in ("length", "gpt"):
            assert first.raw[name][keys.index("bad_empty")] == np.nanmin(first.raw[name])
        reasons = {row["id"]: row["excluded_reason"] for row in csv.DictReader(open(tmp_path / "a5k3" / "scores.csv"))}
        assert "duplicate_answer" in (reasons["bad_copy"], reasons[records[2]["id"]])
        # Same seed -> same subset (fresh output dir, warm cache); a changed weight reuses every cached score.
        again = run_selection(data, world["syn"] / "images", tmp_path / "again",
                              _config(world, **common, **{"cluster.k": 3}), alpha=5)
        assert again.selected == first.selected and np.array_equal(again.labels, first.labels)
        reweighted = run_selection(data, world["syn"] / "images", tmp_path / "rew",
                                   _config(world, **common, **{"cluster.k": 3, "weights.gpt": 3.0,
                                                               "normalization": "rank"}), alpha=5)
        assert all(v["computed"] == 0 for v in reweighted.report["score_runs"].values())
        assert len(server.chat_requests()) == requests_after_first
    header = next(csv.reader(open(tmp_path / "a5k3" / "scores.csv")))
    assert header[:5] == ["id", "clip", "length", "reward", "gpt"] and "final" in header and "selected" in header
    report = json.loads((tmp_path / "a5k3" / "report.json").read_text())
    assert report["config"]["cluster"]["k"] == 3 and report["scores"]["final"]["selected"]["count"] == 5


def test_select_minigpt4_keeps_format_with_plots(world, tmp_path):
    data = world["syn"] / "cc_sbu_align" / "filter_cap.json"
    original = json.loads(data.read_text())
    cfg = _config(world, "offline", plots=True, **{"cluster.k": 2})
    result = run_selection(data, world["syn"] / "cc_sbu_align", tmp_path / "out", cfg, alpha=7)
    subset = json.loads((tmp_path / "out" / "filter_cap.json").read_text())
    assert subset == {"annotations": [original["annotations"][i] for i in result.selected]}
    assert result.report["input"]["image_root"].endswith("image")
    assert result.report["clustering"]["method"] == "spectral"
    for name in ("scores.png", "clusters.png", "projection.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_random_strategy_is_seeded(world, tmp_path):
    data = world["syn"] / "stage2.json"
    a = run_selection(data, world["syn"] / "images", tmp_path / "a", _config(world, "random"), alpha=10)
    b = run_selection(data, world["syn"] / "images", tmp_path / "b", _config(world, "random"), alpha=10)
    c = run_selection(data, world["syn"] / "images", tmp_path / "c", _config(world, "random", seed=1), alpha=10)
    assert a.selected == b.selected != c.selected and len(c.selected) == 10
    assert a.report["score_runs"] == {}


def test_cli_with_precomputed_embeddings(world, tmp_path):
    data = world["syn"] / "stage2.json"
    n = len(json.loads(data.read_text()))
    rng = np.random.default_rng(0)
    np.save(tmp_path / "emb.npy", rng.standard_normal((n, 8)).astype(np.float32))
    cmd = [sys.executable, "-m", "selection.select", "--data", str(data), "--image-root", str(world["syn"] / "images"),
           "--out", str(tmp_path / "out"), "--alpha", "6", f"--config={REPO / 'configs' / 'select.py'}:length",
           f"--config.cluster.embeddings={tmp_path / 'emb.npy'}", "--config.cluster.k=2", "--config.plots=False"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "selected 6 of" in proc.stdout
    assert len(json.loads((tmp_path / "out" / "stage2.json").read_text())) == 6
    no_embeddings = get_config("length")
    with pytest.raises(SelectionConfigError, match="clip.model_dir"):
        run_selection(data, world["syn"] / "images", tmp_path / "bad", no_embeddings, alpha=6)
    with pytest.raises(SelectionConfigError, match="normalization"):
        run_selection(data, world["syn"] / "images", tmp_path / "bad", _config(world, normalization="softmax"))
    with pytest.raises(BudgetError, match="alpha"):
        run_selection(data, world["syn"] / "images", tmp_path / "bad", _config(world, "length"), alpha=n + 1)


def test_text_only_group_and_unreadable_images(world, tmp_path):
    records = json.loads((world["syn"] / "stage2.json").read_text())[:12]
    text_only = [{"id": f"txt{i}", "conversations": [
        {"from": "human", "value": f"Name a colour that starts with letter {c}."},
        {"from": "gpt", "value": f"{w.capitalize()} starts with {c}."}]}
        for i, (c, w) in enumerate([("r", "red"), ("b", "blue"), ("g", "green"), ("p", "purple")])]
    broken = {"id": "broken", "image": "missing.jpg", "conversations": records[0]["conversations"][:2]}
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records + text_only + [broken]))
    result = run_selection(data, world["syn"] / "images", tmp_path / "out", _config(world, "offline", **{"cluster.k": 2}),
                           alpha=8)
    clustering = result.report["clustering"]
    assert clustering["text_only_group"] == 4 and clustering["text_only_label"] == 2
    assert clustering["embedding_failures"] == {"image_unreadable": 1}
    # 16 clustered examples (12 images + 4 text-only) share 8 slots: the text-only group gets 8 * 4 / 16 = 2.
    assert result.report["clusters"]["2"] == {"size": 4, "eligible": 4, "allocated": 2}
    broken_index = result.keys.index("broken")
    assert result.labels[broken_index] == -1 and not result.eligible[broken_index]
    assert result.report["excluded"] == {"clip_failed": 1}
    txt = [result.keys.index(f"txt{i}") for i in range(4)]
    assert np.isnan(result.raw["clip"][txt]).all() and np.isfinite(result.final[txt]).all()
