"""Hashable config values: the model configs are static arguments of jitted functions (through the nnx graph
definition), so every field must be hashable.

Hugging Face configs carry dicts (`rope_scaling` / `rope_parameters`) and lists (`eos_token_id` of Llama 3,
`vision_feature_layer`). `freeze` turns them into `FrozenDict` / tuples when a config is built; `thaw` gives
back the JSON form (dicts and lists) for `to_hf`, so a config round-trips exactly:
`thaw(freeze(x)) == x` for any JSON value x.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any


class FrozenDict(Mapping):
    """An immutable, hashable mapping (equal to a dict with the same items). Values must be hashable, which
    `freeze` ensures."""

    __slots__ = ("_items", "_hash")

    def __init__(self, items: Mapping[str, Any] | None = None, **kw: Any):
        self._items = dict(items or {}, **kw)
        self._hash = None

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._items.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"FrozenDict({self._items!r})"

    def __reduce__(self):
        return FrozenDict, (self._items,)


def freeze(value: Any) -> Any:
    """A hashable copy of a JSON-like value: mappings -> FrozenDict, lists / tuples -> tuples, recursively;
    anything else (numbers, strings, None, dataclass configs) is returned as it is."""
    if isinstance(value, Mapping):
        return value if isinstance(value, FrozenDict) else FrozenDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The JSON form of a frozen value: FrozenDict / mappings -> dict, tuples / lists -> lists, recursively."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [thaw(v) for v in value]
    return value


def freeze_fields(config: Any) -> None:
    """Freezes every field of a frozen dataclass instance in place (call it from `__post_init__`)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        frozen = freeze(value)
        if frozen is not value:
            object.__setattr__(config, f.name, frozen)


def fields_as_json(config: Any) -> dict[str, Any]:
    """{field name: thawed value} of a dataclass config (nested dataclasses are left to their own `to_hf`)."""
    return {f.name: thaw(getattr(config, f.name)) for f in dataclasses.fields(config)}
