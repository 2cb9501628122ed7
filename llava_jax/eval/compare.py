"""Pairwise comparison of two answer files by a GPT judge that sees every pair in both orders.

Command:
  python -m llava_jax.eval.compare --questions questions.jsonl --answers-a A.jsonl --answers-b B.jsonl \
      --out DIR [--context context.jsonl] [--judge-model gpt-4o ...]

For each question the judge rates (A, B) and, in a second call, (B, A). In each order A wins, ties or loses on
the two scores. Per question: win if A wins both orders or wins one and ties the other; lose for the mirror;
tie otherwise (one win and one loss, or two ties). A question whose judging failed in either order is
counted as failed and left out of n. Win score = (wins - losses) / n + 1 (2 = A always better, 1 = even,
0 = B always better), overall and per category.

Writes DIR/judgments.jsonl (one row per question with both orders' scores and the outcome),
DIR/summary.json, and the judge journal DIR/judge_journal.jsonl (a rerun resumes from it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from llava_jax import cli
from llava_jax.eval import judge as judge_lib
from llava_jax.eval.answers import EvalDataError, qid_key, read_answers, read_questions
from llava_jax.eval.llava_bench import load_context
from llava_jax.io import atomic_write_json, atomic_write_jsonl

log = logging.getLogger(__name__)

WIN, TIE, LOSE = "win", "tie", "lose"


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def pair_outcome(scores_ab: tuple[float, float], scores_ba: tuple[float, float]) -> str:
    """A's outcome from the judge's scores with A first (a, b) and with B first (b, a)."""
    total = _sign(scores_ab[0] - scores_ab[1]) + _sign(scores_ba[1] - scores_ba[0])
    return WIN if total > 0 else LOSE if total < 0 else TIE


def build_pair_tasks(questions: Sequence[Mapping[str, Any]], context: Mapping[str, Mapping[str, Any]],
                     answers_a: Mapping[str, Mapping[str, Any]], answers_b: Mapping[str, Mapping[str, Any]]
                     ) -> list[judge_lib.JudgeTask]:
    """Two judge tasks per question, keyed "<qid>|ab" (A shown first) and "<qid>|ba"; a missing answer raises."""
    tasks = []
    for q in questions:
        key = qid_key(q["question_id"])
        for name, table in (("A", answers_a), ("B", answers_b)):
            if key not in table:
                raise EvalDataError(f"question {key} has no answer in answers-{name}")
        image = q.get("image")
        ctx = judge_lib.format_context(context.get(str(image)) if image is not None else None)
        a, b = str(answers_a[key]["text"]), str(answers_b[key]["text"])
        tasks.append(judge_lib.JudgeTask(f"{key}|ab", str(q["text"]), a, b, ctx))
        tasks.append(judge_lib.JudgeTask(f"{key}|ba", str(q["text"]), b, a, ctx))
    return tasks


def judgments(questions: Sequence[Mapping[str, Any]], outcomes: Mapping[str, judge_lib.JudgeOutcome]
              ) -> list[dict[str, Any]]:
    """One row per question: scores in both orders (as shown), outcome for A (or "failed") and errors."""
    rows = []
    for q in questions:
        key = qid_key(q["question_id"])
        ab, ba = outcomes[f"{key}|ab"], outcomes[f"{key}|ba"]
        errors = [f"{order}: {o.error}" for order, o in (("ab", ab), ("ba", ba)) if not o.ok]
        outcome = pair_outcome(ab.scores, ba.scores) if ab.ok and ba.ok else "failed"
        rows.append({
            "question_id": q["question_id"],
            "category": q.get("category", "all"),
            "scores_ab": list(ab.scores) if ab.ok else None,
            "scores_ba": list(ba.scores) if ba.ok else None,
            "outcome": outcome,
            "errors": errors,
            "review_ab": ab.review,
            "review_ba": ba.review,
        })
    return rows


def _counts(outcomes: Sequence[str]) -> dict[str, Any]:
    wins, ties, losses = (outcomes.count(x) for x in (WIN, TIE, LOSE))
    n = wins + ties + losses
    return {
        "n": n,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "failed": outcomes.count("failed"),
        "win_score": round((wins - losses) / n + 1, 4) if n else None,
    }


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts and win score overall and per category from judgment rows; lists failed question ids."""
    by_category: dict[str, list[str]] = {}
    for r in rows:
        by_category.setdefault(str(r.get("category", "all")), []).append(str(r["outcome"]))
    overall = _counts([str(r["outcome"]) for r in rows])
    overall["failed_ids"] = [r["question_id"] for r in rows if r["outcome"] == "failed"]
    return {"overall": overall, "by_category": {c: _counts(v) for c, v in sorted(by_category.items())}}


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    parser = cli.ArgumentParser(prog="python -m llava_jax.eval.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", required=True)
    parser.add_argument("--answers-a", required=True)
    parser.add_argument("--answers-b", required=True)
    parser.add_argument("--context", default=None, help="context JSONL (captions, boxes) matched by image name")
    parser.add_argument("--out", required=True, help="output directory")
    judge_lib.add_judge_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        questions = read_questions(args.questions, need=("text",))
        tasks = build_pair_tasks(questions, load_context(args.context), read_answers(args.answers_a),
                                 read_answers(args.answers_b))
    except EvalDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = judge_lib.JudgeSettings.from_args(args)
    os.makedirs(args.out, exist_ok=True)
    try:
        client = judge_lib.make_client(settings, args.journal or os.path.join(args.out, "judge_journal.jsonl"))
        outcomes = judge_lib.run_judge(client, tasks, settings, desc="pairwise judge")
    except judge_lib.judge_setup_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = judgments(questions, outcomes)
    summary = summarize(rows)
    summary["answers_a"] = os.path.abspath(args.answers_a)
    summary["answers_b"] = os.path.abspath(args.answers_b)
    summary["judge_model"] = settings.model
    summary["client_stats"] = client.last_stats.to_dict()
    atomic_write_jsonl(os.path.join(args.out, "judgments.jsonl"), rows)
    atomic_write_json(os.path.join(args.out, "summary.json"), summary)
    o = summary["overall"]
    print(f"A vs B: {o['wins']} wins, {o['ties']} ties, {o['losses']} losses, {o['failed']} failed; "
          f"win score {o['win_score']}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
