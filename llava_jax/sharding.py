"""Device mesh and logical-axis sharding.

Parameters carry logical axis names (nnx metadata `out_sharding`, e.g. ('embed', 'mlp') or
('layers', 'embed', 'heads') for scanned stacks). The rules context and the activation constraint are the
models' own (`llava_jax.models.layers.axis_rules` / `constrain`), re-exported here. A rules table, ordered by precedence, maps each
logical name to a mesh axis (or a tuple of mesh axes, or None = replicated). The mesh has the axes
(data, fsdp, tensor); sizes come from the config and -1 means "all remaining devices".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llava_jax.models import layers
from llava_jax.models.layers import axis_rules, constrain, logical_to_mesh_spec

__all__ = [
    "DEFAULT_RULES", "MESH_AXES", "MeshConfigError", "axis_rules", "constrain", "current_rules", "data_sharding",
    "describe", "logical_to_spec", "make_mesh", "replicated", "resolve_mesh_shape", "rules_from_config", "rules_to_config",
    "state_shardings",
]

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, Any], ...]

# Precedence matters: the first rule whose mesh axes are still free in an array wins.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("activation_heads", "tensor"),
    ("activation_length", None),
    ("activation_embed", None),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("layers", None),
    ("norm", None),
    ("head_dim", None),
    ("lora_rank", None),
)

log = logging.getLogger(__name__)

class MeshConfigError(ValueError):
    """The configured mesh sizes do not fit the available devices."""


def resolve_mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces at most one -1 in `sizes` by the remaining device count; checks the product."""
    sizes = [int(s) for s in sizes]
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1:
        raise MeshConfigError(f"at most one mesh axis may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshConfigError(f"mesh sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if unknown:
        if num_devices % known:
            raise MeshConfigError(f"{num_devices} devices do not divide by the fixed mesh sizes {sizes}")
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshConfigError(f"mesh {sizes} needs {math.prod(sizes)} devices, have {num_devices}")
    return tuple(sizes)


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh with Auto axis types.

    `mesh_config` has attributes data, fsdp, tensor (ints, -1 = the rest). With `devices` given (for
    example the devices of a TPU topology description) those are laid out; otherwise all of
    `jax.devices()` through `jax.make_mesh`.
    """
    sizes = [getattr(mesh_config, name) for name in MESH_AXES]
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if devices is None:
        shape = resolve_mesh_shape(sizes, jax.device_count())
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
    shape = resolve_mesh_shape(sizes, len(devices))
    try:
        from jax.experimental import mesh_utils

        device_array = mesh_utils.create_device_mesh(shape, devices=list(devices))
    except (ValueError, NotImplementedError, AssertionError):
        device_array = np.asarray(list(devices)).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=axis_types)


def rules_from_config(rules: Any) -> Rules:
    """Config rules -> ((name, axes), ...).

    Accepts strings "name:axis" / "name:axis1,axis2" / "name:" (replicated) - the form configs use, so
    `--config.axis_rules=...` can override them - or (name, axes) pairs.
    """
    out = []
    for entry in rules:
        if isinstance(entry, str):
            name, sep, axes_text = entry.partition(":")
            if not sep:
                raise MeshConfigError(f"axis rule {entry!r} is not 'name:axis[,axis]'")
            names = tuple(a.strip() for a in axes_text.split(",") if a.strip())
            axes: Any = None if not names else (names[0] if len(names) == 1 else names)
        else:
            name, axes = entry[0], entry[1]
            if isinstance(axes, list):
                axes = tuple(axes)
        for a in (axes,) if isinstance(axes, str) else (axes or ()):
            if a not in MESH_AXES:
                raise MeshConfigError(f"axis rule for {name!r} names {a!r}, not one of the mesh axes {MESH_AXES}")
        out.append((str(name).strip(), axes))
    return tuple(out)


def rules_to_config(rules: Rules) -> tuple[str, ...]:
    """((name, axes), ...) -> the config's string form ("name:axis1,axis2")."""
    def axes_text(axes: Any) -> str:
        return "" if axes is None else (axes if isinstance(axes, str) else ",".join(axes))

    return tuple(f"{name}:{axes_text(axes)}" for name, axes in rules)


def current_rules() -> Rules:
    """The rules made current by `axis_rules` (the models' context), else DEFAULT_RULES."""
    rules = layers._RULES.get()
    return DEFAULT_RULES if rules is None else tuple(rules)


def _axis_size(mesh: Any, axes: Any) -> int:
    if axes is None:
        return 1
    names = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[n] for n in names)


def logical_to_spec(
    names: Sequence[str | None] | None,
    rules: Rules | None = None,
    *,
    shape: Sequence[int] | None = None,
    mesh: Any = None,
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec.

    Unknown names are replicated. With `shape` and `mesh` given, a dimension whose size does not
    divide by its mesh axes is replicated instead (logged once per call site), so odd vocabularies or
    tiny test models still place.
    """
    if not names:
        return PartitionSpec()
    rules = current_rules() if rules is None else rules
    spec = list(logical_to_mesh_spec(tuple(names), rules))
    if shape is not None and mesh is not None:
        for i, axes in enumerate(spec):
            if axes is not None and shape[i] % _axis_size(mesh, axes):
                log.debug("dim %d of %s (size %d) not divisible by %s: replicated", i, names, shape[i], axes)
                spec[i] = None
    return PartitionSpec(*spec)


def _variable_names(v: nnx.Variable) -> tuple | None:
    meta = v.get_metadata()
    names = meta.get("out_sharding")
    return tuple(names) if names else None


def state_shardings(state: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """NamedSharding per leaf of an nnx.State (or any tree of Variables / arrays).

    Variables with `out_sharding` logical names are sharded by the rules; everything else
    (scalars, step counters, unnamed arrays) is replicated.
    """
    rules = current_rules() if rules is None else rules

    def one(x: Any) -> Any:
        if isinstance(x, nnx.Variable):
            names = _variable_names(x)
            if not hasattr(x.get_value(), "shape"):  # no array (optax's masked-out state of another group)
                return x
            shape = x.get_value().shape
            if names is not None and len(names) != len(shape):
                raise ValueError(f"logical names {names} do not match the shape {shape}")
            return x.replace(NamedSharding(mesh, logical_to_spec(names, rules, shape=shape, mesh=mesh)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def data_sharding(mesh: Mesh, ndim: int, rules: Rules | None = None) -> NamedSharding:
    """Sharding of a batch array [B, ...]: the batch axis over the 'batch' rule, the rest replicated."""
    spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def describe(mesh: Mesh) -> str:
    """One line: axis sizes and device kind, for the trainer's banner."""
    sizes = ", ".join(f"{n}={mesh.shape[n]}" for n in mesh.axis_names)
    kind = mesh.devices.flat[0].device_kind
    return f"mesh ({sizes}) over {mesh.devices.size} x {kind}"
