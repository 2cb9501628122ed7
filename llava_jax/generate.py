"""Batched KV-cache decoding, and the `python -m llava_jax.generate` command.

`generate` left-pads prompts of different lengths (positions count only real tokens), prefills a fixed-size
cache in one call, then decodes inside one jitted `lax.while_loop` (greedy, temperature and top-p sampling),
stopping early once every sequence has produced an end-of-sequence token. Stop strings are applied afterwards
on the decoded text. Prompt and cache lengths are rounded up to buckets so repeated calls reuse compilations.

At batch 1 decoding is bound by memory bandwidth (every step reads all decoder weights): on CPU the decode loop
runs on per-layer copies of the weights (`split_layers`), and `--dtype bfloat16` halves the bytes read.

  python -m llava_jax.generate --model runs/demo/hf --image cat.jpg --prompt "What is in the image?" --json
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax import cli, host_memory
from llava_jax.models.llava import Llava

BUCKET = 32
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # --dtype: weights and compute


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _select(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Next tokens [B] from logits [B, V]: argmax when temperature is 0, else top-p sampling."""
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # the smallest prefix whose mass reaches top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "cache_len", "temperature", "top_p",
                                             "split"))
def _generate_jit(graphdef, state, input_ids, attention_mask, pixel_values, has_image, eos_ids, key, *,
                  max_new_tokens: int, cache_len: int, temperature: float, top_p: float, split: bool = False):
    model: Llava = nnx.merge(graphdef, state)
    lm = model.language_model
    b = input_ids.shape[0]
    cache = model.language_model.init_cache(b, cache_len)
    # only the last prompt position is projected onto the vocabulary (the others' logits are never used)
    hidden, cache = model(input_ids, pixel_values, has_image, attention_mask, cache=cache, return_hidden=True)
    key, sub = jax.random.split(key)
    first = _select(model.language_model.logits(hidden[:, -1]), sub, temperature, top_p)
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos_ids)
    weights = None
    if split:  # decode from per-layer weight and cache buffers, copied once here (see `split_weights`)
        weights, cache = lm.split_weights(), lm.split_cache(cache)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, out, cache, last, done, key = carry
        if split:  # text only from here on: the decoder alone (Llava's embedding merge has no image to merge)
            logits, cache = lm(last[:, None], cache=cache, split=weights)
        else:
            logits, cache = model(last[:, None], cache=cache)
        key, sub = jax.random.split(key)
        tok = _select(logits[:, -1], sub, temperature, top_p)
        tok = jnp.where(done, eos_ids[0], tok)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        return i + 1, out, cache, tok, done | jnp.isin(tok, eos_ids), key

    i, out, *_ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, cache, first, done, key))
    return out, i


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists into ids [B, length] and attention mask [B, length] (1 = token)."""
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for i, s in enumerate(sequences):
        if len(s) > length:
            raise ValueError(f"prompt {i} has {len(s)} tokens, more than {length}")
        if len(s):
            ids[i, length - len(s):] = s
            mask[i, length - len(s):] = 1
    return ids, mask


def _cut_at_stop(tokens: list[int], eos_ids: Sequence[int], stop_strings: Sequence[str], tokenizer) -> list[int]:
    for j, t in enumerate(tokens):
        if t in eos_ids:
            tokens = tokens[: j + 1]
            break
    if stop_strings and tokenizer is not None:
        # one decode for the usual case (no stop string); the prefix search only when there is one to find
        if not any(s in tokenizer.decode(tokens, skip_special_tokens=False) for s in stop_strings):
            return tokens
        for j in range(len(tokens)):
            text = tokenizer.decode(tokens[: j + 1], skip_special_tokens=False)
            if any(s in text for s in stop_strings):
                return tokens[: j + 1]
    return tokens


def generate(model: Llava, input_ids_list: Sequence[Sequence[int]], pixel_values=None, has_image=None, *,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             eos_ids: Sequence[int] = (2,), stop_strings: Sequence[str] = (), tokenizer=None, seed: int = 0,
             pad_id: int = 0, bucket: int = BUCKET, split_layers: bool | None = None) -> list[list[int]]:
    """Decodes a batch of prompts.

    Args:
      model: a Llava model.
      input_ids_list: B prompts as token lists (image positions already expanded to num_image_tokens).
      pixel_values: [B, H, W, 3] images (zeros for samples without one) or None for text only.
      has_image: [B] bool; by default every sample has an image when pixel_values is given.
      max_new_tokens: upper bound on generated tokens per sequence.
      temperature: 0 for greedy; else sampling with `top_p`.
      eos_ids: ids that end a sequence (kept in the output).
      stop_strings: texts that end a sequence (needs `tokenizer`; the output is cut after the token that
        completes one).
      split_layers: decode from per-layer copies of the decoder weights (`LlamaForCausalLM.split_weights`):
        at batch 1 on CPU this made decoding 1.7x faster (the layer scan copied every layer's weights out of
        the stack at every step), for one copy of the decoder weights per call, held while it runs. None: on
        CPU only (accelerators keep the memory).
    Returns:
      B lists of new token ids (the prompt excluded).
    """
    if not input_ids_list:
        return []
    if max_new_tokens < 1:
        return [[] for _ in input_ids_list]
    b = len(input_ids_list)
    prompt_len = _round_up(max(len(s) for s in input_ids_list), bucket)
    cache_len = _round_up(prompt_len + max_new_tokens, bucket)
    ids, mask = left_pad(input_ids_list, pad_id, prompt_len)
    if pixel_values is not None:
        pixel_values = jnp.asarray(pixel_values, jnp.float32)
        has_image = jnp.ones((b,), bool) if has_image is None else jnp.asarray(has_image, bool)
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    if split_layers is None:
        split_layers = jax.default_backend() == "cpu"
    split_layers = split_layers and max_new_tokens > 1  # no decode step: nothing to split for
    graphdef, state = nnx.split(model)
    out, n = _generate_jit(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), pixel_values, has_image, eos,
                           jax.random.key(seed), max_new_tokens=max_new_tokens, cache_len=cache_len,
                           temperature=float(temperature), top_p=float(top_p), split=bool(split_layers))
    out = np.asarray(out)[:, : int(n)]
    return [_cut_at_stop(list(map(int, row)), list(eos_ids), stop_strings, tokenizer) for row in out]


def eos_ids_of(tokenizer, config=None) -> list[int]:
    """The end-of-sequence ids of a tokenizer / text config."""
    ids = []
    for v in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(config, "text", None), "eos_token_id", None)):
        if isinstance(v, int):
            ids.append(v)
        elif isinstance(v, (list, tuple)):
            ids.extend(int(x) for x in v)
    return sorted(set(ids)) or [2]


# ------------------------------------------------------------------------------------------------ prompts


def build_prompt_ids(loaded, prompt: str, with_image: bool, raw: bool = False) -> list[int]:
    """Token ids of `prompt` for a loaded model: wrapped in its conversation template (the image marker is
    put before the text when missing), or, with `raw`, tokenized as-is with its `<image>` expanded."""
    from llava_jax.data import conversation

    cfg = loaded.config
    tok = loaded.tokenizer
    n, image_id = cfg.num_image_tokens, cfg.image_token_id
    if raw:  # as LLaVA's CLI: tokenizer_image_token over the whole text (DESIGN.md, tokenization rule)
        if not with_image:
            return list(tok(prompt.replace("<image>", ""), add_special_tokens=True).input_ids)
        return [int(t) for t in conversation.tokenize_with_image(prompt, tok, n, image_id).ids]
    text = prompt
    if with_image and "<image>" not in text:
        text = "<image>\n" + text
    if not with_image:
        text = text.replace("<image>", "").strip()
    return conversation.encode_prompt([{"from": "human", "value": text}], loaded.template, tok, n, image_id,
                                      has_image=with_image)


def stop_strings_of(template_name: str) -> tuple[str, ...]:
    from llava_jax.data import conversation

    try:
        return conversation.get_template(template_name).stop_strings
    except KeyError:
        return ()


def main(argv: Sequence[str] | None = None) -> int:
    from llava_jax.convert.model_dir import load_model
    from llava_jax.data import images

    p = cli.ArgumentParser(prog="python -m llava_jax.generate", description="Answer a prompt about an image.")
    p.add_argument("--model", required=True, help="HF LLaVA dir, llava_jax model dir, or training workdir")
    p.add_argument("--image", help="image file (omit for a text-only prompt)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="send the prompt as-is; its <image> marks the image")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print {'text': ..., 'token_ids': [...]}")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                   help="weights and compute (bfloat16 halves the bytes each decoded token reads; on accelerators: "
                        "XLA:CPU's bfloat16 matmuls are slower than its float32 ones)")
    args = p.parse_args(argv)
    host_memory.retain_freed_memory()  # XLA:CPU: reuse freed pages (before JAX's backend starts)

    loaded = load_model(args.model, dtype=DTYPES[args.dtype], param_dtype=DTYPES[args.dtype])
    if loaded.tokenizer is None:
        print(f"error: {args.model} has no tokenizer", file=sys.stderr)
        return 2
    pixels = None
    if args.image:
        if loaded.image_config is None:
            print(f"error: {args.model} has no image preprocessing config", file=sys.stderr)
            return 2
        pixels = images.load_and_preprocess(args.image, loaded.image_config)[None]
    ids = build_prompt_ids(loaded, args.prompt, with_image=pixels is not None, raw=args.raw)
    stops = () if args.raw else stop_strings_of(loaded.template)
    eos = eos_ids_of(loaded.tokenizer, loaded.config)
    new = generate(loaded.model, [ids], pixels, None, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p, eos_ids=eos, stop_strings=stops,
                   tokenizer=loaded.tokenizer, seed=args.seed, pad_id=loaded.tokenizer.pad_token_id or 0)[0]
    text = loaded.tokenizer.decode(new, skip_special_tokens=True)
    for s in stops:
        text = text.split(s)[0]
    text = text.strip()
    if args.json:
        print(json.dumps({"text": text, "token_ids": new}))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
