"""The `predict` / `score` sub-commands shared by the breadth benchmarks (captioning, vsr, mme, textvqa, gqa,
mmbench, ehub): each module adds its data flags, builds its PromptItems and its score dict; this module does
the rest (batched generation through `predict.run_predictions`, the score JSON, the printed summary)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llava_jax.eval.predict import PredictSettings, PromptItem, add_predict_flags, run_predictions
from llava_jax.io import atomic_write_json


def add_predict_parser(sub: Any, max_new_tokens: int = 16) -> argparse.ArgumentParser:
    """The `predict` sub-command: --out plus the model and decoding flags."""
    p = sub.add_parser("predict", help="generate an answers JSONL (LLaVA's answer-file fields)")
    p.add_argument("--out", required=True, help="answers JSONL")
    add_predict_flags(p, max_new_tokens=max_new_tokens)
    return p


def add_score_parser(sub: Any) -> argparse.ArgumentParser:
    """The `score` sub-command: --answers and --out."""
    s = sub.add_parser("score", help="score an answers JSONL")
    s.add_argument("--answers", required=True, help="answers JSONL (question_id, text)")
    s.add_argument("--out", default=None, help="score JSON")
    return s


def predict(args: argparse.Namespace, items: Sequence[PromptItem]) -> int:
    """Runs the batched generation for `items` into args.out; returns 0."""
    from llava_jax import host_memory

    host_memory.retain_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows = run_predictions(items, PredictSettings.from_args(args), args.out)
    print(f"wrote {len(rows)} answers to {args.out}")
    return 0


def report(args: argparse.Namespace, result: dict[str, Any], summary: str) -> int:
    """Writes the score JSON (when --out) and prints the summary line; returns 0."""
    if args.out:
        atomic_write_json(args.out, result)
    print(summary)
    return 0


@dataclass(frozen=True)
class DataFlag:
    """One data flag of a benchmark's command line (`--questions`, `--image-root`, ...).

    both: whether `score` takes it too (else `predict` only); an optional flag has `required=False` and a default."""
    name: str
    both: bool = True
    required: bool = True
    default: str | None = None
    help: str | None = None


def main(argv: Sequence[str] | None, *, prog: str, doc: str | None, flags: Sequence[DataFlag],
         items: Callable[[argparse.Namespace], Sequence[PromptItem]],
         score: Callable[[argparse.Namespace], dict[str, Any]],
         summary: Callable[[dict[str, Any]], str], max_new_tokens: int = 16) -> int:
    """A benchmark's whole command line: `predict` (generation into an answers JSONL) and `score` (the score JSON
    and a printed summary). `items(args)` builds the PromptItems, `score(args)` the score dict from args.answers,
    `summary(result)` the printed line(s). Returns the exit status."""
    from llava_jax import cli

    parser = cli.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p, s = add_predict_parser(sub, max_new_tokens=max_new_tokens), add_score_parser(sub)
    for flag in flags:
        for target in (p, s) if flag.both else (p,):
            target.add_argument(flag.name, required=flag.required, default=flag.default, help=flag.help)
    args = parser.parse_args(argv)
    if args.command == "predict":
        return predict(args, items(args))
    result = score(args)
    return report(args, result, summary(result))
