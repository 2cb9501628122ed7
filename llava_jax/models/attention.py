"""Attention implementations: the training paths (`attention_fn`) and the decoding path (`cached_attention`).

- XLA (`xla_attention`, the default): plain XLA ops with a hand-written backward pass. The forward pass keeps
  only q, k, v, the output and each row's log-sum-exp; the backward pass recomputes the [T, S] scores once and
  derives every gradient from them (the FlashAttention-2 backward, done with whole matrices instead of tiles).
  Causal self-attention can be split into query pieces that each attend only the keys they can see.
- "cudnn": `jax.nn.dot_product_attention`'s fused GPU kernel.
- "flash_tpu": the Pallas TPU flash-attention kernel (`flash_tpu_attention`).

Packed rows (`data.packing`): a row holds several samples, told apart by segment ids [B, T] (1, 2, ... per
sample, 0 = padding); a token attends only to earlier tokens of its own segment. The XLA path and cuDNN get
that rule inside the boolean mask the decoder builds (`segment_mask`); cuDNN turns a boolean mask into an
additive bias: `jax.nn.dot_product_attention` has no segment-id argument in jax 0.10 (its
query/key_value_seq_lengths describe one sequence per row; the packed `q_offsets` layout exists only in jax's
private cudnn module), so the explicit mask is what carries the segments there. The Pallas kernel takes the
segment ids themselves (`SegmentIds`) and never sees a mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llava_jax.models.layers import _RULES, UnsupportedConfigError, logical_to_mesh_spec

XLA_ATTENTION = (None, "", "xla")  # names of the XLA path
ATTENTION_IMPLS = (*XLA_ATTENTION, "cudnn", "flash_tpu")
FLASH_BLOCK = 128
_MASKED = float(jnp.finfo(jnp.float32).min)


def attention_fn(implementation: str | None, causal: bool = False):
    """`attend(q, k, v, mask, segment_ids=None)` ([B, T, N, H] x [B, S, K, H] -> [B, T, N, H]) for training.

    mask [B, 1, T, S] bool (True = attend; for packed rows it already holds the segment rule, see
    `segment_mask`); segment_ids [B, T] int (0 = padding, one id per packed sample; an unpacked row is all 1).
    None / "" / "xla": `xla_attention` on the mask. With `causal` (self-attention whose
    mask hides every later key) it skips the fully masked key blocks on CPU (`causal_pieces`): that paid on the
    CPU bench (3.16 -> 3.10 s/step) but raised XLA's estimated time per 7b layer on TPU (89.7 -> 98.3 ms), so
    other platforms attend in one piece. "cudnn": the fused GPU kernel on the same mask (`cudnn_attention`).
    "flash_tpu": causal self-attention only, masking by `segment_ids` instead of `mask`; see
    `flash_tpu_attention`.
    Fused kernels skip masked blocks themselves.
    """
    if implementation not in ATTENTION_IMPLS:
        raise UnsupportedConfigError(f"unknown attention implementation {implementation!r}; known: "
                                     f"{', '.join(repr(x) for x in ATTENTION_IMPLS[1:])}")
    if implementation == "flash_tpu":
        return lambda q, k, v, mask, segment_ids=None: flash_tpu_attention(q, k, v, segment_ids)
    if implementation == "cudnn":
        return lambda q, k, v, mask, segment_ids=None: cudnn_attention(q, k, v, mask)
    if not causal:
        return lambda q, k, v, mask, segment_ids=None: xla_attention(q, k, v, mask)

    def attend_causal(q, k, v, mask, segment_ids=None):
        pieces = causal_pieces(q.shape[1]) if q.shape[1] == k.shape[1] else 1
        return jax.lax.platform_dependent(q, k, v, mask, default=xla_attention,
                                          cpu=functools.partial(xla_attention, pieces=pieces))

    return attend_causal


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """Causal attention mask [B, 1, T, T] bool of rows of segments: segment_ids [B, T] int (0 = padding).

    A token attends to itself and to earlier tokens of its own segment; a padding token attends to every
    earlier non-padding token and itself (its output is never used; this keeps the unpacked mask unchanged:
    for segment ids 0 / 1 it equals causal & key-is-valid). Never fully masked, so softmax stays finite.
    """
    seg = segment_ids.astype(jnp.int32)
    t = seg.shape[1]
    pos = jnp.arange(t)
    causal = pos[None, None, :] <= pos[None, :, None]  # [1, T, S]
    same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, :, None] == 0)
    mask = causal & (seg[:, None, :] > 0) & same
    return (mask | (pos[None, None, :] == pos[None, :, None]))[:, None]


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *,
                    implementation: str = "cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention` with the explicit boolean mask [B, 1, T, S] (padding, causality and
    packed segments in one; cuDNN adds it as a bias). q [B, T, N, H], k / v [B, S, K, H] -> [B, T, N, H].
    `implementation` is "cudnn" in training; tests pass "xla" to check on CPU the inputs cuDNN gets."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def causal_pieces(t: int, block: int = 128, max_pieces: int = 8) -> int:
    """How many query pieces `xla_attention` splits causal self-attention of length t into: t // block, at
    most max_pieces, 1 when that does not divide t."""
    n = min(max_pieces, t // block)
    return n if n > 1 and t % n == 0 else 1


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, pieces: int = 1) -> jax.Array:
    """Softmax attention in XLA ops, with a backward pass that recomputes only the scores.

    q [B, T, N, H]; k, v [B, S, K, H] (K divides N: each group of N / K query heads shares a key/value head);
    mask [B, 1, T, S] bool (True = attend) or None. Scores and softmax are float32; the probabilities are cast
    to v's dtype for the value product (as `jax.nn.dot_product_attention` does). Returns [B, T, N, H].

    pieces > 1 is for causal self-attention (T == S, mask False for every key after its query): the queries
    are split into `pieces` equal parts and part i attends only keys [0, (i + 1) T / pieces), which hold every
    key its mask allows, so the result is unchanged while the [T, S] work falls to (pieces + 1) / (2 pieces)
    of it, forward and backward. Residuals for the backward pass: q, k, v, the output and [B, N, T] row
    statistics; never a [T, S] matrix.
    """
    t = q.shape[1]
    if pieces > 1 and (t != k.shape[1] or t % pieces):
        raise ValueError(f"causal pieces need T == S divisible by pieces; got T={t}, S={k.shape[1]}, {pieces}")
    return _attention(q, k, v, mask, pieces)


def _heads_first(q, k, v):
    """[B, T, N, H] / [B, S, K, H] -> q [B, K, G, T, H], k / v [B, K, S, H]."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    qh = q.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
    return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _spans(t: int, pieces: int) -> list[tuple[int, int, int]]:
    """(query start, query end, key end) per piece; one piece spans everything (key end None)."""
    if pieces == 1:
        return [(0, t, None)]
    c = t // pieces
    return [(i * c, (i + 1) * c, (i + 1) * c) for i in range(pieces)]


def _scores(qh, kh, mask, lo, hi, kend):
    """float32 [B, K, G, hi - lo, S'] scaled scores of queries [lo, hi) over keys [0, kend), masked."""
    s = jnp.einsum("bkgth,bksh->bkgts", qh[:, :, :, lo:hi], kh[:, :, :kend],
                   preferred_element_type=jnp.float32) * (qh.shape[-1] ** -0.5)
    if mask is None:
        return s
    return jnp.where(mask[:, :, None, lo:hi, :kend], s, _MASKED)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, pieces):
    return _attention_fwd(q, k, v, mask, pieces)[0]


def _attention_fwd(q, k, v, mask, pieces):
    qh, kh, vh = _heads_first(q, k, v)
    outs, lses = [], []
    for lo, hi, kend in _spans(q.shape[1], pieces):
        s = _scores(qh, kh, mask, lo, hi, kend)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        total = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bkgts,bksh->bkgth", p.astype(vh.dtype), vh[:, :, :kend],
                       preferred_element_type=jnp.float32) / total
        outs.append(o.astype(q.dtype))
        lses.append(m + jnp.log(total))
    oh = outs[0] if pieces == 1 else jnp.concatenate(outs, axis=3)
    lse = lses[0] if pieces == 1 else jnp.concatenate(lses, axis=3)
    b, t, n, h = q.shape
    out = oh.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
    return out, (qh, kh, vh, oh, lse, mask)


def _attention_bwd(pieces, res, d_out):
    qh, kh, vh, oh, lse, mask = res
    b, kv, g, t, h = qh.shape
    scale = h ** -0.5
    doh = d_out.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4)
    row_dot = jnp.sum(doh.astype(jnp.float32) * oh.astype(jnp.float32), axis=-1, keepdims=True)
    dqs = []
    dk = dv = jnp.zeros(kh.shape, jnp.float32)  # key / value gradients, summed over the pieces
    for lo, hi, kend in _spans(t, pieces):
        p = jnp.exp(_scores(qh, kh, mask, lo, hi, kend) - lse[:, :, :, lo:hi])
        do = doh[:, :, :, lo:hi]
        dv_part = jnp.einsum("bkgts,bkgth->bksh", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bkgth,bksh->bkgts", do, vh[:, :, :kend], preferred_element_type=jnp.float32)
        ds = (p * (dp - row_dot[:, :, :, lo:hi]) * scale).astype(qh.dtype)
        dqs.append(jnp.einsum("bkgts,bksh->bkgth", ds, kh[:, :, :kend], preferred_element_type=jnp.float32))
        dk_part = jnp.einsum("bkgts,bkgth->bksh", ds, qh[:, :, :, lo:hi], preferred_element_type=jnp.float32)
        if kend is None:
            dk, dv = dk_part, dv_part
        else:
            dk = dk.at[:, :, :kend].add(dk_part)
            dv = dv.at[:, :, :kend].add(dv_part)
    dqh = dqs[0] if pieces == 1 else jnp.concatenate(dqs, axis=3)
    dq = dqh.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, h)
    return (dq.astype(qh.dtype), dk.transpose(0, 2, 1, 3).astype(kh.dtype),
            dv.transpose(0, 2, 1, 3).astype(vh.dtype), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """Causal self-attention with the Pallas TPU flash-attention kernel (no [T, S] matrix in memory).

    q [B, T, N, H], k / v [B, T, K, H] (K divides N: grouped heads are repeated), segment_ids [B, T] int
    (one id per packed sample, 1 for an unpacked row's tokens, padding 0: a token attends to earlier tokens of
    its own segment, which for valid tokens is the same as `segment_mask`; padded positions' outputs differ
    and are never used). T must be a
    multiple of FLASH_BLOCK. Under a mesh the kernel runs per shard (`shard_map` over the batch and head axes
    the logical rules give), since XLA cannot partition a custom kernel. Returns [B, T, N, H].
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    b, t, n, h = q.shape
    if t % FLASH_BLOCK:
        raise UnsupportedConfigError(f"attention_impl 'flash_tpu' needs a sequence length divisible by "
                                     f"{FLASH_BLOCK}, got {t}")
    if k.shape[2] != n:
        k, v = (jnp.repeat(x, n // k.shape[2], axis=2) for x in (k, v))
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)

    def local(q, k, v, seg):
        heads_first = [x.transpose(0, 2, 1, 3) for x in (q, k, v)]
        out = fa.flash_attention(*heads_first, segment_ids=fa.SegmentIds(q=seg, kv=seg), causal=True,
                                 sm_scale=h ** -0.5)
        return out.transpose(0, 2, 1, 3)

    rules = _RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh is None or mesh.empty:
        return local(q, k, v, segment_ids)
    spec = logical_to_mesh_spec(("activation_batch", None, "activation_heads", None), rules)
    seg_spec = jax.sharding.PartitionSpec(spec[0], None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, seg_spec), out_specs=spec,
                         check_vma=False)(q, k, v, segment_ids)


def cached_attention(q: jax.Array, k_t: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention of new queries over a KV cache kept in matmul-ready layouts (XLA path, inference).

    q [B, T, N, H]; k_t [B, K, H, S] (keys transposed); v [B, K, S, H]; mask [B, 1, T, S] (True = attend).
    N = K x G query heads share each key/value head. Both products are then plain row-major batched matmuls;
    with the [B, S, K, H] cache layout XLA:CPU copied every layer's whole K and V cache into transposed
    layout at every decode step. Scores and softmax in float32. Returns [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    kv = k_t.shape[1]
    qg = q.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("btkgh,bkhs->bkgts", qg, k_t, preferred_element_type=jnp.float32) * (h ** -0.5)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, v)
    return out.reshape(b, t, n, h).astype(q.dtype)
