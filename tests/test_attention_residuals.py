"""Training attention recomputes its probabilities in the backward pass instead of saving them."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import print_saved_residuals

from llava_jax.models import layers as L


def _inputs():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 16, 4, 8)), jnp.float32) for _ in range(3))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((16, 16), bool)), (2, 1, 16, 16))
    return q, k, v, mask


def test_same_values_and_gradients_as_plain_attention():
    q, k, v, mask = _inputs()

    def plain(q, k, v):
        return jnp.sum(jnp.sin(jax.nn.dot_product_attention(q, k, v, mask=mask)))

    def ours(q, k, v):
        return jnp.sum(jnp.sin(L.attention_fn(None)(q, k, v, mask)))

    np.testing.assert_allclose(ours(q, k, v), plain(q, k, v), rtol=1e-6)
    for a, b in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(plain, (0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_probabilities_are_not_saved(capsys):
    q, k, v, mask = _inputs()
    def saved_ts_floats(out):  # float [..., T, S] residuals: scores, their exponentials, probabilities
        return [line for line in out.splitlines() if line.startswith("f32[") and ",16,16]" in line]

    print_saved_residuals(lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, mask=mask)), q, k, v)
    assert saved_ts_floats(capsys.readouterr().out)  # the plain path keeps them (the check can fail)
    print_saved_residuals(lambda q, k, v: jnp.sum(L.attention_fn(None)(q, k, v, mask)), q, k, v)
    assert not saved_ts_floats(capsys.readouterr().out)
