"""CLIP contrastive training (llava_jax.clip_train) and its HF CLIPModel export (convert clip-to-hf), on tiny towers
and a small synthetic world: the loss against transformers' CLIPModel, training lowers it, exact resume, the
export loads in transformers with equal embeddings and serves as selection's CLIP directory, the CLI's errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax import clip_train
from llava_jax.convert.clip_export import clip_to_hf, load_clip_any
from llava_jax.data import clip_pairs

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "clip.py"


def _config_module(name: str):
    """configs/NAME.py loaded by path (configs/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"clip_test_cfg_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(data: Path, **overrides):
    """configs/clip.py:synthetic shrunk to a few seconds: 1-layer 32-wide towers, batch 16, 6 steps; the logit
    scale starts above CLIP's clamp."""
    c = _config_module("clip").get_config("synthetic")
    c.model.vision.hidden_size = c.model.text.hidden_size = 32
    c.model.vision.intermediate_size = c.model.text.intermediate_size = 64
    c.model.vision.num_hidden_layers = c.model.text.num_hidden_layers = 1
    c.model.text.max_position_embeddings = 48
    c.model.projection_dim = 16
    c.model.logit_scale_init = 6.0  # above log(100): the first step must clamp it
    c.data.captions = str(data / "coco" / "captions.json")
    c.data.image_root = str(data / "images")
    c.data.num_holdout = 8
    c.data.workers = 2
    c.batch_size = 16
    c.max_steps = 6
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_ratio = 0.0
    c.checkpoint.every_steps = 3
    c.checkpoint.use_async = False
    c.log_every = 1
    c.progress = False
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from llava_jax.data.synthetic import generate

    root = tmp_path_factory.mktemp("clip_world")
    generate(root / "data", num=56, seed=3, num_eval=0, image_size=32)
    return root


@pytest.fixture(scope="module")
def trained(world):
    """One uninterrupted 6-step run (shared by the tests that read a finished workdir)."""
    workdir = world / "run_full"
    summary = clip_train.train(tiny_config(world / "data"), workdir)
    return workdir, summary


def _fixed_batch(world, tokenizer, context):
    pairs = clip_pairs.read_pairs(world / "data" / "coco" / "captions.json")
    from llava_jax.data.images import ImageConfig

    loader = clip_pairs.ImageLoader(world / "data" / "images", ImageConfig(size=32, crop_size=32, aspect="crop"))
    batches = clip_pairs.PairBatches(pairs, loader, tokenizer, context, global_batch=16, seed=99)
    return {k: jnp.asarray(v) for k, v in next(batches).items()}


# ------------------------------------------------------------------------------------------------ the loss


def test_loss_matches_transformers_clip_and_hand_written_infonce(tmp_path):
    torch = pytest.importorskip("torch")
    from llava_jax.convert.model_dir import load_clip
    from llava_jax.tiny import make_hf_clip

    hf = make_hf_clip(tmp_path / "clip", seed=1, text_vocab=99)
    ours, _, _ = load_clip(tmp_path / "clip")
    rng = np.random.default_rng(0)
    b, t = 6, 12
    ids = rng.integers(3, 99, size=(b, t)).astype(np.int32)
    lengths = rng.integers(4, t + 1, size=b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    pixels = rng.standard_normal((b, 32, 32, 3)).astype(np.float32)
    loss, per_text = clip_train.clip_loss(ours, {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
                                                 "pixel_values": jnp.asarray(pixels)})
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                 pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), return_loss=True)
    np.testing.assert_allclose(np.asarray(per_text), out.logits_per_text.numpy(), atol=1e-4, rtol=1e-5)
    assert float(loss) == pytest.approx(float(out.loss), abs=1e-5)
    # by hand: mean of the row-wise and column-wise cross-entropies with the diagonal as targets
    z = np.asarray(per_text, np.float64)

    def xent(m):
        m = m - m.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(m).sum(axis=1)) - np.diag(m)))

    assert float(loss) == pytest.approx(0.5 * (xent(z) + xent(z.T)), abs=1e-5)
    assert float(clip_train.contrastive_loss(jnp.eye(4) * 50.0)) < 1e-6  # perfectly separated batch: ~0


# ------------------------------------------------------------------------------------------------ training


def test_training_lowers_the_loss_and_writes_metrics_and_eval(world, trained):
    from llava_jax.convert.model_dir import load_clip

    workdir, summary = trained
    assert summary["steps"] == 6 and not summary["preempted"]
    init, tokenizer, _ = load_clip(workdir / "init")
    final, _, _ = load_clip_any(workdir)
    batch = _fixed_batch(world, tokenizer, 48)
    before = float(clip_train.clip_loss(init, batch)[0])
    after = float(clip_train.clip_loss(final, batch)[0])
    assert after < before - 0.1, (before, after)
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(0 < r["logit_scale"] <= 100.0 + 1e-3 for r in rows)
    assert rows[0]["logit_scale"] == pytest.approx(100.0, rel=1e-5)  # exp(6) ~ 403 clamped at log(100) at once
    result = json.loads((workdir / "eval.json").read_text())
    assert result["n"] == 8 and result["step"] == 6
    assert 0 <= result["i2t_top1"] <= result["i2t_top5"] <= 1 and 0 < result["chance"] < 1
    assert (workdir / "tb").is_dir() and json.loads((workdir / "run.json").read_text())["model"] == "clip"


@pytest.mark.slow  # ~21 s; the trainer's own exact-resume test (test_train_cli.py) covers the shared machinery
def test_resume_after_interruption_continues_exactly(world, trained, tmp_path):
    full_dir, _ = trained
    workdir = tmp_path / "run"
    first = clip_train.train(tiny_config(world / "data", **{"debug.preempt_at_step": 4}), workdir)
    assert first == {"steps": 4, "loss": pytest.approx(first["loss"]), "preempted": True}
    assert not (workdir / "eval.json").exists()
    second = clip_train.train(tiny_config(world / "data"), workdir)
    assert second["steps"] == 6
    losses = [json.loads(x)["loss"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(x)["loss"] for x in (full_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6
    np.testing.assert_allclose(losses, reference, rtol=1e-5, atol=1e-6)
    a, _, _ = load_clip_any(workdir)
    b, _, _ = load_clip_any(full_dir)
    for (path, x), (_, y) in zip(nnx.to_flat_state(nnx.state(a, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(b, nnx.Param)), strict=True):
        np.testing.assert_allclose(np.asarray(x.get_value()), np.asarray(y.get_value()), atol=1e-5,
                                   err_msg=str(path))
    assert json.loads((workdir / "eval.json").read_text()) == json.loads((full_dir / "eval.json").read_text())


# ------------------------------------------------------------------------------------------------ export


def test_export_loads_in_transformers_with_equal_embeddings(world, trained, tmp_path):
    torch = pytest.importorskip("torch")
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

    workdir, _ = trained
    out = clip_to_hf(workdir, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= \
        {p.name for p in out.iterdir()}
    ours, tokenizer, image_config = load_clip_any(workdir)
    hf = CLIPModel.from_pretrained(out).eval()
    processor = CLIPProcessor.from_pretrained(out)
    assert isinstance(processor.tokenizer, CLIPTokenizer)
    names = sorted(p.name for p in (world / "data" / "images").iterdir())[:4]
    images = [Image.open(world / "data" / "images" / n).convert("RGB") for n in names]
    captions = [c["caption"] for c in json.loads((world / "data" / "coco" / "captions.json").read_text())
                ["annotations"][:4]]
    inputs = processor(text=captions, images=images, return_tensors="pt", padding=True, truncation=True,
                       max_length=48)
    with torch.no_grad():
        result = hf(**inputs)
    image_emb = ours.image_embeds(jnp.asarray(inputs["pixel_values"].permute(0, 2, 3, 1).numpy()))
    text_emb = ours.text_embeds(jnp.asarray(inputs["input_ids"].numpy()), jnp.asarray(inputs["attention_mask"].numpy()))
    # transformers' outputs are normalised embeddings
    np.testing.assert_allclose(np.asarray(image_emb / jnp.linalg.norm(image_emb, axis=-1, keepdims=True)),
                               result.image_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(text_emb / jnp.linalg.norm(text_emb, axis=-1, keepdims=True)),
                               result.text_embeds.numpy(), atol=1e-5)
    assert float(hf.logit_scale.detach()) == pytest.approx(float(ours.logit_scale[...]), abs=1e-6)
    # the processor's pixels and ids are what our loader and tokenizer give
    from llava_jax.data.images import load_and_preprocess

    ours_pixels = np.stack([load_and_preprocess(world / "data" / "images" / n, image_config) for n in names])
    np.testing.assert_allclose(inputs["pixel_values"].permute(0, 2, 3, 1).numpy(), ours_pixels, atol=1e-5)
    assert inputs["input_ids"][0, : int(inputs["attention_mask"][0].sum())].tolist() == tokenizer(captions[0])["input_ids"]


def test_export_is_a_selection_clip_model_dir(world, trained, tmp_path):
    from selection.clip_score import ClipEncoder
    from selection.select import run_selection

    workdir, _ = trained
    out = clip_to_hf(workdir, tmp_path / "hf")
    ours, _, image_config = load_clip_any(workdir)
    encoder = ClipEncoder(str(out), batch_size=4)
    names = sorted(p.name for p in (world / "data" / "images").iterdir())[:3]
    pixels = np.stack([x for x in encoder.load_images([str(world / "data" / "images" / n) for n in names])])
    emb = np.asarray(ours.image_embeds(jnp.asarray(pixels)))
    np.testing.assert_allclose(encoder.embed_pixels(pixels), emb / np.linalg.norm(emb, axis=-1, keepdims=True),
                               atol=1e-5)
    config = _config_module("select").get_config("default")
    config.clip.model_dir = str(out)
    config.clip.batch_size = 8
    for name in list(config.weights):
        config.weights[name] = 1.0 if name in ("clip", "length") else 0.0
    config.cluster.k = 3
    config.plots = False
    result = run_selection(world / "data" / "stage2.json", world / "data" / "images", tmp_path / "sel", config,
                           alpha=10)
    assert len(result.selected) == 10
    assert np.isfinite(result.raw["clip"]).all() and len(result.report["clusters"]) == 3


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_reports_a_bad_captions_file_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "llava_jax.clip_train", f"--config={CONFIG}:synthetic", f"--workdir={tmp_path / 'w'}",
         f"--config.data.captions={tmp_path / 'missing.json'}", f"--config.data.image_root={tmp_path}"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "missing.json" in lines[0] and "Traceback" not in proc.stderr


def test_cli_vit_l14_without_a_local_clip_dir_is_a_config_error(world, tmp_path):
    data = world / "data"
    proc = subprocess.run(
        [sys.executable, "-m", "llava_jax.clip_train", f"--config={CONFIG}:vit_l14", f"--workdir={tmp_path / 'w'}",
         f"--config.data.captions={data / 'coco' / 'captions.json'}", f"--config.data.image_root={data / 'images'}",
         "--config.data.num_holdout=8"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "openai/clip-vit-large-patch14" in lines[0] and "Traceback" not in proc.stderr


def test_pairs_read_coco_and_llava_records_and_split(world):
    coco = clip_pairs.read_pairs(world / "data" / "coco" / "captions.json")
    llava = clip_pairs.read_pairs(world / "data" / "stage1.json")
    assert len(coco) == len(llava) == 56
    assert all(len(p.captions) == 5 for p in coco) and all(len(p.captions) == 1 for p in llava)
    assert {p.image for p in coco} == {p.image for p in llava}
    for p in llava[:10]:  # the stage-1 caption is one of the COCO captions of the same image
        assert p.captions[0] in {c for q in coco if q.image == p.image for c in q.captions}
    train, held = clip_pairs.split_holdout(coco, 8)
    assert len(held) == 8 and not {p.image for p in train} & {p.image for p in held}
    assert clip_pairs.split_holdout(list(reversed(coco)), 8)[1] == held  # independent of file order
    with pytest.raises(clip_pairs.PairsError):
        clip_pairs.split_holdout(coco, 56)
    # two sources, each with its root: cc_sbu_align/image/* link to images/*, so each image gets 5 + 1 captions
    data = world / "data"
    both = clip_pairs.read_sources(f"{data / 'coco' / 'captions.json'},{data / 'cc_sbu_align' / 'filter_cap.json'}",
                                   [str(data / "images"), str(data / "cc_sbu_align")])
    assert len(both) == 56 and all(len(p.captions) == 6 for p in both)
    assert all(Path(p.image).parent == (data / "images").resolve() for p in both)
    with pytest.raises(clip_pairs.PairsError, match="image roots"):
        clip_pairs.read_sources([str(data / "stage1.json")] * 3, "a,b")


def test_retrieval_metrics_count_identical_captions_as_right():
    emb = np.eye(3, dtype=np.float32)
    texts = ["a", "b", "a"]  # images 0 and 2 show the same scene
    captions = [["a"], ["b"], ["a"]]
    swapped = emb[[2, 1, 0]]  # image 0 retrieves text 2 and vice versa: same caption, still right
    m = clip_train.retrieval_metrics(emb, swapped, texts, captions, ks=(1,))
    assert m["i2t_top1"] == 1.0 and m["t2i_top1"] == 1.0 and m["chance"] == pytest.approx(5 / 9)
    wrong = emb[[1, 0, 2]]
    m = clip_train.retrieval_metrics(emb, wrong, texts, captions, ks=(1,))
    assert m["i2t_top1"] == pytest.approx(1 / 3)


def test_clip_tokenizer_is_deterministic_and_clip_shaped():
    from llava_jax.tiny import CLIP_BOS, CLIP_EOS, build_clip_tokenizer

    texts = ["A red circle is in the top left corner.", "There are two shapes: a blue square and a red cross."] * 3
    a, b = build_clip_tokenizer(texts), build_clip_tokenizer(list(reversed(texts)))
    assert a.get_vocab() == b.get_vocab()  # a function of the texts alone (ties never random)
    ids = a("A RED circle!  Zebra 42")["input_ids"]
    assert ids[0] == a.convert_tokens_to_ids(CLIP_BOS) and ids[-1] == a.convert_tokens_to_ids(CLIP_EOS)
    assert a.eos_token_id == a.pad_token_id == len(a) - 1 and a.bos_token_id == len(a) - 2
    assert "red</w>" in a.get_vocab() and a.convert_ids_to_tokens(ids[2]) == "red</w>"
    assert a.decode(ids, skip_special_tokens=True) == "a red circle ! zebra 4 2"  # CLIP's lower-cased split
