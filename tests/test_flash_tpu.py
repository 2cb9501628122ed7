"""attention_impl='flash_tpu' (the Pallas TPU flash-attention kernel, run here in Pallas' TPU interpret mode)
gives the XLA path's results at every real token, in the attention alone and in the whole decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from llava_jax.models import attention as A
from llava_jax.models import layers as L
from llava_jax.models.llama import LlamaConfig, LlamaForCausalLM
from llava_jax.tiny import tiny_llama_kwargs


def _padding(b: int, t: int) -> np.ndarray:
    valid = np.ones((b, t), np.int32)
    valid[1, :37] = 0  # row 1 left-padded
    return valid


def test_flash_tpu_attention_matches_xla_at_tokens():
    rng = np.random.default_rng(0)
    b, t, kv, g, h = 2, 128, 2, 2, 64
    q = jnp.asarray(rng.normal(size=(b, t, kv * g, h)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, kv, h)), jnp.float32) for _ in range(2))
    valid = _padding(b, t)
    mask = jnp.asarray((np.tril(np.ones((t, t), bool))[None] & (valid[:, None, :] > 0)) | np.eye(t, dtype=bool))[:, None]
    weight = jnp.asarray(valid, jnp.float32)[:, :, None, None]  # only real tokens' outputs count

    def xla(q, k, v):
        return jnp.sum(jnp.sin(A.attention_fn(None)(q, k, v, mask)) * weight)

    def flash(q, k, v):
        return jnp.sum(jnp.sin(A.attention_fn("flash_tpu")(q, k, v, mask, segment_ids=jnp.asarray(valid))) * weight)

    with pltpu.force_tpu_interpret_mode():
        got, grads = flash(q, k, v), jax.grad(flash, (0, 1, 2))(q, k, v)
    np.testing.assert_allclose(got, xla(q, k, v), rtol=1e-5)
    for a, e in zip(grads, jax.grad(xla, (0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)


def test_decoder_with_flash_tpu_matches_xla_at_tokens():
    cfg = LlamaConfig(**tiny_llama_kwargs(64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1))
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 64, size=(2, 128)), jnp.int32)
    valid = _padding(2, 128)
    ref = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    flash = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0), attention_impl="flash_tpu")
    expected, _ = ref(ids, attention_mask=jnp.asarray(valid))
    with pltpu.force_tpu_interpret_mode():
        got, _ = flash(ids, attention_mask=jnp.asarray(valid))
    keep = valid.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[keep], np.asarray(expected)[keep], rtol=1e-4, atol=1e-4)


def test_flash_tpu_rejects_unaligned_length_and_unknown_impl_is_named():
    x = jnp.zeros((1, 100, 2, 64))
    with pytest.raises(L.UnsupportedConfigError, match="divisible by 128"):
        A.attention_fn("flash_tpu")(x, x, x, None)
    with pytest.raises(L.UnsupportedConfigError, match="unknown attention implementation 'splash'"):
        A.attention_fn("splash")


def test_trainer_config_check_names_unaligned_buckets_and_unknown_impls():
    from llava_jax import train_config

    cfg = train_config.base_config()
    with cfg.unlocked():
        cfg.model.attention_impl, cfg.data.max_length, cfg.data.bucket_lengths = "flash_tpu", 2048, (1000, 2048)
    with pytest.raises(train_config.ConfigError, match=r"divisible by 128; these are not: \[1000\]"):
        train_config.check_attention_impl(cfg)
    with cfg.unlocked():
        cfg.data.bucket_lengths = (1024, 2048)
    train_config.check_attention_impl(cfg)  # aligned: accepted
    with cfg.unlocked():
        cfg.model.attention_impl = "splash"
    with pytest.raises(train_config.ConfigError, match="unknown model.attention_impl 'splash'"):
        train_config.check_attention_impl(cfg)
