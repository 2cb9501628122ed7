"""GQA: compositional questions on images, exact-match accuracy as LLaVA scores it (convert_gqa_for_eval.py
then GQA's official eval.py).

Commands:
  python -m llava_jax.eval.gqa predict --model PATH --questions testdev_balanced_questions.json \
      --image-root images --out answers.jsonl
  python -m llava_jax.eval.gqa score --questions testdev_balanced_questions.json --answers answers.jsonl \
      [--out score.json]

Questions are GQA's public JSON {question id: {"imageId", "question", "answer", "types": {"structural", ...},
"isBalanced"}}; images are <image-root>/<imageId>.jpg. The prompt is the question plus LLaVA-1.5's
short-answer instruction.

Scoring: the reply loses its trailing periods and is lower-cased (LLaVA's conversion), then it must equal the
gold answer exactly (eval.py). Only balanced questions count (a question without "isBalanced" counts), as in
eval.py. "accuracy" is in percent; "binary" / "open" split the questions by types.structural ("query" is
open, the rest binary), as eval.py does. A question without an answer is wrong (eval.py would stop with a
KeyError); malformed and unknown rows are counted.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from llava_jax import cli
from llava_jax.eval.answers import EvalDataError, percent, qid_key, read_answers_lenient
from llava_jax.eval.predict import PromptItem, with_instruction
from llava_jax.io import read_json

SHORT_ANSWER = "Answer the question using a single word or phrase."


def load_questions(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{question id key: question} of the balanced questions; a bad record raises EvalDataError."""
    if not os.path.exists(path):
        raise EvalDataError(f"GQA questions not found: {path}")
    data = read_json(path)
    if not isinstance(data, dict):
        raise EvalDataError(f"{path}: expected GQA's {{question id: question}} JSON object")
    out = {}
    for qid, q in data.items():
        if not isinstance(q, dict) or not all(k in q for k in ("imageId", "question", "answer")):
            raise EvalDataError(f"{path}: question {qid} needs imageId, question and answer")
        if q.get("isBalanced", True):
            out[qid_key(qid)] = {**q, "question_id": qid}
    return out


def normalize_prediction(reply: str) -> str:
    """LLaVA's convert_gqa_for_eval.py: trailing periods removed, lower-cased."""
    return reply.rstrip(".").lower()


def score(questions: Mapping[str, Mapping[str, Any]], answers: Mapping[str, Mapping[str, Any]],
          malformed: int = 0) -> dict[str, Any]:
    """GQA accuracy of `answers` ({question id key: {"text"}})."""
    groups: dict[str, list[int]] = {"binary": [], "open": []}
    correct = answered = 0
    for key, q in questions.items():
        row = answers.get(key)
        answered += row is not None
        ok = int(row is not None and normalize_prediction(row["text"]) == q["answer"])
        correct += ok
        structural = (q.get("types") or {}).get("structural")
        groups["open" if structural == "query" else "binary"].append(ok)
    n = len(questions)
    return {"accuracy": percent(correct, n), "binary": percent(sum(groups["binary"]), len(groups["binary"])),
            "open": percent(sum(groups["open"]), len(groups["open"])), "n": n, "answered": answered,
            "missing": n - answered, "malformed": malformed,
            "unknown": sum(1 for k in answers if k not in questions)}


def score_file(questions_path: str | os.PathLike, answers_path: str | os.PathLike) -> dict[str, Any]:
    """`score` on files."""
    data = load_questions(questions_path)
    answers, malformed = read_answers_lenient(answers_path)
    return score(data, answers, malformed)


def prompt_items(questions_path: str | os.PathLike, image_root: str | os.PathLike,
                 instruction: str = SHORT_ANSWER) -> list[PromptItem]:
    """One PromptItem per balanced GQA question (`instruction` after it)."""
    return [PromptItem(q["question_id"], with_instruction(q["question"], instruction),
                       os.path.join(image_root, f"{q['imageId']}.jpg"))
            for q in load_questions(questions_path).values()]


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    from llava_jax.eval import runner

    return runner.main(
        argv, prog="python -m llava_jax.eval.gqa", doc=__doc__,
        flags=[runner.DataFlag("--questions"), runner.DataFlag("--image-root", both=False)],
        items=lambda a: prompt_items(a.questions, a.image_root),
        score=lambda a: score_file(a.questions, a.answers),
        summary=lambda r: (f"GQA accuracy {r['accuracy']}% (binary {r['binary']}, open {r['open']}, n={r['n']}, "
                           f"missing {r['missing']})"))


if __name__ == "__main__":
    sys.exit(cli.run(main))
