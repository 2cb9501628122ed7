"""The GPT quality score: a chat model rates each (instruction, answer) pair from 0 to 100 without seeing the image.

Requests go through the project's one client (data_gen.client: rate limits, retries, journal). The reply must end
with a line "Score: N"; `parse_rating` also accepts "N/100" or a reply that is only a number, and rejects
anything else (no number, two different candidate numbers, a value outside 0-100). A rejected reply is asked
again once by the client; if it is still unusable the example's GPT score is failed and counted, never defaulted.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from data_gen.client import ChatClient, ChatRequest, ClientConfig
from selection.records import Example
from selection.scores import Failure

RATING_SYSTEM = (
    "You review training examples for a multimodal assistant that answers questions about images. You only see "
    "the instruction given to the assistant and the answer it was trained to give; you cannot see the image, so "
    "do not judge whether the answer matches it. Judge the answer as a piece of writing that should teach the "
    "assistant good behaviour: it should respond to the instruction, be specific and informative, be coherent "
    "from start to end, read fluently, contain no copied or repeated passages, and not stop mid-sentence. "
    "Empty, truncated, repetitive, vague or off-topic answers deserve low ratings; complete, detailed and "
    "well-organised answers deserve high ones. Use the whole range from 0 to 100 and avoid rating everything "
    "alike. Write at most two sentences of reasons, then finish with a line of the form 'Score: N', where N is "
    "a whole number from 0 to 100."
)

RATING_USER = "Instruction given to the assistant:\n{instruction}\n\nAnswer to rate:\n{answer}"

_SCORE_LINE = re.compile(r"\b(?:score|rating)\s*(?:[:=]|is|of)\s*\**\s*(\d{1,3}(?:\.\d+)?)\s*\**\s*(?:/\s*100)?", re.IGNORECASE)
_OUT_OF_100 = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d+)?)\s*(?:/|out of)\s*100\b", re.IGNORECASE)
_ONLY_NUMBER = re.compile(r"^\s*\**\s*(\d{1,3}(?:\.\d+)?)\s*\**\s*\.?\s*$")


class RatingParseError(ValueError):
    """A reply holds no single usable 0-100 rating."""


def parse_rating(text: str) -> float:
    """The 0-100 rating in a reply.

    Accepted, in order: the last "Score: N" (also "Rating: N", "score = N", "score is/of N", with an optional
    "/100" and markdown bold); otherwise a single distinct "N/100" or "N out of 100"; otherwise a reply that is only a number.
    Raises RatingParseError for an empty reply, no candidate, conflicting candidates, or a value outside 0-100.
    """
    if not text or not text.strip():
        raise RatingParseError("empty reply")
    candidates = _SCORE_LINE.findall(text)
    if candidates:
        value = float(candidates[-1])
    else:
        found = {float(v) for v in _OUT_OF_100.findall(text)}
        if len(found) > 1:
            raise RatingParseError(f"conflicting ratings {sorted(found)}")
        if found:
            value = found.pop()
        else:
            match = _ONLY_NUMBER.match(text)
            if match is None:
                raise RatingParseError("no rating found")
            value = float(match.group(1))
    if not 0.0 <= value <= 100.0:
        raise RatingParseError(f"rating {value} outside 0-100")
    return value


def rating_rejection(text: str) -> str | None:
    """The client's validator: None when `text` holds a rating, else "unparsable_rating: <why>"."""
    try:
        parse_rating(text)
    except RatingParseError as e:
        return f"unparsable_rating: {e}"
    return None


def rating_messages(instruction: str, answer: str) -> list[dict[str, str]]:
    """The chat messages asking for one rating."""
    return [
        {"role": "system", "content": RATING_SYSTEM},
        {"role": "user", "content": RATING_USER.format(instruction=instruction.strip(), answer=answer.strip())},
    ]


class GptScorer:
    """Rates examples through `data_gen.client.ChatClient`; the client's journal lives in `journal_dir`."""

    name = "gpt"

    def __init__(self, client: Mapping[str, Any], journal_dir: str | os.PathLike, params: Mapping[str, Any] | None = None):
        self.client_config = ClientConfig.from_mapping(client)
        self.params = dict(params or {"temperature": 0.0, "max_tokens": 150})
        self.journal_path = Path(journal_dir) / "gpt-journal.jsonl"
        self.last_stats: dict[str, Any] = {}

    def settings(self) -> dict[str, Any]:
        prompt = hashlib.sha256((RATING_SYSTEM + "\0" + RATING_USER).encode()).hexdigest()[:12]
        return {"model": self.client_config.model, "base_url": self.client_config.base_url or "",
                "params": self.params, "prompt": prompt}

    def score(self, examples: Sequence[Example]) -> list[float | Failure]:
        if not examples:
            return []
        requests = [
            ChatRequest(key=ex.key, messages=rating_messages(ex.instruction, ex.answer), params=self.params,
                        validate=rating_rejection)
            for ex in examples
        ]
        client = ChatClient(self.client_config, self.journal_path)
        results = client.run(requests, desc="gpt score")
        self.last_stats = client.last_stats.to_dict()
        out: list[float | Failure] = []
        for ex in examples:
            result = results[ex.key]
            if not result.ok or result.text is None:
                out.append(Failure(result.error or "request failed"))
                continue
            try:
                out.append(parse_rating(result.text))
            except RatingParseError as e:
                out.append(Failure(f"unparsable_rating: {e}"))
        return out
