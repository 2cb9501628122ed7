"""VSR (Visual Spatial Reasoning): is a caption's spatial relation true of the image? Accuracy.

Commands:
  python -m llava_jax.eval.vsr predict --model PATH --data test.jsonl --image-root DIR --out answers.jsonl
  python -m llava_jax.eval.vsr score --data test.jsonl --answers answers.jsonl [--out score.json]

Data is VSR's public JSONL (data/splits/*/test.jsonl): {"image", "caption", "label": 1|0, "relation", ...}.
VSR rows have no id: a row's question_id is its 0-based line number among the file's records (or its own
"question_id" when it has one). The prompt follows MiniGPT-v2's VSR evaluation: "Based on the image, is this
statement true or false? <caption>", plus an instruction to answer with true or false.

Scoring: the reply is lower-cased and stripped of surrounding whitespace and a final period; "true" or "yes"
reads as true, "false" or "no" as false, anything else is unreadable and wrong (MiniGPT-v2 compares the reply
with "true"/"false" exactly; "yes"/"no" are also accepted here and counted in "yes_no_replies"). Accuracy in
percent overall and per relation; a missing answer is wrong; malformed and unknown rows are counted.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from llava_jax import cli
from llava_jax.eval.answers import EvalDataError, percent, qid_key, read_answers_lenient, read_records
from llava_jax.eval.predict import PromptItem, with_instruction

PROMPT = "Based on the image, is this statement true or false? {caption}"
INSTRUCTION = "Answer with true or false."
_TRUE, _FALSE = ("true", "yes"), ("false", "no")


def load_data(path: str | os.PathLike) -> list[dict[str, Any]]:
    """VSR records with "question_id" (line number unless given) and "label" as a bool."""
    out = []
    for i, r in enumerate(read_records(path, "VSR data")):
        if "caption" not in r or "label" not in r:
            raise EvalDataError(f"{path}: record #{i} needs caption and label")
        label = r["label"]
        if isinstance(label, str):
            label = {"1": 1, "0": 0, "true": 1, "false": 0}.get(label.strip().lower(), label)
        if label not in (0, 1) or isinstance(label, float):
            raise EvalDataError(f"{path}: record #{i} has label {r['label']!r} (need 1/0 or true/false)")
        out.append({**r, "question_id": r.get("question_id", i), "label": bool(label)})
    if len({qid_key(r["question_id"]) for r in out}) != len(out):
        raise EvalDataError(f"{path}: question ids repeat")
    return out


def parse_true_false(reply: str) -> bool | None:
    """True / False for a reply, None when it is neither (module docstring)."""
    text = reply.strip().lower().removesuffix(".").strip()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return None


def score(data: Sequence[Mapping[str, Any]], answers: Mapping[str, Mapping[str, Any]],
          malformed: int = 0) -> dict[str, Any]:
    """Accuracy of `answers` ({question id key: {"text"}}) on VSR records."""
    correct = unreadable = yes_no = answered = 0
    per_relation: dict[str, list[int]] = {}
    keys = set()
    for r in data:
        key = qid_key(r["question_id"])
        keys.add(key)
        row = answers.get(key)
        pred = None
        if row is not None:
            answered += 1
            pred = parse_true_false(row["text"])
            unreadable += pred is None
            yes_no += row["text"].strip().lower().removesuffix(".").strip() in ("yes", "no")
        ok = pred is not None and pred == r["label"]
        correct += ok
        per_relation.setdefault(str(r.get("relation", "all")), []).append(int(ok))
    n = len(data)
    return {"accuracy": percent(correct, n), "n": n, "answered": answered, "missing": n - answered,
            "unreadable": unreadable, "yes_no_replies": yes_no, "malformed": malformed,
            "unknown": sum(1 for k in answers if k not in keys),
            "by_relation": {k: {"n": len(v), "accuracy": percent(sum(v), len(v))} for k, v in sorted(per_relation.items())}}


def score_file(data_path: str | os.PathLike, answers_path: str | os.PathLike) -> dict[str, Any]:
    """`score` on files."""
    data = load_data(data_path)
    answers, malformed = read_answers_lenient(answers_path)
    return score(data, answers, malformed)


def prompt_items(data_path: str | os.PathLike, image_root: str | os.PathLike,
                 instruction: str = INSTRUCTION) -> list[PromptItem]:
    """One PromptItem per VSR statement (`instruction` after it)."""
    return [PromptItem(r["question_id"], with_instruction(PROMPT.format(caption=r["caption"]), instruction),
                       os.path.join(image_root, r["image"]),
                       {"category": str(r.get("relation", ""))}) for r in load_data(data_path)]


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    from llava_jax.eval import runner

    return runner.main(
        argv, prog="python -m llava_jax.eval.vsr", doc=__doc__, max_new_tokens=8,
        flags=[runner.DataFlag("--data"), runner.DataFlag("--image-root", both=False)],
        items=lambda a: prompt_items(a.data, a.image_root),
        score=lambda a: score_file(a.data, a.answers),
        summary=lambda r: (f"VSR accuracy {r['accuracy']}% (n={r['n']}, missing {r['missing']}, "
                           f"unreadable {r['unreadable']})"))


if __name__ == "__main__":
    sys.exit(cli.run(main))
