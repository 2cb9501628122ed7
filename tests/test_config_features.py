"""Config features through every path (issue 15.1): llama3 rope scaling, a vision feature-layer list,
grouped-query attention and tied embeddings.

For each feature a tiny random transformers `LlavaForConditionalGeneration` is saved to disk and then:
generate (the CLI in-process and the API) equals transformers' greedy `generate`, one train step gives
transformers' loss and changes the trained parameters, `eval.predict` answers as transformers decodes, `aot`
compiles the train step for a TPU topology (when libtpu is installed), and `convert from-hf` + `to-hf` gives
a directory transformers loads with the original's logits. Configs must be hashable (they are static
arguments of jitted functions) and round-trip to the exact HF dict.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from llava_jax import tiny  # noqa: E402
from llava_jax.models.frozen import FrozenDict, freeze, thaw  # noqa: E402
from llava_jax.models.llama import LlamaConfig, rope_inv_freq  # noqa: E402
from llava_jax.models.llava import LlavaConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
MHA = {"num_key_value_heads": 4}  # the tiny default is GQA (2 of 4); the other features use plain attention
FEATURES = {
    "llama3_rope": dict(text={**MHA, "rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0, "eos_token_id": [2, 3]}),
    "feature_layers": dict(text=MHA, vision_feature_layer=[-3, -1]),
    "gqa": dict(text={"num_key_value_heads": 1}),
    "tied": dict(text={**MHA, "tie_word_embeddings": True}),
}
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer(["a red circle", "two blue squares on the left"], vocab_size=200)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module", params=list(FEATURES))
def case(request, tmp_path_factory, tokenizer):
    """One feature: its HF model (torch, eval mode), the saved directory and our model loaded from it."""
    from llava_jax.convert.model_dir import load_model

    name = request.param
    d = tmp_path_factory.mktemp(name)
    hf = tiny.make_hf_llava(d, tokenizer, seed=3 + list(FEATURES).index(name), **FEATURES[name])
    return SimpleNamespace(name=name, dir=d, hf=hf, loaded=load_model(d), tok=tokenizer)


def _hf_greedy(hf, ids: list[int], pixels: np.ndarray | None, n: int, pad_id: int) -> list[int]:
    """transformers' greedy continuation (exactly n tokens, no end-of-sequence stop) of one prompt;
    pixels [1, H, W, 3] (ours) or None."""
    kw = {"pixel_values": torch.tensor(pixels.transpose(0, 3, 1, 2))} if pixels is not None else {}
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=pad_id, **kw)
    return out[0, len(ids):].tolist()


# ------------------------------------------------------------------------------------------------ configs


def test_freeze_thaw_round_trip():
    value = {"a": [1, 2, {"b": [3]}], "c": {"d": None, "e": 1.5}, "f": "x"}
    frozen = freeze(value)
    assert isinstance(frozen, FrozenDict) and isinstance(frozen["a"], tuple) and isinstance(frozen["a"][2], FrozenDict)
    assert hash(frozen) == hash(freeze(json.loads(json.dumps(value))))
    assert frozen["c"] == value["c"] and frozen == freeze(value) and thaw(frozen) == value  # tuples != lists
    assert json.dumps(thaw(frozen)) == json.dumps(value)
    with pytest.raises(TypeError):
        frozen["a"] = 1


def test_llama_config_with_rope_dict_and_eos_list_is_hashable_and_round_trips():
    hf = {"vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
          "rope_theta": 500000.0, "rope_scaling": dict(LLAMA3_ROPE), "eos_token_id": [2, 5]}
    cfg = LlamaConfig.from_hf(hf)
    assert isinstance(cfg.rope_scaling, FrozenDict) and cfg.eos_token_id == (2, 5)
    assert hash(cfg) == hash(LlamaConfig.from_hf(json.loads(json.dumps(hf))))
    back = cfg.to_hf()
    assert type(back["rope_scaling"]) is dict and back["rope_scaling"] == LLAMA3_ROPE
    assert type(back["eos_token_id"]) is list and back["eos_token_id"] == [2, 5]
    assert LlamaConfig.from_hf(back) == cfg
    assert copy.deepcopy(cfg) == cfg and dataclasses.replace(cfg, vocab_size=65).rope_scaling == cfg.rope_scaling
    # transformers v5's form: rope_parameters carrying rope_theta
    v5 = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**LLAMA3_ROPE, "rope_theta": 500000.0}
    assert LlamaConfig.from_hf(v5) == cfg
    # a jitted function with the config as a static argument (what failed in `generate`)
    f = jax.jit(lambda c, x: x * rope_inv_freq(c)[0], static_argnums=0)
    assert float(f(cfg, 2.0)) == pytest.approx(2.0)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"type": "linear", "factor": 4.0},
    LLAMA3_ROPE,
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
])
def test_rope_frequencies_equal_transformers(scaling):
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kw = dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=2, rope_theta=500000.0)
    hf = HFLlamaConfig(**kw, rope_scaling=dict(scaling))
    want = ROPE_INIT_FUNCTIONS[hf.rope_parameters["rope_type"]](hf, "cpu")[0].numpy()
    np.testing.assert_allclose(rope_inv_freq(LlamaConfig(**kw, rope_scaling=scaling)), want, rtol=1e-6)


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "yarn", "factor": 4.0}, "'yarn' is not supported"),
    ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic' is not supported"),
    ({"rope_type": "llama3", "factor": 8.0}, "lacks low_freq_factor, high_freq_factor"),
])
def test_unsupported_rope_scaling_is_a_named_error_when_the_config_is_read(scaling, message):
    from llava_jax.models.layers import UnsupportedConfigError

    with pytest.raises(UnsupportedConfigError, match=message):
        LlamaConfig.from_hf({"hidden_size": 32, "num_attention_heads": 4, "rope_scaling": scaling})


def test_llava_config_hashable_and_to_hf_equals_the_hf_config(case):
    cfg = case.loaded.config
    assert hash(cfg) == hash(LlavaConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))))
    assert LlavaConfig.from_hf(cfg.to_hf()) == cfg
    hf = case.hf.config.to_dict()
    ours = cfg.to_hf()
    assert ours["vision_feature_layer"] == hf["vision_feature_layer"]
    assert type(ours["vision_feature_layer"]) is type(hf["vision_feature_layer"])
    for k in ("num_key_value_heads", "tie_word_embeddings", "eos_token_id", "vocab_size"):
        assert ours["text_config"][k] == hf["text_config"][k], k
    rope = dict(hf["text_config"]["rope_parameters"])
    assert ours["text_config"]["rope_theta"] == rope.pop("rope_theta")
    if rope["rope_type"] == "default":
        assert "rope_scaling" not in ours["text_config"]
    else:
        assert ours["text_config"]["rope_scaling"] == rope
        assert not np.allclose(rope_inv_freq(cfg.text), rope_inv_freq(dataclasses.replace(cfg.text, rope_scaling=None)))
    if case.name == "tied":
        assert not hasattr(case.loaded.model.language_model, "lm_head")
    if case.name == "feature_layers":
        assert case.loaded.model.projector.linear_1_kernel.shape[0] == 2 * cfg.vision.hidden_size


# ------------------------------------------------------------------------------------------------ generate


def test_generate_cli_and_api_equal_transformers_greedy(case, image, capsys):
    from llava_jax.data import images
    from llava_jax.generate import build_prompt_ids, generate
    from llava_jax.generate import main as generate_main

    loaded, tok = case.loaded, case.tok
    prompt = "What is in the picture?"
    pixels = images.load_and_preprocess(image, loaded.image_config)[None]
    ids = build_prompt_ids(loaded, prompt, with_image=True)
    ref = _hf_greedy(case.hf, ids, pixels, NEW_TOKENS, tok.pad_token_id)
    assert generate(loaded.model, [ids], pixels, None, max_new_tokens=NEW_TOKENS, eos_ids=[-5],
                    pad_id=tok.pad_token_id)[0] == ref

    capsys.readouterr()
    assert generate_main(["--model", str(case.dir), "--image", str(image), "--prompt", prompt, "--json",
                          "--max-new-tokens", str(NEW_TOKENS)]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]
    assert got and got == ref[: len(got)]  # the CLI stops early at an end-of-sequence id or stop string
    assert len(got) == NEW_TOKENS or got[-1] in (2, 3) or "</s>" in tok.decode(ref[: len(got)])


# ------------------------------------------------------------------------------------------------ train step


def test_one_train_step_has_transformers_loss_and_changes_params(case):
    from llava_jax import checkpoint as ckpt
    from llava_jax import train as T
    from llava_jax.convert.model_dir import load_model
    from llava_jax.train_config import base_config

    loaded = load_model(case.dir)  # a fresh copy: the step donates its parameters
    cfg = loaded.config
    c = base_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.optimizer.lr, c.optimizer.warmup_ratio = 1e-2, 0.0
    tx, _ = T.make_optimizer(c, 2)
    mesh = T.sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
    rules = T.sharding.DEFAULT_RULES
    with jax.set_mesh(mesh):
        parts = T.split_for_training(loaded.model, tx, ckpt.trainable_filter(["^projector/", "^language_model/"]))
    before = {"/".join(map(str, p)): np.array(v.get_value()) for p, v in nnx.to_flat_state(parts.params)}
    bs = T.batch_shardings_for(mesh, rules)
    step = T.make_step_fn(parts, accum=1)
    jitted, psh, osh = T.jit_step(step, parts, mesh, rules, bs)
    batch = next(T.RandomBatches(2, 40, cfg.vision.image_size, cfg.text.vocab_size, cfg.image_token_id,
                                 cfg.num_image_tokens, seed=5))
    with torch.no_grad():
        ref = case.hf(input_ids=torch.tensor(batch["input_ids"]).long(),
                      pixel_values=torch.tensor(batch["pixel_values"].transpose(0, 3, 1, 2)),
                      attention_mask=torch.tensor(batch["attention_mask"]),
                      labels=torch.tensor(batch["labels"]).long()).loss.item()
    with jax.set_mesh(mesh):
        p, o = T.place(parts.params, psh), T.place(parts.opt_state, osh)
        fr = T.place(parts.frozen, T.sharding.state_shardings(parts.frozen, mesh))
        rs = T.place(parts.rest, T.sharding.state_shardings(parts.rest, mesh))
        p, o, m = jitted(p, o, fr, rs, T.to_global_batch(batch, bs))
    loss = float(m["loss"])
    assert np.isfinite(loss) and loss == pytest.approx(ref, rel=1e-4)
    after = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(p)}
    assert set(after) == set(before) and any(k.startswith("projector/") for k in after)
    unchanged = [k for k in before if np.array_equal(before[k], after[k])]
    assert not unchanged, unchanged
    assert ("language_model/lm_head" in after) == (case.name != "tied")


# ------------------------------------------------------------------------------------------------ eval predict


def test_eval_predict_answers_as_transformers_decodes(case, image, tmp_path):
    from llava_jax.data import conversation, images
    from llava_jax.eval.predict import (
        PredictSettings,
        PromptItem,
        cut_at_stop_strings,
        run_predictions,
        truncate_at_eos,
        user_message,
    )
    from llava_jax.generate import eos_ids_of

    loaded, tok = case.loaded, case.tok
    items = [PromptItem("q1", "Describe the image.", str(image)), PromptItem("q2", "Tell me a story.", None)]
    out = tmp_path / "answers.jsonl"
    rows = run_predictions(items, PredictSettings(model=str(case.dir), batch_size=1, max_new_tokens=NEW_TOKENS),
                           out, loaded=loaded)
    assert [r["question_id"] for r in rows] == ["q1", "q2"] and out.exists()
    template = conversation.get_template(loaded.template)
    eos = eos_ids_of(tok, loaded.config)
    for item, row in zip(items, rows, strict=True):
        with_image = item.image is not None
        ids = conversation.encode_prompt(user_message(item), template, tok, loaded.config.num_image_tokens,
                                         loaded.config.image_token_id, has_image=with_image)
        pixels = images.load_and_preprocess(item.image, loaded.image_config)[None] if with_image else None
        ref = truncate_at_eos(_hf_greedy(case.hf, ids, pixels, NEW_TOKENS, tok.pad_token_id), eos)
        assert row["text"] == cut_at_stop_strings(tok.decode(ref, skip_special_tokens=True), template.stop_strings)


# ------------------------------------------------------------------------------------------------ aot


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_aot_compiles_the_train_step_for_a_tpu(case):
    os.environ.pop("JAX_PLATFORMS", None)
    from llava_jax import aot
    from llava_jax.train import count_params

    spec = importlib.util.spec_from_file_location("finetune_cfg", REPO / "configs" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("7b")
    with cfg.unlocked():
        cfg.model.arch, cfg.batch_size, cfg.grad_accum_steps, cfg.data.max_length = "tiny", 2, 1, 64
        cfg.model.attention_impl = "xla"
    devices, topo = aot.topology_devices("v5e-1")
    compiled, facts = aot.compile_step(cfg, devices, mcfg=case.loaded.config)
    r = aot.report(compiled, facts, topo, cfg)
    assert r["fits"] and r["xla_flops_per_chip"] > 0
    assert r["params_total"] == count_params(nnx.state(case.loaded.model, nnx.Param))


# ------------------------------------------------------------------------------------------------ export


def test_convert_and_export_give_transformers_the_same_logits(case, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from llava_jax.convert.__main__ import main as convert_main
    from llava_jax.convert.safetensors_io import read_directory

    ours, out = tmp_path / "ours", tmp_path / "hf"
    assert convert_main(["from-hf", str(case.dir), str(ours)]) == 0
    assert convert_main(["to-hf", str(ours), str(out)]) == 0
    exported = json.loads((out / "config.json").read_text())
    original = json.loads((case.dir / "config.json").read_text())
    assert exported["vision_feature_layer"] == original["vision_feature_layer"]
    assert exported["text_config"]["eos_token_id"] == original["text_config"]["eos_token_id"]
    assert ("language_model.lm_head.weight" in read_directory(out)) == (case.name != "tied")

    model, info = LlavaForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.eval()
    tc = model.config.text_config
    assert tc.rope_parameters == case.hf.config.text_config.rope_parameters
    assert tc.num_key_value_heads == case.hf.config.text_config.num_key_value_heads
    assert tc.tie_word_embeddings == (case.name == "tied")
    n_img = case.loaded.config.num_image_tokens
    rng = np.random.default_rng(1)
    ids = torch.tensor([[1] + [case.loaded.config.image_token_id] * n_img + rng.integers(3, 150, 12).tolist()])
    pixels = torch.tensor(rng.normal(size=(1, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        want = case.hf(input_ids=ids, pixel_values=pixels).logits.numpy()
        got = model(input_ids=ids, pixel_values=pixels).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and our model on the same input
    logits, _ = case.loaded.model(jax.numpy.asarray(ids.numpy()), jax.numpy.asarray(pixels.numpy().transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-4)
