"""LoRA fine-tuning: adapters with B = 0 leave the model unchanged; after training steps the merged model equals the
unmerged one and the frozen weights are bit-identical; the PEFT export loads with `peft` on the HF base with our
logits and `from-peft` round-trips it (ours and LLaVA's layout); the (data 2, fsdp 2, tensor 2) mesh equals one
device with LoRA dropout on (8 host CPU devices, in a subprocess). SIGKILL + resume: tests/test_train_cli.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llava_jax import checkpoint as ckpt
from llava_jax import train as T
from llava_jax.convert.params import build_with_params, flat_params, to_numpy
from llava_jax.models import lora
from llava_jax.models.clip import CLIPVisionConfig
from llava_jax.models.llama import LlamaConfig
from llava_jax.models.llava import Llava, LlavaConfig, build_llava
from llava_jax.train_config import ConfigError, base_config

REPO = Path(__file__).resolve().parents[1]
TRAINABLE = ("^projector/", "_lora_[ab]$")


def tiny_config() -> LlavaConfig:
    return LlavaConfig(
        vision=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                image_size=16, patch_size=8),
        text=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2),
        image_token_id=63)


def lora_train_config(rank: int = 4, dropout: float = 0.1, targets=lora.DEFAULT_TARGET_PATTERNS):
    c = base_config()
    c.trainable = TRAINABLE
    c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.targets = rank, 2.0 * rank, dropout, targets
    c.optimizer.lr, c.optimizer.projector_lr, c.optimizer.warmup_ratio = 2e-2, 1e-2, 0.0
    return c


def flat(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in to_numpy(flat_params(model)).items()}


def train_steps(model, c, mesh_sizes=(1, 1, 1), devices=None, steps=3, batch=8, accum=1):
    """Runs the trainer's own jitted step on `model` (adapters added from `c`); returns (model, losses)."""
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_sizes
    trainable = ckpt.trainable_filter(c.trainable)
    spec = T.prepare_lora(model, c, trainable)
    tx, _ = T.make_optimizer(c, steps)
    mesh = T.sharding.make_mesh(c.mesh, devices=devices or jax.devices()[:1])
    rules = T.sharding.DEFAULT_RULES
    with jax.set_mesh(mesh):
        parts = T.split_for_training(model, tx, trainable)
    bs = T.batch_shardings_for(mesh, rules)
    step = T.make_step_fn(parts, accum=accum, batch_constraint=T.micro_batch_constraint(mesh, rules),
                          dropout_seed=0 if spec is not None and spec.dropout > 0 else None)
    jitted, psh, osh = T.jit_step(step, parts, mesh, rules, bs)
    p, o = T.place(parts.params, psh), T.place(parts.opt_state, osh)
    fr = T.place(parts.frozen, T.sharding.state_shardings(parts.frozen, mesh, rules))
    rs = T.place(parts.rest, T.sharding.state_shardings(parts.rest, mesh, rules))
    cfg = model.config
    it = T.RandomBatches(batch, 12, cfg.vision.image_size, cfg.text.vocab_size, cfg.image_token_id,
                         cfg.num_image_tokens, seed=1)
    losses = []
    with jax.set_mesh(mesh):
        for _ in range(steps):
            p, o, m = jitted(p, o, fr, rs, T.to_global_batch(next(it), bs))
            losses.append(float(m["loss"]))
    return nnx.merge(parts.graphdef, p, fr, rs), losses, p


def logits(model, seed: int = 3) -> np.ndarray:
    cfg = model.config
    b = T.RandomBatches(2, 12, cfg.vision.image_size, cfg.text.vocab_size, cfg.image_token_id,
                        cfg.num_image_tokens, seed=seed)
    x = next(b)
    out, _ = model(jnp.asarray(x["input_ids"]), jnp.asarray(x["pixel_values"]))
    return np.asarray(out)


# ------------------------------------------------------------------------------------------------ units


def test_spec_and_target_table():
    assert lora.resolve_targets(lora.DEFAULT_TARGET_PATTERNS) == lora.TARGETS
    assert lora.resolve_targets([r"^language_model/(q|v)_kernel$"]) == ("q", "v")
    with pytest.raises(lora.LoraConfigError, match="matches none"):
        lora.resolve_targets([r"vision_tower/q_kernel"])
    with pytest.raises(lora.LoraConfigError, match="rank"):
        lora.LoraSpec(rank=0, alpha=1.0)
    with pytest.raises(lora.LoraConfigError, match="dropout"):
        lora.LoraSpec(rank=2, alpha=1.0, dropout=1.0)
    spec = lora.LoraSpec(rank=8, alpha=16.0, dropout=0.05, targets=("v", "q"))
    assert spec.targets == ("q", "v") and spec.scale == 2.0
    assert lora.LoraSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    # the recipe variants
    import importlib.util

    s = importlib.util.spec_from_file_location("ft", REPO / "configs" / "finetune.py")
    ft = importlib.util.module_from_spec(s)
    s.loader.exec_module(ft)
    for variant in ("7b_lora", "13b_lora", "demo_lora"):
        c = ft.get_config(variant)
        assert c.lora.dropout == 0.05 and c.trainable == TRAINABLE
        assert lora.spec_from_config(c.lora).targets == lora.TARGETS
    c7 = ft.get_config("7b_lora")
    assert (c7.lora.rank, c7.lora.alpha, c7.optimizer.lr, c7.optimizer.projector_lr) == (128, 256.0, 2e-4, 2e-5)
    assert c7.lora.base_dtype == "bfloat16"


def test_zero_b_equals_base_and_adapters_are_stacked():
    model = build_llava(tiny_config(), seed=0)
    before = logits(model)
    c = lora_train_config(rank=4)
    spec = T.prepare_lora(model, c, ckpt.trainable_filter(c.trainable))
    llm = model.language_model
    n, d = llm.config.num_hidden_layers, llm.config.hidden_size
    assert llm.q_lora_a.shape == (n, d, 4) and llm.down_lora_b.shape == (n, 4, d)
    assert llm.o_lora_a.get_metadata()["out_sharding"] == ("layers", "heads", "lora_rank")
    assert not np.any(np.asarray(llm.q_lora_b.get_value())) and np.any(np.asarray(llm.q_lora_a.get_value()))
    np.testing.assert_array_equal(logits(model), before)
    # a fresh adapter with a non-zero B moves the output; the same spec again keeps the adapters
    llm.q_lora_b.set_value(jnp.ones_like(llm.q_lora_b.get_value()))
    assert np.max(np.abs(logits(model) - before)) > 1e-3
    lora.add_lora(llm, spec)
    assert np.all(np.asarray(llm.q_lora_b.get_value()) == 1.0)
    with pytest.raises(lora.LoraConfigError, match="already has"):
        lora.add_lora(llm, lora.LoraSpec(rank=2, alpha=4.0))
    # LoRA on without the adapters trainable is a config error
    bad = lora_train_config()
    bad.trainable = ("^projector/",)
    with pytest.raises(ConfigError, match="_lora_"):
        T.prepare_lora(build_llava(tiny_config(), seed=0), bad, ckpt.trainable_filter(bad.trainable))


def test_training_merged_equals_unmerged_and_frozen_is_bit_identical():
    cfg = tiny_config()
    init = flat(build_llava(cfg, seed=0))
    model = build_llava(cfg, seed=0)
    c = lora_train_config(rank=4, dropout=0.1, targets=(r"^language_model/(q|v|o)_kernel$",
                                                           r"^language_model/(gate|up|down)_kernel$"))
    trained, losses, _ = train_steps(model, c, steps=3)
    assert losses[0] != losses[-1]
    after = flat(trained)
    adapters = {k for k in after if "_lora_" in k}
    assert {k.split(".")[-1] for k in adapters} == {f"{t}_lora_{ab}" for t in ("q", "v", "o", "gate", "up", "down")
                                                    for ab in "ab"}
    assert all(np.any(after[k]) for k in adapters if k.endswith("_b")), "B must move away from zero"
    changed = {k for k in init if not np.array_equal(init[k], after[k])}
    assert changed and all(k.startswith("projector.") for k in changed), changed  # the base is bit-identical
    # merged (W + alpha / r A B) equals the unmerged model, in fp32
    spec = lora.lora_spec_of(trained)
    merged = lora.merge_flat(after, spec)
    assert not any("_lora_" in k for k in merged) and set(merged) == set(init)
    assert not np.array_equal(merged["language_model.q_kernel"], init["language_model.q_kernel"])
    np.testing.assert_array_equal(merged["language_model.k_kernel"], init["language_model.k_kernel"])  # no adapter
    plain = build_with_params(lambda: Llava(cfg, rngs=nnx.Rngs(0)), merged)
    np.testing.assert_allclose(logits(plain), logits(trained), atol=1e-5, rtol=0)


def test_bf16_base_trains_the_fp32_adapters():
    model = build_llava(tiny_config(), seed=0)
    c = lora_train_config(rank=2, dropout=0.0)
    c.lora.base_dtype = "bfloat16"
    trained, losses, params = train_steps(model, c, steps=2, batch=4)
    assert all(np.isfinite(losses))
    assert trained.language_model.q_kernel.get_value().dtype == jnp.bfloat16
    assert trained.vision_tower is not None
    assert {v.dtype for v in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


# ------------------------------------------------------------------------------------------------ PEFT

@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    """An HF LLaVA base, our model dir of it with trained-looking adapters and a new projector, its PEFT export
    and its merged HF export."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from llava_jax import tiny
    from llava_jax.convert.__main__ import main as convert_main
    from llava_jax.convert.model_dir import load_model, save_model_dir

    root = tmp_path_factory.mktemp("lora")
    tok = tiny.build_tokenizer(["a red circle", "two blue squares on the left"], vocab_size=200)
    tiny.make_hf_llava(root / "base_hf", tok, seed=5)
    loaded = load_model(root / "base_hf")
    lora.add_lora(loaded.model.language_model, lora.LoraSpec(rank=3, alpha=6.0, dropout=0.05,
                                                             targets=("q", "k", "v", "o", "gate", "down")), seed=1)
    rng = np.random.default_rng(0)
    for name, v in nnx.to_flat_state(nnx.state(loaded.model, nnx.Param)):
        key = "/".join(map(str, name))
        if key.endswith("_lora_b") or key.startswith("projector/"):
            v.set_value(jnp.asarray(0.05 * rng.standard_normal(v.shape), jnp.float32))
    save_model_dir(root / "ours", loaded.model, loaded.config, loaded.tokenizer, loaded.image_config,
                   template=loaded.template)
    assert convert_main(["to-peft", str(root / "ours"), str(root / "peft"), "--base-name", str(root / "base_hf")]) == 0
    assert convert_main(["to-hf", str(root / "ours"), str(root / "merged_hf")]) == 0
    return root


def _hf_inputs(model_cfg, seed=0):
    rng = np.random.default_rng(seed)
    n = model_cfg.num_image_tokens
    ids = rng.integers(3, model_cfg.text.vocab_size - 2, size=(2, n + 9)).astype(np.int64)
    ids[ids == model_cfg.image_token_id] = 3
    ids[:, 1:1 + n] = model_cfg.image_token_id
    size = model_cfg.vision.image_size
    pixels = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    return ids, pixels


def _ours(model, ids, pixels):
    out, _ = model(jnp.asarray(ids, jnp.int32), jnp.asarray(pixels))
    return np.asarray(out)


def _hf(model, ids, pixels):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))
                     ).logits.float().numpy()


def test_peft_export_loads_in_peft_with_our_logits(lora_dirs):
    import torch
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from llava_jax.convert.model_dir import load_model

    ours = load_model(lora_dirs / "ours")
    ids, pixels = _hf_inputs(ours.config)
    expected = _ours(ours.model, ids, pixels)
    base = LlavaForConditionalGeneration.from_pretrained(str(lora_dirs / "base_hf")).eval()
    assert np.max(np.abs(_hf(base, ids, pixels) - expected)) > 1e-3, "the adapters must matter"
    peft_model = PeftModel.from_pretrained(base, str(lora_dirs / "peft")).eval()
    np.testing.assert_allclose(_hf(peft_model, ids, pixels), expected, atol=2e-5, rtol=0)
    # the vision tower carries no adapter; the adapter config names the decoder's layers only
    names = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert names and not any("vision" in n for n in names)
    assert not any("up_proj" in n for n in names)
    # LLaVA's projector file beside the adapter
    nl = torch.load(lora_dirs / "peft" / "non_lora_trainables.bin", weights_only=True)
    assert sorted(nl) == sorted(f"base_model.model.model.mm_projector.{i}.{w}" for i in (0, 2)
                                for w in ("weight", "bias"))
    # the merged HF export is a plain LLaVA with the same logits
    merged = LlavaForConditionalGeneration.from_pretrained(str(lora_dirs / "merged_hf")).eval()
    np.testing.assert_allclose(_hf(merged, ids, pixels), expected, atol=2e-5, rtol=0)


def test_from_peft_round_trips_ours_and_llava_layout(lora_dirs, tmp_path):
    import torch
    from safetensors.numpy import load_file, save_file

    from llava_jax.convert.__main__ import main as convert_main
    from llava_jax.convert.model_dir import load_model

    ours = load_model(lora_dirs / "ours")
    reference = flat(ours.model)
    ids, pixels = _hf_inputs(ours.config, seed=1)
    expected = _ours(ours.model, ids, pixels)
    assert convert_main(["from-peft", str(lora_dirs / "peft"), "--base", str(lora_dirs / "base_hf"),
                         str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back")
    assert lora.lora_spec_of(back.model) == lora.lora_spec_of(ours.model)
    got = flat(back.model)
    assert set(got) == set(reference)
    for k in reference:
        np.testing.assert_array_equal(got[k], reference[k], err_msg=k)
    # merged on import: a plain model with the same logits
    assert convert_main(["from-peft", str(lora_dirs / "peft"), "--base", str(lora_dirs / "base_hf"), "--merge",
                         str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    assert lora.lora_spec_of(merged.model) is None
    np.testing.assert_allclose(_ours(merged.model, ids, pixels), expected, atol=1e-5, rtol=0)
    # LLaVA's LoRA layout: adapters keyed model.layers.N (LlavaLlamaForCausalLM), projector in non_lora_trainables
    llava_dir = tmp_path / "llava_lora"
    llava_dir.mkdir()
    tensors = load_file(str(lora_dirs / "peft" / "adapter_model.safetensors"))
    renamed = {k.replace("base_model.model.model.language_model.layers.", "base_model.model.model.layers."): v
               for k, v in tensors.items() if "multi_modal_projector" not in k}
    save_file(renamed, str(llava_dir / "adapter_model.safetensors"))
    config = json.loads((lora_dirs / "peft" / "adapter_config.json").read_text())
    config.update(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
                  modules_to_save=None)
    (llava_dir / "adapter_config.json").write_text(json.dumps(config))
    nl = torch.load(lora_dirs / "peft" / "non_lora_trainables.bin", weights_only=True)
    torch.save(nl, llava_dir / "non_lora_trainables.bin")
    assert convert_main(["from-peft", str(llava_dir), "--base", str(lora_dirs / "base_hf"),
                         str(tmp_path / "from_llava")]) == 0
    np.testing.assert_array_equal(_ours(load_model(tmp_path / "from_llava").model, ids, pixels), expected)
    # unknown adapter tensors (here: an adapter on lm_head) are a named error
    bad = dict(renamed, **{"base_model.model.lm_head.lora_A.weight": np.zeros((3, 48), np.float32)})
    save_file(bad, str(llava_dir / "adapter_model.safetensors"))
    from llava_jax.convert.peft_io import PeftFormatError

    with pytest.raises(PeftFormatError, match="lm_head"):
        from llava_jax.convert.peft_io import import_peft

        import_peft(llava_dir, lora_dirs / "base_hf")


# ------------------------------------------------------------------------------------------------ 8 devices


@pytest.mark.slow  # ~25 s; the mesh equality without LoRA (test_sharding.py) stays in the default run
def test_mesh_2x2x2_equals_one_device_with_lora():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))  # this checkout's package
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert r["devices"] == 8
    assert "tensor" in r["lora_b_spec"], "the adapters must really be sharded on the mesh"
    for a, b in zip(r["losses_mesh"], r["losses_single"], strict=True):
        assert abs(a - b) <= 1e-5
    assert r["losses_mesh"][0] != r["losses_mesh"][-1]
    assert r["param_max_diff"] <= 1e-5
    assert r["adapter_change"] > 1e-4


def _child() -> None:
    cfg = tiny_config()
    devs = jax.devices()
    init = flat(build_llava(cfg, seed=0))
    mesh_model, lm, p = train_steps(build_llava(cfg, seed=0), lora_train_config(rank=4, dropout=0.1), (2, 2, 2), devs)
    one_model, ls, _ = train_steps(build_llava(cfg, seed=0), lora_train_config(rank=4, dropout=0.1), (1, 1, 1),
                                   devs[:1])
    a, b = flat(mesh_model), flat(one_model)
    result = {
        "devices": len(devs),
        "lora_b_spec": str(p["language_model"]["q_lora_b"].get_value().sharding.spec),
        "losses_mesh": lm, "losses_single": ls,
        "param_max_diff": max(float(np.max(np.abs(a[k] - b[k]))) for k in a),
        "adapter_change": float(np.max(np.abs(a["language_model.q_lora_b"]))),
        "base_unchanged": all(np.array_equal(init[k], a[k]) for k in init if not k.startswith("projector.")),
    }
    assert result["base_unchanged"]
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    _child()
