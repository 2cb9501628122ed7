"""LLaVA-Bench style evaluation: predict answers, have a GPT judge rate them against reference answers, summarise.

Commands:
  python -m llava_jax.eval.llava_bench predict --model PATH --questions questions.jsonl --image-root DIR \
      --out answers.jsonl
  python -m llava_jax.eval.llava_bench review --questions questions.jsonl --context context.jsonl \
      --references answers_gpt4.jsonl --answers answers.jsonl --out reviews.jsonl [--judge-model gpt-4o ...]
  python -m llava_jax.eval.llava_bench summarize --reviews reviews.jsonl [--out summary.json]

Files: questions JSONL {question_id, image, text, category}; context JSONL {image, caption | captions,
instances: [{category, bbox}]} (matched to questions by image name); references and answers are answer files
{question_id, text}. In each review the judge sees the reference as Answer 1 and the model's answer as Answer 2
and puts both scores (1-10) on its first line. The summary gives, per category and overall, the mean reference
score, the mean model score and the relative score = mean(model) / mean(reference) x 100, over the reviews
that parsed; failed reviews are counted per category and listed.
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
from llava_jax.eval.answers import EvalDataError, qid_key, read_answers, read_questions, read_records
from llava_jax.io import atomic_write_json, atomic_write_jsonl, read_jsonl

log = logging.getLogger(__name__)


def load_context(path: str | os.PathLike | None) -> dict[str, dict]:
    """{image name: context record} from a context JSONL (None -> empty)."""
    if not path:
        return {}
    out: dict[str, dict] = {}
    for i, rec in enumerate(read_records(path, "context")):
        if "image" not in rec:
            raise EvalDataError(f"{path}: context #{i} has no 'image'")
        out[str(rec["image"])] = rec
    return out


def build_review_tasks(questions: Sequence[Mapping[str, Any]], context: Mapping[str, Mapping[str, Any]],
                       references: Mapping[str, Mapping[str, Any]], answers: Mapping[str, Mapping[str, Any]]
                       ) -> list[judge_lib.JudgeTask]:
    """One judge task per question (reference = Answer 1, model = Answer 2); a missing answer raises."""
    tasks = []
    for q in questions:
        key = qid_key(q["question_id"])
        for name, table in (("reference", references), ("model answer", answers)):
            if key not in table:
                raise EvalDataError(f"question {key} has no {name}")
        image = q.get("image")
        ctx = context.get(str(image)) if image is not None else None
        if context and image is not None and ctx is None:
            log.warning("question %s: no context for image %s", key, image)
        tasks.append(judge_lib.JudgeTask(
            key=key,
            question=str(q["text"]),
            answer_1=str(references[key]["text"]),
            answer_2=str(answers[key]["text"]),
            context=judge_lib.format_context(ctx),
        ))
    return tasks


def review_records(questions: Sequence[Mapping[str, Any]], outcomes: Mapping[str, judge_lib.JudgeOutcome],
                   model_id: str | None = None) -> list[dict[str, Any]]:
    """The reviews JSONL rows: question_id, category, scores [reference, model] or null, review, error."""
    rows = []
    for q in questions:
        key = qid_key(q["question_id"])
        outcome = outcomes[key]
        rows.append({
            "question_id": q["question_id"],
            "category": q.get("category", "all"),
            "scores": list(outcome.scores) if outcome.scores is not None else None,
            "review": outcome.review,
            "error": outcome.error,
            "model_id": model_id,
        })
    return rows


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _summary_row(pairs: Sequence[Sequence[float]], failed: Sequence[Any]) -> dict[str, Any]:
    ref = _mean([p[0] for p in pairs])
    model = _mean([p[1] for p in pairs])
    relative = round(100.0 * model / ref, 1) if ref else None
    return {
        "n": len(pairs),
        "failed": len(failed),
        "failed_ids": list(failed),
        "mean_reference": None if ref is None else round(ref, 3),
        "mean_model": None if model is None else round(model, 3),
        "relative": relative,
    }


def _row_scores(row: Mapping[str, Any], index: int) -> list[float] | None:
    """[reference, model] of a review row, or None when the review failed.

    Reads our rows ("scores": [a, b] or null) and LLaVA's review files ("tuple": [a, b], with [-1, -1] for a
    failed parse).
    """
    scores = row["scores"] if "scores" in row else row.get("tuple")
    if scores is None:
        return None
    if (not isinstance(scores, list) or len(scores) != 2
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)):
        raise EvalDataError(f"review #{index} has malformed scores {scores!r}")
    if scores[0] < 0 or scores[1] < 0:
        return None
    return [float(s) for s in scores]


def summarize(reviews: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-category and overall means and relative scores from review rows (see module docstring).

    Returns:
      {"by_category": {category: row}, "overall": row}, row = {n, failed, failed_ids, mean_reference,
      mean_model, relative}. Categories named "llava_bench_<c>" (LLaVA's review files) are reported as <c>.
    """
    pairs: dict[str, list[list[float]]] = {}
    failed: dict[str, list[Any]] = {}
    for i, r in enumerate(reviews):
        category = str(r.get("category", "all")).removeprefix("llava_bench_")
        scores = _row_scores(r, i)
        pairs.setdefault(category, [])
        failed.setdefault(category, [])
        if scores is None:
            failed[category].append(r.get("question_id"))
        else:
            pairs[category].append(scores)
    by_category = {c: _summary_row(pairs[c], failed[c]) for c in sorted(pairs)}
    overall = _summary_row([p for c in sorted(pairs) for p in pairs[c]],
                           [q for c in sorted(failed) for q in failed[c]])
    return {"by_category": by_category, "overall": overall}


def review_command(args: argparse.Namespace) -> int:
    """Judges every answer against its reference and writes the reviews JSONL."""
    questions = read_questions(args.questions, need=("text",))
    answers = read_answers(args.answers)
    tasks = build_review_tasks(questions, load_context(args.context), read_answers(args.references), answers)
    settings = judge_lib.JudgeSettings.from_args(args)
    journal = args.journal or f"{args.out}.journal.jsonl"
    client = judge_lib.make_client(settings, journal)
    outcomes = judge_lib.run_judge(client, tasks, settings, desc="llava-bench review")
    model_ids = {str(a.get("model_id")) for a in answers.values() if a.get("model_id")}
    rows = review_records(questions, outcomes, model_id=model_ids.pop() if len(model_ids) == 1 else None)
    atomic_write_jsonl(args.out, rows)
    n_failed = sum(r["scores"] is None for r in rows)
    print(f"wrote {len(rows)} reviews to {args.out} ({n_failed} failed)")
    _print_summary(summarize(rows))
    return 0


def _print_summary(summary: Mapping[str, Any]) -> None:
    for name, row in [*summary["by_category"].items(), ("overall", summary["overall"])]:
        print(f"{name:>10}: relative {row['relative']}  reference {row['mean_reference']}  "
              f"model {row['mean_model']}  (n={row['n']}, failed {row['failed']})")


def summarize_command(args: argparse.Namespace) -> int:
    """Summarises one or more reviews files."""
    rows = [row for path in args.reviews for row in read_jsonl(path)]
    summary = summarize(rows)
    if args.out:
        atomic_write_json(args.out, summary)
    _print_summary(summary)
    return 0


def predict_command(args: argparse.Namespace) -> int:
    """Generates the model's answers to the questions file."""
    from llava_jax.eval import predict as predict_lib

    items = predict_lib.items_from_questions(args.questions, args.image_root, limit=args.limit)
    predict_lib.run_predictions(items, predict_lib.PredictSettings.from_args(args), args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    from llava_jax.eval import predict as predict_lib

    parser = cli.ArgumentParser(prog="python -m llava_jax.eval.llava_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="generate answers")
    p.add_argument("--questions", required=True)
    p.add_argument("--image-root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=0)
    predict_lib.add_predict_flags(p, max_new_tokens=512)
    r = sub.add_parser("review", help="judge answers against reference answers")
    r.add_argument("--questions", required=True)
    r.add_argument("--context", default=None)
    r.add_argument("--references", required=True)
    r.add_argument("--answers", required=True)
    r.add_argument("--out", required=True, help="reviews JSONL")
    judge_lib.add_judge_flags(r)
    s = sub.add_parser("summarize", help="summarise review files")
    s.add_argument("--reviews", nargs="+", required=True)
    s.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = {"predict": predict_command, "review": review_command, "summarize": summarize_command}[args.command]
    try:
        return command(args)
    except (EvalDataError, *judge_lib.judge_setup_errors()) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli.run(main))
