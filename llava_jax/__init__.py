"""llava_jax: LLaVA visual instruction tuning in JAX/Flax NNX."""

__version__ = "0.1.0"
