"""The XLA attention path (hand-written backward pass, optional causal pieces) equals
`jax.nn.dot_product_attention` in values and gradients, keeps no [T, S] residual and skips masked work;
the decoding path equals it over a transposed KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from llava_jax.models import attention as A


def _inputs(t: int = 32, s: int | None = None, heads: int = 4, kv_heads: int = 2, pad: int = 5, causal=True,
            seed: int = 0):
    """q [2, t, heads, 8], k / v [2, s, kv_heads, 8], mask [2, 1, t, s]: causal (or random) and row 1
    right-padded, every query seeing at least itself (as the LLaMA module builds it)."""
    s = t if s is None else s
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(2, t, heads, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, s, kv_heads, 8)), jnp.float32) for _ in range(2))
    valid = np.ones((2, s), bool)
    valid[1, s - pad:] = False
    allowed = np.tril(np.ones((t, s), bool)) if causal else rng.random((t, s)) > 0.4
    mask = allowed[None] & valid[:, None, :]
    mask |= np.eye(t, s, dtype=bool)[None]
    return q, k, v, jnp.asarray(mask[:, None])


def _reference(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask)  # repeats grouped heads itself


@pytest.mark.parametrize("pieces,heads,kv_heads,causal", [
    (1, 4, 4, False),  # plain multi-head, arbitrary mask
    (1, 4, 2, True),  # grouped heads
    (4, 4, 2, True),  # causal pieces
    (2, 2, 1, True),  # pieces and a single shared key/value head
])
def test_values_and_gradients_match_dot_product_attention(pieces, heads, kv_heads, causal):
    q, k, v, mask = _inputs(heads=heads, kv_heads=kv_heads, causal=causal)
    weight = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)

    def ours(q, k, v):
        return jnp.sum(jnp.sin(A.xla_attention(q, k, v, mask, pieces=pieces)) * weight)

    def ref(q, k, v):
        return jnp.sum(jnp.sin(_reference(q, k, v, mask)) * weight)

    np.testing.assert_allclose(A.xla_attention(q, k, v, mask, pieces=pieces), _reference(q, k, v, mask),
                               rtol=1e-5, atol=1e-6)
    for a, e in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)


def test_no_mask_and_bfloat16_inputs():
    q, k, v, _ = _inputs(t=16, s=24, heads=2, kv_heads=2)
    got = A.xla_attention(q, k, v, None)
    np.testing.assert_allclose(got, _reference(q, k, v, None), rtol=1e-5, atol=1e-6)
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = A.xla_attention(qb, kb, vb, None)
    grads = jax.grad(lambda q, k, v: jnp.sum(A.xla_attention(q, k, v, None).astype(jnp.float32)), (0, 1, 2))(
        qb, kb, vb)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    np.testing.assert_allclose(out.astype(jnp.float32), got, atol=3e-2)


def test_pieces_need_square_divisible_lengths():
    q, k, v, mask = _inputs(t=30)
    with pytest.raises(ValueError, match="divisible by pieces"):
        A.xla_attention(q, k, v, mask, pieces=4)
    assert A.causal_pieces(512) == 4 and A.causal_pieces(2048) == 8
    assert A.causal_pieces(100) == 1 and A.causal_pieces(384 + 64) == 1  # shorter than 2 blocks / not divisible


def test_probabilities_are_not_saved(capsys):
    q, k, v, mask = _inputs(t=16, heads=2, kv_heads=2)

    def saved_ts_floats(out):  # float [..., T, S] residuals: scores, their exponentials, probabilities
        return [line for line in out.splitlines() if line.startswith("f32[") and ",16,16]" in line]

    print_saved_residuals(lambda q, k, v: jnp.sum(_reference(q, k, v, mask)), q, k, v)
    assert saved_ts_floats(capsys.readouterr().out)  # the plain path keeps them (the check can fail)
    for pieces in (1, 2):
        print_saved_residuals(lambda q, k, v, n=pieces: jnp.sum(A.xla_attention(q, k, v, mask, n)), q, k, v)
        assert not saved_ts_floats(capsys.readouterr().out)


def test_causal_pieces_skip_work():
    q, k, v, mask = _inputs(t=64, pad=0)

    def flops(pieces):
        fn = jax.grad(lambda q, k, v: jnp.sum(A.xla_attention(q, k, v, mask, pieces)), (0, 1, 2))
        cost = jax.jit(fn).lower(q, k, v).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list | tuple) else cost)["flops"]

    assert flops(4) < 0.75 * flops(1)  # (4 + 1) / 8 of the [T, T] work, forward and backward


def test_unknown_implementation_is_named():
    with pytest.raises(A.UnsupportedConfigError, match="unknown attention implementation 'splash'"):
        A.attention_fn("splash")


def test_cached_attention_matches_dot_product_attention_with_grouped_heads():
    rng = np.random.default_rng(3)
    b, t, s, kv, g, h = 2, 3, 10, 2, 3, 8  # 6 query heads share 2 key/value heads
    q = jnp.asarray(rng.normal(size=(b, t, kv * g, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, s, kv, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, s, kv, h)), jnp.float32)
    mask = jnp.asarray(rng.random((b, 1, t, s)) > 0.3).at[..., 0].set(True)
    expected = jax.nn.dot_product_attention(q, k, v, mask=mask)
    got = A.cached_attention(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), mask)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_causal_attention_fn_skips_masked_blocks_on_cpu():
    """attention_fn(causal=True) is the decoder's training attention: on CPU it splits a 256-token sequence
    into causal_pieces(256) = 2 pieces (same values, less work); the non-causal function does not."""
    q, k, v, mask = _inputs(t=256, heads=2, kv_heads=1, pad=7)
    causal, plain = A.attention_fn(None, causal=True), A.attention_fn(None)
    np.testing.assert_allclose(causal(q, k, v, mask), _reference(q, k, v, mask), rtol=1e-5, atol=1e-6)

    def flops(fn):
        cost = jax.jit(lambda q, k, v: fn(q, k, v, mask)).lower(q, k, v).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list | tuple) else cost)["flops"]

    assert flops(causal) < 0.85 * flops(plain)  # 2 pieces: 3/4 of the [T, T] work
