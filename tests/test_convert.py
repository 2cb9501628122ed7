"""Conversion: HF -> llava_jax -> HF round trips exactly; exports load in transformers; compose grows the vocabulary."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

from llava_jax import tiny  # noqa: E402
from llava_jax.convert.__main__ import main as convert_main  # noqa: E402
from llava_jax.convert.hf_keys import canonical_llava_key  # noqa: E402
from llava_jax.convert.model_dir import load_model, load_model_dir  # noqa: E402
from llava_jax.convert.safetensors_io import CheckpointFormatError, read_directory, write_safetensors  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer(["a red circle", "two blue squares on the left"], vocab_size=200)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("hf")
    tiny.make_hf_llava(d, tokenizer, seed=11)
    return d


def _canonical(tensors):
    return {canonical_llava_key(k): np.asarray(v) for k, v in tensors.items()}


def _logits(model, ids, pixels):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.float().numpy()


def test_round_trip_is_exact_and_export_loads_in_transformers(tmp_path, hf_dir, tokenizer):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    ours, out = tmp_path / "ours", tmp_path / "out"
    assert convert_main(["from-hf", str(hf_dir), str(ours)]) == 0
    assert convert_main(["to-hf", str(ours), str(out)]) == 0
    src, dst = _canonical(read_directory(hf_dir)), read_directory(out)
    assert set(dst) == set(src)
    for k in src:
        assert dst[k].dtype == src[k].dtype and np.array_equal(dst[k], src[k]), k
    assert (out / "model.safetensors.index.json").exists()

    model, info = LlavaForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    original = LlavaForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    processor = AutoProcessor.from_pretrained(str(out))
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    batch = processor(images=image, text="USER: <image>\nWhat is it? ASSISTANT:", return_tensors="pt")
    n_image = int((batch.input_ids == original.config.image_token_index).sum())
    assert n_image == 16
    ids, pixels = batch.input_ids.numpy(), batch.pixel_values.numpy()
    np.testing.assert_array_equal(_logits(model.eval(), ids, pixels), _logits(original, ids, pixels))
    rendered = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], add_generation_prompt=True)
    assert "USER: <image>\nHi ASSISTANT:" in rendered


def test_bf16_sharded_and_in_memory_layouts(tmp_path, tokenizer):
    from transformers import LlavaForConditionalGeneration

    model = tiny.make_hf_llava(None, tokenizer, seed=12).to(torch.bfloat16)
    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="20KB")
    tokenizer.save_pretrained(str(sharded))
    assert len(list(sharded.glob("*.safetensors"))) > 1
    # the in-memory key names of current transformers, written as they are
    inmem = tmp_path / "inmem"
    inmem.mkdir()
    write_safetensors(inmem / "model.safetensors",
                      {k: v.float().numpy() for k, v in model.state_dict().items()})
    (inmem / "config.json").write_text((sharded / "config.json").read_text())
    a, b = load_model(sharded), load_model(inmem)
    assert a.source_dtype == "bfloat16"
    ids = jnp.asarray([[1, 5, 9, 12]])
    la, _ = a.model(ids)
    lb, _ = b.model(ids)
    np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    out = tmp_path / "out"
    assert convert_main(["to-hf", str(sharded), str(out)]) == 0
    src, dst = _canonical(read_directory(sharded)), read_directory(out)
    assert all(dst[k].dtype == src[k].dtype and np.array_equal(dst[k].view(np.uint16), src[k].view(np.uint16))
               for k in src)
    reloaded = LlavaForConditionalGeneration.from_pretrained(str(out))
    assert reloaded.dtype == torch.bfloat16


def test_from_hf_rejects_mismatched_weights(tmp_path, hf_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 2  # the weights have 3
    (bad / "config.json").write_text(json.dumps(cfg))
    tensors = read_directory(hf_dir)
    write_safetensors(bad / "model.safetensors", {k: np.asarray(v) for k, v in tensors.items()})
    with pytest.raises(CheckpointFormatError, match="layer 2"):
        load_model(bad)
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointFormatError, match="pickled"):
        load_model(bad)


def test_compose_grows_vocabulary_and_keeps_towers(tmp_path):
    tok = tiny.build_tokenizer(["a red circle"], vocab_size=150, add_image_and_pad=False)
    clip_dir, llama_dir, out = tmp_path / "clip", tmp_path / "llama", tmp_path / "composed"
    clip = tiny.make_hf_clip(clip_dir, seed=2)
    llama = tiny.make_hf_llama(llama_dir, tok, seed=3)
    assert convert_main(["compose", "--vision", str(clip_dir), "--text", str(llama_dir), "--projector", "linear",
                         str(out)]) == 0
    loaded = load_model_dir(out)
    cfg = loaded.config
    assert cfg.text.vocab_size % 64 == 0 and cfg.text.vocab_size >= len(tok) + 2
    assert loaded.tokenizer.convert_ids_to_tokens(cfg.image_token_id) == "<image>"
    assert loaded.tokenizer.pad_token == "<pad>" and cfg.projector == "linear"
    emb = np.asarray(loaded.model.language_model.embed_tokens[...])
    old = llama.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(emb[: len(old)], old)
    new = emb[len(old):]
    assert np.abs(new.mean(0) - old.mean(0)).max() < 0.5 * np.abs(old).max()
    np.testing.assert_array_equal(np.asarray(loaded.model.vision_tower.patch_embedding[...]),
                                  clip.vision_model.embeddings.patch_embedding.weight.detach().numpy().transpose(2, 3, 1, 0))
    ids = np.array([[1, 20, 33, 47, 60]])
    with torch.no_grad():
        ref = llama(input_ids=torch.tensor(ids)).logits.numpy()
    ours, _ = loaded.model(jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(ours)[..., : ref.shape[-1]], ref, atol=1e-4)
    assert loaded.image_config.aspect == "pad"
