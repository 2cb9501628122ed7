"""The data tools' crash-safe reply journal: one JSONL line per received reply, keyed by request hash and attempt.

A rerun reads it and skips every request whose reply is already there (`data_gen.client.ChatClient`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class JournalError(ValueError):
    """The journal file is corrupt somewhere other than its last line."""



def request_hash(model: str, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> str:
    """Stable SHA-256 hex digest of (model, messages, params): the journal key of a request."""
    blob = json.dumps([model, list(messages), dict(params)], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()



class Journal:
    """Append-only JSONL of received replies, keyed by (request hash, attempt). Each line is flushed and fsynced
    before `append` returns; `append` may be called from several threads.

    Opening cuts off a torn last line; a corrupt line elsewhere raises `JournalError`.
    """

    def __init__(self, path: str | os.PathLike):
        if "://" in os.fspath(path):
            raise JournalError(f"journal {os.fspath(path)}: must be a local file (it is appended to and fsynced line "
                               f"by line); the outputs may be gs://")
        self.path = Path(path)
        self.entries: dict[str, dict[int, dict[str, Any]]] = {}
        self._file = None
        self._lock = threading.Lock()
        self.torn_bytes = 0
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            self.torn_bytes = len(data) - end
            log.warning("journal %s: cutting off a torn last line (%d bytes)", self.path, self.torn_bytes)
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        for lineno, line in enumerate(data[:end].split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                self.entries.setdefault(entry["hash"], {})[int(entry["attempt"])] = entry
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise JournalError(f"{self.path}:{lineno}: corrupt journal line ({e})") from e

    def replies(self, hash_: str) -> list[dict[str, Any]]:
        """Journaled replies for a request, in attempt order (attempt 0, 1, ... without gaps)."""
        by_attempt = self.entries.get(hash_, {})
        out = []
        while len(out) in by_attempt:
            out.append(by_attempt[len(out)])
        return out

    def append(self, entry: dict[str, Any]) -> None:
        """Writes one entry as a line, flushed and fsynced before returning."""
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open across appends
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.entries.setdefault(entry["hash"], {})[int(entry["attempt"])] = entry

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

