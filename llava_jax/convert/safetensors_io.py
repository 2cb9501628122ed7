"""Reading and writing safetensors files as numpy arrays (bf16 through ml_dtypes), single or sharded.

A small reader of our own instead of `safetensors.numpy`, because that one cannot return bfloat16 arrays;
files are memory-mapped, so reading a 7B checkpoint costs no more memory than the tensors kept.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from llava_jax.io import atomic_open, atomic_write_json

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointFormatError(ValueError):
    """A weights file or directory is not in a layout we can read."""


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-maps one .safetensors file into {name: array} (arrays are read-only views)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointFormatError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointFormatError(f"{path}: unreadable safetensors header: {e}") from e
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if path.stat().st_size > 8 + n else None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise CheckpointFormatError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dt = _DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        count = int(np.prod(info["shape"])) if info["shape"] else 1
        if end - start != count * dt.itemsize:
            raise CheckpointFormatError(f"{path}: tensor {name} has {end - start} bytes for shape {info['shape']}")
        raw = data[start:end] if data is not None else np.zeros(0, np.uint8)
        out[name] = raw.view(dt).reshape(info["shape"])
    return out


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory: those named by the index, else the single file, else
    every *.safetensors file. Raises CheckpointFormatError (mentioning .bin files, which we never unpickle)."""
    d = Path(directory)
    if (d / INDEX_NAME).exists():
        index = json.loads((d / INDEX_NAME).read_text())
        files = sorted(set(index["weight_map"].values()))
        missing = [f for f in files if not (d / f).exists()]
        if missing:
            raise CheckpointFormatError(f"{d}: index names missing shard files {missing}")
        return [d / f for f in files]
    if (d / SINGLE_NAME).exists():
        return [d / SINGLE_NAME]
    files = sorted(d.glob("*.safetensors"))
    if files:
        return files
    if list(d.glob("*.bin")) or list(d.glob("*.pt")):
        raise CheckpointFormatError(
            f"{d} holds only pickled PyTorch weights (.bin/.pt), which llava_jax does not load; re-save them with "
            "`model.save_pretrained(dir, safe_serialization=True)`")
    raise CheckpointFormatError(f"{d}: no safetensors weights found")


def read_directory(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (single file or sharded with an index)."""
    out: dict[str, np.ndarray] = {}
    for f in weight_files(directory):
        for k, v in read_safetensors(f).items():
            if k in out:
                raise CheckpointFormatError(f"tensor {k} appears in more than one shard")
            out[k] = v
    return out


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes {name: array} as one safetensors file, atomically."""
    header: dict = {}
    offset = 0
    items = sorted(tensors.items())
    for name, arr in items:
        arr = np.asarray(arr)
        if arr.dtype not in _NAMES:
            raise CheckpointFormatError(f"cannot write tensor {name} of dtype {arr.dtype}")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in items:
            f.write(np.ascontiguousarray(arr).tobytes())


def _shards(tensors: Mapping[str, np.ndarray], max_bytes: int) -> Iterator[dict[str, np.ndarray]]:
    shard: dict[str, np.ndarray] = {}
    size = 0
    for name in sorted(tensors):
        arr = tensors[name]
        if shard and size + arr.nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = arr
        size += arr.nbytes
    if shard:
        yield shard


def write_sharded(directory: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                  max_shard_bytes: int = 2 * 1024**3, always_index: bool = True) -> list[str]:
    """Writes tensors as `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`
    (transformers' layout). Returns the shard file names."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    shards = list(_shards(tensors, max_shard_bytes))
    if len(shards) == 1 and not always_index:
        write_safetensors(d / SINGLE_NAME, shards[0], {"format": "pt"})
        return [SINGLE_NAME]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(d / name, shard, {"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
    total = int(sum(a.nbytes for a in tensors.values()))
    atomic_write_json(d / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names
