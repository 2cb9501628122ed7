"""Record checks shared by the validator CLI and the training pipeline.

    python -m llava_jax.data.validate --data FILE --image-root DIR [--json]
        [--tokenizer DIR --template vicuna_v1] [--max-length 2048] [--num-image-tokens 576] [--workers 8]

Exit status 0 when every record is usable, 1 otherwise. `--json` prints one object:
{"total": n, "ok": n, "errors": {reason: count}, "examples": {reason: [first few]}, "bad": [every bad record]}.
Without `--tokenizer` the "first answer beyond max length" check uses a conservative token estimate.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from llava_jax import cli
from llava_jax.data import conversation, images, sources

_ESTIMATE_TEMPLATE_OVERHEAD = 8  # BOS, role names and separators, at least


@dataclasses.dataclass(frozen=True)
class LengthCheck:
    """Settings of the max-length check: exact with a tokenizer, estimated (lower bound-ish) without."""

    max_length: int = 2048
    num_image_tokens: int = 576
    tokenizer: Any = None
    template: str = "vicuna_v1"
    image_token_id: int = 0


def reason_of(exc: BaseException) -> str:
    """The machine-readable reason of a record problem (any exception: unexpected ones become 'internal_error')."""
    if isinstance(exc, FileNotFoundError):
        return sources.MissingImageFileError.reason
    reason = getattr(exc, "reason", None)
    return reason if isinstance(reason, str) else "internal_error"


def estimate_tokens(text: str) -> int:
    """A rough lower estimate of LLaMA-style token count: max(word count, characters / 4)."""
    return max(len(text.split()), math.ceil(len(text) / 4))


def check_length(turns: conversation.Turns, record: dict, length: LengthCheck) -> None:
    """Raises AnswerTruncatedError when the first answer would start at or beyond `length.max_length`."""
    if length.tokenizer is not None:
        conversation.encode(
            record,
            length.template,
            length.tokenizer,
            length.num_image_tokens,
            length.image_token_id,
            length.max_length,
            has_image=turns.has_image,
        )
        return
    question = turns.pairs[0][0].replace(conversation.IMAGE_MARK, "")
    estimate = estimate_tokens((turns.system or "") + " " + question) + _ESTIMATE_TEMPLATE_OVERHEAD
    estimate += length.num_image_tokens if turns.has_image else 0
    if estimate >= length.max_length:
        raise conversation.AnswerTruncatedError(
            f"first answer would start near token {estimate}, beyond max_length {length.max_length}"
        )


def check_conversation(record: Any, has_image: bool) -> conversation.Turns:
    """Structure checks of a record's conversation (roles, order, markers, empty answers)."""
    sources.raise_placeholder(record)
    if not isinstance(record, dict):
        raise sources.NotAnObjectError("record is not a JSON object")
    if "conversations" not in record:
        raise conversation.NoTurnsError("record has no 'conversations'")
    return conversation.normalize_turns(record["conversations"], has_image)


def check_record(
    record: Any,
    image_roots: Sequence[str | os.PathLike] = (),
    *,
    image_bytes: bytes | None = None,
    check_image: bool = True,
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    length: LengthCheck | None = None,
) -> None:
    """Raises a named error (with `.reason`) if `record` is not usable for training; returns None otherwise.

    Checks, in order: placeholder from parsing (invalid JSON / not UTF-8 / not an object), the image field
    (type, absolute path, '..', missing file), the conversation (no turns, unknown role, order, empty answer,
    image marker missing / repeated / without image), the image bytes (empty, undecodable or truncated,
    zero size, decompression bomb) and, with `length`, a first answer beyond max_length.
    """
    sources.raise_placeholder(record)
    if not isinstance(record, dict):
        raise sources.NotAnObjectError("record is not a JSON object")
    rel = sources.image_field(record)
    path = None
    if rel is not None and image_bytes is None:
        path = sources.resolve_image_path(rel, image_roots)
    turns = check_conversation(record, has_image=rel is not None)
    if rel is not None and check_image:
        images.load_rgb(image_bytes if image_bytes is not None else path, max_pixels)
    if length is not None:
        check_length(turns, record, length)


@dataclasses.dataclass
class Report:
    """Counts and the list of bad records of a validation run."""

    total: int = 0
    ok: int = 0
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
    bad: list[dict] = dataclasses.field(default_factory=list)

    def add(self, index: int, record: Any, exc: BaseException | None, max_examples: int = 5) -> None:
        self.total += 1
        if exc is None:
            self.ok += 1
            return
        reason = reason_of(exc)
        rid = record.get("id") if isinstance(record, dict) and "_error" not in record else None
        entry = {"index": index, "id": rid if isinstance(rid, (str, int)) else None, "reason": reason,
                 "message": str(exc)[:300]}
        self.errors[reason] += 1
        self.bad.append(entry)
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < max_examples:
            self.examples[reason].append(entry)

    def to_json(self) -> dict:
        return {"total": self.total, "ok": self.ok, "errors": dict(self.errors), "examples": self.examples,
                "bad": self.bad}


def validate_records(
    records: Sequence[Any],
    image_roots: Sequence[str | os.PathLike],
    *,
    length: LengthCheck | None = None,
    check_image: bool = True,
    workers: int = 8,
    progress: bool = False,
) -> Report:
    """Runs check_record over every record (threads for image decoding) and collects a Report."""

    def run(item):
        index, record = item
        try:
            check_record(record, image_roots, check_image=check_image, length=length)
            return index, record, None
        except Exception as e:  # every problem becomes a reported reason, never a crash
            return index, record, e

    report = Report()
    items = list(enumerate(records))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="validate", file=sys.stderr)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for index, record, exc in pool.map(run, items, chunksize=64):
            report.add(index, record, exc)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return report


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m llava_jax.data.validate", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="LLaVA JSON / JSONL file or MiniGPT-4 filter_cap.json")
    p.add_argument("--image-root", action="append", default=[], help="image root (repeat or comma-separate)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for the exact length check")
    p.add_argument("--template", default="vicuna_v1", help=f"one of {conversation.template_names()}")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--num-image-tokens", type=int, default=576)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--no-image-decode", action="store_true", help="check files exist but do not decode them")
    p.add_argument("--seed", type=int, default=0, help="instruction draw for filter_cap.json")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = _parse_args(argv)
    roots = [r.strip() for item in args.image_root for r in item.split(",") if r.strip()]
    if not roots and args.data.endswith("filter_cap.json"):
        roots = [os.path.dirname(os.path.abspath(args.data))]
    try:
        records = sources.load_records(args.data, seed=args.seed)
    except OSError as e:  # a missing / unreadable --data file is a bad argument, not unusable records
        return cli.report(cli.describe(e))
    except sources.DataFileError as e:
        reason = reason_of(e)
        if args.json:
            print(json.dumps({"total": 0, "ok": 0, "errors": {reason: 1},
                              "examples": {reason: [{"index": None, "message": str(e)}]}, "bad": []}))
        else:
            print(f"error: {e}", file=sys.stderr)
        return 1
    if not records:
        if args.json:
            print(json.dumps({"total": 0, "ok": 0, "errors": {"no_records": 1},
                              "examples": {"no_records": [{"index": None, "message": "no records"}]}, "bad": []}))
        else:
            print(f"error: {args.data} holds no records", file=sys.stderr)
        return 1
    tokenizer = None
    image_token_id = 0
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        image_token_id = tokenizer.convert_tokens_to_ids(conversation.IMAGE_MARK)
    length = LengthCheck(args.max_length, args.num_image_tokens, tokenizer, args.template, image_token_id)
    report = validate_records(records, roots, length=length, check_image=not args.no_image_decode,
                              workers=args.workers, progress=not args.json)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        for entry in report.bad:
            ident = f" (id {entry['id']})" if entry["id"] is not None else ""
            print(f"record {entry['index']}{ident}: {entry['reason']}: {entry['message']}")
        print(f"{report.ok}/{report.total} records usable; errors: {dict(report.errors) or 'none'}")
    return 0 if report.ok == report.total else 1


if __name__ == "__main__":
    sys.exit(cli.run(main))
