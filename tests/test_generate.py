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
