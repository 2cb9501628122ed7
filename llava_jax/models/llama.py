"""LLaMA decoder in Flax NNX, numerically equal to transformers' `LlamaForCausalLM`.

RMSNorm, rotary embeddings (default, linear and `llama3` scaling), grouped-query attention (`attention.py`: XLA
with a hand-written backward pass, cuDNN, or the Pallas TPU flash kernel), SwiGLU MLP, optional attention / MLP
biases, optional tied embeddings, and a fixed-size KV cache for decoding. Decoder layers are stored stacked
(leading axis 'layers') and scanned.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.models import attention as A
from llava_jax.models import frozen as F
from llava_jax.models import layers as L
from llava_jax.models import lora as lora_lib

Cache = dict[str, jax.Array]
TRANSPOSE_MIN = 1024  # `split_weights`: kernels with this many inputs or more are stored [out, in]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Geometry of a LLaMA decoder (field names as in transformers' LlamaConfig)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None  # frozen (FrozenDict) when the config is built
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        F.freeze_fields(self)  # dicts / lists -> FrozenDict / tuples: the config must be hashable
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise L.UnsupportedConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        rope_inv_freq(self)  # an unsupported or incomplete rope_scaling fails here, when the config is read

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> LlamaConfig:
        """From a transformers LlamaConfig dict, in either the v4 (`rope_theta` + `rope_scaling`) or the v5
        (`rope_parameters`) form."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        rope = d.get("rope_parameters")
        if rope:
            rope = dict(rope)
            kw["rope_theta"] = rope.pop("rope_theta", kw.get("rope_theta", 10000.0))
            kind = rope.get("rope_type", rope.get("type", "default"))
            kw["rope_scaling"] = None if kind == "default" else rope
        if kw.get("head_dim") is None:
            kw.pop("head_dim", None)
        if kw.get("num_key_value_heads") is None:
            kw["num_key_value_heads"] = kw.get("num_attention_heads", cls.num_attention_heads)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """The transformers LlamaConfig dict (v4 style keys, which v5 also reads), with plain dicts and lists."""
        d = F.fields_as_json(self)
        d["model_type"] = "llama"
        if d["rope_scaling"] is None:
            d.pop("rope_scaling")
        return d


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] of the rotary embedding, including the configured scaling."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv.astype(np.float32)
    needs = {"linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    if kind not in needs:
        raise L.UnsupportedConfigError(f"rope scaling type {kind!r} is not supported (default, linear, llama3)")
    missing = [k for k in needs[kind] if scaling.get(k) is None]
    if missing:
        raise L.UnsupportedConfigError(f"rope scaling {kind!r} lacks {', '.join(missing)}")
    if kind == "linear":
        return (inv / scaling["factor"]).astype(np.float32)
    factor = scaling["factor"]  # llama3
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates x [B, T, N, H] by positions [B, T] (half-split layout, as transformers' rotate_half)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb).astype(x.dtype)[:, :, None], jnp.sin(emb).astype(x.dtype)[:, :, None]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Rotary positions [B, T] of packed rows: each run of equal segment ids [B, T] counts from 0."""
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


class SplitWeights(NamedTuple):
    """The decoder's weights laid out for batch-1 decoding (`LlamaForCausalLM.split_weights`): `layers`, one
    dict per layer of arrays of their own, whose matmul kernels are `{name}_kernel` [in, out] or, for long
    rows, `{name}_kernel_t` [out, in]; `head`, the output projection, [V, D] when `head_transposed`, else
    [D, V]."""

    layers: list[dict[str, jax.Array]]
    head: jax.Array
    head_transposed: bool


def dense_t(x: jax.Array, kernel_t: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """x [..., in] @ kernel_t [out, in]^T (+ bias [out]) in x's dtype: the product with a transposed kernel,
    which XLA:CPU runs as row dot products (a matrix-vector product streams the weights row by row)."""
    y = jnp.einsum("...i,oi->...o", x, kernel_t.astype(x.dtype))
    return y if bias is None else y + bias.astype(x.dtype)


class LlamaForCausalLM(nnx.Module):
    """LLaMA decoder with its language-model head.

    Parameters (D model width, F MLP width, V vocabulary, Lyr layers, Nq/Nk heads of size Hd):
    embed_tokens [V, D]; stacked per layer: input_norm [Lyr, D], q [Lyr, D, Nq*Hd], k / v [Lyr, D, Nk*Hd],
    o [Lyr, Nq*Hd, D], post_norm [Lyr, D], gate / up [Lyr, D, F], down [Lyr, F, D] (+ biases when configured);
    norm [D]; lm_head [D, V] unless embeddings are tied.
    """

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 attention_impl: str | None = None, remat: str | None = None):
        self.config, self.dtype = config, dtype
        self.attention_impl, self.remat = attention_impl, remat
        self.scan_unroll: int | bool = 1  # layers per scan iteration (True: fully unrolled)
        self.lora: lora_lib.LoraSpec | None = None  # adapters: models/lora.py `add_lora`
        c = config
        n, d, f = c.num_hidden_layers, c.hidden_size, c.intermediate_size
        qd, kd = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        std = 0.02

        def p(init, shape, names):
            return L.param(rngs, init, shape, names, param_dtype)

        self.embed_tokens = p(L.normal(std), (c.vocab_size, d), ("vocab", "embed"))
        self.input_norm = p(L.ones, (n, d), ("layers", "norm"))
        self.q_kernel = p(L.normal(std), (n, d, qd), ("layers", "embed", "heads"))
        self.k_kernel = p(L.normal(std), (n, d, kd), ("layers", "embed", "kv_heads"))
        self.v_kernel = p(L.normal(std), (n, d, kd), ("layers", "embed", "kv_heads"))
        self.o_kernel = p(L.normal(std), (n, qd, d), ("layers", "heads", "embed"))
        if c.attention_bias:
            self.q_bias = p(L.zeros, (n, qd), ("layers", "heads"))
            self.k_bias = p(L.zeros, (n, kd), ("layers", "kv_heads"))
            self.v_bias = p(L.zeros, (n, kd), ("layers", "kv_heads"))
            self.o_bias = p(L.zeros, (n, d), ("layers", "norm"))
        self.post_norm = p(L.ones, (n, d), ("layers", "norm"))
        self.gate_kernel = p(L.normal(std), (n, d, f), ("layers", "embed", "mlp"))
        self.up_kernel = p(L.normal(std), (n, d, f), ("layers", "embed", "mlp"))
        self.down_kernel = p(L.normal(std), (n, f, d), ("layers", "mlp", "embed"))
        if c.mlp_bias:
            self.gate_bias = p(L.zeros, (n, f), ("layers", "mlp"))
            self.up_bias = p(L.zeros, (n, f), ("layers", "mlp"))
            self.down_bias = p(L.zeros, (n, d), ("layers", "norm"))
        self.norm = p(L.ones, (d,), ("norm",))
        if not c.tie_word_embeddings:
            self.lm_head = p(L.normal(std), (d, c.vocab_size), ("embed", "vocab"))

    # -------------------------------------------------------------------------------------------- pieces
    def embed(self, input_ids: jax.Array) -> jax.Array:
        """input_ids [B, T] -> embeddings [B, T, D] in the compute dtype (ids are clipped into range)."""
        ids = jnp.clip(input_ids, 0, self.config.vocab_size - 1)
        return self.embed_tokens[...].astype(self.dtype)[ids]

    def head_kernel(self) -> jax.Array:
        """The output projection [D, V] (the transposed embedding table when tied)."""
        return self.embed_tokens[...].T if self.config.tie_word_embeddings else self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-norm'd hidden [..., D] -> logits [..., V]."""
        return L.dense(hidden, self.head_kernel())

    def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
        """An empty KV cache: keys transposed k [Lyr, B, Nk, Hd, S], values v [Lyr, B, Nk, S, Hd] (the layouts
        `attention.cached_attention` multiplies without copies), `valid` [B, S] int32 and write `index` []."""
        c = self.config
        lyr, nk, hd = c.num_hidden_layers, c.num_key_value_heads, c.head_dim
        dt = dtype or self.dtype
        return {"k": jnp.zeros((lyr, batch, nk, hd, max_len), dt), "v": jnp.zeros((lyr, batch, nk, max_len, hd), dt),
                "valid": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.zeros((), jnp.int32)}

    def _layer_weights(self) -> dict[str, jax.Array]:
        names = ["input_norm", "q_kernel", "k_kernel", "v_kernel", "o_kernel", "post_norm", "gate_kernel",
                 "up_kernel", "down_kernel"]
        if self.config.attention_bias:
            names += ["q_bias", "k_bias", "v_bias", "o_bias"]
        if self.config.mlp_bias:
            names += ["gate_bias", "up_bias", "down_bias"]
        if self.lora is not None:
            names += [n for t in self.lora.targets for n in lora_lib.adapter_names(t)]
        return {k: getattr(self, k)[...] for k in names}

    def split_weights(self, dtype=None, transpose_min: int = TRANSPOSE_MIN) -> SplitWeights:
        """The decoder's weights for `__call__(split=...)`: each layer's in arrays of their own, in `dtype`
        (default: the compute dtype); kernels with at least `transpose_min` inputs (and the head, by the
        model width) transposed to [out, in].

        Inside a jitted function these are copies made once; a decode loop then multiplies the buffers as they
        lie, where the scan over the stacked [Lyr, ...] parameters has XLA:CPU copy each layer's slice out of
        the stack before its matmuls at every step (three times the weight traffic of a memory-bound batch-1
        step). XLA:CPU's matrix-vector product streamed [out, in] weights with 1,024-long rows 12-25% faster
        than [in, out], and 256-long rows at half the speed (bench/roofline.py's notes in BENCHMARKS.md), hence
        the threshold. Costs one more copy of the decoder weights while it lives."""
        dt = dtype or self.dtype

        def one(name, v):
            if name.endswith("_kernel") and v.shape[0] >= transpose_min:
                return name + "_t", jnp.swapaxes(v, 0, 1).astype(dt)
            return name, v.astype(dt)

        stacked = self._layer_weights()
        layers = [dict(one(k, v[i]) for k, v in stacked.items()) for i in range(self.config.num_hidden_layers)]
        transposed = self.config.hidden_size >= transpose_min
        if self.config.tie_word_embeddings:
            head = self.embed_tokens[...] if transposed else self.embed_tokens[...].T
        else:
            head = self.lm_head[...].T if transposed else self.lm_head[...]
        return SplitWeights(layers, head.astype(dt), transposed)

    @staticmethod
    def split_cache(cache: Cache) -> Cache:
        """A cache whose "k" / "v" are per-layer lists ([B, Nk, Hd, S] / [B, Nk, S, Hd] each) instead of stacks,
        for `__call__(split=...)`: each layer's attention then reads and writes its own buffer in place."""
        n = cache["k"].shape[0]
        return dict(cache, k=[cache["k"][i] for i in range(n)], v=[cache["v"][i] for i in range(n)])

    # -------------------------------------------------------------------------------------------- forward
    def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
                 cache: Cache | None = None, return_hidden: bool = False, lora_key: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, split: SplitWeights | None = None):
        """Runs the decoder.

        Args:
          input_ids: [B, T] token ids (or pass inputs_embeds [B, T, D]).
          attention_mask: [B, T] 1 for tokens, 0 for padding (left or right); all ones by default.
          positions: [B, T] rotary positions; by default the count of real tokens before each one (so left
            padding gets correct positions), continuing from the cache when one is given.
          cache: a KV cache from `init_cache` (or a previous call); the T new tokens are written at its index
            (a scalar; or, for a slot cache whose rows hold unrelated sequences, an index per row [B]).
          return_hidden: return the final-norm'd hidden states [B, T, D] instead of logits.
          lora_key: PRNG key for the LoRA adapters' dropout (training); None = no dropout.
          segment_ids: [B, T] int for packed rows (training, no cache): one id per sample, 0 = padding; a token
            attends only to earlier tokens of its own sample (`attention.segment_mask`, and the flash kernel's
            segment ids), and default positions restart at 0 at each sample's first token.
          split: the weights from `split_weights` (decoding): a Python loop over its layers replaces the scan
            over the stacked parameters; needs a cache, whose "k" / "v" may be per-layer lists (`split_cache`).
        Returns:
          (logits [B, T, V] — or hidden [B, T, D] — , the updated cache or None).
        """
        c = self.config
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        b, t, _ = h.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        attention_mask = attention_mask.astype(jnp.int32)
        per_row = cache is not None and cache["index"].ndim == 1  # a slot cache: one write index per row
        if cache is None:
            valid = attention_mask
            q_slots = jnp.arange(t)[None]  # [1, T]
            k_slots = jnp.arange(t)
        elif per_row:
            start = cache["index"]  # [B]
            valid = jax.vmap(lambda row, m, s: jax.lax.dynamic_update_slice(row, m, (s,)))(
                cache["valid"], attention_mask, start)
            q_slots = start[:, None] + jnp.arange(t)[None]  # [B, T]
            k_slots = jnp.arange(valid.shape[1])
        else:
            start = cache["index"]
            valid = jax.lax.dynamic_update_slice(cache["valid"], attention_mask, (0, start))
            q_slots = (start + jnp.arange(t))[None]
            k_slots = jnp.arange(valid.shape[1])
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed rows) are for training; a KV cache holds one sequence per row")
            segment_ids = segment_ids.astype(jnp.int32)
            if positions is None:
                positions = segment_positions(segment_ids)
        if positions is None:
            before = jnp.cumsum(valid, axis=1) - 1
            positions = jnp.maximum(jnp.take_along_axis(before, jnp.broadcast_to(q_slots, (b, t)), axis=1), 0)
        causal = (k_slots[None, None, :] <= q_slots[:, :, None]) & (valid[:, None, :] > 0)  # [B, T, S]
        causal = causal | (k_slots[None, None, :] == q_slots[:, :, None])  # padded queries see themselves
        mask = causal[:, None] if segment_ids is None else A.segment_mask(segment_ids)  # [B, 1, T, S]
        inv_freq = jnp.asarray(rope_inv_freq(c))
        nq, nk, hd, eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
        impl, act = self.attention_impl, L.activation(c.hidden_act)
        dtype = self.dtype

        attention = A.attention_fn(impl, causal=True)
        lora = self.lora

        def proj(name, x, w):
            if f"{name}_kernel_t" in w:  # split weights: [out, in]
                y = dense_t(x, w[f"{name}_kernel_t"], w.get(f"{name}_bias"))
            else:
                y = L.dense(x, w[f"{name}_kernel"], w.get(f"{name}_bias"))
            if lora is not None and name in lora.targets:
                a_name, b_name = lora_lib.adapter_names(name)
                key = w.get("lora_key")
                key = None if key is None else jax.random.fold_in(key, lora_lib.target_index(name))
                y = y + lora_lib.delta(x, w[a_name], w[b_name], lora.scale, lora.dropout, key)
            return y

        def attend_and_mlp(x, w, k_all, v_all, q):
            if cache is not None:  # k_all [B, K, H, S], v_all [B, K, S, H]: the cache's layouts
                if impl in (*A.XLA_ATTENTION, "flash_tpu"):
                    a = A.cached_attention(q, k_all, v_all, mask)
                else:
                    a = attention(q, k_all.transpose(0, 3, 1, 2), v_all.transpose(0, 2, 1, 3), mask)
            else:
                a = attention(q, k_all, v_all, mask, segment_ids=valid if segment_ids is None else segment_ids)
            x = x + proj("o", a.reshape(b, t, nq * hd), w)
            y = L.rms_norm(x, w["post_norm"], eps)
            g = proj("gate", y, w)
            u = proj("up", y, w)
            y = proj("down", act(g) * u, w)
            return L.constrain(x + y, ("activation_batch", "activation_length", "activation_embed"))

        def qkv(x, w):
            y = L.rms_norm(x, w["input_norm"], eps)
            q = proj("q", y, w).reshape(b, t, nq, hd)
            k = proj("k", y, w).reshape(b, t, nk, hd)
            v = proj("v", y, w).reshape(b, t, nk, hd)
            q = L.constrain(apply_rope(q, positions, inv_freq), ("activation_batch", "activation_length",
                                                                 "activation_heads", None))
            k = apply_rope(k, positions, inv_freq)
            return q, k, v

        layers = None if split is None else split.layers
        if layers is not None and cache is None:
            raise ValueError("split= (split decoder weights) is for decoding with a cache")
        weights = {} if layers is not None else {
            k: v.astype(dtype) if v.ndim > 2 else v for k, v in self._layer_weights().items()}
        if lora is not None and lora.dropout > 0 and lora_key is not None:
            weights["lora_key"] = jax.random.split(lora_key, c.num_hidden_layers)  # one key per layer
        if cache is None:
            def body(x, w):
                q, k, v = qkv(x, w)
                return attend_and_mlp(x, w, k, v, q), None

            h, _ = jax.lax.scan(L.maybe_remat(body, self.remat), h, weights, unroll=self.scan_unroll)
            new_cache = None
        else:
            start = cache["index"]

            if per_row:  # row b's T new entries go to slots start[b] + [0, T): one in-place scatter per layer
                rows = jnp.arange(b)[:, None]
                at = jnp.minimum(q_slots, valid.shape[1] - 1)  # [B, T]

            def body(carry, xs):
                x, ck, cv = carry
                w, i = xs
                q, k, v = qkv(x, w)
                if per_row:  # advanced indices first: the updates are [B, T, K, H]
                    ck = ck.at[i, rows, :, :, at].set(k.astype(ck.dtype), mode="promise_in_bounds")
                    cv = cv.at[i, rows, :, at, :].set(v.astype(cv.dtype), mode="promise_in_bounds")
                else:
                    k_t = k.astype(ck.dtype).transpose(0, 2, 3, 1)[None]  # [1, B, K, H, T]
                    ck = jax.lax.dynamic_update_slice(ck, k_t, (i, 0, 0, 0, start))
                    cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype).transpose(0, 2, 1, 3)[None],
                                                      (i, 0, 0, start, 0))
                k_all = jax.lax.dynamic_index_in_dim(ck, i, 0, keepdims=False).astype(dtype)
                v_all = jax.lax.dynamic_index_in_dim(cv, i, 0, keepdims=False).astype(dtype)
                return (attend_and_mlp(x, w, k_all, v_all, q), ck, cv), None

            if layers is not None and isinstance(cache["k"], (list, tuple)):  # per-layer buffers throughout
                ck, cv = list(cache["k"]), list(cache["v"])
                for i, w in enumerate(layers):
                    (h, ck_i, cv_i), _ = body((h, ck[i][None], cv[i][None]), (w, 0))
                    ck[i], cv[i] = ck_i[0], cv_i[0]
            elif layers is not None:
                ck, cv = cache["k"], cache["v"]
                for i, w in enumerate(layers):
                    (h, ck, cv), _ = body((h, ck, cv), (w, i))
            else:
                idx = jnp.arange(c.num_hidden_layers)
                (h, ck, cv), _ = jax.lax.scan(body, (h, cache["k"], cache["v"]), (weights, idx),
                                              unroll=self.scan_unroll)
            new_cache = {"k": ck, "v": cv, "valid": valid, "index": start + t}
        h = L.rms_norm(h, self.norm[...], eps)
        if return_hidden:
            return h, new_cache
        if split is not None:
            return (dense_t if split.head_transposed else L.dense)(h, split.head), new_cache
        return self.logits(h), new_cache
