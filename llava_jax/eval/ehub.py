"""LVLM-eHub-style object counting and multi-class identification, scored as short answers the way
LVLM-eHub (Multi-Modality-Arena) scores them.

Commands:
  python -m llava_jax.eval.ehub predict --model PATH --questions counting.jsonl --image-root DIR --out answers.jsonl
  python -m llava_jax.eval.ehub score --questions counting.jsonl --answers answers.jsonl [--out score.json]

Questions: a JSONL (or JSON list) of {"question_id", "image", "text", "answer": str or [str, ...],
"category"?}. Counting asks "How many <objects> are there in the image?" with a number as the answer;
multi-class identification asks whether a class is present ("Is there a <class> in the image?", yes / no).
The prompt is the question plus LLaVA-1.5's short-answer instruction.

Scoring (LVLM-eHub's VQAEval.evaluate): the reply and each gold answer go through the VQA answer processing
(`normalize.vqa_normalize`: punctuation, number words to digits, articles, contractions); the reply is right
when some processed gold answer occurs in the processed reply as whole words (regex word boundaries). So
"There are 3 cars." is right for "three", and "yes, there is" for "yes". Accuracy in percent, overall and
per category; a missing answer is wrong; malformed and unknown rows are counted.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from llava_jax import cli
from llava_jax.eval.answers import EvalDataError, percent, qid_key, read_answers_lenient, read_questions
from llava_jax.eval.normalize import has_word, vqa_normalize
from llava_jax.eval.predict import PromptItem, with_instruction

SHORT_ANSWER = "Answer the question using a single word or phrase."


def load_questions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Questions with "answer" as a non-empty list of strings."""
    out = []
    for q in read_questions(path, need=("text", "answer")):
        gold = q["answer"] if isinstance(q["answer"], list) else [q["answer"]]
        if not gold or not all(isinstance(a, (str, int)) and not isinstance(a, bool) for a in gold):
            raise EvalDataError(f"{path}: question {q['question_id']!r} needs a string answer or a list of them")
        out.append({**q, "answer": [str(a) for a in gold]})
    return out


def is_correct(reply: str, gold: Sequence[str]) -> bool:
    """LVLM-eHub's rule (module docstring)."""
    processed = vqa_normalize(reply)
    return any(has_word(processed, vqa_normalize(g)) for g in gold)


def score(questions: Sequence[Mapping[str, Any]], answers: Mapping[str, Mapping[str, Any]],
          malformed: int = 0) -> dict[str, Any]:
    """Accuracy of `answers` ({question id key: {"text"}}) on the questions."""
    per_category: dict[str, list[int]] = {}
    correct = answered = 0
    keys = set()
    for q in questions:
        key = qid_key(q["question_id"])
        keys.add(key)
        row = answers.get(key)
        answered += row is not None
        ok = int(row is not None and is_correct(row["text"], q["answer"]))
        correct += ok
        per_category.setdefault(str(q.get("category", "all")), []).append(ok)
    n = len(questions)
    return {"accuracy": percent(correct, n), "n": n, "answered": answered, "missing": n - answered,
            "malformed": malformed, "unknown": sum(1 for k in answers if k not in keys),
            "by_category": {c: {"n": len(v), "accuracy": percent(sum(v), len(v))} for c, v in sorted(per_category.items())},
            "rules": "LVLM-eHub VQAEval.evaluate (VQA processing, gold answer as whole words in the reply)"}


def score_file(questions_path: str | os.PathLike, answers_path: str | os.PathLike) -> dict[str, Any]:
    """`score` on files."""
    data = load_questions(questions_path)
    answers, malformed = read_answers_lenient(answers_path)
    return score(data, answers, malformed)


def prompt_items(questions_path: str | os.PathLike, image_root: str | os.PathLike,
                 instruction: str = SHORT_ANSWER) -> list[PromptItem]:
    """One PromptItem per question (`instruction` after it)."""
    return [PromptItem(q["question_id"], with_instruction(str(q["text"]).replace("<image>", "").strip(), instruction),
                       os.path.join(image_root, q["image"]) if q.get("image") else None,
                       {"category": q["category"]} if "category" in q else {})
            for q in load_questions(questions_path)]


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    from llava_jax.eval import runner

    return runner.main(
        argv, prog="python -m llava_jax.eval.ehub", doc=__doc__,
        flags=[runner.DataFlag("--questions"), runner.DataFlag("--image-root", both=False)],
        items=lambda a: prompt_items(a.questions, a.image_root),
        score=lambda a: score_file(a.questions, a.answers),
        summary=lambda r: f"accuracy {r['accuracy']}% (n={r['n']}, missing {r['missing']})")


if __name__ == "__main__":
    sys.exit(cli.run(main))
