"""Reads the selector's input (LLaVA JSON or MiniGPT-4 `filter_cap.json`) into uniform examples, and writes a
subset back in the input's own format.

An `Example` is what the scorers see: a unique id, the image path relative to the image root (None for text-only
records), the instruction and the answer. LLaVA records with several turns are scored on all their human turns
(the instruction) and all their assistant turns (the answer), each joined by a blank line; `turns` keeps the
record's (human, assistant) pairs for scorers that replay the conversation (the `mllm` score).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

from llava_jax.data.sources import (
    RecordError,
    check_relative_path,
    image_field,
    load_records,
    raise_placeholder,
)
from llava_jax.io import atomic_write_json, atomic_write_jsonl, read_json

log = logging.getLogger(__name__)

InputFormat = Literal["llava", "minigpt4"]
IMAGE_MARK = "<image>"


class InputFormatError(ValueError):
    """The input file is neither a LLaVA record list nor a MiniGPT-4 `{"annotations": [...]}` file."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One scoreable example.

    `index` is the position of the source record in the input file, `key` a unique id (the record's id, with
    "#2", "#3", ... appended to repeats), `image` the path relative to the image root or None. `turns` holds the
    record's (human, assistant) pairs without the image marker; empty when the record has no such pairing
    (MiniGPT-4 captions, records whose roles do not alternate), see `dialogue`.
    """

    index: int
    key: str
    image: str | None
    instruction: str
    answer: str
    turns: tuple[tuple[str, str], ...] = dataclasses.field(default=(), compare=False)

    def dialogue(self) -> tuple[tuple[str, str], ...]:
        """The (human, assistant) pairs to replay: `turns`, or the single pair (instruction, answer)."""
        return self.turns or ((self.instruction, self.answer),)

    def content_hash(self) -> str:
        """A short hash of everything a score can depend on (image path, instruction, answer)."""
        h = hashlib.sha256()
        for part in (self.image or "", self.instruction, self.answer):
            h.update(part.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()[:16]


@dataclasses.dataclass
class Dataset:
    """The parsed input: its format, the raw records (kept for writing the subset) and one Example per record."""

    format: InputFormat
    records: list[Any]
    examples: list[Example]
    duplicate_ids: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)


def _strip_image_mark(text: str) -> str:
    return text.replace(IMAGE_MARK, "").strip()


def _llava_example(index: int, record: Any) -> tuple[str, Example]:
    if not isinstance(record, dict):
        raise InputFormatError(f"record {index}: expected an object, got {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise InputFormatError(f"record {index} (id {record.get('id')!r}): missing or empty 'conversations'")
    human, gpt, roles = [], [], []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise InputFormatError(f"record {index}: turn {t} has no string 'value'")
        role = turn.get("from")
        roles.append(role)
        if role == "human":
            human.append(_strip_image_mark(turn["value"]))
        elif role == "gpt":
            gpt.append(turn["value"].strip())
        else:
            raise InputFormatError(f"record {index}: turn {t} has unknown role {role!r}")
    raw_id = record.get("id")
    base = str(raw_id) if raw_id is not None else f"record-{index}"
    image = image_field(record)
    if image is not None:
        check_relative_path(image)
    alternating = len(human) == len(gpt) and all(r == ("human", "gpt")[t % 2] for t, r in enumerate(roles))
    pairs = tuple(zip(human, gpt, strict=True)) if alternating else ()
    return base, Example(index, base, image, "\n\n".join(human), "\n\n".join(gpt), pairs)


def _minigpt4_example(index: int, ann: Any, instruction: str, image_ext: str) -> tuple[str, Example]:
    if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
        raise InputFormatError(f"annotation {index}: expected {{'image_id', 'caption'}}, got {ann!r:.120}")
    image_id = str(ann["image_id"])
    return image_id, Example(index, image_id, f"{image_id}{image_ext}", instruction, ann["caption"].strip())


def _first_char(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", errors="ignore").lstrip()
    return head[:1]


def load_dataset(
    path: str | os.PathLike, instruction: str = "Describe this image in detail.", image_ext: str = ".jpg"
) -> Dataset:
    """Reads a LLaVA JSON/JSONL file (through llava_jax.data.sources) or a MiniGPT-4 filter_cap.json.

    `instruction` is the instruction paired with every MiniGPT-4 caption (that format stores none); images of
    MiniGPT-4 annotations are `{image_id}{image_ext}` under the image root. Records that cannot be used (bad
    JSON line, no conversation, unknown role, malformed image field) are skipped and counted in `skipped`.
    Repeated ids get a "#n" suffix.
    """
    pairs: list[tuple[str, Example]] = []
    skipped: Counter[str] = Counter()
    data = read_json(path) if not str(path).endswith(".jsonl") and _first_char(path) == "{" else None
    if isinstance(data, dict) and "annotations" in data:
        fmt: InputFormat = "minigpt4"
        if not isinstance(data["annotations"], list):
            raise InputFormatError(f"{path}: 'annotations' must be a list")
        records = data["annotations"]
        for i, ann in enumerate(records):
            try:
                pairs.append(_minigpt4_example(i, ann, instruction, image_ext))
            except InputFormatError as e:
                skipped["bad_annotation"] += 1
                log.warning("%s: skipping: %s", path, e)
    else:
        fmt = "llava"
        records = [data] if isinstance(data, dict) else load_records(path)
        for i, record in enumerate(records):
            try:
                raise_placeholder(record)
                pairs.append(_llava_example(i, record))
            except (RecordError, InputFormatError) as e:
                skipped[getattr(e, "reason", "bad_conversation")] += 1
                log.warning("%s: skipping record %d: %s", path, i, e)
    seen: dict[str, int] = {}
    examples, duplicates = [], 0
    for base, ex in pairs:
        n = seen.get(base, 0) + 1
        seen[base] = n
        if n > 1:
            duplicates += 1
            ex = dataclasses.replace(ex, key=f"{base}#{n}")
        examples.append(ex)
    if duplicates:
        log.warning("%s: %d records repeat an earlier id; they are keyed as id#n", path, duplicates)
    if not examples:
        raise InputFormatError(f"{path}: no usable records (skipped: {dict(skipped)})")
    return Dataset(fmt, records, examples, duplicates, dict(skipped))


def write_subset(path: str | os.PathLike, dataset: Dataset, indices: Sequence[int]) -> None:
    """Writes the records at `indices` (input order kept) in the input's own format, atomically."""
    chosen = [dataset.records[i] for i in sorted(indices)]
    if dataset.format == "minigpt4":
        atomic_write_json(path, {"annotations": chosen})
    elif str(path).endswith(".jsonl"):
        atomic_write_jsonl(path, chosen)
    else:
        atomic_write_json(path, chosen)
