"""Score and embedding caches keyed by example id, per scorer settings.

A score cache is one JSONL file per (scorer name, settings) pair, named `{name}-{settings hash}.jsonl`; each line
holds an example key, the hash of the example's content and its value. An entry is reused only when both the key
and the content hash match, so editing a record recomputes that record alone, and changing a scorer's settings
(model, prompt, unit) starts a fresh file. Only successful scores are cached; failures are recomputed next run.

An embedding cache stores a float32 matrix [N, D] as `{name}-{hash}.npy` with its row keys in
`{name}-{hash}.keys.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llava_jax.io import atomic_open, atomic_write_json, atomic_write_jsonl, read_json, read_jsonl

log = logging.getLogger(__name__)


def settings_hash(settings: Mapping[str, Any]) -> str:
    """A 12-hex-digit hash of a JSON-serialisable settings mapping (key order does not matter)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def directory_fingerprint(path: str | os.PathLike) -> dict[str, int]:
    """File name -> size for the files of a model directory, so a replaced model invalidates its cache."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory not found: {root}")
    return {p.name: p.stat().st_size for p in sorted(root.iterdir()) if p.is_file()}


class ScoreCache:
    """Cached scalar scores of one scorer under one settings mapping."""

    def __init__(self, cache_dir: str | os.PathLike, name: str, settings: Mapping[str, Any]):
        self.path = Path(cache_dir) / f"{name}-{settings_hash(settings)}.jsonl"
        self.settings = dict(settings)
        self._entries: dict[str, tuple[str, float]] = {}
        if self.path.exists():
            for row in read_jsonl(self.path):
                self._entries[row["key"]] = (row["hash"], float(row["value"]))

    def get(self, key: str, content_hash: str) -> float | None:
        """The cached value for `key`, or None when absent or cached for different content."""
        entry = self._entries.get(key)
        if entry is None or entry[0] != content_hash:
            return None
        return entry[1]

    def put(self, key: str, content_hash: str, value: float) -> None:
        """Records a value in memory; `save` writes it."""
        self._entries[key] = (content_hash, float(value))

    def save(self) -> None:
        """Rewrites the cache file atomically (with a sidecar holding the settings, for people reading it)."""
        rows = ({"key": k, "hash": h, "value": v} for k, (h, v) in self._entries.items())
        atomic_write_jsonl(self.path, rows)
        atomic_write_json(self.path.with_suffix(".settings.json"), self.settings)

    def __len__(self) -> int:
        return len(self._entries)


class EmbeddingCache:
    """Cached float32 row vectors [N, D] keyed by (example key, content hash)."""

    def __init__(self, cache_dir: str | os.PathLike, name: str, settings: Mapping[str, Any]):
        stem = f"{name}-{settings_hash(settings)}"
        self.array_path = Path(cache_dir) / f"{stem}.npy"
        self.keys_path = Path(cache_dir) / f"{stem}.keys.json"
        self._rows: dict[tuple[str, str], int] = {}
        self._array: np.ndarray | None = None
        if self.array_path.exists() and self.keys_path.exists():
            keys = read_json(self.keys_path)
            array = np.load(self.array_path)
            if len(keys) == len(array):
                self._array = array
                self._rows = {(k, h): i for i, (k, h) in enumerate(keys)}
            else:
                log.warning("embedding cache %s is inconsistent (%d keys, %d rows); ignoring it",
                            self.array_path, len(keys), len(array))

    def lookup(self, keys: Sequence[tuple[str, str]]) -> tuple[np.ndarray | None, list[int]]:
        """Returns (array [len(keys), D] with cached rows filled, indices of the keys still missing)."""
        missing = [i for i, k in enumerate(keys) if k not in self._rows]
        if self._array is None:
            return None, list(range(len(keys)))
        out = np.zeros((len(keys), self._array.shape[1]), np.float32)
        for i, k in enumerate(keys):
            row = self._rows.get(k)
            if row is not None:
                out[i] = self._array[row]
        return out, missing

    def store(self, keys: Sequence[tuple[str, str]], array: np.ndarray) -> None:
        """Writes these rows [len(keys), D] plus every earlier row under another key (atomic)."""
        array = np.asarray(array, np.float32)
        keys = [tuple(k) for k in keys]
        if self._array is not None and self._array.shape[1] == array.shape[1]:
            wanted = set(keys)
            kept = [(k, i) for k, i in self._rows.items() if k not in wanted]
            if kept:
                keys = keys + [k for k, _ in kept]
                array = np.concatenate([array, self._array[[i for _, i in kept]]])
        with atomic_open(self.array_path, "wb") as f:
            np.save(f, array)
        atomic_write_json(self.keys_path, [list(k) for k in keys], indent=None)
        self._array = array
        self._rows = {k: i for i, k in enumerate(keys)}
