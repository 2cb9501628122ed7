"""Reading PyTorch `.bin` / `.pt` state dicts safely: `torch.load(..., weights_only=True)` and nothing else.

A torch checkpoint is a pickle; an unrestricted unpickle runs whatever the file asks for. These readers only
accept what torch's weights-only unpickler accepts (tensors, dicts, plain containers and numbers) and turn any
file that needs more into `UnsafeCheckpointError`. They are used for the PyTorch LLaVA repo's checkpoints
(`pytorch_model-0000K-of-0000N.bin` + index, `mm_projector.bin`); everything else reads safetensors.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import ml_dtypes
import numpy as np

from llava_jax.convert.safetensors_io import CheckpointFormatError, read_directory, read_safetensors

BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_SINGLE_NAME = "pytorch_model.bin"


class UnsafeCheckpointError(CheckpointFormatError):
    """A pickled checkpoint needs more than torch's weights-only unpickler (arbitrary objects or code)."""


def _reason(message: str) -> str:
    lines = [x.strip() for x in message.splitlines() if x.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line or "unsupported" in line:
            return line
    return lines[-1] if lines else message


def _to_numpy(name: str, value) -> np.ndarray:
    import torch

    if not isinstance(value, torch.Tensor):
        raise CheckpointFormatError(f"entry {name!r} is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu().contiguous()
    if value.dtype == torch.bfloat16:
        return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return value.numpy()


def read_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a torch state dict file with `torch.load(weights_only=True)` into {name: array}.

    Arrays keep the stored dtype (bf16 as ml_dtypes.bfloat16). Raises UnsafeCheckpointError if the file needs
    arbitrary unpickling (or is not a torch file at all), CheckpointFormatError if it is not a flat
    {name: tensor} mapping (or torch is not installed)."""
    path = Path(path)
    try:
        import torch
    except ImportError as e:
        raise CheckpointFormatError(f"{path}: reading .bin checkpoints needs torch (pip install torch)") from e
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: no such file")
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path} cannot be read with torch.load(weights_only=True) ({_reason(str(e))}); llava_jax never "
            "unpickles arbitrary objects - re-save the tensors alone, or as safetensors") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointFormatError(f"{path}: not a readable torch checkpoint: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return {str(k): _to_numpy(str(k), v) for k, v in state.items()}


def read_weights_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """One weights file by its suffix: `.safetensors`, or `.bin` / `.pt` / `.pth` (weights-only torch.load)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointFormatError(f"{path}: no such file")
        return read_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return read_torch_bin(path)
    raise CheckpointFormatError(f"{path}: expected a .safetensors or .bin file")


def bin_weight_files(directory: str | os.PathLike) -> list[Path]:
    """The torch shards of a directory: those named by `pytorch_model.bin.index.json`, else
    `pytorch_model.bin`, else every `pytorch_model*.bin`. Raises CheckpointFormatError when there are none."""
    d = Path(directory)
    if (d / BIN_INDEX_NAME).exists():
        try:
            index = json.loads((d / BIN_INDEX_NAME).read_text())
            files = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise CheckpointFormatError(f"{d / BIN_INDEX_NAME}: not a weight index ({e})") from e
        missing = [f for f in files if not (d / f).exists()]
        if missing:
            raise CheckpointFormatError(f"{d}: index names missing shard files {missing}")
        return [d / f for f in files]
    if (d / BIN_SINGLE_NAME).exists():
        return [d / BIN_SINGLE_NAME]
    files = sorted(d.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointFormatError(f"{d}: no safetensors or pytorch_model*.bin weights found")
    return files


def read_any_directory(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory: safetensors when there are any (single or sharded), otherwise the
    torch `.bin` shards read weights-only. Raises CheckpointFormatError on duplicate tensors or no weights."""
    d = Path(directory)
    if (d / "model.safetensors.index.json").exists() or list(d.glob("*.safetensors")):
        return read_directory(d)
    out: dict[str, np.ndarray] = {}
    for f in bin_weight_files(d):
        for k, v in read_torch_bin(f).items():
            if k in out:
                raise CheckpointFormatError(f"tensor {k} appears in more than one shard")
            out[k] = v
    return out
