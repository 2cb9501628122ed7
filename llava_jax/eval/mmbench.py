"""MMBench (dev TSV): multiple choice with circular evaluation -- a question counts only when every rotation
of its options is answered correctly.

Commands:
  python -m llava_jax.eval.mmbench predict --model PATH --tsv mmbench_dev_20230712.tsv --out answers.jsonl \
      [--image-dir DIR]
  python -m llava_jax.eval.mmbench score --tsv mmbench_dev_20230712.tsv --answers answers.jsonl [--out score.json]

The TSV is MMBench's public layout: index, question, hint, A, B, C, D (E, ... optional), answer (a letter),
category, l2-category, split, image (base64). Options are the letter columns up to the first empty one.

Rounds. When the TSV holds only original questions (every index < 1,000,000), a question with N options is
asked N times, round r showing the options rotated by r (options[r:] + options[:r], lettered A, B, ... again)
as LLaVA's model_vqa_mmbench.py --all-rounds does; the answer row of round r has question_id
index + r * 1,000,000 (MMBench's own numbering of circular copies). LLaVA's answer rows, {question_id: index,
round_id: r}, are read as that id. When the TSV already holds the circular copies (indices >= 1,000,000, as
MMBench's circular TSVs do), every row is one round of question index % 1,000,000, asked as it stands.

Prompt (LLaVA): the hint (when present) and the question on separate lines, then "A. option" lines, then
"Answer with the option's letter from the given choices directly." Images are decoded once into --image-dir
(default: next to --out).

Scoring, with VLMEvalKit's rule-based answer matching (`can_infer`): the reply with . ( ) [ ] , : ; ! * # { }
turned into spaces is split into words; exactly one option letter among the words gives that letter (unless
the words contain "A" and there are more than three of them: "A" may be an article); no option letter but a
"Z", or one of VLMEvalKit's refusal sentences, gives "Z" (wrong); otherwise exactly one option whose text
(lower-cased) occurs in the lower-cased reply gives its letter; else the round is wrong
(VLMEvalKit would then ask a GPT judge; no judge is used here, so such replies count as failed, in
"unmatched"). A round is right when the inferred letter is the correct one; a question is right under the
circular rule when all its rounds are (a missing round makes it wrong). "circular_accuracy" (percent) is the
headline; "vanilla_accuracy" scores round 0 alone; both also per category.
"""

from __future__ import annotations

import base64
import csv
import io
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llava_jax import cli
from llava_jax.eval.answers import EvalDataError, percent, qid_key, read_answers_lenient
from llava_jax.eval.predict import PromptItem

ROUND_STRIDE = 1_000_000
LETTERS = "ABCDEFGHIJ"
INSTRUCTION = "Answer with the option's letter from the given choices directly."
_SEPARATORS = ".()[],:;!*#{}"
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "nan", "none"))


def load_rounds(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every round to ask: {"question_id", "group", "round", "question", "hint", "options", "answer" (letter),
    "category", "image_b64"}; see the module docstring for the numbering."""
    if not os.path.exists(path):
        raise EvalDataError(f"MMBench TSV not found: {path}")
    csv.field_size_limit(1 << 30)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise EvalDataError(f"{path}: no rows")
    for field in ("index", "question", "answer", "A", "B"):
        if field not in rows[0]:
            raise EvalDataError(f"{path}: no {field!r} column")
    parsed = []
    for i, row in enumerate(rows):
        try:
            index = int(float(row["index"]))
        except (TypeError, ValueError) as e:
            raise EvalDataError(f"{path}: row #{i} has index {row['index']!r}") from e
        options = []
        for letter in LETTERS:
            if _is_none(row.get(letter)):
                break
            options.append(str(row[letter]))
        answer = str(row["answer"]).strip()
        if len(options) < 2 or answer not in LETTERS[: len(options)]:
            raise EvalDataError(f"{path}: row #{i} (index {index}) needs >= 2 options and an answer among them")
        parsed.append({"index": index, "options": options, "answer": answer, "question": str(row["question"]),
                       "hint": None if _is_none(row.get("hint")) else str(row["hint"]),
                       "category": str(row.get("category") or ""), "image_b64": row.get("image") or ""})
    circular_tsv = any(r["index"] >= ROUND_STRIDE for r in parsed)
    rounds = []
    for r in parsed:
        if circular_tsv:
            rounds.append({**r, "question_id": r["index"], "group": r["index"] % ROUND_STRIDE,
                           "round": r["index"] // ROUND_STRIDE})
            continue
        n, correct = len(r["options"]), LETTERS.index(r["answer"])
        for k in range(n):
            rounds.append({**r, "question_id": r["index"] + k * ROUND_STRIDE, "group": r["index"], "round": k,
                           "options": r["options"][k:] + r["options"][:k], "answer": LETTERS[(correct - k) % n]})
    keys = [r["question_id"] for r in rounds]
    if len(set(keys)) != len(keys):
        raise EvalDataError(f"{path}: indices repeat")
    return rounds


def build_prompt(round_: Mapping[str, Any]) -> str:
    """LLaVA's MMBench prompt for one round (module docstring)."""
    text = round_["question"] if round_["hint"] is None else f"{round_['hint']}\n{round_['question']}"
    for letter, option in zip(LETTERS, round_["options"], strict=False):
        text += f"\n{letter}. {option}"
    return f"{text}\n{INSTRUCTION}"


def infer_option(reply: str, options: Sequence[str]) -> str | None:
    """The option letter a reply gives, by VLMEvalKit's can_infer (module docstring); "Z" for a refusal or a
    lone "Z" (never a right answer), None when nothing can be inferred."""
    letters = list(LETTERS[: len(options)])
    if any(refusal in reply for refusal in _REFUSALS):
        return "Z"
    text = reply
    for c in _SEPARATORS:
        text = text.replace(c, " ")
    words = text.split()
    hits = [c for c in letters if c in words]
    if len(hits) == 1 and not ("A" in words and len(words) > 3):
        return hits[0]
    if not hits and "Z" in words:
        return "Z"
    lowered = reply.lower()
    matches = [c for c, option in zip(letters, options, strict=True) if option.lower() in lowered]
    return matches[0] if len(matches) == 1 else None


def _answer_key(row: Mapping[str, Any]) -> str:
    """LLaVA's rows {question_id: index < 1,000,000, round_id: r} -> index + r * 1,000,000; others (ours carry
    the round in the id already, and round_id as a field): their question_id."""
    if "round_id" in row:
        index = int(float(row["question_id"]))
        if index < ROUND_STRIDE:
            return qid_key(index + int(row["round_id"]) * ROUND_STRIDE)
    return qid_key(row["question_id"])


def score(rounds: Sequence[Mapping[str, Any]], answers: Mapping[str, Mapping[str, Any]],
          malformed: int = 0) -> dict[str, Any]:
    """Circular and vanilla accuracy of `answers` ({round question id key: {"text"}})."""
    groups: dict[int, dict[str, Any]] = {}
    unmatched = answered = 0
    for r in rounds:
        row = answers.get(qid_key(r["question_id"]))
        ok = False
        if row is not None:
            answered += 1
            letter = infer_option(row["text"], r["options"])
            unmatched += letter is None
            ok = letter == r["answer"]
        g = groups.setdefault(r["group"], {"category": r["category"], "all": True, "first": None})
        g["all"] = g["all"] and ok
        if r["round"] == 0:
            g["first"] = ok
    by_category: dict[str, list[tuple[bool, bool]]] = {}
    for g in groups.values():
        by_category.setdefault(g["category"], []).append((g["all"], bool(g["first"])))
    n = len(groups)
    keys = {qid_key(r["question_id"]) for r in rounds}
    return {
        "circular_accuracy": percent(sum(g["all"] for g in groups.values()), n),
        "vanilla_accuracy": percent(sum(bool(g["first"]) for g in groups.values()), n),
        "n": n, "rounds": len(rounds), "answered": answered, "missing": len(rounds) - answered,
        "unmatched": unmatched, "malformed": malformed, "unknown": sum(1 for k in answers if k not in keys),
        "by_category": {c: {"n": len(v), "circular_accuracy": percent(sum(a for a, _ in v), len(v)),
                            "vanilla_accuracy": percent(sum(b for _, b in v), len(v))}
                        for c, v in sorted(by_category.items())},
        "rules": "circular (every rotation right); VLMEvalKit can_infer matching, no GPT fallback",
    }


def score_file(tsv: str | os.PathLike, answers_path: str | os.PathLike) -> dict[str, Any]:
    """`score` on files."""
    data = load_rounds(tsv)
    answers, malformed = read_answers_lenient(answers_path, key_fn=_answer_key)
    return score(data, answers, malformed)


def _write_image(b64: str, path: Path) -> None:
    from PIL import Image

    from llava_jax.io import atomic_write_bytes

    try:
        data = base64.b64decode(b64, validate=False)
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Exception as e:  # noqa: BLE001 -- any undecodable image is a data error
        raise EvalDataError(f"MMBench image {path.stem} cannot be decoded: {e}") from e
    atomic_write_bytes(path, data)


def prompt_items(tsv: str | os.PathLike, image_dir: str | os.PathLike) -> list[PromptItem]:
    """One PromptItem per round; each question's image is decoded once into `image_dir`."""
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    items = []
    for r in load_rounds(tsv):
        image = None
        if r["image_b64"]:
            path = image_dir / f"{r['group']}.img"
            if not path.exists():
                _write_image(r["image_b64"], path)
            image = str(path)
        items.append(PromptItem(r["question_id"], build_prompt(r), image,
                                {"category": r["category"], "round_id": r["round"], "options": r["options"]}))
    return items


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    from llava_jax.eval import runner

    return runner.main(
        argv, prog="python -m llava_jax.eval.mmbench", doc=__doc__, max_new_tokens=8,
        flags=[runner.DataFlag("--tsv"), runner.DataFlag("--image-dir", both=False, required=False,
                                                          help="decoded images (default: <out>.images)")],
        items=lambda a: prompt_items(a.tsv, a.image_dir or f"{a.out}.images"),
        score=lambda a: score_file(a.tsv, a.answers),
        summary=lambda r: (f"MMBench circular accuracy {r['circular_accuracy']}% (vanilla {r['vanilla_accuracy']}%, "
                           f"n={r['n']}, rounds {r['rounds']}, missing {r['missing']}, unmatched {r['unmatched']})"))


if __name__ == "__main__":
    sys.exit(cli.run(main))
