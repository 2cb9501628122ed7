"""ScienceQA: multiple-choice science questions, some with an image; predict and score are separate steps.

Commands:
  python -m llava_jax.eval.scienceqa build --questions eval.jsonl --image-root DIR --out SQA_DIR
  python -m llava_jax.eval.scienceqa predict --model PATH --data-dir SQA_DIR --split test --out answers.jsonl
  python -m llava_jax.eval.scienceqa score --data-dir SQA_DIR --split test --answers answers.jsonl --out score.json

SQA_DIR is ScienceQA's own layout: problems.json ({pid: problem}), pid_splits.json ({split: [pid, ...]}) and
images under images/<pid>/image.png or images/<split>/<pid>/image.png (`--image-root` overrides the folder).
`build` writes that layout from any multiple-choice questions JSONL, e.g. the synthetic set's eval.jsonl.

Answer extraction (`extract_letter`), in order: the reply is exactly an option letter; the reply starts with
"X." (followed by a space or the end); the reply contains exactly one "The answer is X" (X a letter, optionally
in parentheses, not followed by another letter). Anything else is failed: scored wrong and listed by id.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from llava_jax.eval.answers import EvalDataError, percent, qid_key, read_answers
from llava_jax.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

OPTION_LETTERS = "ABCDEFGHIJ"
ANSWER_INSTRUCTION = "Reply with only the letter of the correct option."
GRADE_GROUPS = {
    "G1-6": {f"grade{i}" for i in range(1, 7)},
    "G7-12": {f"grade{i}" for i in range(7, 13)},
}
_ANSWER_IS = re.compile(r"The answer is \(?([A-Z])\)?(?![A-Za-z])")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One ScienceQA problem. `answer` is the index of the correct choice."""

    pid: str
    question: str
    choices: tuple[str, ...]
    answer: int
    hint: str
    image: str | None
    subject: str
    grade: str
    split: str

    @property
    def has_image(self) -> bool:
        """The problem comes with an image (ScienceQA's IMG context)."""
        return bool(self.image)

    @property
    def has_text_context(self) -> bool:
        """The problem has a non-empty hint (ScienceQA's TXT context)."""
        return bool(self.hint.strip())

    @property
    def answer_letter(self) -> str:
        """The letter of the correct option."""
        return OPTION_LETTERS[self.answer]


def _problem_from_json(pid: str, raw: Mapping[str, Any], split: str) -> Problem:
    try:
        choices = tuple(str(c) for c in raw["choices"])
        answer = int(raw["answer"])
        question = str(raw["question"])
    except (KeyError, TypeError, ValueError) as e:
        raise EvalDataError(f"ScienceQA problem {pid}: missing or bad field ({e!r})") from e
    if not 2 <= len(choices) <= len(OPTION_LETTERS):
        raise EvalDataError(f"ScienceQA problem {pid}: {len(choices)} choices (need 2..{len(OPTION_LETTERS)})")
    if not 0 <= answer < len(choices):
        raise EvalDataError(f"ScienceQA problem {pid}: answer index {answer} outside its {len(choices)} choices")
    return Problem(
        pid=pid,
        question=question,
        choices=choices,
        answer=answer,
        hint=str(raw.get("hint") or ""),
        image=raw.get("image") or None,
        subject=str(raw.get("subject") or "unknown"),
        grade=str(raw.get("grade") or "unknown"),
        split=str(raw.get("split") or split),
    )


def load_problems(data_dir: str | os.PathLike, split: str = "test") -> list[Problem]:
    """Reads problems.json and pid_splits.json from `data_dir`; returns the split's problems in split order."""
    problems_path = os.path.join(data_dir, "problems.json")
    splits_path = os.path.join(data_dir, "pid_splits.json")
    for path in (problems_path, splits_path):
        if not os.path.exists(path):
            raise EvalDataError(f"ScienceQA file not found: {path}")
    problems = read_json(problems_path)
    splits = read_json(splits_path)
    if not isinstance(problems, dict) or not isinstance(splits, dict):
        raise EvalDataError("problems.json and pid_splits.json must both hold JSON objects")
    if split not in splits:
        raise EvalDataError(f"split {split!r} not in pid_splits.json (has: {sorted(splits)})")
    out = []
    for pid in splits[split]:
        key = qid_key(pid)
        if key not in problems:
            raise EvalDataError(f"pid {key} of split {split!r} is not in problems.json")
        out.append(_problem_from_json(key, problems[key], split))
    return out


def image_path(problem: Problem, image_root: str | os.PathLike) -> str:
    """Path of a problem's image: <root>/<pid>/<image>, else <root>/<split>/<pid>/<image>; raises if absent."""
    if not problem.image:
        raise EvalDataError(f"ScienceQA problem {problem.pid} has no image")
    candidates = [
        os.path.join(image_root, problem.pid, problem.image),
        os.path.join(image_root, problem.split, problem.pid, problem.image),
    ]
    for path in candidates:
        if os.path.exists(path):
            return path
    raise EvalDataError(f"image of ScienceQA problem {problem.pid} not found (looked at {candidates})")


def build_prompt(problem: Problem) -> str:
    """The question text sent to the model (without the image marker): question, context, lettered options."""
    lines = [problem.question.strip()]
    if problem.has_text_context:
        lines.append(f"Context: {problem.hint.strip()}")
    lines.append("Options:")
    lines.extend(f"({OPTION_LETTERS[i]}) {choice}" for i, choice in enumerate(problem.choices))
    lines.append(ANSWER_INSTRUCTION)
    return "\n".join(lines)


def extract_letter(reply: str) -> str | None:
    """The option letter a reply chooses, by the three rules in the module docstring; None if failed."""
    text = reply.strip()
    if len(text) == 1 and text in OPTION_LETTERS:
        return text
    if len(text) >= 2 and text[0] in OPTION_LETTERS and text[1] == "." and (len(text) == 2 or text[2].isspace()):
        return text[0]
    matches = _ANSWER_IS.findall(text)
    if len(matches) == 1:
        return matches[0]
    return None


def _accuracy_table(groups: Mapping[str, list[bool]]) -> dict[str, dict[str, float | int | None]]:
    return {
        name: {"n": len(flags), "correct": sum(flags), "accuracy": percent(sum(flags), len(flags))}
        for name, flags in sorted(groups.items())
    }


def score(
    problems: Sequence[Problem], answers: Mapping[str, Mapping[str, Any]], only_answered: bool = False
) -> dict[str, Any]:
    """Scores replies against the problems.

    Args:
      problems: the split's problems.
      answers: {question id key: {"text": reply, ...}} as read by `read_answers`.
      only_answered: score only problems that have an answer; otherwise a missing answer counts as wrong.
    Returns:
      JSON-ready dict: n, correct, accuracy (percent), image_accuracy (over problems with an image), tables
      by_subject / by_context (TXT, IMG, NO) / by_grade (G1-6, G7-12), and the ids of failed extractions,
      letters outside a problem's options, and missing answers. Ids in `answers` that are not in `problems`
      are counted as `unknown_answers`.
    """
    by_subject: dict[str, list[bool]] = {}
    by_context: dict[str, list[bool]] = {"TXT": [], "IMG": [], "NO": []}
    by_grade: dict[str, list[bool]] = {name: [] for name in GRADE_GROUPS}
    failed, out_of_range, missing = [], [], []
    flags: list[bool] = []
    image_flags: list[bool] = []
    pids = set()
    for problem in problems:
        pids.add(problem.pid)
        answer = answers.get(problem.pid)
        if answer is None:
            if only_answered:
                continue
            missing.append(problem.pid)
            letter = None
        else:
            letter = extract_letter(str(answer.get("text", "")))
            if letter is None:
                failed.append(problem.pid)
            elif OPTION_LETTERS.index(letter) >= len(problem.choices):
                out_of_range.append(problem.pid)
        correct = letter == problem.answer_letter
        flags.append(correct)
        by_subject.setdefault(problem.subject, []).append(correct)
        if problem.has_text_context:
            by_context["TXT"].append(correct)
        if problem.has_image:
            by_context["IMG"].append(correct)
            image_flags.append(correct)
        if not problem.has_text_context and not problem.has_image:
            by_context["NO"].append(correct)
        for name, grades in GRADE_GROUPS.items():
            if problem.grade in grades:
                by_grade[name].append(correct)
    unknown = sorted(set(answers) - pids)
    if unknown:
        log.warning("%d answers have ids outside the split; ignored", len(unknown))
    return {
        "n": len(flags),
        "correct": sum(flags),
        "accuracy": percent(sum(flags), len(flags)),
        "image_n": len(image_flags),
        "image_accuracy": percent(sum(image_flags), len(image_flags)),
        "by_subject": _accuracy_table(by_subject),
        "by_context": _accuracy_table(by_context),
        "by_grade": _accuracy_table(by_grade),
        "num_failed": len(failed),
        "failed_ids": failed,
        "num_out_of_range": len(out_of_range),
        "out_of_range_ids": out_of_range,
        "num_missing": len(missing),
        "missing_ids": missing,
        "unknown_answers": len(unknown),
    }


def _answer_index(raw: Any, choices: Sequence[str], where: str) -> int:
    if isinstance(raw, bool):
        raise EvalDataError(f"{where}: answer {raw!r} is not an index, letter or choice text")
    if isinstance(raw, int):
        index = raw
    elif isinstance(raw, str) and raw in choices:
        index = list(choices).index(raw)
    elif isinstance(raw, str) and len(raw.strip()) == 1 and raw.strip() in OPTION_LETTERS:
        index = OPTION_LETTERS.index(raw.strip())
    else:
        raise EvalDataError(f"{where}: answer {raw!r} is not an index, letter or choice text")
    if not 0 <= index < len(choices):
        raise EvalDataError(f"{where}: answer index {index} outside {len(choices)} choices")
    return index


def build_from_questions(questions_path: str | os.PathLike, image_root: str | os.PathLike | None,
                         out_dir: str | os.PathLike, split: str = "test") -> int:
    """Writes ScienceQA's layout (problems.json, pid_splits.json, images/<pid>/image.png) from a multiple-choice
    questions JSONL {question_id, text, choices, answer (index, letter or choice text), image?, category?,
    context?}, e.g. the synthetic set's eval.jsonl. Returns the number of problems written."""
    from llava_jax.data import images
    from llava_jax.eval.answers import read_questions
    from llava_jax.io import atomic_open

    questions = read_questions(questions_path, need=("text", "choices", "answer"))
    problems: dict[str, dict[str, Any]] = {}
    for q in questions:
        pid = qid_key(q["question_id"])
        where = f"{questions_path}: question {pid}"
        choices = [str(c) for c in q["choices"]] if isinstance(q["choices"], list) else []
        if not 2 <= len(choices) <= len(OPTION_LETTERS):
            raise EvalDataError(f"{where}: needs 2..{len(OPTION_LETTERS)} choices")
        image_name = None
        if q.get("image"):
            if image_root is None:
                raise EvalDataError(f"{where} has an image but no image root was given")
            img = images.load_rgb(os.path.join(image_root, str(q["image"])))
            image_name = "image.png"
            with atomic_open(os.path.join(out_dir, "images", pid, image_name), "wb") as f:
                img.save(f, format="PNG")
        problems[pid] = {
            "question": str(q["text"]).replace("<image>", "").strip(),
            "choices": choices,
            "answer": _answer_index(q["answer"], choices, where),
            "hint": str(q.get("context") or ""),
            "image": image_name,
            "subject": str(q.get("category") or q.get("subject") or "unknown"),
            "grade": str(q.get("grade") or ""),
            "split": split,
        }
    atomic_write_json(os.path.join(out_dir, "problems.json"), problems)
    atomic_write_json(os.path.join(out_dir, "pid_splits.json"), {split: list(problems)})
    return len(problems)


def predict(args: argparse.Namespace) -> int:
    """Batched generation over a split; writes the answers JSONL (question_id, text, prompt, model_id)."""
    from llava_jax.eval import predict as predict_lib

    problems = load_problems(args.data_dir, args.split)
    if args.limit:
        problems = problems[: args.limit]
    image_root = args.image_root or os.path.join(args.data_dir, "images")
    items = [
        predict_lib.PromptItem(
            question_id=p.pid,
            text=build_prompt(p),
            image=image_path(p, image_root) if p.has_image else None,
        )
        for p in problems
    ]
    predict_lib.run_predictions(items, predict_lib.PredictSettings.from_args(args), args.out)
    return 0


def score_command(args: argparse.Namespace) -> int:
    """Scores an answers file and writes/prints the score JSON."""
    problems = load_problems(args.data_dir, args.split)
    result = score(problems, read_answers(args.answers), only_answered=args.only_answered)
    if args.out:
        atomic_write_json(args.out, result)
    print(
        f"ScienceQA {args.split}: accuracy {result['accuracy']}% ({result['correct']}/{result['n']}), "
        f"image {result['image_accuracy']}% (n={result['image_n']}), failed {result['num_failed']}, "
        f"missing {result['num_missing']}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    from llava_jax.eval import predict as predict_lib

    parser = argparse.ArgumentParser(prog="python -m llava_jax.eval.scienceqa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="generate answers for a split")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--image-root", default=None, help="default: DATA_DIR/images")
    p.add_argument("--out", required=True, help="answers JSONL")
    p.add_argument("--limit", type=int, default=0, help="only the first N problems (0: all)")
    predict_lib.add_predict_flags(p, max_new_tokens=16)
    s = sub.add_parser("score", help="score an answers file")
    s.add_argument("--data-dir", required=True)
    s.add_argument("--split", default="test")
    s.add_argument("--answers", required=True)
    s.add_argument("--out", default=None, help="score JSON")
    s.add_argument("--only-answered", action="store_true", help="skip problems without an answer")
    b = sub.add_parser("build", help="write ScienceQA's layout from a multiple-choice questions JSONL")
    b.add_argument("--questions", required=True, help="JSONL {question_id, text, choices, answer, image?, ...}")
    b.add_argument("--image-root", default=None)
    b.add_argument("--split", default="test")
    b.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "build":
            n = build_from_questions(args.questions, args.image_root, args.out, args.split)
            print(f"wrote {n} problems in ScienceQA layout to {args.out}")
            return 0
        return predict(args) if args.command == "predict" else score_command(args)
    except EvalDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
