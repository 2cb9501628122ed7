"""LoRA adapters on the LLaMA decoder's linear layers (stacked, like the layers they adapt).

For a target projection with stacked kernel W [Lyr, in, out] the adapter adds A [Lyr, in, r] and
B [Lyr, r, out] (B starts at zero, so a fresh adapter leaves the model unchanged) and the layer computes

    y = x @ W + (alpha / r) * (dropout(x) @ A) @ B

which is PEFT's `lora_B(lora_A(dropout(x))) * scaling` with lora_A.weight = A^T [r, in] and lora_B.weight = B^T
[out, r]. The adapters are parameters of `LlamaForCausalLM` named `{target}_lora_a` / `{target}_lora_b`, so they
are scanned with the layer stack and sharded by logical names (the rank axis is `lora_rank`). Which projections
carry an adapter is chosen by a table of regexes searched in the paths `language_model/{target}_kernel`.

Merging folds the adapters into the kernels (W + (alpha / r) A @ B), giving a plain model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.models import layers as L

# The decoder's linear layers, in a fixed order (the order also numbers them for dropout keys).
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# The HF module of each target inside a decoder layer.
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
DEFAULT_TARGET_PATTERNS = (r"^language_model/(q|k|v|o)_kernel$", r"^language_model/(gate|up|down)_kernel$")
RANK_AXIS = "lora_rank"


class LoraConfigError(ValueError):
    """A LoRA setting cannot be used (rank, alpha, dropout, target patterns, an existing adapter)."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """rank r, alpha (scale = alpha / r), dropout probability on the adapter input, target names (of TARGETS)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        if int(self.rank) <= 0:
            raise LoraConfigError(f"LoRA rank must be positive, got {self.rank}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise LoraConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise LoraConfigError("LoRA has no target layers")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise LoraConfigError(f"unknown LoRA targets {unknown}; known: {list(TARGETS)}")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LoraSpec:
        return cls(rank=d["rank"], alpha=d["alpha"], dropout=d.get("dropout", 0.0), targets=tuple(d["targets"]))


def resolve_targets(patterns: Sequence[str]) -> tuple[str, ...]:
    """The targets whose path `language_model/{t}_kernel` one of the regexes (re.search) matches.

    Raises LoraConfigError on an invalid regex or a pattern that matches no decoder linear layer."""
    chosen = []
    for pattern in patterns:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise LoraConfigError(f"LoRA target pattern {pattern!r} is not a regex: {e}") from None
        hits = [t for t in TARGETS if rx.search(f"language_model/{t}_kernel")]
        if not hits:
            raise LoraConfigError(f"LoRA target pattern {pattern!r} matches none of the decoder's linear layers "
                                  f"({', '.join(f'language_model/{t}_kernel' for t in TARGETS)})")
        chosen.extend(hits)
    return tuple(t for t in TARGETS if t in chosen)


def spec_from_config(c: Any) -> LoraSpec | None:
    """The trainer config's `lora` block -> LoraSpec, or None when rank is 0 (LoRA off)."""
    if int(c.rank) == 0:
        return None
    return LoraSpec(rank=c.rank, alpha=c.alpha, dropout=c.dropout, targets=resolve_targets(c.targets))


# ------------------------------------------------------------------------------------------------ module


def adapter_names(target: str) -> tuple[str, str]:
    return f"{target}_lora_a", f"{target}_lora_b"


def add_lora(llm: Any, spec: LoraSpec, *, seed: int = 0, param_dtype: Any = jnp.float32) -> None:
    """Adds adapters to a `LlamaForCausalLM` in place: A [Lyr, in, r] ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's
    Kaiming-uniform default), B [Lyr, r, out] = 0. A model that already has adapters keeps them when `spec`
    describes them (continued training; the dropout is `spec`'s) and raises LoraConfigError otherwise."""
    from flax import nnx

    existing = getattr(llm, "lora", None)
    if existing is not None:
        if (existing.rank, existing.alpha, existing.targets) != (spec.rank, spec.alpha, spec.targets):
            raise LoraConfigError(f"the model already has LoRA adapters {existing.to_json()}, the config asks "
                                  f"for {spec.to_json()}")
        llm.lora = spec
        return
    rngs = nnx.Rngs(params=seed)
    for t in spec.targets:
        kernel = getattr(llm, f"{t}_kernel")
        names = kernel.get_metadata().get("out_sharding") or (None, None, None)
        n, d_in, d_out = kernel.shape
        a_name, b_name = adapter_names(t)
        setattr(llm, a_name, L.param(rngs, _Uniform(d_in ** -0.5), (n, d_in, spec.rank),
                                     (names[0], names[1], RANK_AXIS), param_dtype))
        setattr(llm, b_name, L.param(rngs, L.zeros, (n, spec.rank, d_out), (names[0], RANK_AXIS, names[2]),
                                     param_dtype))
    llm.lora = spec


class _Uniform(L.Init):
    """U(-bound, bound), on both the traced and the host path of `layers.param`."""

    def __init__(self, bound: float):
        super().__init__("uniform")
        self.bound = bound

    def __call__(self, key, shape, dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -self.bound, self.bound)

    def host(self, rng: np.random.Generator, shape, dtype) -> np.ndarray:
        return rng.uniform(-self.bound, self.bound, size=shape).astype(dtype)


def delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float, dropout: float,
          key: jax.Array | None) -> jax.Array:
    """The adapter's output: x [..., in], a [in, r], b [r, out] -> scale * (dropout(x) @ a) @ b [..., out].
    Dropout (inverted, probability `dropout`) applies only when a key is given (training)."""
    if key is not None and dropout > 0.0:
        keep = jax.random.bernoulli(key, 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), jnp.zeros_like(x))
    return L.dense(L.dense(x, a), b) * jnp.asarray(scale, x.dtype)


def target_index(target: str) -> int:
    return TARGETS.index(target)


# ------------------------------------------------------------------------------------------------ merging

_ADAPTER = re.compile(r"^(?P<prefix>.*?)(?P<target>" + "|".join(TARGETS) + r")_lora_(?P<ab>[ab])$")


def merge_flat(params: Mapping[str, np.ndarray], spec: LoraSpec, sep: str = ".") -> dict[str, np.ndarray]:
    """Flat parameters with adapters ({'language_model.q_lora_a': ...}) -> the same model without them, each
    kernel W replaced by W + scale * A @ B (computed in float32, stored in W's dtype)."""
    out = {k: v for k, v in params.items() if not _ADAPTER.match(k.split(sep)[-1] if sep else k)}
    for t in spec.targets:
        a_name, b_name = adapter_names(t)
        prefix = "language_model" + sep
        a, b = params.get(prefix + a_name), params.get(prefix + b_name)
        if a is None or b is None:
            raise LoraConfigError(f"adapter of {t} is missing ({prefix + a_name} / {prefix + b_name})")
        w = np.asarray(params[prefix + f"{t}_kernel"])
        merged = w.astype(np.float32) + spec.scale * np.einsum(
            "lir,lro->lio", np.asarray(a, np.float32), np.asarray(b, np.float32))
        out[prefix + f"{t}_kernel"] = merged.astype(w.dtype)
    return out


def lora_spec_of(model: Any) -> LoraSpec | None:
    """The LoraSpec of a Llava model's language model (None without adapters)."""
    return getattr(getattr(model, "language_model", None), "lora", None)
