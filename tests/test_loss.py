"""The supervised-positions / chunked loss equals the plain full-logits cross entropy, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.loss import IGNORE_INDEX, hidden_cross_entropy, supervised_budget


def _reference(hidden, labels, head):
    logits = jnp.einsum("btd,dv->btv", hidden[:, :-1], head)
    t = labels[:, 1:]
    mask = t != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(mask, t, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(picked * mask), mask.sum()


@pytest.mark.parametrize("budget,chunk,supervised", [(None, 0, 10), (16, 0, 10), (16, 8, 10), (16, 8, 30),
                                                     (None, 7, 30)])
def test_matches_reference(budget, chunk, supervised):
    rng = np.random.default_rng(0)
    b, t, d, v = 3, 40, 8, 50
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    labels = np.full((b, t), IGNORE_INDEX)
    for i in range(b):  # scattered supervised positions; row 0 has `supervised`, others fewer
        pos = rng.choice(np.arange(1, t), size=supervised if i == 0 else 5, replace=False)
        labels[i, pos] = rng.integers(0, v, size=len(pos))
    labels = jnp.asarray(labels)

    def ours(h, w):
        return hidden_cross_entropy(h, labels, w, budget=budget, chunk=chunk)[0]

    def ref(h, w):
        return _reference(h, labels, w)[0]

    np.testing.assert_allclose(ours(hidden, head), ref(hidden, head), rtol=1e-5)
    assert float(hidden_cross_entropy(hidden, labels, head, budget=budget)[1]) == float(_reference(hidden, labels, head)[1])
    g1 = jax.grad(ours, argnums=(0, 1))(hidden, head)
    g2 = jax.grad(ref, argnums=(0, 1))(hidden, head)
    for a, b_ in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5)


def test_budget_rounding():
    assert supervised_budget(512, 0.5) == 256
    assert supervised_budget(512, None) is None
    assert supervised_budget(512, 1.0) is None
    assert supervised_budget(10, 0.99) is None
