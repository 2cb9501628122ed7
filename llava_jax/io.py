"""The project's one path layer and its file helpers: atomic writes and JSON / JSONL reading.

Every path the project reads or writes - training workdirs, model dirs, data files, image roots, selection and
evaluation inputs and outputs - may be a local path or a `gs://bucket/key` URI. `as_path` turns either into an
`etils.epath.Path` (gcsfs serves `gs://`; the usual Google credentials apply, and `STORAGE_EMULATOR_HOST` points
it at an emulator). Libraries that only read local files (transformers tokenizers, safetensors) get a local copy
of a remote directory through `local_copy`, and writers of whole directories write into `staged_dir`, uploaded
on a clean exit.

Writes that matter are atomic: locally they go to a temporary file in the target's directory that is fsynced
and renamed into place, so a crash never leaves a half-written file behind; on an object store they are one
single-object upload made only on a clean exit (an object appears whole or not at all).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

# gcsfs >= 2025.x probes every bucket for a "zonal / hierarchical namespace" layout through the Storage Control
# gRPC API before its first use; off Google's network (an emulator, a VPC without that API) the probe waits out
# a 60 s timeout. Its own switch turns the probe off; it must be set before gcsfs is imported, and a value the
# user set wins.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from etils import epath  # noqa: E402

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """True for a URI with a scheme (`gs://...`, `s3://...`): a path that is not on a local filesystem."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """Any project path -> etils.epath.Path (local paths made absolute; `gs://` kept as a URI)."""
    if isinstance(path, epath.Path) and is_remote(path):
        return path
    s = os.fspath(path)
    return epath.Path(s) if is_remote(s) else epath.Path(os.path.abspath(s))


def path_str(path: PathLike) -> str:
    """The string form of a project path (a local absolute path or a URI)."""
    return os.fspath(as_path(path))


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Opens a file whose content replaces `path` only on a clean exit.

    Local: a temporary file beside `path`, fsynced and renamed onto it. Remote: a local temporary file that
    is uploaded as one object on a clean exit (nothing is written when the block raises).
    """
    if is_remote(path):
        target = as_path(path)
        binary = "b" in mode
        with tempfile.TemporaryDirectory(prefix="llava_jax_upload_") as tmpdir:
            tmp = os.path.join(tmpdir, "data")
            with open(tmp, mode, encoding=None if binary else encoding) as f:
                yield f
            upload_file(tmp, target)  # an object store has no directories to create
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    binary = "b" in mode
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def upload_file(local: PathLike, target: PathLike) -> None:
    """Copies a local file to `target` (any project path) in one streamed write."""
    with open(local, "rb") as src, as_path(target).open("wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)


def download_file(source: PathLike, local: PathLike) -> None:
    """Copies `source` (any project path) to a local file."""
    with as_path(source).open("rb") as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)


def list_files(directory: PathLike) -> list[str]:
    """Relative paths (with '/') of every file under `directory`, sorted; one listing call on an object store."""
    root = os.fspath(as_path(directory)).rstrip("/")
    if is_remote(root):
        import fsspec

        fs, base = fsspec.core.url_to_fs(root)
        base = base.rstrip("/")
        fs.invalidate_cache(base)  # other gcsfs instances (epath's) or processes may have written since
        return sorted(f[len(base) + 1:] for f in fs.find(base) if f.startswith(base + "/"))
    out = []
    for dirpath, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, n), root).replace(os.sep, "/") for n in names]
    return sorted(out)


def copy_tree(src: PathLike, dst: PathLike) -> int:
    """Copies every file under directory `src` to the same relative place under `dst` (either side local or
    remote; files stream through this host). Returns the number of files copied."""
    src_p, dst_p = as_path(src), as_path(dst)
    n = 0
    for rel in list_files(src_p):
        f, out = src_p / rel, dst_p / rel
        if not is_remote(out):  # an object store has no directories to create
            out.parent.mkdir(parents=True, exist_ok=True)
        with f.open("rb") as a, out.open("wb") as b:
            shutil.copyfileobj(a, b, 16 << 20)
        n += 1
    return n


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[Path]:
    """Yields a local directory holding `path`'s files: `path` itself when local, else a temporary download
    (removed on exit). For readers that only take local directories (tokenizers, safetensors)."""
    if not is_remote(path):
        yield Path(path)
        return
    if not as_path(path).is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    with tempfile.TemporaryDirectory(prefix="llava_jax_download_") as tmp:
        copy_tree(path, tmp)
        yield Path(tmp)


def cached_copy(path: PathLike) -> Path:
    """A local copy of remote directory `path`, made once per host under $LLAVA_JAX_CACHE (default
    ~/.cache/llava_jax) and reused while complete; a local `path` is returned as it is. For readers that need
    a local disk (array_record)."""
    if not is_remote(path):
        return Path(path)
    import hashlib

    root = Path(os.environ.get("LLAVA_JAX_CACHE", os.path.expanduser("~/.cache/llava_jax")))
    uri = path_str(path).rstrip("/")
    dest = root / "copies" / (hashlib.sha256(uri.encode()).hexdigest()[:16] + "_" + uri.rsplit("/", 1)[-1])
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        copy_tree(uri, tmp)
        (tmp / ".complete").write_text(uri + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@contextlib.contextmanager
def staged_dir(path: PathLike) -> Iterator[Path]:
    """Yields a local directory to write `path`'s files into: `path` itself when local, else a temporary
    directory whose files are uploaded to `path` on a clean exit (nothing is uploaded when the block raises)."""
    if not is_remote(path):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="llava_jax_stage_") as tmp:
        yield Path(tmp)
        copy_tree(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Writes `obj` as JSON (UTF-8, non-ASCII kept) to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Writes one JSON object per line to `path` atomically."""
    with atomic_open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Reads a JSON file (any project path)."""
    with as_path(path).open("r", encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """Reads a JSONL file, skipping blank lines; a bad line raises ValueError naming the line number."""
    rows = []
    with as_path(path).open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from e
    return rows


def read_json_or_jsonl(path: str | os.PathLike) -> Any:
    """Reads `path` as JSONL when its name ends in .jsonl, else as JSON."""
    return read_jsonl(path) if str(path).endswith(".jsonl") else read_json(path)
