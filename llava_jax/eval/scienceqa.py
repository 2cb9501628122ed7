"""ScienceQA: multiple-choice science questions, some with an image; predict and score are separate steps.

Commands:
  python -m llava_jax.eval.scienceqa build --questions eval.jsonl --image-root DIR --out SQA_DIR
  python -m llava_jax.eval.scienceqa predict --model PATH --data-dir SQA_DIR --split test --out answers.jsonl
  python -m llava_jax.eval.scienceqa score --data-dir SQA_DIR --split test --answers answers.jsonl --out score.json
      [--rules official|lenient] [--analysis analysis.json]
  python -m llava_jax.eval.scienceqa gpt-answer --data-dir SQA_DIR --out gpt.jsonl [--judge-* flags]
  python -m llava_jax.eval.scienceqa ensemble --data-dir SQA_DIR --answers answers.jsonl --judge-answers gpt.jsonl
      --mode complement|judge --out DIR [--judge-* flags]   (see llava_jax.eval.scienceqa_ensemble)

SQA_DIR is ScienceQA's own layout: problems.json ({pid: problem}), pid_splits.json ({split: [pid, ...]}) and
images under images/<pid>/image.png or images/<split>/<pid>/image.png (`--image-root` overrides the folder).
`build` writes that layout from any multiple-choice questions JSONL, e.g. the synthetic set's eval.jsonl.
Answers files are LLaVA's layout (llava_jax.eval.answers); LLaVA's own answers files are read as they are.

Scoring rules (`--rules`, recorded in the score JSON as "rules"):

official (the default) -- the per-question verdicts of LLaVA's llava/eval/eval_science_qa.py:
  - the split's problems are those of pid_splits.json[split] (a repeated pid counts once); an answer belongs to
    a problem when its question_id is exactly the pid string (an int id 5 is not the pid "5": LLaVA counts that
    problem as missing, and so does this rule; the score JSON counts such answers in `id_mismatch`);
  - the reply is used as it is (never stripped). It is the letter X when it equals one of A-E; else when it is
    at least 3 characters long and starts with "X. " (X in A-E); else when it holds exactly one match of the
    regex `The answer is ([A-Z]).` (case-sensitive; `.` is any character but a newline, so a character must
    follow the letter on its line: "The answer is B" at the very end fails, "The answer is (B)." fails);
    else it is FAILED;
  - a missing answer is FAILED; FAILED and a letter outside the problem's choices (or beyond E: LLaVA's
    options are A-E) are wrong;
  - image accuracy ("IMG-Accuracy") is over the answers whose `prompt` contains "<image>", as LLaVA counts it
    (a missing answer is never an image answer; an answer without a `prompt` falls back to the problem's image).
lenient (this module's earlier rules): the reply is stripped; it is exactly an option letter (A-J); or it
  starts with "X." followed by a space or the end; or it contains exactly one "The answer is X" (X optionally in
  parentheses, not followed by another letter). Image accuracy is over the problems that have an image.

Both rules give the same tables: overall, image, by_subject, by_context (TXT, IMG, NO: from the problem), by_grade,
the ids of failed, out-of-range and missing answers, and LLaVA's result fields (acc, correct, count,
results {pid: chosen option index or -1}, outputs {pid: reply}). `--analysis FILE` also writes LLaVA's per-question
analysis file ({"correct": [...], "incorrect": [...]}).
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

from llava_jax import cli
from llava_jax.eval.answers import EvalDataError, percent, qid_key, read_answers
from llava_jax.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

OPTION_LETTERS = "ABCDEFGHIJ"
ANSWER_INSTRUCTION = "Reply with only the letter of the correct option."
OFFICIAL, LENIENT = "official", "lenient"
RULES = (OFFICIAL, LENIENT)
LLAVA_OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py's --options
FAILED = "FAILED"
IMAGE_MARK = "<image>"
GRADE_GROUPS = {
    "G1-6": {f"grade{i}" for i in range(1, 7)},
    "G7-12": {f"grade{i}" for i in range(7, 13)},
}
_ANSWER_IS = re.compile(r"The answer is \(?([A-Z])\)?(?![A-Za-z])")
_LLAVA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


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
    """Reads problems.json and pid_splits.json from `data_dir`; returns the split's problems in split order
    (each pid once)."""
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
    if not isinstance(splits[split], list):
        raise EvalDataError(f"pid_splits.json[{split!r}] must be a list of pids")
    out, seen = [], set()
    for pid in splits[split]:
        key = qid_key(pid)
        if key in seen:  # LLaVA's scorer builds a dict of the split: a repeated pid counts once
            log.warning("pid %s appears more than once in split %r; counted once", key, split)
            continue
        seen.add(key)
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


def extract_letter_lenient(reply: str) -> str | None:
    """The option letter a reply chooses under the lenient rules (module docstring); None if failed."""
    text = reply.strip()
    if len(text) == 1 and text in OPTION_LETTERS:
        return text
    if len(text) >= 2 and text[0] in OPTION_LETTERS and text[1] == "." and (len(text) == 2 or text[2].isspace()):
        return text[0]
    matches = _ANSWER_IS.findall(text)
    if len(matches) == 1:
        return matches[0]
    return None


def extract_letter_official(reply: str) -> str | None:
    """The letter LLaVA's eval_science_qa.py parses from a reply (module docstring); None where it says FAILED.

    The letter may lie outside the problem's choices ("The answer is G." gives "G"); `option_index` decides.
    """
    if reply in LLAVA_OPTIONS:
        return reply
    if len(reply) >= 3 and reply[0] in LLAVA_OPTIONS and reply[1:3] == ". ":
        return reply[0]
    matches = _LLAVA_ANSWER_IS.findall(reply)
    if len(matches) == 1:
        return matches[0]
    return None


def extract_letter(reply: str, rules: str = OFFICIAL) -> str | None:
    """The option letter a reply chooses under `rules` ("official" or "lenient"); None if failed."""
    if rules == OFFICIAL:
        return extract_letter_official(reply)
    if rules == LENIENT:
        return extract_letter_lenient(reply)
    raise ValueError(f"unknown ScienceQA rules {rules!r} (choose from {', '.join(RULES)})")


def option_letters(rules: str) -> Sequence[str]:
    """The letters that can name options under `rules`: A-E for LLaVA's scorer, A-J for the lenient rules."""
    return LLAVA_OPTIONS if rules == OFFICIAL else tuple(OPTION_LETTERS)


def option_index(letter: str | None, num_choices: int, rules: str = OFFICIAL) -> int:
    """The 0-based choice a parsed letter names, or -1 when it failed or lies outside the problem's choices."""
    letters = option_letters(rules)[:num_choices]
    return letters.index(letter) if letter in letters else -1


@dataclasses.dataclass(frozen=True)
class Verdict:
    """How one problem was scored.

    `parsed` is the extracted letter or "FAILED" (a missing answer is FAILED); `index` the chosen option (-1:
    none); `image` whether the problem counts towards image accuracy under the rules that ran.
    """

    pid: str
    parsed: str
    index: int
    correct: bool
    missing: bool
    image: bool
    reply: str
    prompt: str


def _check_rules(rules: str) -> None:
    if rules not in RULES:
        raise EvalDataError(f"unknown ScienceQA rules {rules!r} (choose from {', '.join(RULES)})")


def judge_reply(problem: Problem, answer: Mapping[str, Any] | None, rules: str = OFFICIAL) -> Verdict:
    """The verdict on one problem given its answer record ({"text", "prompt"?, ...}) or None when missing."""
    _check_rules(rules)
    if rules == OFFICIAL and problem.answer >= len(LLAVA_OPTIONS):
        raise EvalDataError(f"ScienceQA problem {problem.pid}: answer index {problem.answer} is beyond E; LLaVA's "
                            "scorer knows options A-E only (use --rules lenient)")
    if answer is None:
        # LLaVA's scorer gives a missing answer the prompt "Unknown": never an image answer under its rules.
        return Verdict(problem.pid, FAILED, -1, False, True, rules == LENIENT and problem.has_image, FAILED,
                       "Unknown")
    reply = str(answer.get("text", ""))
    letter = extract_letter(reply, rules)
    index = option_index(letter, len(problem.choices), rules)
    prompt = answer.get("prompt")
    if rules == OFFICIAL and isinstance(prompt, str):
        image = IMAGE_MARK in prompt
    else:
        image = problem.has_image
    return Verdict(problem.pid, letter or FAILED, index, index == problem.answer, False, image, reply,
                   str(prompt) if prompt is not None else "")


def match_answers(problems: Sequence[Problem], answers: Mapping[str, Mapping[str, Any]], rules: str = OFFICIAL
                  ) -> tuple[dict[str, Mapping[str, Any]], list[str]]:
    """The answer of each problem: ({pid: answer record}, ids that match only after normalisation).

    Official rules match ids exactly as LLaVA does (question_id must be the pid string); lenient rules
    compare `qid_key`s, so an int 5 answers the pid "5".
    """
    matched: dict[str, Mapping[str, Any]] = {}
    mismatched: list[str] = []
    for problem in problems:
        answer = answers.get(problem.pid)
        if answer is None:
            continue
        if rules == OFFICIAL and answer.get("question_id", problem.pid) != problem.pid:
            mismatched.append(problem.pid)
            continue
        matched[problem.pid] = answer
    if mismatched:
        log.warning("%d answers have a question_id that is not the exact pid string (e.g. %r for %r); LLaVA's "
                    "scorer and the official rules count those problems as missing (--rules lenient matches them)",
                    len(mismatched), answers[mismatched[0]].get("question_id"), mismatched[0])
    return matched, mismatched


def _accuracy_table(groups: Mapping[str, list[bool]]) -> dict[str, dict[str, float | int | None]]:
    return {
        name: {"n": len(flags), "correct": sum(flags), "accuracy": percent(sum(flags), len(flags))}
        for name, flags in sorted(groups.items())
    }


def score_verdicts(problems: Sequence[Problem], verdicts: Mapping[str, Verdict], rules: str) -> dict[str, Any]:
    """The score JSON (see `score`) from per-problem verdicts; problems without a verdict are skipped."""
    by_subject: dict[str, list[bool]] = {}
    by_context: dict[str, list[bool]] = {"TXT": [], "IMG": [], "NO": []}
    by_grade: dict[str, list[bool]] = {name: [] for name in GRADE_GROUPS}
    failed, out_of_range, missing = [], [], []
    flags: list[bool] = []
    image_flags: list[bool] = []
    results: dict[str, int] = {}
    outputs: dict[str, str] = {}
    for problem in problems:
        v = verdicts.get(problem.pid)
        if v is None:
            continue
        if v.missing:
            missing.append(problem.pid)
        elif v.parsed == FAILED:
            failed.append(problem.pid)
        elif v.index < 0:
            out_of_range.append(problem.pid)
        results[problem.pid] = v.index
        outputs[problem.pid] = v.reply
        flags.append(v.correct)
        if v.image:
            image_flags.append(v.correct)
        by_subject.setdefault(problem.subject, []).append(v.correct)
        if problem.has_text_context:
            by_context["TXT"].append(v.correct)
        if problem.has_image:
            by_context["IMG"].append(v.correct)
        if not problem.has_text_context and not problem.has_image:
            by_context["NO"].append(v.correct)
        for name, grades in GRADE_GROUPS.items():
            if problem.grade in grades:
                by_grade[name].append(v.correct)
    return {
        "rules": rules,
        "n": len(flags),
        "correct": sum(flags),
        "accuracy": percent(sum(flags), len(flags)),
        "acc": 100.0 * sum(flags) / len(flags) if flags else None,
        "count": len(flags),
        "image_rule": "prompt contains <image>" if rules == OFFICIAL else "problem has an image",
        "image_n": len(image_flags),
        "image_correct": sum(image_flags),
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
        "results": results,
        "outputs": outputs,
    }


def verdicts_for(problems: Sequence[Problem], answers: Mapping[str, Mapping[str, Any]], rules: str = OFFICIAL,
                 only_answered: bool = False) -> tuple[dict[str, Verdict], list[str]]:
    """({pid: Verdict} in split order, ids matched only after normalisation) for the answers under `rules`."""
    _check_rules(rules)
    matched, mismatched = match_answers(problems, answers, rules)
    verdicts = {}
    for problem in problems:
        if only_answered and problem.pid not in matched:
            continue
        verdicts[problem.pid] = judge_reply(problem, matched.get(problem.pid), rules)
    return verdicts, mismatched


def score(problems: Sequence[Problem], answers: Mapping[str, Mapping[str, Any]], only_answered: bool = False,
          rules: str = OFFICIAL) -> dict[str, Any]:
    """Scores replies against the problems.

    Args:
      problems: the split's problems.
      answers: {question id key: {"question_id", "text": reply, "prompt"?, ...}} as read by `read_answers`.
      only_answered: score only problems that have an answer; otherwise a missing answer counts as wrong.
      rules: "official" (LLaVA's eval_science_qa.py verdicts) or "lenient" (module docstring).
    Returns:
      JSON-ready dict: rules, n, correct, accuracy (percent, 2 decimals), image_n / image_accuracy (see
      image_rule), tables by_subject / by_context (TXT, IMG, NO) / by_grade (G1-6, G7-12), the ids of failed
      extractions, letters outside a problem's options and missing answers, LLaVA's result fields acc (unrounded
      percent), count, results {pid: option index or -1}, outputs {pid: reply}; `unknown_answers` counts answer
      ids outside the split and `id_mismatch` answers whose id is not the exact pid string (official rules).
    """
    verdicts, mismatched = verdicts_for(problems, answers, rules, only_answered)
    result = score_verdicts(problems, verdicts, rules)
    unknown = sorted(set(answers) - {p.pid for p in problems})
    if unknown:
        log.warning("%d answers have ids outside the split; ignored", len(unknown))
    result["unknown_answers"] = len(unknown)
    result["id_mismatch"] = len(mismatched)
    return result


def analysis(problems: Sequence[Problem], verdicts: Mapping[str, Verdict], rules: str = OFFICIAL
             ) -> dict[str, list[dict[str, Any]]]:
    """LLaVA's per-question analysis file: {"correct": [...], "incorrect": [...]}, each item {question_id,
    parsed_ans, ground_truth, question (the answer's prompt), pred (the reply), is_multimodal}."""
    out: dict[str, list[dict[str, Any]]] = {"correct": [], "incorrect": []}
    letters = option_letters(rules)
    for problem in problems:
        v = verdicts.get(problem.pid)
        if v is None:
            continue
        out["correct" if v.correct else "incorrect"].append({
            "question_id": problem.pid,
            "parsed_ans": v.parsed,
            "ground_truth": letters[problem.answer],
            "question": v.prompt,
            "pred": v.reply,
            "is_multimodal": v.image,
        })
    return out


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
    """Batched generation over a split; writes the answers JSONL in LLaVA's layout (question_id = the pid,
    prompt with "<image>\n" first for image problems, text, answer_id, model_id, metadata)."""
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
    """Scores an answers file under --rules and writes/prints the score JSON (and LLaVA's analysis file)."""
    problems = load_problems(args.data_dir, args.split)
    answers = read_answers(args.answers)
    result = score(problems, answers, only_answered=args.only_answered, rules=args.rules)
    result["split"] = args.split
    if args.out:
        atomic_write_json(args.out, result)
    if args.analysis:
        verdicts, _ = verdicts_for(problems, answers, args.rules, args.only_answered)
        atomic_write_json(args.analysis, analysis(problems, verdicts, args.rules))
    print(
        f"ScienceQA {args.split} ({args.rules} rules): accuracy {result['accuracy']}% "
        f"({result['correct']}/{result['n']}), image {result['image_accuracy']}% (n={result['image_n']}), "
        f"failed {result['num_failed']}, out of range {result['num_out_of_range']}, missing {result['num_missing']}"
    )
    return 0


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, help="ScienceQA layout: problems.json, pid_splits.json")
    parser.add_argument("--split", default="test")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    from data_gen.client import RunHalted
    from llava_jax.eval import judge as judge_lib
    from llava_jax.eval import predict as predict_lib
    from llava_jax.eval import scienceqa_ensemble as ensemble_lib

    parser = cli.ArgumentParser(prog="python -m llava_jax.eval.scienceqa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="generate answers for a split")
    _add_data_flags(p)
    p.add_argument("--image-root", default=None, help="default: DATA_DIR/images")
    p.add_argument("--out", required=True, help="answers JSONL")
    p.add_argument("--limit", type=int, default=0, help="only the first N problems (0: all)")
    predict_lib.add_predict_flags(p, max_new_tokens=16)
    s = sub.add_parser("score", help="score an answers file")
    _add_data_flags(s)
    s.add_argument("--answers", required=True, help="answers JSONL (ours or LLaVA's), or LLaVA's result JSON")
    s.add_argument("--out", default=None, help="score JSON")
    s.add_argument("--rules", choices=RULES, default=OFFICIAL,
                   help="official: LLaVA's eval_science_qa.py verdicts (default); lenient: this module's older rules")
    s.add_argument("--analysis", default=None, help="also write LLaVA's per-question analysis JSON here")
    s.add_argument("--only-answered", action="store_true", help="skip problems without an answer")
    b = sub.add_parser("build", help="write ScienceQA's layout from a multiple-choice questions JSONL")
    b.add_argument("--questions", required=True, help="JSONL {question_id, text, choices, answer, image?, ...}")
    b.add_argument("--image-root", default=None)
    b.add_argument("--split", default="test")
    b.add_argument("--out", required=True, help="output directory")
    g = sub.add_parser("gpt-answer", help="a text-only GPT answers the split (the ensembles' judge answers)")
    _add_data_flags(g)
    ensemble_lib.add_gpt_answer_flags(g)
    judge_lib.add_judge_flags(g)
    e = sub.add_parser("ensemble", help="combine our answers with a text-only GPT's (complement or judge)")
    _add_data_flags(e)
    ensemble_lib.add_ensemble_flags(e)
    e.add_argument("--rules", choices=RULES, default=OFFICIAL, help="how replies are read (see score)")
    judge_lib.add_judge_flags(e)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    commands = {"build": _build_command, "predict": predict, "score": score_command,
                "gpt-answer": ensemble_lib.gpt_answer_command, "ensemble": ensemble_lib.ensemble_command}
    try:
        return commands[args.command](args)
    except (EvalDataError, RunHalted, *judge_lib.judge_setup_errors()) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _build_command(args: argparse.Namespace) -> int:
    n = build_from_questions(args.questions, args.image_root, args.out, args.split)
    print(f"wrote {n} problems in ScienceQA layout to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
