"""Parse and check GPT replies for the three instruction types.

Formats (set by the system messages in data_gen/prompts/):
- conversation: alternating lines "Q: ..." / "A: ..." (answers may continue over several lines), at least one pair;
- complex: exactly one "Q:" and one "A:" (the answer may span paragraphs);
- detail: one paragraph of prose.

A reply is rejected, with a short reason, when it breaks its format or leaks the text-only setting: coordinates
or 3-decimal fractions, words such as "bounding box", or references to "the captions" / "the descriptions".
"""

from __future__ import annotations

import re
from collections.abc import Callable

_LABEL = re.compile(r"^\s*(?:[*_#>\-\s]*)(q|a|question|answer)\s*(?:\d+)?\s*[*_]*\s*:\s*[*_]*\s*(.*)$", re.IGNORECASE)
_COORDINATE_PATTERNS = (
    re.compile(r"\[\s*-?\d*\.?\d+\s*,\s*-?\d*\.?\d+"),  # a bracketed list of numbers
    re.compile(r"(?<![\d.])(?:0|1)?\.\d{3}(?![\d])"),  # a 3-decimal fraction such as 0.312
    re.compile(r"\b(?:coordinates?|bounding[- ]?box(?:es)?|bbox(?:es)?)\b", re.IGNORECASE),
)
_SOURCE_PATTERNS = (
    re.compile(r"\b(?:the|these|those|provided|given)\s+(?:captions?|descriptions|annotations|sentences)\b",
               re.IGNORECASE),
    re.compile(r"\baccording to the (?:captions?|descriptions?|annotations?)\b", re.IGNORECASE),
    re.compile(r"\b(?:object list|list of objects)\b", re.IGNORECASE),
)
MIN_DETAIL_WORDS = 15


class ReplyFormatError(ValueError):
    """A reply that cannot be used; `reason` is a short category for counting."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


def leak_reason(text: str) -> str | None:
    """"mentions_coordinates" or "mentions_source_text" when the reply gives away its text-only input, else None."""
    if any(p.search(text) for p in _COORDINATE_PATTERNS):
        return "mentions_coordinates"
    if any(p.search(text) for p in _SOURCE_PATTERNS):
        return "mentions_source_text"
    return None


def parse_qa(text: str) -> list[tuple[str, str]]:
    """[(question, answer), ...] from "Q:" / "A:" labelled text (also "Question:" / "Answer:", markdown bold).

    Raises ReplyFormatError: "empty", "text_before_first_question", "unlabelled_reply", "turns_out_of_order",
    "empty_turn", "question_without_answer".
    """
    if not text.strip():
        raise ReplyFormatError("empty")
    turns: list[tuple[str, list[str]]] = []  # (role, lines)
    for line in text.strip().splitlines():
        match = _LABEL.match(line)
        if match:
            role = "q" if match.group(1).lower().startswith("q") else "a"
            turns.append((role, [match.group(2).strip()]))
        elif turns:
            turns[-1][1].append(line.rstrip())
        elif line.strip():
            raise ReplyFormatError("text_before_first_question", line.strip()[:80])
    if not turns:
        raise ReplyFormatError("unlabelled_reply")
    bodies = []
    for i, (role, lines) in enumerate(turns):
        if role != ("q" if i % 2 == 0 else "a"):
            raise ReplyFormatError("turns_out_of_order", f"turn {i} is {role!r}")
        body = re.sub(r"\n\s*\n(\s*\n)+", "\n\n", "\n".join(lines)).strip()
        if not body:
            raise ReplyFormatError("empty_turn", f"turn {i}")
        bodies.append(body)
    if len(bodies) % 2:
        raise ReplyFormatError("question_without_answer")
    return [(bodies[i], bodies[i + 1]) for i in range(0, len(bodies), 2)]


def parse_detail(text: str) -> str:
    """The single paragraph of a detailed description. Raises ReplyFormatError: "empty", "labelled_turns",
    "not_one_paragraph", "too_short"."""
    body = text.strip()
    if not body:
        raise ReplyFormatError("empty")
    if any(_LABEL.match(line) for line in body.splitlines()):
        raise ReplyFormatError("labelled_turns")
    paragraphs = [p for p in re.split(r"\n\s*\n", body) if p.strip()]
    if len(paragraphs) != 1:
        raise ReplyFormatError("not_one_paragraph", f"{len(paragraphs)} paragraphs")
    paragraph = " ".join(body.split())
    if len(paragraph.split()) < MIN_DETAIL_WORDS:
        raise ReplyFormatError("too_short", f"{len(paragraph.split())} words")
    return paragraph


def parse_reply(kind: str, text: str) -> list[tuple[str | None, str]]:
    """Turns of a reply: [(question, answer), ...]; for "detail" a single (None, paragraph).

    Raises ReplyFormatError (format or leak) and ValueError for an unknown kind.
    """
    if kind == "detail":
        turns: list[tuple[str | None, str]] = [(None, parse_detail(text))]
    elif kind == "conversation":
        turns = list(parse_qa(text))
    elif kind == "complex":
        turns = list(parse_qa(text))
        if len(turns) != 1:
            raise ReplyFormatError("not_one_question", f"{len(turns)} questions")
    else:
        raise ValueError(f"unknown instruction type {kind!r}")
    leak = leak_reason(text)
    if leak is not None:
        raise ReplyFormatError(leak)
    return turns


def validator(kind: str) -> Callable[[str], str | None]:
    """A `ChatRequest.validate` for one type: None when the reply parses cleanly, else the rejection reason."""

    def validate(text: str) -> str | None:
        try:
            parse_reply(kind, text)
        except ReplyFormatError as e:
            return e.reason
        return None

    return validate
