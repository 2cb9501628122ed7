"""The train step's hand-written pieces equal the plain JAX they replace, values and gradients:
the dense layer's custom weight gradient, causal block-skipping attention and the cross entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.loss import IGNORE_INDEX, nll_sum
from llava_jax.models import layers as L


@pytest.mark.parametrize("d_in,d_out", [(8, 24), (24, 8)])  # x transposed / the gradient transposed
def test_dense_matches_einsum(d_in, d_out):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 5, d_in)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(d_out,)), jnp.float32)

    def ours(x, w, b):
        return jnp.sum(jnp.sin(L.dense(x, w, b)))

    def plain(x, w, b):
        return jnp.sum(jnp.sin(jnp.einsum("...i,io->...o", x, w) + b))

    np.testing.assert_allclose(ours(x, w, b), plain(x, w, b), rtol=1e-5)
    for a, e in zip(jax.grad(ours, (0, 1, 2))(x, w, b), jax.grad(plain, (0, 1, 2))(x, w, b), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def test_dense_gradient_keeps_kernel_dtype():
    x = jnp.ones((4, 8), jnp.bfloat16)
    w = jnp.ones((8, 16), jnp.float32)
    g = jax.grad(lambda w: jnp.sum(L.dense(x, w).astype(jnp.float32)))(w)
    assert g.dtype == jnp.float32 and g.shape == w.shape
    np.testing.assert_allclose(g, 4.0)


def _contracting_dims(fn, *args) -> list[str]:
    """lhs_contracting_dims of every dot in the compiled HLO of grad(fn) (on this CPU backend)."""
    text = jax.jit(jax.grad(fn)).lower(*args).compile().as_text()
    return [line.split("lhs_contracting_dims={", 1)[1].split("}", 1)[0]
            for line in text.splitlines() if " dot(" in line and "lhs_contracting_dims" in line]


def test_dense_weight_gradient_is_a_plain_row_major_matmul_on_cpu():
    # The einsum's weight gradient x^T dy contracts the token axis, x's leading one (lhs_contracting_dims={0}):
    # XLA:CPU then transposes an operand inside its own lowering, in the real step the larger gradient.
    # Ours transposes x explicitly, so every dot contracts the lhs's last axis.
    x = jnp.ones((1024, 128), jnp.float32)
    w = jnp.ones((128, 512), jnp.float32) * 0.01

    def ours(w):
        return jnp.sum(jnp.sin(L.dense(x, w)))

    def plain(w):
        return jnp.sum(jnp.sin(jnp.einsum("ni,io->no", x, w)))

    assert "0" in _contracting_dims(plain, w)  # the check can fail
    dims = _contracting_dims(ours, w)
    assert len(dims) == 2 and set(dims) == {"1"}


def _attention_inputs(t: int, pad: int):
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(2, t, 2, 8)), jnp.float32) for _ in range(3))
    valid = np.ones((2, t), bool)
    valid[1, t - pad:] = False  # row 1 right-padded
    causal = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
    causal |= np.eye(t, dtype=bool)[None]
    return q, k, v, jnp.asarray(causal[:, None])


@pytest.mark.parametrize("t,block", [(32, 8), (32, 16), (30, 8)])  # 4 pieces, 2 pieces, not divisible
def test_causal_block_attention_matches_full(t, block):
    q, k, v, mask = _attention_inputs(t, pad=5)
    attend = L.attention_fn(None)

    def ours(q, k, v):
        return jnp.sum(jnp.sin(L.causal_block_attention(attend, q, k, v, mask, block=block)))

    def full(q, k, v):
        return jnp.sum(jnp.sin(attend(q, k, v, mask)))

    np.testing.assert_allclose(ours(q, k, v), full(q, k, v), rtol=1e-5)
    for a, e in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(full, (0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)


def test_causal_block_attention_skips_work():
    q, k, v, mask = _attention_inputs(64, pad=0)
    attend = L.attention_fn(None)

    def flops(fn):
        cost = jax.jit(fn).lower(q, k, v).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list | tuple) else cost)["flops"]

    full = flops(lambda q, k, v: attend(q, k, v, mask))
    blocked = flops(lambda q, k, v: L.causal_block_attention(attend, q, k, v, mask, block=16))  # 4 pieces
    assert blocked < 0.75 * full


def test_nll_sum_matches_log_softmax_and_is_stable():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(2, 6, 11)) * 30 + 500, jnp.float32)  # large, far from zero
    targets = jnp.asarray(rng.integers(0, 11, size=(2, 6)), jnp.int32).at[1, 2:].set(IGNORE_INDEX)

    def ref(x):
        lp = jax.nn.log_softmax(x, axis=-1)
        mask = targets != IGNORE_INDEX
        return -jnp.sum(jnp.take_along_axis(lp, jnp.where(mask, targets, 0)[..., None], -1)[..., 0] * mask)

    np.testing.assert_allclose(nll_sum(logits, targets), ref(logits), rtol=1e-5)
    g = jax.grad(nll_sum)(logits, targets)
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(g, jax.grad(ref)(logits), atol=1e-4)  # logits near 500: fp32 spacing 3e-5
    np.testing.assert_array_equal(g[1, 2:], 0.0)  # ignored positions get no gradient
    np.testing.assert_allclose(jnp.sum(g[0], axis=-1), 0.0, atol=1e-4)  # softmax minus one-hot sums to 0


def test_cached_attention_matches_dot_product_attention_with_grouped_heads():
    rng = np.random.default_rng(3)
    b, t, s, kv, g, h = 2, 3, 10, 2, 3, 8  # 6 query heads share 2 key/value heads
    q = jnp.asarray(rng.normal(size=(b, t, kv * g, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, s, kv, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, s, kv, h)), jnp.float32)
    mask = jnp.asarray(rng.random((b, 1, t, s)) > 0.3).at[..., 0].set(True)
    expected = jax.nn.dot_product_attention(q, k, v, mask=mask)
    got = L.cached_attention(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), mask)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
