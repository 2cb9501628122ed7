"""Random-access record sources: LLaVA JSON / JSONL, MiniGPT-4 cc_sbu_align, ArrayRecord (TFDS), mixtures.

Every source yields the same element: {"record": LLaVA record dict, "roots": image roots (tuple of str),
"image_bytes": bytes or None}. A record is {"id", "image" (optional, relative to one of the roots),
"conversations": [{"from": "human"|"gpt", "value"}, ...]}. Lines or entries that cannot be parsed become
placeholder records {"_error": reason, "_message": text}, so a bad line costs one counted skip, never a crash,
and indices stay stable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------ errors


class RecordError(ValueError):
    """A record-level problem outside the conversation and the pixels; `reason` is machine-readable."""

    reason = "bad_record"


class NotAnObjectError(RecordError):
    reason = "record_not_an_object"


class InvalidJsonError(RecordError):
    reason = "invalid_json"


class NotUtf8Error(RecordError):
    reason = "not_utf8"


class BadImageFieldError(RecordError):
    reason = "bad_image_field"


class AbsoluteImagePathError(RecordError):
    reason = "absolute_image_path"


class ImagePathEscapesRootError(RecordError):
    reason = "image_path_escapes_root"


class MissingImageFileError(RecordError):
    reason = "missing_image_file"


class DataFileError(RecordError):
    """The data file as a whole cannot be read (not JSON, unknown layout)."""

    reason = "unreadable_data_file"


_PLACEHOLDER_ERRORS: dict[str, type[RecordError]] = {
    cls.reason: cls for cls in (NotAnObjectError, InvalidJsonError, NotUtf8Error, RecordError)
}


def raise_placeholder(record: dict) -> None:
    """Raises the RecordError a placeholder record stands for (no-op for real records)."""
    if isinstance(record, dict) and "_error" in record:
        cls = _PLACEHOLDER_ERRORS.get(record["_error"], RecordError)
        raise cls(record.get("_message", record["_error"]))


# ------------------------------------------------------------------------------------------------ reading files

# Instructions paired with MiniGPT-4 descriptions (our own phrasings; one is drawn per image, fixed by seed).
DESCRIBE_INSTRUCTIONS = (
    "Describe this image in detail.",
    "Give a thorough description of what the picture shows.",
    "What can you see in this image? Please be detailed.",
    "Write a detailed account of the scene in the image.",
    "Explain in detail what is happening in this picture.",
    "Tell me everything you notice in this image.",
)


def _has_surrogates(obj: Any) -> bool:
    if isinstance(obj, str):
        return any("\ud800" <= ch <= "\udfff" for ch in obj)
    if isinstance(obj, dict):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_surrogates(v) for v in obj)
    return False


def _placeholder(reason: str, message: str) -> dict:
    return {"_error": reason, "_message": message}


def _parse_lines(data: bytes, name: str) -> list[dict]:
    records = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            records.append(_placeholder(NotUtf8Error.reason, f"{name}:{lineno}: not UTF-8 ({e.reason})"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            records.append(_placeholder(InvalidJsonError.reason, f"{name}:{lineno}: invalid JSON ({e.msg})"))
            continue
        if not isinstance(obj, dict):
            records.append(_placeholder(NotAnObjectError.reason, f"{name}:{lineno}: not a JSON object"))
            continue
        if _has_surrogates(obj):
            records.append(_placeholder(NotUtf8Error.reason, f"{name}:{lineno}: text holds invalid code points"))
            continue
        records.append(obj)
    return records


def minigpt4_records(annotations: Sequence[Any], seed: int = 0) -> list[dict]:
    """MiniGPT-4 `filter_cap.json` annotations -> single-turn LLaVA records (image at image/{id}.jpg).

    The instruction of each record is drawn from DESCRIBE_INSTRUCTIONS by a hash of (seed, image_id), so it is
    stable across runs and processes.
    """
    out = []
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            out.append(_placeholder(NotAnObjectError.reason, f"annotation {i} lacks image_id or caption"))
            continue
        image_id = str(ann["image_id"])
        digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
        instruction = DESCRIBE_INSTRUCTIONS[int.from_bytes(digest[:4], "little") % len(DESCRIBE_INSTRUCTIONS)]
        out.append(
            {
                "id": image_id,
                "image": f"image/{image_id}.jpg",
                "conversations": [
                    {"from": "human", "value": f"<image>\n{instruction}"},
                    {"from": "gpt", "value": ann["caption"]},
                ],
            }
        )
    return out


def load_records(path: str | os.PathLike, seed: int = 0) -> list[dict]:
    """Reads a LLaVA JSON array, a JSONL file or a MiniGPT-4 filter_cap.json into a list of records.

    Unparseable lines / entries become placeholders (see module docstring). A file that is neither a JSON
    document nor JSON lines raises DataFileError.
    """
    from llava_jax.io import as_path

    name = os.fspath(path)
    with as_path(name).open("rb") as f:  # a local path or gs://
        data = f.read()
    text = data.decode("utf-8", errors="surrogateescape")
    stripped = text.lstrip()
    obj: Any = None
    whole_ok = False
    if not name.endswith(".jsonl"):
        try:
            obj = json.loads(text)
            whole_ok = True
        except json.JSONDecodeError as e:
            if stripped.startswith("["):
                raise DataFileError(f"{name}: invalid JSON document ({e.msg} at line {e.lineno})") from e
    if not whole_ok:
        return _parse_lines(data, name)
    if isinstance(obj, dict) and isinstance(obj.get("annotations"), list):
        return minigpt4_records(obj["annotations"], seed)
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list):
        raise DataFileError(f"{name}: expected a JSON array of records, got {type(obj).__name__}")
    records = []
    for i, rec in enumerate(obj):
        if not isinstance(rec, dict):
            records.append(_placeholder(NotAnObjectError.reason, f"{name}[{i}]: not a JSON object"))
        elif _has_surrogates(rec):
            records.append(_placeholder(NotUtf8Error.reason, f"{name}[{i}]: contains bytes that are not UTF-8"))
        else:
            records.append(rec)
    return records


# ------------------------------------------------------------------------------------------------ image paths


def image_field(record: dict) -> str | None:
    """The record's relative image path, None for text-only records; BadImageFieldError when malformed."""
    value = record.get("image")
    if value is None:
        return None
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise BadImageFieldError(f"'image' must be a relative path string, got {type(value).__name__}")
    if not value.strip():
        raise BadImageFieldError("'image' is an empty string")
    if "\x00" in value:
        raise BadImageFieldError("'image' contains a NUL character")
    return value


def check_relative_path(rel: str) -> None:
    """Refuses absolute paths and any '..' component (a path must stay inside its image root)."""
    if os.path.isabs(rel) or rel.startswith(("~", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise AbsoluteImagePathError(f"image path {rel!r} is absolute; it must be relative to the image root")
    parts = rel.replace("\\", "/").split("/")
    if ".." in parts:
        raise ImagePathEscapesRootError(f"image path {rel!r} contains '..' and may leave the image root")


def resolve_image_path(rel: str, roots: Sequence[str | os.PathLike]) -> str:
    """The first existing file `root/rel` over `roots`; raises the path errors above when none exists."""
    check_relative_path(rel)
    if not roots:
        raise MissingImageFileError(f"image {rel!r} given but no image root configured")
    from llava_jax.io import as_path, is_remote

    for root in roots:
        candidate = os.path.join(os.fspath(root), rel)
        if is_remote(candidate) and as_path(candidate).is_file() or os.path.isfile(candidate):
            return candidate
    raise MissingImageFileError(f"image file {rel!r} not found under {', '.join(map(os.fspath, roots))}")


# ------------------------------------------------------------------------------------------------ sources


class RecordSource:
    """Random-access source over a list of records sharing image roots (a grain RandomAccessDataSource)."""

    def __init__(self, records: list[dict], image_roots: Sequence[str | os.PathLike] = (), name: str = ""):
        self._records = records
        self._roots = tuple(os.fspath(r) for r in image_roots)
        self.name = name

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return {"record": self._records[index], "roots": self._roots, "image_bytes": None}

    def __repr__(self) -> str:
        return f"RecordSource({self.name!r}, n={len(self)})"


class JsonRecordSource(RecordSource):
    """A LLaVA JSON / JSONL file (or MiniGPT-4 filter_cap.json) with one or several image roots."""

    def __init__(self, path: str | os.PathLike, image_roots: Sequence[str | os.PathLike] | str = (), seed: int = 0):
        if isinstance(image_roots, (str, os.PathLike)):
            image_roots = [image_roots]
        super().__init__(load_records(path, seed), image_roots, name=os.fspath(path))


def find_arrayrecord_dir(path: str | os.PathLike) -> Path:
    """The TFDS version directory (holding dataset_info.json) under `path` (the build --out dir or deeper)."""
    from llava_jax.io import is_remote

    if is_remote(path):  # array_record reads local files only: one cached copy per host
        from llava_jax.io import cached_copy

        path = cached_copy(path)
    path = Path(path)
    if (path / "dataset_info.json").exists():
        return path
    found = sorted(path.glob("*/*/dataset_info.json")) + sorted(path.glob("*/dataset_info.json"))
    if not found:
        raise DataFileError(f"{path}: no TFDS dataset (dataset_info.json) found")
    return found[-1].parent


class ArrayRecordSource:
    """Records written by `python -m llava_jax.data.build`, read with TFDS's array_record data source."""

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        import tensorflow_datasets as tfds

        self.path = find_arrayrecord_dir(path)
        builder = tfds.builder_from_directory(os.fspath(self.path))
        self._source = builder.as_data_source(split=split)
        self.name = os.fspath(self.path)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        row = self._source[index]
        raw = row["record"]
        try:
            record = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            record = _placeholder(InvalidJsonError.reason, f"{self.name}[{index}]: {e}")
        image = row["image"]
        return {"record": record, "roots": (), "image_bytes": bytes(image) if image else None}

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.name!r}, n={len(self)})"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a mixture: a JSON/JSONL/filter_cap.json file with image roots, or an ArrayRecord dir.

    `path` ending in .json/.jsonl is read as JSON; a directory as ArrayRecord (build output) or, when it holds
    filter_cap.json, as MiniGPT-4 cc_sbu_align (image root = that directory). `weight` is its mixture weight.
    """

    path: str
    image_roots: tuple[str, ...] = ()
    weight: float = 1.0


def parse_specs(data: Any, image_root: Any = None, weights: Any = None) -> list[DatasetSpec]:
    """Dataset specs from config values: a path, a comma list of paths, or a list of dicts / DatasetSpecs.

    image_root: one root (str), a comma-separated or ':'-free list, or a list (applied to every dataset whose
    entry gives none). weights: optional list of floats, one per dataset.
    """
    if isinstance(data, DatasetSpec):
        return [data]
    items = [p.strip() for p in data.split(",") if p.strip()] if isinstance(data, str) else list(data or [])
    if isinstance(image_root, str):
        default_roots = tuple(r.strip() for r in image_root.split(",") if r.strip())
    else:
        default_roots = tuple(image_root or ())
    weight_list = [float(w) for w in weights] if weights else None
    if weight_list is not None and len(weight_list) != len(items):
        raise ValueError(f"{len(weight_list)} weights given for {len(items)} datasets")
    specs = []
    for i, item in enumerate(items):
        if isinstance(item, DatasetSpec):
            specs.append(item)
            continue
        if isinstance(item, str):
            item = {"path": item}
        roots = item.get("image_roots", item.get("image_root", default_roots))
        roots = (roots,) if isinstance(roots, str) else tuple(roots or ())
        weight = weight_list[i] if weight_list else float(item.get("weight", 1.0))
        specs.append(DatasetSpec(path=str(item["path"]), image_roots=roots, weight=weight))
    if not specs:
        raise ValueError("no dataset given")
    return specs


def open_source(spec: DatasetSpec, seed: int = 0) -> RecordSource | ArrayRecordSource:
    """The random-access source for one spec (see DatasetSpec for how the path is read)."""
    from llava_jax.io import as_path, is_remote

    path = as_path(spec.path) if is_remote(spec.path) else Path(spec.path)
    if path.is_dir():
        if (path / "filter_cap.json").exists():
            return JsonRecordSource(path / "filter_cap.json", spec.image_roots or (path,), seed=seed)
        return ArrayRecordSource(path)
    if not path.exists():
        raise DataFileError(f"data file {path} does not exist")
    return JsonRecordSource(path, spec.image_roots, seed=seed)
