"""The `mllm` selection score on a tiny LLaVA trained in the test (through `llava_jax.train`) on a task where the
image decides the answer: the colour of a flat picture.

Checked: a matching answer scores higher than a contradicting one under the trained model (and the reason is the
image: the blank-image term is the same for both), batched scores equal one-by-one scores, a rerun is served from
the cache (and retraining the workdir invalidates it), text-only records fail like clip's, and
`selection.select` runs with weights.mllm=1, dropping the score (and saying so) when no model is given.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selection.records import load_dataset
from selection.scores import Failure, compute_scores
from selection.select import SelectionConfigError, resolve_weights, run_selection

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
              patch_size=8, projection_dim=16)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, tie_word_embeddings=False)
TRAIN, HELD_OUT, STEPS = 64, 12, 100


def _load_config(name: str, variant: str | None):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _picture(path: Path, colour: str, rng: np.random.Generator) -> None:
    base = np.array(COLOURS[colour], np.float32)
    pixels = np.clip(base + rng.normal(0, 12, (16, 16, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def _record(rid: str, image: str, colour: str, answer_colour: str, second_turn: bool) -> dict:
    turns = [{"from": "human", "value": "<image>\nWhat colour is the picture?"},
             {"from": "gpt", "value": f"The picture is {answer_colour}."}]
    if second_turn:
        turns += [{"from": "human", "value": "Say the colour once more."},
                  {"from": "gpt", "value": f"It is {answer_colour}."}]
    return {"id": rid, "image": image, "conversations": turns}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Pictures, a training set, a held-out scoring set (each image with a matching and a contradicting answer),
    a tiny model dir and a stage-2 workdir trained on the training set."""
    from llava_jax.demo import build_model_dir
    from llava_jax.train import train

    root = tmp_path_factory.mktemp("mllm")
    data = root / "data"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    train_records, scoring = [], []
    for i in range(TRAIN + HELD_OUT):
        colour = names[i % len(names)]
        image = f"pic_{i:03d}.png"
        _picture(data / "images" / image, colour, rng)
        if i < TRAIN:
            train_records.append(_record(f"t{i}", image, colour, colour, second_turn=i % 2 == 0))
        else:
            wrong = names[(names.index(colour) + 1 + i % 3) % len(names)]
            scoring.append(_record(f"match{i}", image, colour, colour, second_turn=i % 2 == 0))
            scoring.append(_record(f"contra{i}", image, colour, wrong, second_turn=i % 2 == 0))
    for name in ("stage1.json", "stage2.json"):  # build_model_dir trains the tokenizer on these texts
        (data / name).write_text(json.dumps(train_records))
    (data / "eval.jsonl").write_text(json.dumps({"text": "What colour is the picture?"}) + "\n")
    (data / "scoring.json").write_text(json.dumps(scoring))
    build_model_dir(data, root / "model", seed=0, vision=VISION, text=TEXT, vocab=300)

    cfg = _load_config("finetune", "demo")
    cfg.init_from = str(root / "model")
    cfg.data.train_file = str(data / "stage2.json")
    cfg.data.image_root = str(data / "images")
    cfg.data.max_length = 64  # the longest record (two turns) is 60 tokens with this tokenizer
    cfg.data.bucket_lengths = (64,)
    cfg.batch_size = 16
    cfg.max_steps = STEPS
    cfg.optimizer.lr = 3e-3
    cfg.eval.file = ""
    cfg.checkpoint.every_steps = STEPS
    cfg.checkpoint.keep = 1
    cfg.checkpoint.use_async = False
    cfg.log_every = STEPS
    cfg.progress = False
    summary = train(cfg, root / "workdir")
    return {"root": root, "data": data, "images": data / "images", "model": root / "model",
            "workdir": root / "workdir", "train_cfg": cfg, "summary": summary}


def _scorer(world, model=None, **kw):
    from selection.mllm_score import MllmScorer

    return MllmScorer(str(model or world["workdir"]), world["images"], **{"batch_size": 4, "max_length": 96, **kw})


def _examples(world):
    return load_dataset(world["data"] / "scoring.json").examples


def test_matching_answer_scores_higher_than_contradicting(world):
    examples = _examples(world)
    scorer = _scorer(world)
    values = dict(zip((ex.key for ex in examples), scorer.score(examples), strict=True))
    assert all(isinstance(v, float) for v in values.values()), values
    ids = [ex.key[len("match"):] for ex in examples if ex.key.startswith("match")]
    match = np.array([values[f"match{i}"] for i in ids])
    contra = np.array([values[f"contra{i}"] for i in ids])
    # The trained model uses the picture: a supported answer gains likelihood from it, a contradicted one loses.
    assert match.mean() > contra.mean() + 0.2, (match, contra)
    assert match.mean() > 0 > contra.mean(), (match, contra)
    assert (match > contra).mean() >= 0.75, (match, contra)
    # Both answers of a picture share the prompt; the contradicting one is less likely with the image.
    detail = scorer.details
    assert np.mean([detail[f"contra{i}"].with_image < detail[f"match{i}"].with_image for i in ids]) >= 0.75
    assert all(d.tokens > 0 for d in detail.values())
    # Two-turn records score both answers: more tokens than the one-turn records.
    one = [detail[ex.key].tokens for ex in examples if len(ex.dialogue()) == 1]
    two = [detail[ex.key].tokens for ex in examples if len(ex.dialogue()) == 2]
    assert one and two and min(two) > max(one)
    assert all(len(detail[ex.key].turn_gains) == len(ex.dialogue()) for ex in examples)
    assert all(values[k] == pytest.approx(d.gain) for k, d in detail.items())


def test_batched_equals_one_by_one_and_failures(world):
    examples = _examples(world)[:7]
    text_only = load_dataset_from(world, [{"id": "txt", "conversations": [
        {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Red."}]}])
    missing = load_dataset_from(world, [_record("gone", "missing.png", "red", "red", False)], name="gone.json")
    batched = _scorer(world, batch_size=4).score(examples + text_only + missing)
    single = _scorer(world, batch_size=1)
    one_by_one = [single.score([ex])[0] for ex in examples]
    np.testing.assert_allclose(batched[:7], one_by_one, rtol=1e-4, atol=1e-4)
    assert isinstance(batched[7], Failure) and batched[7].reason.startswith("text_only")
    assert isinstance(batched[8], Failure) and batched[8].reason.startswith("image_unreadable")
    # Against the trainer's loss on the same tokens: the summed answer log-probabilities with the image, and with
    # the blank image as the image, are minus its summed cross entropy.
    scorer = _scorer(world, batch_size=4)
    scorer.score(examples[:2])
    check_against_training_loss(scorer, examples[:2])
    # A single-turn template (stage 1's plain) scores a two-turn record's answers joined into one text.
    plain = _scorer(world, template="plain")
    two_turn = [ex for ex in examples if len(ex.dialogue()) == 2][:2]
    assert two_turn and all(isinstance(v, float) for v in plain.score(two_turn))
    assert all(plain.details[ex.key].tokens > len(ex.answer.split()) for ex in two_turn)


def check_against_training_loss(scorer, examples):
    import jax.numpy as jnp

    from llava_jax.data import conversation, images
    from llava_jax.data.pipeline import collate
    from llava_jax.loss import llava_loss
    from selection.mllm_score import _conversation

    loaded = scorer._load()
    cfg = loaded.config
    for ex in examples:
        enc = conversation.encode({"conversations": _conversation(ex)}, "vicuna_v1", loaded.tokenizer,
                                  cfg.num_image_tokens, cfg.image_token_id, 96, has_image=True)
        pixels = images.load_and_preprocess(scorer.image_root / ex.image, loaded.image_config)
        detail = scorer.details[ex.key]
        for image, mean_log_prob in ((pixels, detail.with_image), (images.blank_image(loaded.image_config),
                                                                   detail.with_blank)):
            batch = collate([{"input_ids": enc.input_ids, "labels": enc.labels, "pixel_values": image,
                              "has_image": True}], (96,), loaded.tokenizer.pad_token_id)
            total, count = llava_loss(loaded.model, {k: jnp.asarray(v) for k, v in batch.items()},
                                      budget_fraction=None)
            assert int(count) == detail.tokens
            assert -float(total) / float(count) == pytest.approx(mean_log_prob, abs=1e-4)


def load_dataset_from(world, records, name="extra.json"):
    path = world["root"] / name
    path.write_text(json.dumps(records))
    return load_dataset(path).examples


def test_cache_hits_on_rerun_and_model_change_invalidates(world, tmp_path):
    from selection.mllm_score import model_fingerprint, trained_template

    examples = _examples(world)[:6]
    first = compute_scores(_scorer(world), examples, tmp_path)
    assert first.computed == 6 and first.cached == 0 and not first.errors
    again = compute_scores(_scorer(world), examples, tmp_path)
    assert again.computed == 0 and again.cached == 6
    np.testing.assert_array_equal(first.values, again.values)
    # The untrained base model is another model: its scores are computed afresh and differ.
    base = compute_scores(_scorer(world, model=world["model"]), examples, tmp_path)
    assert base.computed == 6 and not np.allclose(base.values, first.values)
    # A workdir's fingerprint follows its checkpoints by content (and the model it started from): a copy has the
    # same checkpoints; a checkpoint written again (another run, same shapes and step) is another model.
    before = model_fingerprint(world["workdir"])
    assert before["checkpoints"] and before["base"]["files"]
    copy = tmp_path / "copy"
    shutil.copytree(world["workdir"], copy)
    assert model_fingerprint(copy)["checkpoints"] == before["checkpoints"]
    meta = copy / "checkpoints" / str(STEPS) / "_CHECKPOINT_METADATA"
    stamp = json.loads(meta.read_text())
    meta.write_text(json.dumps({**stamp, "commit_timestamp_nsecs": stamp["commit_timestamp_nsecs"] + 1}))
    assert model_fingerprint(copy)["checkpoints"] != before["checkpoints"]
    # The default template of a workdir is the one it was trained with (stage 1: plain).
    assert trained_template(world["workdir"]) == "vicuna_v1" and trained_template(world["model"]) is None
    run = json.loads((copy / "run.json").read_text())
    run["config"]["data"]["template"] = "plain"
    (copy / "run.json").write_text(json.dumps(run))
    assert trained_template(copy) == "plain"


def test_select_with_mllm_weight_and_dropped_without_model(world, tmp_path):
    data = world["data"] / "scoring.json"
    cfg = _load_config("select", "mllm")
    cfg.mllm.model_dir = str(world["workdir"])
    cfg.mllm.batch_size = 4
    cfg.mllm.max_length = 96
    cfg.cluster.k = 1
    cfg.dedupe_answers = False  # pictures of one colour share their answer texts here
    cfg.plots = False
    cfg.cache_dir = str(tmp_path / "cache")
    result = run_selection(data, world["images"], tmp_path / "sel", cfg, alpha=HELD_OUT)
    assert result.report["weights"] == {"mllm": 1.0} and result.report["dropped_scores"] == {}
    chosen = {result.keys[i] for i in result.selected}
    # Half the records contradict their picture; the mllm ranking keeps mostly the matching ones.
    assert sum(k.startswith("match") for k in chosen) >= 0.75 * HELD_OUT, chosen
    assert result.report["score_runs"]["mllm"]["computed"] == 2 * HELD_OUT

    # The command line: the cached scores are reused, the subset is the same.
    cmd = [sys.executable, "-m", "selection.select", "--data", str(data), "--image-root", str(world["images"]),
           "--out", str(tmp_path / "cli"), "--alpha", str(HELD_OUT), f"--config={REPO / 'configs' / 'select.py'}:mllm",
           f"--config.mllm.model_dir={world['workdir']}", "--config.mllm.batch_size=4",
           "--config.mllm.max_length=96", "--config.cluster.k=1", "--config.plots=False",
           "--config.dedupe_answers=False",
           f"--config.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert report["score_runs"]["mllm"] == {"computed": 0, "cached": 2 * HELD_OUT, "failed": 0, "failures": {}}
    subset = json.loads((tmp_path / "cli" / "scoring.json").read_text())
    assert sorted(r["id"] for r in subset) == sorted(chosen)

    # Without a model dir the weighted mllm (and reward) scores are dropped and reported, never an error ...
    default = _load_config("select", None)
    default.cluster.k = 1
    default.weights.gpt = 0.0
    weights, dropped = resolve_weights(default)
    assert set(dropped) == {"clip", "reward", "mllm"} and weights == {"length": 1.0}
    assert "mllm.model_dir" in dropped["mllm"]
    plain = run_selection(data, world["images"], tmp_path / "nomodel", default, alpha=4)
    assert plain.report["dropped_scores"] == dropped and "mllm" not in plain.report["score_runs"]
    # ... unless no weighted score is left.
    alone = _load_config("select", "mllm")
    alone.cluster.k = 1
    with pytest.raises(SelectionConfigError, match="mllm.model_dir"):
        run_selection(data, world["images"], tmp_path / "none", alone, alpha=4)
    alone.mllm.model_dir = str(tmp_path / "no_such_model")
    with pytest.raises(SelectionConfigError, match="not found"):
        run_selection(data, world["images"], tmp_path / "none", alone, alpha=4)
    alone.mllm.model_dir, alone.mllm.dtype = str(world["workdir"]), "float16"
    with pytest.raises(SelectionConfigError, match="mllm.dtype"):
        run_selection(data, world["images"], tmp_path / "none", alone, alpha=4)
