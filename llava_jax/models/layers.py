"""Building blocks shared by the CLIP, LLaMA and LLaVA modules.

Parameters are `nnx.Param`s carrying logical axis names in their `out_sharding` metadata (for example
`('layers', 'embed', 'mlp')`); the mesh mapping of those names lives in the training config, never here.
Activations are constrained by logical name through `constrain`, which is a no-op unless `axis_rules` is
active and a mesh is set.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LogicalNames = tuple[str | None, ...]
LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

_RULES: contextvars.ContextVar[LogicalRules | None] = contextvars.ContextVar("llava_jax_axis_rules", default=None)


class UnsupportedConfigError(ValueError):
    """A model configuration asks for something this implementation does not support."""


class Init:
    """An initialiser usable on both paths: traced (jax.random, under eval_shape / jit) and eager (numpy on
    the host, which avoids compiling a random-number kernel per parameter shape)."""

    def __init__(self, kind: str, std: float = 1.0):
        self.kind, self.std = kind, std

    def __call__(self, key, shape, dtype=jnp.float32) -> jax.Array:
        if self.kind == "normal":
            return self.std * jax.random.normal(key, shape, dtype)
        return jnp.full(shape, 1.0 if self.kind == "ones" else 0.0, dtype)

    def host(self, rng: np.random.Generator, shape, dtype) -> np.ndarray:
        if self.kind == "normal":
            return (self.std * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
        return np.full(shape, 1.0 if self.kind == "ones" else 0.0, dtype)


def normal(std: float) -> Init:
    """Initialiser N(0, std^2)."""
    return Init("normal", std)


zeros = Init("zeros")
ones = Init("ones")


def param(rngs: nnx.Rngs | None, init: Init, shape: Sequence[int], names: LogicalNames,
          dtype=jnp.float32) -> nnx.Param:
    """Creates a parameter of `shape` initialised by `init`, tagged with logical axis `names`."""
    if len(names) != len(shape):
        raise ValueError(f"logical names {names} do not match shape {tuple(shape)}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    if isinstance(key, jax.core.Tracer):
        value = init(key, tuple(shape), dtype)
    else:
        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
        value = jnp.asarray(init.host(np.random.default_rng(seed), tuple(shape), np.dtype(dtype)))
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


@contextlib.contextmanager
def axis_rules(rules: LogicalRules) -> Iterator[None]:
    """Within this context, `constrain` maps logical names to mesh axes with `rules` (name -> mesh axis)."""
    token = _RULES.set(tuple(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


def logical_to_mesh_spec(names: Sequence[str | None], rules: LogicalRules) -> jax.sharding.PartitionSpec:
    """Maps logical axis names to a PartitionSpec: the first rule for a name whose mesh axes are still unused
    wins; names without a rule are replicated."""
    used: set[str] = set()
    out: list = []
    table: dict[str, list] = {}
    for name, axes in rules:
        table.setdefault(name, []).append(axes)
    for name in names:
        chosen = None
        for axes in table.get(name, []) if name is not None else []:
            tup = (axes,) if isinstance(axes, str) else tuple(axes or ())
            if tup and not (set(tup) & used):
                chosen = tup
                break
        if chosen is None:
            out.append(None)
        else:
            used.update(chosen)
            out.append(chosen[0] if len(chosen) == 1 else chosen)
    return jax.sharding.PartitionSpec(*out)


def constrain(x: jax.Array, names: LogicalNames) -> jax.Array:
    """Constrains activation `x` to the sharding its logical `names` map to (no-op outside `axis_rules`)."""
    rules = _RULES.get()
    if rules is None:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = logical_to_mesh_spec(names, rules)
    return jax.lax.with_sharding_constraint(x, spec)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """LLaMA RMSNorm over the last axis, computed in float32 and cast back to x's dtype (as HF does)."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(dtype) * x32.astype(dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


def activation(name: str):
    """Returns the activation function named as in transformers' ACT2FN."""
    table = {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "relu": jax.nn.relu,
        "tanh": jnp.tanh,
    }
    if name not in table:
        raise UnsupportedConfigError(f"unsupported activation {name!r}; known: {sorted(table)}")
    return table[name]


def _weight_grad_plain(x2: jax.Array, dy2: jax.Array) -> jax.Array:
    return jnp.einsum("ni,no->io", x2, dy2)


def _weight_grad_transpose_smaller(x2: jax.Array, dy2: jax.Array) -> jax.Array:
    # XLA:CPU lowers the "transposed-lhs" product x2^T dy2 by copying one operand into transposed layout and
    # picks the gradient dy2 even when it is the larger one (the [N, 1376] SwiGLU gradient, the [N, 32000]
    # logits gradient), often fused into the element-wise backward pass that produced it, where the strided
    # writes are slow. Transposing the smaller operand explicitly (the barrier keeps the algebraic simplifier
    # from folding the transpose back into the dot) leaves plain row-major matmuls.
    if x2.shape[1] <= dy2.shape[1]:
        return jax.lax.optimization_barrier(x2.T) @ dy2
    return (jax.lax.optimization_barrier(dy2.T) @ x2).T


@jax.custom_vjp
def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jnp.einsum("...i,io->...o", x, kernel)


def _matmul_fwd(x: jax.Array, kernel: jax.Array):
    return _matmul(x, kernel), (x, kernel)


def _matmul_bwd(res, dy: jax.Array):
    x, kernel = res
    dx = jnp.einsum("...o,io->...i", dy, kernel)
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dk = jax.lax.platform_dependent(x2, dy2, cpu=_weight_grad_transpose_smaller, default=_weight_grad_plain)
    return dx, dk.astype(kernel.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """x [..., in] @ kernel [in, out] (+ bias [out]) in x's dtype.

    The same values and gradients as the einsum; only the lowering of the weight gradient differs on CPU
    (see `_weight_grad_transpose_smaller`); other platforms get the einsum's own transpose rule.
    """
    y = _matmul(x, kernel.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y


def remat_policy(name: str | None):
    """Returns the `jax.checkpoint` policy named in config: 'none' (no remat), 'full' (save nothing),
    'dots' (save matmul outputs), 'dots_no_batch' (save matmuls without batch dims)."""
    policies = jax.checkpoint_policies
    table = {
        "full": policies.nothing_saveable,
        "dots": policies.checkpoint_dots,
        "dots_no_batch": policies.dots_with_no_batch_dims_saveable,
        "everything": policies.everything_saveable,
    }
    if name in (None, "none"):
        return None
    if name not in table:
        raise UnsupportedConfigError(f"unknown remat policy {name!r}; known: none, {', '.join(table)}")
    return table[name]


def maybe_remat(fn, policy_name: str | None):
    """Wraps a scan body with `jax.checkpoint` under the named policy ('none' returns fn unchanged)."""
    if policy_name in (None, "none"):
        return fn
    return jax.checkpoint(fn, policy=remat_policy(policy_name), prevent_cse=False)
