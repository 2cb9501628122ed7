"""VQA-style short-answer accuracy (VQAv2, VizWiz, TextVQA layouts) with the standard answer normalisation.

Command:
  python -m llava_jax.eval.vqa score --annotations FILE --answers answers.jsonl [--out score.json]

Annotations may be VQAv2's ({"annotations": [{"question_id", "answers": [{"answer": ...}], "answer_type"}]}),
TextVQA's ({"data": [{"question_id", "answers": [str, ...]}]}), VizWiz's (a list of {"image", "answers": [...]},
keyed by the image name when there is no question_id) or a JSONL of {"question_id", "answers"}.

Normalisation (`normalize_answer`), as in the public VQA evaluation: newlines/tabs to spaces; punctuation
removed (glued when next to a space or when the text holds a digit-comma-digit, else replaced by a space);
periods not followed by a digit removed; lower-cased; number words zero..ten (and "none") become digits;
articles dropped; apostrophe-less contractions restored ("dont" -> "don't"). Unlike the public script, the
normalisation is applied to every answer, also when all annotators agree.

Accuracy of one prediction against the annotators' answers: for each annotator, min(1, matches among the
other annotators / 3), averaged over annotators (with 10 annotators this is the familiar min(#matches/3, 1)
up to the leave-one-out averaging). The score is the mean over questions, in percent.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from llava_jax import cli
from llava_jax.eval.answers import EvalDataError, index_by_qid, percent, read_answers, read_records
from llava_jax.io import atomic_write_json

log = logging.getLogger(__name__)

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions in their written form; every spelling with some apostrophes left out maps back to it.
_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd
he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't
shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll
they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's
where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all
y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for written in _CONTRACTIONS:
        positions = [i for i, ch in enumerate(written) if ch == "'"]
        for k in range(1, len(positions) + 1):
            for dropped in itertools.combinations(positions, k):
                spelling = "".join(ch for i, ch in enumerate(written) if i not in dropped)
                table.setdefault(spelling, written)
    return table


_CONTRACTION_FIXES = _contraction_table()


def _strip_punctuation(text: str) -> str:
    glue_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        if glue_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _normalize_words(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTION_FIXES.get(word, word))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """The standard VQA answer normalisation described in the module docstring."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _normalize_words(_strip_punctuation(text))


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one prediction against the annotators' answers (leave-one-out, min(matches/3, 1))."""
    if not gt_answers:
        raise EvalDataError("a question has no ground-truth answers")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in gt_answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    total_matches = sum(g == pred for g in gts)
    scores = [min(1.0, (total_matches - (g == pred)) / 3.0) for g in gts]
    return sum(scores) / len(scores)


def _answer_strings(raw: Any, where: str) -> list[str]:
    if not isinstance(raw, list) or not raw:
        raise EvalDataError(f"{where}: 'answers' must be a non-empty list")
    out = []
    for a in raw:
        if isinstance(a, dict) and isinstance(a.get("answer"), str):
            out.append(a["answer"])
        elif isinstance(a, str):
            out.append(a)
        else:
            raise EvalDataError(f"{where}: unreadable answer entry {a!r}")
    return out


def load_annotations(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Reads annotations in any layout listed in the module docstring.

    Returns:
      {question id key: {"answers": [str, ...], "answer_type": str | None}}; VizWiz records without a
      question_id are keyed by their image name.
    """
    records = read_records(path, "annotations")
    for rec in records:
        if "question_id" not in rec and "image" in rec:
            rec["question_id"] = rec["image"]
    indexed = index_by_qid(records, path, "annotation")
    return {
        key: {
            "answers": _answer_strings(rec.get("answers"), f"{path}: question {key}"),
            "answer_type": rec.get("answer_type"),
        }
        for key, rec in indexed.items()
    }


def score(annotations: Mapping[str, Mapping[str, Any]], answers: Mapping[str, Mapping[str, Any]],
          only_answered: bool = False) -> dict[str, Any]:
    """VQA accuracy (percent) overall and per answer_type; missing answers score 0 unless only_answered."""
    total = 0.0
    n = 0
    per_type: dict[str, list[float]] = {}
    missing = []
    for key, ann in annotations.items():
        answer = answers.get(key)
        if answer is None:
            if only_answered:
                continue
            missing.append(key)
            acc = 0.0
        else:
            acc = vqa_accuracy(str(answer.get("text", "")), ann["answers"])
        total += acc
        n += 1
        if ann.get("answer_type"):
            per_type.setdefault(str(ann["answer_type"]), []).append(acc)
    unknown = len(set(answers) - set(annotations))
    if unknown:
        log.warning("%d answers have ids without annotations; ignored", unknown)
    return {
        "n": n,
        "accuracy": percent(total, n),
        "by_answer_type": {t: {"n": len(v), "accuracy": percent(sum(v), len(v))} for t, v in sorted(per_type.items())},
        "num_missing": len(missing),
        "missing_ids": missing,
        "unknown_answers": unknown,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    parser = cli.ArgumentParser(prog="python -m llava_jax.eval.vqa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score an answers JSONL against annotations")
    s.add_argument("--annotations", required=True)
    s.add_argument("--answers", required=True)
    s.add_argument("--out", default=None)
    s.add_argument("--only-answered", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = score(load_annotations(args.annotations), read_answers(args.answers), args.only_answered)
    except EvalDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        atomic_write_json(args.out, result)
    print(f"VQA accuracy {result['accuracy']}% (n={result['n']}, missing {result['num_missing']})")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
