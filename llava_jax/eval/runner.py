"""The `predict` / `score` sub-commands shared by the breadth benchmarks (captioning, vsr, mme, textvqa, gqa,
mmbench, ehub): each module adds its data flags, builds its PromptItems and its score dict; this module does
the rest (batched generation through `predict.run_predictions`, the score JSON, the printed summary)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
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
