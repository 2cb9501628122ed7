"""Greedy KV-cache generation equals transformers' `generate(do_sample=False)`; sampling options behave."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from llava_jax import tiny  # noqa: E402
from llava_jax.convert.model_dir import llava_params_from_hf  # noqa: E402
from llava_jax.convert.params import build_with_params  # noqa: E402
from llava_jax.generate import _select, generate, left_pad  # noqa: E402
from llava_jax.models.llava import Llava, LlavaConfig  # noqa: E402


@pytest.fixture(scope="module")
def models():
    tok = tiny.build_tokenizer(["a red circle", "two blue squares on the left"], vocab_size=200)
    hf = tiny.make_hf_llava(None, tok, seed=7)
    cfg = LlavaConfig.from_hf(hf.config.to_dict())
    arrays = llava_params_from_hf({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
    ours = build_with_params(lambda: Llava(cfg, rngs=nnx.Rngs(0)), arrays)
    return tok, hf, ours, cfg


def test_greedy_matches_hf_generate_mixed_batch(models):
    tok, hf, ours, cfg = models
    img = "<image>" * cfg.num_image_tokens
    texts = ["USER: " + img + "\nWhat is this? ASSISTANT:", "USER: hello there, tell me a story ASSISTANT:",
             "USER: " + img + "\nDescribe the picture in detail please ASSISTANT:", "USER: hi ASSISTANT:"]
    has_image = np.array([True, False, True, False])
    seqs = [tok(t).input_ids for t in texts]
    pixels = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    new = generate(ours, seqs, jnp.asarray(pixels.transpose(0, 2, 3, 1)), has_image, max_new_tokens=20,
                   eos_ids=[-5], pad_id=tok.pad_token_id)
    # HF: images batch together, text-only prompts batch together (it cannot mix), each left-padded.
    for rows, with_pixels in (([0, 2], True), ([1, 3], False)):
        t = max(len(seqs[r]) for r in rows)
        ids, mask = left_pad([seqs[r] for r in rows], tok.pad_token_id, t)
        kw = dict(pixel_values=torch.tensor(pixels[rows])) if with_pixels else {}
        with torch.no_grad():
            ref = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                              max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id,
                              eos_token_id=None, **kw)
        ref = ref[:, t:].numpy()
        for j, r in enumerate(rows):
            assert new[r] == ref[j].tolist(), f"row {r}"


def test_eos_stops_and_is_kept(models):
    tok, hf, ours, cfg = models
    seq = tok("USER: hello there ASSISTANT:").input_ids
    free = generate(ours, [seq], max_new_tokens=12, eos_ids=[-5])[0]
    stop_at = free[3]
    cut = generate(ours, [seq], max_new_tokens=12, eos_ids=[stop_at])[0]
    first = free.index(stop_at)
    assert cut == free[: first + 1]


def test_top_p_keeps_only_the_nucleus():
    import jax

    logits = jnp.log(jnp.asarray([[0.6, 0.3, 0.05, 0.05]]))
    draws = {int(_select(logits, jax.random.key(s), 1.0, 0.8)[0]) for s in range(200)}
    assert draws == {0, 1}
    assert int(_select(logits, jax.random.key(0), 0.0, 1.0)[0]) == 0


def test_cli_raw_json_matches_hf(tmp_path, capsys):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_jax.generate import main

    tok = tiny.build_tokenizer(["a red circle", "two blue squares on the left"], vocab_size=200)
    d = tmp_path / "hf"
    tiny.make_hf_llava(d, tok, seed=8)
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 44, 3), dtype=np.uint8)).save(img)
    prompt = "USER: <image>\nWhat is it? ASSISTANT:"
    assert main(["--model", str(d), "--image", str(img), "--prompt", prompt, "--raw", "--json",
                 "--max-new-tokens", "8"]) == 0
    out = __import__("json").loads(capsys.readouterr().out.strip().splitlines()[-1])
    proc = AutoProcessor.from_pretrained(str(d))
    hf = LlavaForConditionalGeneration.from_pretrained(str(d)).eval()
    batch = proc(images=Image.open(img), text=prompt, return_tensors="pt")
    with torch.no_grad():
        ref = hf.generate(**batch, max_new_tokens=8, do_sample=False)[0, batch.input_ids.shape[1]:].tolist()
    eos = tok.eos_token_id
    ref = ref[: ref.index(eos) + 1] if eos in ref else ref
    assert out["token_ids"] == ref


def test_split_weights_decode_equals_the_layer_scan(models):
    """The CPU decode path (per-layer, transposed weight copies and per-layer caches) computes what the scan over
    the stacked parameters computes: the same greedy tokens, and decode-step logits within float32 rounding."""
    import jax

    tok, hf, ours, cfg = models
    seqs = [tok("USER: two blue squares on the left, what else? ASSISTANT:").input_ids,
            tok("USER: hi ASSISTANT:").input_ids]  # text only: the decode loop is the decoder's alone
    split = generate(ours, seqs, max_new_tokens=10, eos_ids=[-5], split_layers=True)
    stacked = generate(ours, seqs, max_new_tokens=10, eos_ids=[-5], split_layers=False)
    assert split == stacked

    lm = ours.language_model
    ids, mask = left_pad(seqs, tok.pad_token_id, 32)
    _, cache = lm(jnp.asarray(ids), attention_mask=jnp.asarray(mask), cache=lm.init_cache(2, 48))
    nxt = jnp.asarray([[5], [9]], jnp.int32)
    ref, ref_cache = lm(nxt, cache=cache)
    assert not np.allclose(np.asarray(ref[:, 0, :8]), 0)
    for transpose_min in (0, 10**9):  # every kernel and the head transposed; none
        weights = lm.split_weights(transpose_min=transpose_min)
        assert weights.head_transposed == (transpose_min == 0)
        assert ("q_kernel_t" in weights.layers[0]) == (transpose_min == 0)
        got, got_cache = jax.jit(lambda c, w=weights: lm(nxt, cache=lm.split_cache(c), split=w))(cache)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.stack(got_cache["k"]), np.asarray(ref_cache["k"]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.stack(got_cache["v"]), np.asarray(ref_cache["v"]), rtol=1e-5, atol=1e-6)


def test_cli_bfloat16_weights(tmp_path, capsys):
    """`--dtype bfloat16` loads weights and computes in bfloat16: the CLI's tokens are the API's on the model
    loaded in bfloat16, and its logits stay within bfloat16 rounding of float32's."""
    import json

    from llava_jax.convert.model_dir import load_model
    from llava_jax.generate import build_prompt_ids, main

    tok = tiny.build_tokenizer(["a red circle", "two blue squares on the left"], vocab_size=200)
    d = tmp_path / "hf"
    tiny.make_hf_llava(d, tok, seed=9)
    assert main(["--model", str(d), "--prompt", "hello there", "--json", "--max-new-tokens", "6",
                 "--dtype", "bfloat16"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    half = load_model(d, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    full = load_model(d)
    assert half.model.language_model.q_kernel[...].dtype == jnp.bfloat16
    ids = build_prompt_ids(half, "hello there", with_image=False)
    api = generate(half.model, [ids], max_new_tokens=6, eos_ids=[tok.eos_token_id],
                   pad_id=tok.pad_token_id or 0)[0]
    assert out["token_ids"] == api
    l16 = np.asarray(half.model(jnp.asarray([ids]))[0][0, -1].astype(jnp.float32))
    l32 = np.asarray(full.model(jnp.asarray([ids]))[0][0, -1])
    assert np.abs(l16 - l32).max() <= 0.05 * np.abs(l32).max()
    assert np.abs(l16 - l32).max() > 0  # really computed in another precision
