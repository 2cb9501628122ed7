"""Moving parameters between NNX modules and flat {"a.b.c": array} dictionaries."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.convert.safetensors_io import CheckpointFormatError

M = TypeVar("M", bound=nnx.Module)


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
    """{dotted path: value} of every `nnx.Param` of `model`."""
    state = nnx.state(model, nnx.Param)
    return {_key(path): v.get_value() for path, v in nnx.to_flat_state(state)}


def param_shapes(build: Callable[[], nnx.Module]) -> dict[str, tuple[int, ...]]:
    """{dotted path: shape} of the parameters `build()` would create, without allocating them."""
    abstract = nnx.eval_shape(build)
    return {k: tuple(v.shape) for k, v in flat_params(abstract).items()}


def build_with_params(build: Callable[[], M], arrays: Mapping[str, np.ndarray], param_dtype=jnp.float32,
                      strict: bool = True) -> M:
    """Builds `build()` abstractly and fills every parameter from `arrays` (cast to `param_dtype`).

    Raises CheckpointFormatError on a missing or mis-shaped parameter (and, if strict, on an unused array)."""
    abstract = nnx.eval_shape(build)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    flat = nnx.to_flat_state(params)
    used = set()
    leaves = []
    for path, var in flat:
        k = _key(path)
        if k not in arrays:
            raise CheckpointFormatError(f"parameter {k} is missing")
        a = np.asarray(arrays[k])
        if tuple(a.shape) != tuple(var.shape):
            raise CheckpointFormatError(f"parameter {k}: shape {a.shape}, model expects {tuple(var.shape)}")
        leaves.append((path, var.replace(jnp.asarray(a, dtype=param_dtype))))
        used.add(k)
    extra = sorted(set(arrays) - used)
    if strict and extra:
        raise CheckpointFormatError(f"arrays without a parameter: {extra[:10]}")
    filled = nnx.from_flat_state(leaves)
    rest = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, rest)
    return nnx.merge(graphdef, filled, rest)


def to_numpy(params: Mapping[str, jax.Array]) -> dict[str, np.ndarray]:
    """Device arrays -> host numpy arrays (gathered if sharded)."""
    return {k: np.asarray(jax.device_get(v)) for k, v in params.items()}
