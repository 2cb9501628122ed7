"""POPE object-hallucination benchmark: yes/no accuracy, precision, recall, F1 and yes-ratio.

Command:
  python -m llava_jax.eval.pope score --labels coco_pope_random.json coco_pope_popular.json \
      coco_pope_adversarial.json --answers answers.jsonl [--out score.json]

Label files are POPE's public layout: one JSON object per line, {"question_id", "image", "text", "label":
"yes"|"no"}, optionally with "category". A file's category is that field, else its name without the
"coco_pope_" prefix and the extension. Answers are matched by question_id within a category; when ids repeat
across categories the answers must carry the "category" field (predict copies it from the questions), or
`--questions` names the combined questions file the answers were made from (LLaVA's llava_pope_test.jsonl:
renumbered ids, a category per question, label-file order within a category; image and text are checked).

A reply is read as "no" when its first sentence contains the word "no" or "not" or a word ending in "n't";
otherwise it is "yes" (the usual POPE reading of free-form replies). "yes" is the positive class. The summary
also gives the mean accuracy and mean F1 over categories, which is how POPE is usually reported.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from llava_jax import cli
from llava_jax.eval.answers import EvalDataError, percent, qid_key, read_records
from llava_jax.io import atomic_write_json

_WORD = re.compile(r"[a-z']+")


def reply_to_yes_no(reply: str) -> str:
    """'yes' or 'no' for a free-form reply, by the rule in the module docstring."""
    first_sentence = reply.strip().split(".", 1)[0].lower().replace("\u2019", "'")
    for word in _WORD.findall(first_sentence):
        if word in ("no", "not") or word.endswith("n't"):
            return "no"
    return "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Binary metrics with 'yes' as positive, in percent; predictions and labels are 'yes'/'no' lists."""
    if len(predictions) != len(labels):
        raise EvalDataError(f"{len(predictions)} predictions for {len(labels)} labels")
    for value in (*predictions, *labels):
        if value not in ("yes", "no"):
            raise EvalDataError(f"POPE values must be 'yes' or 'no', got {value!r}")
    tp = sum(p == "yes" and t == "yes" for p, t in zip(predictions, labels, strict=True))
    fp = sum(p == "yes" and t == "no" for p, t in zip(predictions, labels, strict=True))
    tn = sum(p == "no" and t == "no" for p, t in zip(predictions, labels, strict=True))
    fn = sum(p == "no" and t == "yes" for p, t in zip(predictions, labels, strict=True))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "accuracy": percent(tp + tn, n),
        "precision": round(100 * precision, 2),
        "recall": round(100 * recall, 2),
        "f1": round(100 * f1, 2),
        "yes_ratio": percent(tp + fp, n),
    }


def category_of_file(path: str | os.PathLike) -> str:
    """coco_pope_random.json -> 'random'; other names -> the file stem."""
    stem = os.path.basename(str(path)).split(".", 1)[0]
    return stem.removeprefix("coco_pope_")


def load_labels(paths: Sequence[str | os.PathLike]) -> dict[tuple[str, str], str]:
    """Reads POPE label files into {(category, question id key): 'yes'|'no'}."""
    labels: dict[tuple[str, str], str] = {}
    for path in paths:
        for i, rec in enumerate(read_records(path, "POPE labels")):
            if "question_id" not in rec or "label" not in rec:
                raise EvalDataError(f"{path}: record #{i} needs question_id and label")
            label = str(rec["label"]).strip().lower()
            if label not in ("yes", "no"):
                raise EvalDataError(f"{path}: record #{i} has label {rec['label']!r} (need yes/no)")
            key = (str(rec.get("category") or category_of_file(path)), qid_key(rec["question_id"]))
            if key in labels:
                raise EvalDataError(f"{path}: question {key[1]} of category {key[0]!r} appears twice")
            labels[key] = label
    return labels


def rekey_labels_by_questions(label_paths: Sequence[str | os.PathLike], questions_path: str | os.PathLike
                              ) -> dict[tuple[str, str], str]:
    """Labels keyed by the ids of a combined questions file (LLaVA's llava_pope_test.jsonl layout).

    That file renumbers the label files' questions and tags each with its category, keeping the label files'
    order within a category. The n-th question of a category is matched to the n-th label of that category;
    their image and text must agree (else EvalDataError), so a reordered file cannot be scored silently.
    """
    by_category: dict[str, list[dict]] = {}
    for path in label_paths:
        for rec in read_records(path, "POPE labels"):
            by_category.setdefault(str(rec.get("category") or category_of_file(path)), []).append(rec)
    questions: dict[str, list[dict]] = {}
    for i, q in enumerate(read_records(questions_path, "POPE questions")):
        if "question_id" not in q or "category" not in q:
            raise EvalDataError(f"{questions_path}: question #{i} needs question_id and category")
        questions.setdefault(str(q["category"]), []).append(q)
    out: dict[tuple[str, str], str] = {}
    for category, labels in by_category.items():
        qs = questions.get(category, [])
        if len(qs) != len(labels):
            raise EvalDataError(f"category {category!r}: {len(qs)} questions but {len(labels)} labels")
        for q, rec in zip(qs, labels, strict=True):
            for field in ("image", "text"):
                if field in q and field in rec and str(q[field]).strip() != str(rec[field]).strip():
                    raise EvalDataError(
                        f"category {category!r}: question {q['question_id']} and its label disagree on {field}")
            label = str(rec.get("label", "")).strip().lower()
            if label not in ("yes", "no"):
                raise EvalDataError(f"category {category!r}: label {rec.get('label')!r} (need yes/no)")
            out[(category, qid_key(q["question_id"]))] = label
    return out


def index_answers(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str | None, str], Mapping[str, Any]]:
    """{(category or None, question id key): answer record}; a repeated key raises EvalDataError."""
    out: dict[tuple[str | None, str], Mapping[str, Any]] = {}
    for i, rec in enumerate(records):
        if "question_id" not in rec or not isinstance(rec.get("text"), str):
            raise EvalDataError(f"answer #{i} needs question_id and a string text")
        category = rec.get("category")
        key = (None if category is None else str(category), qid_key(rec["question_id"]))
        if key in out:
            raise EvalDataError(f"answer for question {key[1]} (category {key[0]!r}) appears twice")
        out[key] = rec
    return out


def score(labels: Mapping[tuple[str, str], str], answers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-category POPE metrics plus means over categories.

    Args:
      labels: {(category, question id key): 'yes'|'no'} from `load_labels`.
      answers: answer records ({"question_id", "text", optional "category"}).
    Returns:
      {"by_category": {category: pope_metrics}, "mean_accuracy", "mean_f1"}. A question without an answer,
      or an answer without a category whose id is used by several categories, raises EvalDataError.
    """
    indexed = index_answers(answers)
    categories_of_id: dict[str, list[str]] = {}
    for category, key in labels:
        categories_of_id.setdefault(key, []).append(category)
    per_category: dict[str, tuple[list[str], list[str]]] = {}
    missing = []
    for (category, key), label in labels.items():
        answer = indexed.get((category, key))
        if answer is None and (None, key) in indexed:
            if len(categories_of_id[key]) > 1:
                raise EvalDataError(
                    f"question_id {key} is in several categories {categories_of_id[key]}; answers need 'category'"
                )
            answer = indexed[(None, key)]
        if answer is None:
            missing.append(f"{category}/{key}")
            continue
        preds, golds = per_category.setdefault(category, ([], []))
        preds.append(reply_to_yes_no(str(answer["text"])))
        golds.append(label)
    if missing:
        raise EvalDataError(f"{len(missing)} POPE questions have no answer (first: {missing[:5]})")
    by_category = {c: pope_metrics(p, g) for c, (p, g) in sorted(per_category.items())}
    means = {
        f"mean_{m}": round(sum(v[m] for v in by_category.values()) / len(by_category), 2) if by_category else None
        for m in ("accuracy", "f1")
    }
    return {"by_category": by_category, **means}


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    parser = cli.ArgumentParser(prog="python -m llava_jax.eval.pope", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score an answers JSONL against POPE label files")
    s.add_argument("--labels", nargs="+", required=True)
    s.add_argument("--questions", default=None,
                   help="combined questions file whose ids the answers use (LLaVA's llava_pope_test.jsonl)")
    s.add_argument("--answers", required=True)
    s.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        labels = (rekey_labels_by_questions(args.labels, args.questions) if args.questions
                  else load_labels(args.labels))
        result = score(labels, read_records(args.answers, "answers"))
    except EvalDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        atomic_write_json(args.out, result)
    for category, m in result["by_category"].items():
        print(f"{category}: acc {m['accuracy']} precision {m['precision']} recall {m['recall']} "
              f"f1 {m['f1']} yes {m['yes_ratio']} (n={m['n']})")
    print(f"mean accuracy {result['mean_accuracy']} mean f1 {result['mean_f1']}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
