"""Answer and question files shared by every benchmark: reading, validation and question-id keys.

An answer file is JSONL, one object per question: {"question_id", "text", "prompt", "model_id", ...}. Scorers
read only `question_id` and `text`, so answers produced by any system can be scored the same way. Question ids
may be ints or strings in the public files; they are compared as strings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any


class EvalDataError(ValueError):
    """An input file of an evaluation (questions, answers, annotations) is malformed."""


def qid_key(question_id: Any) -> str:
    """The comparison key of a question id: ints and their string forms map to the same key."""
    if isinstance(question_id, bool) or question_id is None:
        raise EvalDataError(f"invalid question_id {question_id!r}")
    if isinstance(question_id, float) and question_id.is_integer():
        question_id = int(question_id)
    return str(question_id).strip()


def _load_json_or_lines(path: str | os.PathLike, what: str) -> Any:
    """Parses a whole-file JSON document, else one JSON value per non-blank line (POPE's .json files are JSONL)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{what} file {path}:{lineno} is not valid JSON: {e}") from e
    return rows


def read_records(path: str | os.PathLike, what: str = "records") -> list[dict]:
    """Reads a JSON list, a wrapped list ({"questions"|"annotations"|"data": [...]}) or JSONL of objects.

    The layout is recognised from the content, not the file name. Anything else raises EvalDataError.
    """
    if not os.path.exists(path):
        raise EvalDataError(f"{what} file not found: {path}")
    data = _load_json_or_lines(path, what)
    if isinstance(data, dict):
        for wrapper in ("questions", "annotations", "data"):
            if isinstance(data.get(wrapper), list):
                data = data[wrapper]
                break
        else:
            if "question_id" not in data:
                raise EvalDataError(f"{what} file {path} holds an object, expected a list of records")
            data = [data]  # a JSONL file with a single record
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise EvalDataError(f"{what} file {path} must be a list of JSON objects")
    return data


def index_by_qid(records: Iterable[dict], path: str | os.PathLike, what: str) -> dict[str, dict]:
    """Maps qid_key(record['question_id']) -> record; a missing or repeated id raises EvalDataError."""
    out: dict[str, dict] = {}
    for i, rec in enumerate(records):
        if "question_id" not in rec:
            raise EvalDataError(f"{path}: {what} #{i} has no question_id")
        key = qid_key(rec["question_id"])
        if key in out:
            raise EvalDataError(f"{path}: question_id {key!r} appears more than once")
        out[key] = rec
    return out


def read_answers(path: str | os.PathLike) -> dict[str, dict]:
    """Reads an answer file into {question id key: record}, with each record's reply in `text`.

    The reply is `text`, or `answer` when there is no `text` (the official VQA results layout,
    [{"question_id", "answer"}]). Numbers become strings; a null reply becomes "" (it then scores as a failed
    answer, never as a crash); any other type raises EvalDataError.
    """
    answers = index_by_qid(read_records(path, "answers"), path, "answer")
    for key, rec in answers.items():
        reply = rec["text"] if "text" in rec else rec.get("answer")
        if reply is None:
            reply = ""
        elif isinstance(reply, (int, float)) and not isinstance(reply, bool):
            reply = str(reply)
        elif not isinstance(reply, str):
            raise EvalDataError(f"{path}: answer for question_id {key!r} has a {type(reply).__name__} reply")
        rec["text"] = reply
    return answers


def read_questions(path: str | os.PathLike, need: tuple[str, ...] = ("text",)) -> list[dict]:
    """Reads a questions file (JSONL or JSON list) of {question_id, image?, text, ...}, checking fields."""
    questions = read_records(path, "questions")
    index_by_qid(questions, path, "question")  # checks ids are present and unique
    for i, q in enumerate(questions):
        for field in need:
            if field not in q:
                raise EvalDataError(f"{path}: question #{i} ({q.get('question_id')!r}) has no {field!r}")
    return questions


def percent(numerator: float, denominator: int) -> float | None:
    """100 * numerator / denominator rounded to 2 decimals; None when there is nothing to divide."""
    return round(100.0 * numerator / denominator, 2) if denominator else None
