"""Sequence packing (`data.packing`): packed batches hold the same samples as unpacked ones (cut the same way,
images and text mixed), resume exactly, and give the same per-sample losses and gradients; every attention
implementation keeps packed samples apart (XLA with its hand-written backward, the cuDNN path's inputs, the
Pallas TPU kernel in interpret mode)."""

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from llava_jax.data import images, pipeline, synthetic
from llava_jax.data.conversation import IGNORE_INDEX
from llava_jax.loss import llava_loss
from llava_jax.models import attention as A
from llava_jax.models.clip import CLIPVisionConfig
from llava_jax.models.llama import LlamaConfig, LlamaForCausalLM, segment_positions
from llava_jax.models.llava import LlavaConfig, build_llava
from llava_jax.tiny import build_tokenizer, tiny_clip_vision_kwargs, tiny_llama_kwargs

N_IMG = 4  # 16 x 16 images, 8 x 8 patches
IMAGE_CFG = images.ImageConfig(size=16, crop_size=16)
LONG_TURNS = 12  # the over-long record: this many question / answer pairs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A LLaVA JSON mixing image records, text-only records and one record longer than any row."""
    out = tmp_path_factory.mktemp("packing")
    synthetic.generate(out, num=16, seed=4, num_eval=0, image_size=32)
    recs = json.loads((out / "stage2.json").read_text())
    mixed = []
    for i, r in enumerate(recs):
        r = json.loads(json.dumps(r))
        r["conversations"] = r["conversations"][:2]  # single turn: short samples, several per row
        if i % 3 == 1:  # text only
            r.pop("image")
            r["conversations"][0]["value"] = r["conversations"][0]["value"].replace("<image>", "").strip()
        mixed.append(r)
    long = json.loads(json.dumps(recs[0]))
    long["conversations"] = (long["conversations"][:2] * LONG_TURNS)
    long["conversations"][2:] = [dict(t, value=t["value"].replace("<image>", "").strip())
                                 for t in long["conversations"][2:]]
    mixed.insert(2, long)
    (out / "mixed.json").write_text(json.dumps(mixed))
    tok = build_tokenizer([t["value"] for r in recs for t in r["conversations"]], vocab_size=300)
    return out, tok


def _iter(data, batch=2, seed=0, **kw):
    out, tok = data
    cfg = {"data": str(out / "mixed.json"), "image_root": str(out / "images"), "template": "vicuna_v1",
           "system": "", "max_length": 96, "read_threads": 1, "shuffle": False, "packing": True}
    cfg.update(kw)
    return pipeline.make_train_iterator(cfg, tok, IMAGE_CFG, N_IMG, tok.convert_tokens_to_ids("<image>"), batch,
                                        0, 1, seed)


def _samples(batch):
    """The samples of a packed batch: [(input_ids, labels, pixels or None)] in row order."""
    found = []
    for i in range(batch["input_ids"].shape[0]):
        for s in range(1, batch["segment_ids"][i].max() + 1):
            at = batch["segment_ids"][i] == s
            slot = np.flatnonzero(batch["has_image"][i] == s)
            found.append((batch["input_ids"][i, at], batch["labels"][i, at],
                          batch["pixel_values"][i, slot[0]] if slot.size else None))
    return found


def test_packed_rows_hold_the_unpacked_samples_mixed_and_cut_alike(data):
    tok = data[1]
    img_id = tok.convert_tokens_to_ids("<image>")
    first = list(_iter(data, num_epochs=1, pack_rows=2))  # one epoch, packs of one batch
    want = []
    for b in _iter(data, num_epochs=1, packing=False, batch=1):
        t = int(b["attention_mask"][0].sum())
        want.append((b["input_ids"][0, :t], b["labels"][0, :t], b["pixel_values"][0] if b["has_image"][0] else None))
    got = [s for b in first for s in _samples(b)]

    def key(s):  # tokens, labels after the first, image
        return s[0].tobytes(), s[1][1:].tobytes(), b"" if s[2] is None else s[2].tobytes()

    assert len(want) - 5 <= len(got) <= len(want) and len(got) > 2 * len(first) * 2  # only a last partial batch
    left = collections.Counter(key(w) for w in want)  # is dropped; several samples per row
    for g in got:
        assert left[key(g)] > 0  # the same tokens, labels and image as an unpacked sample
        left[key(g)] -= 1
        assert g[1][0] == IGNORE_INDEX
        assert (g[0] == img_id).sum() == (0 if g[2] is None else N_IMG)
    # the over-long record fills a row of its own, cut at max_length like the unpacked sample
    assert any(len(s[0]) == 96 for s in got)
    mixed_rows = 0
    for b in first:
        assert b["input_ids"].shape == b["segment_ids"].shape == b["positions"].shape == (2, 96)
        for i in range(2):
            seg, pos = b["segment_ids"][i], b["positions"][i]
            assert np.array_equal(b["attention_mask"][i], (seg > 0).astype(np.int32))
            assert np.array_equal(pos[seg > 0], np.asarray(segment_positions(jnp.asarray(seg[None])))[0][seg > 0])
            assert all(pos[np.argmax(seg == s)] == 0 for s in range(1, seg.max() + 1))
            owners = set(b["has_image"][i][b["has_image"][i] > 0])
            text_only = set(range(1, seg.max() + 1)) - owners
            mixed_rows += bool(owners) and bool(text_only)
    assert mixed_rows  # images and text-only samples share a row


def test_resume_with_packing_gives_exactly_the_uninterrupted_batches(data):
    reference = _iter(data, seed=3, pack_rows=4, shuffle=True)
    states, batches = [], []
    for _ in range(9):  # several packs of two batches each, across epochs
        states.append(json.loads(json.dumps(reference.get_state())))
        batches.append(next(reference))
    assert any(s["pipeline"]["emitted"] == 1 for s in states)  # some states are mid-pack
    assert any(s["pipeline"]["carry"] for s in states)  # and some packs begin with carried examples
    for k in (0, 1, 4, 7):
        resumed = _iter(data, seed=3, pack_rows=4, shuffle=True)
        resumed.set_state(states[k])
        for j in range(k, 9):
            b = next(resumed)
            assert b.keys() == batches[j].keys() and all(np.array_equal(b[x], batches[j][x]) for x in b), (k, j)
    assert reference.stats()["seen"] == resumed.stats()["seen"]
    again = _iter(data, seed=3, pack_rows=4, shuffle=True)
    assert all(np.array_equal(next(again)["input_ids"], b["input_ids"]) for b in batches[:3])  # same seed, same rows


def _model(tok):
    cfg = LlavaConfig(vision=CLIPVisionConfig(**tiny_clip_vision_kwargs(image_size=16, patch_size=8,
                                                                         num_hidden_layers=2)),
                      text=LlamaConfig(**tiny_llama_kwargs(len(tok), num_hidden_layers=1)),
                      image_token_id=tok.convert_tokens_to_ids("<image>"))
    model = build_llava(cfg, seed=1)
    assert cfg.num_image_tokens == N_IMG
    return model


def _losses_and_grads(model):
    """jitted batch -> (per predicted position losses [B, T - 1], gradients of the mean supervised loss)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def run(params, batch):
        m = nnx.merge(graphdef, params, rest)
        kw = {"segment_ids": batch["segment_ids"], "positions": batch["positions"]} if "segment_ids" in batch else {}
        logits, _ = m(batch["input_ids"], batch["pixel_values"], batch["has_image"], batch["attention_mask"], **kw)
        t = batch["labels"][:, 1:]
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.where(t == IGNORE_INDEX, 0, t)[..., None], axis=-1)[..., 0]

        def mean_loss(p):
            total, count = llava_loss(nnx.merge(graphdef, p, rest), batch)
            return total / count

        return jnp.where(t == IGNORE_INDEX, 0.0, nll), jax.grad(mean_loss)(params)

    return lambda batch: run(params, batch)


def test_packed_batch_gives_the_unpacked_losses_and_gradients(data):
    tok = data[1]
    packed = {k: jnp.asarray(v) for k, v in next(_iter(data, pack_rows=2, num_epochs=1)).items()}
    samples = _samples({k: np.asarray(v) for k, v in packed.items()})
    assert len(samples) >= 4 and any(s[2] is None for s in samples) and any(s[2] is not None for s in samples)
    rows = [{"input_ids": s[0], "labels": np.where(np.arange(len(s[0])) == 0, IGNORE_INDEX, s[1]),
             "pixel_values": s[2] if s[2] is not None else images.blank_image(IMAGE_CFG),
             "has_image": s[2] is not None} for s in samples]
    unpacked = {k: jnp.asarray(v) for k, v in pipeline.collate(rows, (96,), tok.pad_token_id).items()}
    run = _losses_and_grads(_model(tok))

    per_token, g_packed = run(packed)
    per_token = np.asarray(per_token)
    seg = np.asarray(packed["segment_ids"])[:, 1:]  # the segment of each predicted position
    got = [per_token[i][seg[i] == s].sum() for i in range(seg.shape[0]) for s in range(1, seg[i].max() + 1)]
    unpacked_tokens, g_unpacked = run(unpacked)
    want = np.asarray(unpacked_tokens).sum(axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(want > 0)

    worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_unpacked),
                                                                 strict=True))
    assert worst <= 1e-5
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_packed)) > 1e-3  # not trivially equal


# ------------------------------------------------------------------------------------------------ attention

SEGMENTS = np.array([[1] * 40 + [2] * 50 + [3] * 30 + [0] * 8,
                     [1] * 128])  # a packed row with padding, and a full single-sample row (the flash block)
SHORT = np.array([[1] * 10 + [2] * 12 + [3] * 6 + [0] * 4, [1] * 32])


def _qkv(t, kv=2, g=2, h=16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(2, t, kv * g, h)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, t, kv, h)), jnp.float32) for _ in range(2))
    return q, k, v


def _separately(q, k, v, seg):
    """Reference: each segment attended on its own (plain causal softmax), padding left at zero."""
    out = jnp.zeros_like(q)
    rep = q.shape[2] // k.shape[2]
    for i in range(seg.shape[0]):
        for s in range(1, seg[i].max() + 1):
            at = np.flatnonzero(seg[i] == s)
            qs, ks, vs = q[i, at], jnp.repeat(k[i, at], rep, axis=1), jnp.repeat(v[i, at], rep, axis=1)
            sc = jnp.einsum("tnh,snh->nts", qs, ks) / np.sqrt(q.shape[-1])
            sc = jnp.where(np.tril(np.ones((len(at), len(at)), bool)), sc, -jnp.inf)
            out = out.at[i, at].set(jnp.einsum("nts,snh->tnh", jax.nn.softmax(sc, axis=-1), vs))
    return out


def _check(attend, seg, atol=1e-5):
    q, k, v = _qkv(seg.shape[1])
    weight = jnp.asarray(seg > 0, jnp.float32)[:, :, None, None]  # padding outputs are never used

    def value_and_grads(fn):
        def loss(q, k, v):
            return jnp.sum(jnp.sin(fn(q, k, v)) * weight)
        return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)

    got, got_grads = value_and_grads(attend)
    want, want_grads = value_and_grads(lambda q, k, v: _separately(q, k, v, seg))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, e in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("pieces", [1, 2])
def test_xla_attention_and_its_backward_keep_segments_apart(pieces):
    mask = A.segment_mask(jnp.asarray(SHORT))
    _check(lambda q, k, v: A.xla_attention(q, k, v, mask, pieces=pieces), SHORT)


def test_cudnn_path_gets_the_segment_mask(monkeypatch):
    """cuDNN cannot run on CPU: the inputs its path builds are checked by running them through XLA's
    `jax.nn.dot_product_attention`."""
    seen = []
    original = jax.nn.dot_product_attention

    def recorder(q, k, v, mask=None, implementation=None):
        seen.append((implementation, mask))
        return original(q, k, v, mask=mask, implementation="xla")

    mask = A.segment_mask(jnp.asarray(SHORT))
    monkeypatch.setattr(A.jax.nn, "dot_product_attention", recorder)
    _check(lambda q, k, v: A.attention_fn("cudnn", causal=True)(q, k, v, mask, segment_ids=SHORT), SHORT)
    assert seen and all(impl == "cudnn" and m.shape == mask.shape for impl, m in seen)


def test_flash_tpu_kernel_keeps_segments_apart():
    with pltpu.force_tpu_interpret_mode():
        _check(lambda q, k, v: A.attention_fn("flash_tpu")(q, k, v, None, segment_ids=jnp.asarray(SEGMENTS)),
               SEGMENTS, atol=2e-5)


@pytest.mark.slow
def test_decoder_with_segments_equals_each_sample_alone(monkeypatch):
    """The whole decoder on packed rows (segment mask and positions built by llama.py) with each attention
    implementation gives every sample's logits as that sample alone; cuDNN's call runs through XLA here."""
    monkeypatch.setattr(A, "cudnn_attention", lambda q, k, v, mask: jax.nn.dot_product_attention(
        q, k, v, mask=mask, implementation="xla"))
    cfg = LlamaConfig(**tiny_llama_kwargs(64, num_hidden_layers=1))
    ids = jnp.asarray(np.random.default_rng(2).integers(3, 64, size=SEGMENTS.shape), jnp.int32)
    seg = jnp.asarray(SEGMENTS)
    alone = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    want = {}
    for i in range(2):
        for s in range(1, SEGMENTS[i].max() + 1):
            at = np.flatnonzero(SEGMENTS[i] == s)
            want[i, s] = (at, np.asarray(alone(ids[i:i + 1, at])[0])[0])
    run = nnx.jit(lambda m, ids, seg: m(ids, attention_mask=(seg > 0).astype(jnp.int32), segment_ids=seg)[0])
    for impl in ("xla", "cudnn", "flash_tpu"):
        model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0), attention_impl=impl)
        if impl == "flash_tpu":
            with pltpu.force_tpu_interpret_mode():
                got = np.asarray(run(model, ids, seg))
        else:
            got = np.asarray(run(model, ids, seg))
        for (i, _), (at, expected) in want.items():
            np.testing.assert_allclose(got[i, at], expected, rtol=1e-4, atol=1e-4, err_msg=impl)


def test_configs_turn_packing_on_for_7b_and_13b():
    import importlib.util

    from llava_jax import train_config

    def load(name):
        spec = importlib.util.spec_from_file_location(name, f"configs/{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    for name in ("finetune", "pretrain"):
        module = load(name)
        for variant in ("7b", "13b"):
            cfg = module.get_config(variant)
            assert cfg.data.packing and cfg.data.max_length % A.FLASH_BLOCK == 0
            train_config.check_attention_impl(cfg)
        assert not module.get_config("demo").data.packing
    cfg = load("finetune").get_config("7b")
    with cfg.unlocked():
        cfg.data.bucket_lengths = (1000,)  # unused when packing: rows are max_length long
    train_config.check_attention_impl(cfg)


@pytest.mark.slow
def test_trainer_resume_with_packing_is_exact(tmp_path):
    """The trainer (packed batches, gradient accumulation 2): a run stopped at step 3 and resumed to 6 logs the
    uninterrupted run's losses (constant learning rate, so the stop does not change the schedule)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from llava_jax.demo import build_model_dir

    synthetic.generate(tmp_path / "data", num=48, seed=0, num_eval=4, image_size=16)
    build_model_dir(tmp_path / "data", tmp_path / "model", seed=0,
                    vision=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                image_size=16, patch_size=8, projection_dim=16),
                    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False),
                    vocab=160)
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def run(workdir, steps):
        cmd = [sys.executable, "-m", "llava_jax.train", f"--config={repo / 'configs' / 'pretrain.py'}:demo",
               f"--workdir={workdir}", f"--config.init_from={tmp_path / 'model'}",
               f"--config.data.train_file={tmp_path / 'data' / 'stage1.json'}",
               f"--config.data.image_root={tmp_path / 'data' / 'images'}", "--config.trainable=^projector/",
               "--config.batch_size=4", "--config.grad_accum_steps=2", "--config.data.max_length=96",
               "--config.data.packing=True", "--config.data.pack_rows=8", "--config.checkpoint.every_steps=2",
               "--config.log_every=1", "--config.progress=False", "--config.optimizer.schedule=constant",
               "--config.optimizer.warmup_ratio=0", f"--config.max_steps={steps}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        return {r["step"]: r["loss"] for r in rows}

    reference = run(tmp_path / "ref", 6)
    run(tmp_path / "resumed", 3)
    resumed = run(tmp_path / "resumed", 6)
    assert sorted(resumed) == sorted(reference) == list(range(1, 7))
    assert all(resumed[s] == reference[s] for s in range(4, 7)), (resumed, reference)
