"""The train step's hand-written pieces equal the plain JAX they replace, values and gradients:
the dense layer's custom weight gradient and the cross entropy (attention: tests/test_attention.py)."""

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
