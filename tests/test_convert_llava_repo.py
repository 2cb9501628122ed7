"""`convert from-llava` and `compose --projector-weights`: checkpoints of the PyTorch LLaVA repo.

The LLaVA-repo directories are built here from tiny random transformers models (LLaMA weights plus
`model.mm_projector.*`, a config.json with the `mm_*` fields, the tokenizer) in safetensors and in
`pytorch_model-*.bin` shards. References: transformers' LlavaForConditionalGeneration loaded with the same
weights (mapped by hand below), and, for the linear projector that class cannot express, LLaVA's own forward
(`encode_images` -> splice into the token embeddings -> LlamaForCausalLM) written with transformers' modules.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

from llava_jax import cli, tiny  # noqa: E402
from llava_jax.convert.__main__ import main as convert_main  # noqa: E402
from llava_jax.convert.llava_repo import read_projector_file  # noqa: E402
from llava_jax.convert.model_dir import load_model, load_model_dir  # noqa: E402
from llava_jax.convert.safetensors_io import CheckpointFormatError, write_safetensors, write_sharded  # noqa: E402
from llava_jax.convert.torch_bin import UnsafeCheckpointError, read_torch_bin  # noqa: E402
from llava_jax.models.layers import UnsupportedConfigError  # noqa: E402

CLIP_HIDDEN = tiny.tiny_clip_vision_kwargs()["hidden_size"]
N_PATCHES = (tiny.tiny_clip_vision_kwargs()["image_size"] // tiny.tiny_clip_vision_kwargs()["patch_size"]) ** 2


class _Payload:
    """Pickles as a call of os.mkdir: what an unrestricted unpickle would execute."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


@pytest.fixture(scope="module")
def tokenizer():
    """A LLaMA-style tokenizer as LLaVA saves it: no `<image>` token, pad = unk (LLaVA's v1 setting)."""
    tok = tiny.build_tokenizer(["a red circle", "two blue squares on the left"], vocab_size=180,
                               add_image_and_pad=False)
    tok.pad_token = tok.unk_token
    return tok


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    return d, tiny.make_hf_clip(d, seed=5)


def _projector_tensors(kind: str, hidden: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * (0.8 / shape[-1] ** 0.5)

    if kind == "linear":
        return {"model.mm_projector.weight": rnd(hidden, CLIP_HIDDEN), "model.mm_projector.bias": rnd(hidden)}
    return {"model.mm_projector.0.weight": rnd(hidden, CLIP_HIDDEN), "model.mm_projector.0.bias": rnd(hidden),
            "model.mm_projector.2.weight": rnd(hidden, hidden), "model.mm_projector.2.bias": rnd(hidden)}


def make_llava_repo_dir(d, tokenizer, clip_dir, *, projector="mlp2x_gelu", select_layer=-2,
                        select_feature="patch", aspect="pad", fmt="safetensors", im_patch_token=False, seed=21,
                        **extra_config):
    """Writes a LlavaLlamaForCausalLM directory as the PyTorch LLaVA repo saves it; returns (llama, state)."""
    llama = tiny.make_hf_llama(None, tokenizer, seed=seed)
    state = {k: v.detach().clone() for k, v in llama.state_dict().items()}
    state.update(_projector_tensors(projector, llama.config.hidden_size, seed + 1))
    cfg = llama.config.to_dict()
    rope = cfg.pop("rope_parameters", None) or {}
    cfg.pop("dtype", None)
    cfg.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama", torch_dtype="float32",
               rope_theta=rope.get("rope_theta", 10000.0), rope_scaling=None, mm_vision_tower=str(clip_dir),
               mm_projector_type=projector, mm_vision_select_layer=select_layer,
               mm_vision_select_feature=select_feature, mm_hidden_size=CLIP_HIDDEN, image_aspect_ratio=aspect,
               mm_use_im_start_end=False, mm_use_im_patch_token=im_patch_token, mm_patch_merge_type="flat",
               tokenizer_model_max_length=2048, use_mm_proj=True, tune_mm_mlp_adapter=False)
    cfg.update(extra_config)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    tokenizer.save_pretrained(str(d))
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    if fmt == "safetensors":
        write_sharded(d, {k: state[k].numpy() for k in names}, max_shard_bytes=20_000)
        assert len(list(d.glob("model-*.safetensors"))) > 1
    else:
        weight_map = {}
        for i, part in enumerate(halves, 1):
            name = f"pytorch_model-{i:05d}-of-00002.bin"
            torch.save({k: state[k] for k in part}, d / name)
            weight_map.update({k: name for k in part})
        (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return llama, state


def _ids(image_id: int, n_image: int) -> np.ndarray:
    return np.array([[1, 40, 57, 23, *([image_id] * n_image), 61, 12, 90, 33, 2, 77]])


def _pixels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 32, 32)).astype(np.float32)


def _ours(loaded, ids, pixels_nchw):
    logits, _ = loaded.model(jnp.asarray(ids), jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1)))
    return np.asarray(logits)


def test_from_llava_safetensors_mlp2x_equals_transformers_llava(tmp_path, tokenizer, clip):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    clip_dir, clip_model = clip
    src, out = tmp_path / "llava-v1.5-tiny", tmp_path / "ours"
    llama, state = make_llava_repo_dir(src, tokenizer, clip_dir, projector="mlp2x_gelu", select_layer=-2,
                                       select_feature="patch", aspect="pad", fmt="safetensors")
    assert convert_main(["from-llava", str(src), "--vision", str(clip_dir), str(out)]) == 0
    loaded = load_model_dir(out)
    cfg, tok = loaded.config, loaded.tokenizer
    v_old = len(tokenizer)
    assert cfg.text.vocab_size % 64 == 0 and cfg.image_token_id >= v_old
    assert tok.convert_ids_to_tokens(cfg.image_token_id) == "<image>"
    assert tok.pad_token == "<unk>" and cfg.pad_token_id == 0  # LLaVA's pad kept
    assert tok("a red circle").input_ids == tokenizer("a red circle").input_ids  # original ids unchanged
    assert cfg.projector == "mlp2x_gelu" and cfg.vision_feature_select_strategy == "default"
    assert loaded.image_config.aspect == "pad" and loaded.template == "vicuna_v1"

    # transformers' LLaVA with the same weights: LLaVA's tensors mapped by hand, our added vocabulary rows copied
    text_cfg = {**llama.config.to_dict(), "vocab_size": cfg.text.vocab_size}
    hf_cfg = LlavaConfig(vision_config=clip_model.config.vision_config.to_dict(), text_config=text_cfg,
                         image_token_index=cfg.image_token_id, projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=N_PATCHES,
                         multimodal_projector_bias=True, tie_word_embeddings=False)
    hf = LlavaForConditionalGeneration(hf_cfg).eval()
    emb = np.asarray(loaded.model.language_model.embed_tokens[...])
    head = np.asarray(loaded.model.language_model.lm_head[...]).T
    np.testing.assert_array_equal(emb[:v_old], state["model.embed_tokens.weight"].numpy())
    np.testing.assert_array_equal(head[:v_old], state["lm_head.weight"].numpy())
    lm_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.") and "mm_projector" not in k}
    lm_state["embed_tokens.weight"] = torch.cat([lm_state["embed_tokens.weight"], torch.tensor(emb[v_old:])])
    with torch.no_grad():
        hf.model.language_model.load_state_dict(lm_state)
        hf.lm_head.weight.copy_(torch.cat([state["lm_head.weight"], torch.tensor(head[v_old:])]))
        hf.model.vision_tower.load_state_dict(clip_model.vision_model.state_dict())
        for ours, theirs in (("linear_1", "0"), ("linear_2", "2")):
            layer = getattr(hf.model.multi_modal_projector, ours)
            layer.weight.copy_(state[f"model.mm_projector.{theirs}.weight"])
            layer.bias.copy_(state[f"model.mm_projector.{theirs}.bias"])
        ids, pixels = _ids(cfg.image_token_id, N_PATCHES), _pixels()
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    np.testing.assert_allclose(_ours(loaded, ids, pixels), ref, atol=2e-4, rtol=1e-4)


def _llava_reference_logits(llama, clip_model, state, ids, pixels, image_id, layer, feature):
    """LLaVA's forward for a linear projector: CLIP hidden_states[layer] (CLS dropped for 'patch'), the
    nn.Linear projector, the features spliced in where the image sits, then LlamaForCausalLM."""
    with torch.no_grad():
        hidden = clip_model.vision_model(torch.tensor(pixels), output_hidden_states=True).hidden_states[layer]
        feats = hidden[:, 1:] if feature == "patch" else hidden
        feats = torch.nn.functional.linear(feats, state["model.mm_projector.weight"], state["model.mm_projector.bias"])
        row = ids[0]
        at = int(np.flatnonzero(row == image_id)[0])
        before = llama.model.embed_tokens(torch.tensor(row[:at]))
        after = llama.model.embed_tokens(torch.tensor(row[at + feats.shape[1]:]))
        embeds = torch.cat([before, feats[0], after])[None]
        return llama(inputs_embeds=embeds).logits.numpy()


def test_from_llava_bin_shards_linear_cls_patch_equals_llava_forward(tmp_path, tokenizer, clip):
    clip_dir, clip_model = clip
    src, out = tmp_path / "llava-v1-tiny", tmp_path / "ours"
    llama, state = make_llava_repo_dir(src, tokenizer, clip_dir, projector="linear", select_layer=-1,
                                       select_feature="cls_patch", aspect="square", fmt="bin", im_patch_token=True,
                                       seed=31, mm_projector_type=None)  # absent type: LLaVA's default 'linear'
    assert not list(src.glob("*.safetensors")) and len(list(src.glob("pytorch_model-*.bin"))) == 2
    # the CLIP directory is found through the config's mm_vision_tower (a local path) when --vision is absent
    assert convert_main(["from-llava", str(src), str(out), "--pad-vocab-to", "0"]) == 0
    loaded = load_model_dir(out)
    cfg, tok = loaded.config, loaded.tokenizer
    assert cfg.projector == "linear" and cfg.vision_feature_select_strategy == "full"
    assert cfg.num_image_tokens == N_PATCHES + 1 and loaded.image_config.aspect == "crop"
    # LLaVA's builder adds <im_patch> before resizing when mm_use_im_patch_token; <image> comes after it
    assert tok.convert_tokens_to_ids("<im_patch>") == len(tokenizer)
    assert cfg.image_token_id == len(tokenizer) + 1 and cfg.text.vocab_size == len(tokenizer) + 2
    ids, pixels = _ids(cfg.image_token_id, cfg.num_image_tokens), _pixels(1)
    ref = _llava_reference_logits(llama, clip_model, state, ids, pixels, cfg.image_token_id, -1, "cls_patch")
    ours = _ours(loaded, ids, pixels)
    np.testing.assert_allclose(ours[..., : ref.shape[-1]], ref, atol=2e-4, rtol=1e-4)
    assert loaded.source_dtype == "float32"


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_compose_with_stage1_projector_file(tmp_path, tokenizer, clip, fmt):
    clip_dir, _ = clip
    llama_dir, out = tmp_path / "vicuna", tmp_path / "composed"
    llama = tiny.make_hf_llama(llama_dir, tokenizer, seed=41)
    proj = _projector_tensors("mlp2x_gelu", llama.config.hidden_size, 42)
    path = tmp_path / f"mm_projector.{fmt}"
    if fmt == "bin":
        torch.save(proj, path)
    else:
        write_safetensors(path, {k: v.numpy() for k, v in proj.items()})
    assert read_projector_file(path)[0] == "mlp2x_gelu"
    assert convert_main(["compose", "--vision", str(clip_dir), "--text", str(llama_dir), "--projector-weights",
                         str(path), str(out)]) == 0
    loaded = load_model_dir(out)
    p = loaded.model.projector
    assert loaded.config.projector == "mlp2x_gelu"
    np.testing.assert_array_equal(np.asarray(p.linear_1_kernel[...]), proj["model.mm_projector.0.weight"].numpy().T)
    np.testing.assert_array_equal(np.asarray(p.linear_1_bias[...]), proj["model.mm_projector.0.bias"].numpy())
    np.testing.assert_array_equal(np.asarray(p.linear_2_kernel[...]), proj["model.mm_projector.2.weight"].numpy().T)
    np.testing.assert_array_equal(np.asarray(p.linear_2_bias[...]), proj["model.mm_projector.2.bias"].numpy())
    with pytest.raises(CheckpointFormatError, match="holds a mlp2x_gelu projector, not linear"):
        convert_main(["compose", "--vision", str(clip_dir), "--text", str(llama_dir), "--projector", "linear",
                      "--projector-weights", str(path), str(tmp_path / "bad")])


def test_tampered_bin_is_refused_without_running_it(tmp_path, tokenizer, clip, capsys):
    clip_dir, _ = clip
    target = tmp_path / "payload-ran"
    evil = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.weight": torch.zeros(2), "extra": _Payload(str(target))}, evil)
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        read_torch_bin(evil)
    llama_dir = tmp_path / "vicuna"
    tiny.make_hf_llama(llama_dir, tokenizer, seed=43)
    with pytest.raises(UnsafeCheckpointError):
        convert_main(["compose", "--vision", str(clip_dir), "--text", str(llama_dir), "--projector-weights",
                      str(evil), str(tmp_path / "out1")])
    # a tampered shard inside a from-llava directory
    src = tmp_path / "llava"
    make_llava_repo_dir(src, tokenizer, clip_dir, fmt="bin", seed=44)
    shard = src / "pytorch_model-00002-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    state[next(iter(state))] = _Payload(str(target))
    torch.save(state, shard)
    argv = ["from-llava", str(src), "--vision", str(clip_dir), str(tmp_path / "out2")]
    with pytest.raises(UnsafeCheckpointError):
        convert_main(argv)
    # the command line: one error line, exit code 2
    capsys.readouterr()
    assert cli.run(convert_main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "weights_only=True" in err
    assert not target.exists()


def test_from_llava_uses_a_stored_vision_tower(tmp_path, tokenizer, clip):
    """With unfreeze_mm_vision_tower LLaVA saves the tower as model.vision_tower.vision_tower.*, and those
    weights (loaded over the CLIP directory's) are the ones the model runs."""
    clip_dir, _ = clip
    trained = tiny.make_hf_clip(None, seed=77).vision_model.state_dict()
    src = tmp_path / "llava"
    make_llava_repo_dir(src, tokenizer, clip_dir, seed=71, fmt="bin", unfreeze_mm_vision_tower=True)
    tower = {f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in trained.items()}
    torch.save(tower, src / "pytorch_model-tower.bin")
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    index["weight_map"].update({k: "pytorch_model-tower.bin" for k in tower})
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert convert_main(["from-llava", str(src), "--vision", str(clip_dir), str(tmp_path / "out")]) == 0
    loaded = load_model_dir(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(loaded.model.vision_tower.patch_embedding[...]),
                                  trained["embeddings.patch_embedding.weight"].numpy().transpose(2, 3, 1, 0))


@pytest.mark.parametrize("override, error, match", [
    ({"mm_use_im_start_end": True}, UnsupportedConfigError, "mm_use_im_start_end"),
    ({"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad"}, UnsupportedConfigError, "anyres"),
    ({"mm_projector_type": "mlp3x_gelu"}, UnsupportedConfigError, "mlp3x_gelu"),
    ({"architectures": ["LlavaMptForCausalLM"]}, UnsupportedConfigError, "LlavaMptForCausalLM"),
    ({"mm_vision_select_feature": "cls"}, UnsupportedConfigError, "cls"),
    ({"mm_hidden_size": 1024}, CheckpointFormatError, "mm_hidden_size 1024"),
    ({"mm_vision_tower": "openai/clip-vit-large-patch14-336"}, CheckpointFormatError, "--vision"),
    ({"mm_projector_type": "linear"}, CheckpointFormatError, "weights are a mlp2x_gelu projector"),
])
def test_from_llava_refuses_what_it_cannot_reproduce(tmp_path, tokenizer, clip, override, error, match):
    clip_dir, _ = clip
    src = tmp_path / "llava"
    make_llava_repo_dir(src, tokenizer, clip_dir, seed=51)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(override)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(error, match=match):
        convert_main(["from-llava", str(src), str(tmp_path / "out")])
    assert not (tmp_path / "out" / "llava_jax.json").exists()


def test_load_model_points_llava_repo_dirs_to_from_llava(tmp_path, tokenizer, clip):
    src = tmp_path / "llava"
    make_llava_repo_dir(src, tokenizer, clip[0], seed=61, model_type="llava")  # older LLaVA releases
    with pytest.raises(CheckpointFormatError, match="from-llava"):
        load_model(src)
