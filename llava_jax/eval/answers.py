"""Answer and question files shared by every benchmark: reading, validation and question-id keys.

An answer file is JSONL, one object per question, in LLaVA's layout (what its `model_vqa*.py` scripts write):
{"question_id", "prompt", "text", "answer_id", "model_id", "metadata": {...}} plus optional extras such as
"category" (`answer_record` builds one). Scorers read `question_id` and `text` (ScienceQA's official rules also
read `prompt`), so answers produced by any system, LLaVA's included, are scored the same way. `read_answers` also
takes LLaVA's ScienceQA result JSON ({"acc", "correct", "count", "results", "outputs": {pid: reply}}), the form
in which LLaVA's GPT-4 ensemble scripts read GPT-4's answers. Question ids may be ints or strings in the public
files; they are compared as strings.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from llava_jax.io import as_path


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
    with as_path(path).open("r", encoding="utf-8") as f:  # a local path or gs://
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
    if not as_path(path).exists():
        raise EvalDataError(f"{what} file not found: {path}")
    return _as_records(_load_json_or_lines(path, what), path, what)


def _as_records(data: Any, path: str | os.PathLike, what: str) -> list[dict]:
    """The records of a parsed file (see `read_records`); anything else raises EvalDataError."""
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
    [{"question_id", "answer"}]). LLaVA's ScienceQA result JSON is read from its "outputs" map. Numbers become strings; a null reply becomes "" (it then scores as a failed
    answer, never as a crash); any other type raises EvalDataError.
    """
    if not as_path(path).exists():
        raise EvalDataError(f"answers file not found: {path}")
    data = _load_json_or_lines(path, "answers")
    outputs = data.get("outputs") if isinstance(data, dict) and "question_id" not in data else None
    if isinstance(outputs, dict):  # LLaVA's ScienceQA result JSON: {"outputs": {pid: reply}, ...}
        records = [{"question_id": pid, "text": reply} for pid, reply in outputs.items()]
    else:
        records = _as_records(data, path, "answers")
    answers = index_by_qid(records, path, "answer")
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


def answer_id(model_id: str | None, question_id: Any, prompt: str, text: str) -> str:
    """A 22-character id for one answer (LLaVA stores a random shortuuid there; ours is a hash of the answer,
    so rewriting the same answers gives the same file)."""
    blob = json.dumps([model_id, str(question_id), prompt, text], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:22]


def answer_record(question_id: Any, prompt: str, text: str, model_id: str | None,
                  metadata: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """One answers-file row with LLaVA's fields: question_id, prompt, text, answer_id, model_id, metadata, then
    `extra` (e.g. category). LLaVA's scorers and ours both read it."""
    return {
        "question_id": question_id,
        "prompt": prompt,
        "text": text,
        "answer_id": answer_id(model_id, question_id, prompt, text),
        "model_id": model_id,
        "metadata": dict(metadata or {}),
        **extra,
    }


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


def read_answers_lenient(path: str | os.PathLike, key_fn: Callable[[dict], str] | None = None
                         ) -> tuple[dict[str, dict], int]:
    """Reads an answers file the way the breadth benchmarks score it: a row that cannot be used is counted,
    never fatal.

    Accepts JSONL or a JSON list of objects. A line that is not JSON, a row that is not an object, has no usable
    question_id, or a reply (`text`, else `answer`) that is neither a string, a number nor null, is malformed;
    so is a repeated question_id (the first row is kept). A null reply becomes "". `key_fn(row)` gives a row's
    key instead of qid_key(row["question_id"]) (it may raise ValueError / TypeError / KeyError: malformed).
    Returns:
      ({question id key: record with its reply in `text`}, number of malformed rows).
    """
    if not as_path(path).exists():
        raise EvalDataError(f"answers file not found: {path}")
    with as_path(path).open("rb") as f:  # a local path or gs://
        text = f.read().decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
        rows = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        rows = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append(None)
    answers: dict[str, dict] = {}
    malformed = 0
    for row in rows:
        if not isinstance(row, dict) or "question_id" not in row:
            malformed += 1
            continue
        try:
            key = key_fn(row) if key_fn is not None else qid_key(row["question_id"])
        except (ValueError, TypeError, KeyError):
            malformed += 1
            continue
        if isinstance(row["question_id"], (dict, list)) or key in answers:
            malformed += 1
            continue
        reply = row["text"] if "text" in row else row.get("answer")
        if reply is None:
            reply = ""
        elif isinstance(reply, (int, float)) and not isinstance(reply, bool):
            reply = str(reply)
        elif not isinstance(reply, str):
            malformed += 1
            continue
        answers[key] = {**row, "text": reply}
    return answers, malformed
