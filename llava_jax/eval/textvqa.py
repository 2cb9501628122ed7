"""TextVQA: reading text in images, scored as LLaVA scores it (its m4c evaluator, the EvalAI answer processor).

Commands:
  python -m llava_jax.eval.textvqa predict --model PATH --annotations TextVQA_0.5.1_val.json \
      --image-root train_images --out answers.jsonl [--batch-size 8]
  python -m llava_jax.eval.textvqa score --annotations TextVQA_0.5.1_val.json --answers answers.jsonl \
      [--out score.json]

Annotations are TextVQA's public JSON: {"data": [{"question_id", "image_id", "question", "answers": [10 str]}]};
images are <image-root>/<image_id>.jpg. The prompt is the question plus LLaVA-1.5's short-answer instruction.

Scoring (`score`), as llava/eval/eval_textvqa.py with m4c_evaluator.py:
  - prediction and every human answer go through `normalize.evalai_normalize`;
  - a prediction scores, for each of the human answers in turn, min(1, matches among the *other* answers / 3),
    averaged (with 10 answers: the mean over the 10 choose-9 subsets); accuracy is the mean, in percent;
  - an answer row is matched by question_id; LLaVA's own TextVQA answer files carry the image id as
    question_id, so a row whose id is not a question id is matched by (image_id, the first line of its prompt
    lower-cased), as LLaVA matches it;
  - a question without a usable answer scores 0 (LLaVA averages over its answer rows only: the same number
    whenever every question is answered); malformed rows and rows matching no question are counted.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from llava_jax import cli
from llava_jax.eval.answers import EvalDataError, percent, qid_key, read_answers_lenient, read_records
from llava_jax.eval.normalize import evalai_normalize
from llava_jax.eval.predict import PromptItem, with_instruction

SHORT_ANSWER = "Answer the question using a single word or phrase."


def load_annotations(path: str | os.PathLike) -> list[dict[str, Any]]:
    """TextVQA records [{question_id, image_id, question, answers}]; a bad record raises EvalDataError."""
    records = read_records(path, "TextVQA annotations")
    seen = set()
    for i, r in enumerate(records):
        for field in ("question_id", "question", "answers"):
            if field not in r:
                raise EvalDataError(f"{path}: record #{i} has no {field!r}")
        if not isinstance(r["answers"], list) or not r["answers"] or not all(isinstance(a, str) for a in r["answers"]):
            raise EvalDataError(f"{path}: record #{i} needs 'answers' as a non-empty list of strings")
        key = qid_key(r["question_id"])
        if key in seen:
            raise EvalDataError(f"{path}: question_id {key} appears twice")
        seen.add(key)
    return records


def answer_scores(human_answers: Sequence[str]) -> dict[str, float]:
    """{normalised answer: accuracy} for every distinct normalised human answer (the m4c soft score)."""
    answers = [evalai_normalize(a) for a in human_answers]
    scores = {}
    for candidate in set(answers):
        accs = []
        for i in range(len(answers)):
            matches = sum(1 for j, a in enumerate(answers) if j != i and a == candidate)
            accs.append(min(1.0, matches / 3.0))
        scores[candidate] = sum(accs) / len(accs)
    return scores


def question_of_prompt(prompt: str) -> str:
    """The question in an answer row's prompt, lower-cased, as LLaVA's eval_textvqa.py prompt_processor reads
    it: after "OCR tokens: ..." the text between "Question: " and " Short answer:"; in a three-line prompt with
    "Reference OCR token: " the line that is not the OCR line (the second when the prompt starts with it, else
    the first); otherwise the first line. A leading image-marker line (ours; LLaVA's prompts have none) is
    skipped first."""
    if prompt.startswith("<image>\n"):
        prompt = prompt[len("<image>\n"):]
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        question = match.group(1) if match else lines[0]
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    else:
        question = lines[0]
    return question.lower()


def _row_key(by_qid: Mapping[str, Any]):
    """The answer-row key: its question id when that is one, else "<id>\n<question of its prompt>" (LLaVA's
    rows, whose id is the image id, shared by the questions on one image)."""

    def key(row: Mapping[str, Any]) -> str:
        qid = qid_key(row["question_id"])
        if qid in by_qid:
            return qid
        return f"{qid}\n{question_of_prompt(str(row.get('prompt', '')))}"

    return key


def score(annotations: Sequence[Mapping[str, Any]], answers: Mapping[str, Mapping[str, Any]],
          malformed: int = 0) -> dict[str, Any]:
    """TextVQA accuracy (percent) of `answers` on `annotations`. Answers are keyed by question id, or (LLaVA's
    layout) by "<image id>\n<question, lower-cased>" as `score_file` reads them."""
    by_qid = {qid_key(a["question_id"]): a for a in annotations}
    by_image_question = {f"{a.get('image_id')}\n{str(a['question']).lower()}": qid_key(a["question_id"])
                         for a in annotations}
    replies: dict[str, str] = {}
    unknown = 0
    for key, row in answers.items():
        target = key if key in by_qid else by_image_question.get(key)
        if target is None or target in replies:
            unknown += 1
            continue
        replies[target] = row["text"]
    total = 0.0
    for key, ann in by_qid.items():
        if key in replies:
            total += answer_scores(ann["answers"]).get(evalai_normalize(replies[key]), 0.0)
    n = len(by_qid)
    return {"accuracy": percent(total, n), "n": n, "answered": len(replies), "missing": n - len(replies),
            "malformed": malformed, "unknown": unknown,
            "rules": "LLaVA m4c_evaluator (EvalAI normalisation, leave-one-out min(matches/3, 1))"}


def score_file(annotations_path: str | os.PathLike, answers_path: str | os.PathLike) -> dict[str, Any]:
    """`score` on files."""
    data = load_annotations(annotations_path)
    answers, malformed = read_answers_lenient(answers_path, key_fn=_row_key({qid_key(a["question_id"]): a
                                                                             for a in data}))
    return score(data, answers, malformed)


def prompt_items(annotations_path: str | os.PathLike, image_root: str | os.PathLike,
                 instruction: str = SHORT_ANSWER) -> list[PromptItem]:
    """One PromptItem per TextVQA question (question_id as in the annotations; `instruction` after it)."""
    return [PromptItem(a["question_id"], with_instruction(a["question"], instruction),
                       os.path.join(image_root, f"{a['image_id']}.jpg"))
            for a in load_annotations(annotations_path)]


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    from llava_jax.eval import runner

    return runner.main(
        argv, prog="python -m llava_jax.eval.textvqa", doc=__doc__,
        flags=[runner.DataFlag("--annotations"), runner.DataFlag("--image-root", both=False)],
        items=lambda a: prompt_items(a.annotations, a.image_root),
        score=lambda a: score_file(a.annotations, a.answers),
        summary=lambda r: f"TextVQA accuracy {r['accuracy']}% (n={r['n']}, missing {r['missing']})")


if __name__ == "__main__":
    sys.exit(cli.run(main))
