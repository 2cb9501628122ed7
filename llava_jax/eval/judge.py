"""The GPT judge: our review prompt, the parser of its score line, and the runs through the shared client.

The judge never sees the image. It gets a text description of it (captions and, when given, object boxes),
the question and two answers, and must put the two answers' scores (1-10, for helpfulness, relevance,
accuracy and level of detail) alone on its first line. A reply whose first line is not exactly two scores in
[0, 10] is unparsable: it is regenerated once through the client's `validate` hook and then recorded as failed
with its reason. A failed review is counted and never replaced by a default score.

All requests go through the one OpenAI-compatible client, data_gen/client.py (rate limits, retries, journal
for resuming, progress bar).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

JUDGE_SYSTEM = (
    "You review answers that AI assistants gave to questions about images. You are fair and exacting: you reward "
    "answers that are correct, on topic, useful and appropriately detailed, and you penalise invented content."
)

_REVIEW_INSTRUCTIONS = (
    "You cannot see the image. Its content is given above as a text description (captions, and when present, "
    "objects with boxes [x1, y1, x2, y2] in coordinates from 0 to 1). Treat the description as the truth "
    "about the image.\n"
    "Give each answer one overall score from 1 to 10 (10 is best) that weighs how helpful, relevant, accurate "
    "and detailed it is.\n"
    "Output format: the first line holds only the two scores, Answer 1's first, separated by a space (for "
    "example: 7 4). From the second line on, explain your reasoning. The order in which the answers are shown "
    "says nothing about their quality and must not influence the scores."
)

NO_DESCRIPTION = "(no description of the image is available)"


class ReviewParseError(ValueError):
    """A judge reply does not start with a line holding exactly two scores in [0, 10]."""


@dataclasses.dataclass(frozen=True)
class JudgeTask:
    """One judge call: two answers to a question about an image described by `context`."""

    key: str
    question: str
    answer_1: str
    answer_2: str
    context: str = NO_DESCRIPTION


@dataclasses.dataclass(frozen=True)
class JudgeOutcome:
    """The judge's verdict on one task; `scores` is None when the call or the parse failed (`error` says why)."""

    key: str
    scores: tuple[float, float] | None
    review: str | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """The judge's reply parsed into two scores."""
        return self.scores is not None


_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?:\s*/\s*10)?(?!\w|\.\d)")
_ALLOWED_WORDS = re.compile(r"\b(?:scores?|answers?|assistants?|and|vs)\b", re.IGNORECASE)


def parse_review(text: str) -> tuple[float, float]:
    """The two scores on the first non-blank line of a judge reply.

    Accepts "8 6", "8, 6", "8.5 6", "8/10 6/10", "Scores: 8 6", with markdown emphasis; anything with a
    different count of numbers, other words, or a score outside [0, 10] raises ReviewParseError.
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        raise ReviewParseError("empty review")
    first = lines[0].replace("*", "").replace("`", "").replace("#", "")
    numbers = [float(m) for m in _NUMBER.findall(first)]
    leftover = _ALLOWED_WORDS.sub(" ", _NUMBER.sub(" ", first))
    leftover = re.sub(r"[\s,;:|.\-]", "", leftover)
    if len(numbers) != 2 or leftover:
        raise ReviewParseError(f"first line is not two scores: {lines[0][:80]!r}")
    if not all(0.0 <= s <= 10.0 for s in numbers):
        raise ReviewParseError(f"scores outside [0, 10]: {numbers}")
    return numbers[0], numbers[1]


def review_rejection(text: str) -> str | None:
    """The client's `validate` hook: None for a parsable review, else the reason."""
    try:
        parse_review(text)
    except ReviewParseError as e:
        return f"unparsable review: {e}"
    return None


def format_context(record: Mapping[str, Any] | None) -> str:
    """The image description from a context record: caption(s) plus "category: [box]" lines."""
    if not record:
        return NO_DESCRIPTION
    lines: list[str] = []
    for field in ("caption", "captions"):
        value = record.get(field)
        if isinstance(value, str) and value.strip():
            lines.append(value.strip())
        elif isinstance(value, list):
            lines.extend(str(v).strip() for v in value if str(v).strip())
    for field in ("instances", "boxes"):
        for inst in record.get(field) or []:
            if isinstance(inst, Mapping) and "category" in inst and "bbox" in inst:
                lines.append(f"{inst['category']}: {list(inst['bbox'])}")
    return "\n".join(lines) if lines else NO_DESCRIPTION


def review_messages(task: JudgeTask) -> list[dict[str, str]]:
    """Chat messages for one review: system text, then description, question, both answers and the rules."""
    user = (
        f"[Image description]\n{task.context}\n\n"
        f"[Question]\n{task.question}\n\n"
        f"[Answer 1]\n{task.answer_1}\n[End of Answer 1]\n\n"
        f"[Answer 2]\n{task.answer_2}\n[End of Answer 2]\n\n"
        f"[Instructions]\n{_REVIEW_INSTRUCTIONS}"
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


@dataclasses.dataclass
class JudgeSettings:
    """Which model judges, through which endpoint, under which limits; `journal` makes reruns resume."""

    model: str = "gpt-4o"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_rpm: int | None = None
    max_tpm: int | None = None
    concurrency: int | None = None
    timeout_s: float | None = None
    max_retries: int | None = None
    temperature: float = 0.0
    max_tokens: int = 1024

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> JudgeSettings:
        """Settings from the --judge-* flags of `add_judge_flags`."""
        return cls(**{f.name: getattr(args, f"judge_{f.name}") for f in dataclasses.fields(cls)})


def add_judge_flags(parser: argparse.ArgumentParser) -> None:
    """Adds --judge-* flags (model, endpoint, limits, sampling) and --journal to a command's parser."""
    defaults = JudgeSettings()
    g = parser.add_argument_group("judge")
    g.add_argument("--judge-model", dest="judge_model", default=defaults.model)
    g.add_argument("--judge-base-url", dest="judge_base_url", default=None,
                   help="OpenAI-compatible endpoint (default: the client's default)")
    g.add_argument("--judge-api-key-env", dest="judge_api_key_env", default=defaults.api_key_env,
                   help="name of the environment variable that holds the API key")
    g.add_argument("--judge-max-rpm", dest="judge_max_rpm", type=int, default=None)
    g.add_argument("--judge-max-tpm", dest="judge_max_tpm", type=int, default=None)
    g.add_argument("--judge-concurrency", dest="judge_concurrency", type=int, default=None)
    g.add_argument("--judge-timeout-s", dest="judge_timeout_s", type=float, default=None)
    g.add_argument("--judge-max-retries", dest="judge_max_retries", type=int, default=None)
    g.add_argument("--judge-temperature", dest="judge_temperature", type=float, default=defaults.temperature)
    g.add_argument("--judge-max-tokens", dest="judge_max_tokens", type=int, default=defaults.max_tokens)
    g.add_argument("--journal", default=None, help="judge journal JSONL (default: next to the output)")


def judge_setup_errors() -> tuple[type[Exception], ...]:
    """The client's exceptions that end a judge run with a message instead of a traceback (no key, 401)."""
    from data_gen.client import AuthenticationFailed, MissingAPIKeyError

    return (AuthenticationFailed, MissingAPIKeyError)


def make_client(settings: JudgeSettings, journal_path: str | os.PathLike):
    """A data_gen.client.ChatClient for the judge; unset limits keep the client's defaults."""
    from data_gen.client import ChatClient, ClientConfig

    overrides = {
        name: value
        for name, value in (
            ("base_url", settings.base_url),
            ("max_rpm", settings.max_rpm),
            ("max_tpm", settings.max_tpm),
            ("concurrency", settings.concurrency),
            ("timeout_s", settings.timeout_s),
            ("max_retries", settings.max_retries),
        )
        if value is not None
    }
    config = ClientConfig(model=settings.model, api_key_env=settings.api_key_env, **overrides)
    return ChatClient(config, journal_path)


def run_judge(client: Any, tasks: Sequence[JudgeTask], settings: JudgeSettings, desc: str = "judge"
              ) -> dict[str, JudgeOutcome]:
    """Sends every task to the judge through `client` and parses the replies.

    Returns:
      {task.key: JudgeOutcome}; failed calls and unparsable replies have scores None and an error.
    """
    from data_gen.client import ChatRequest

    keys = [t.key for t in tasks]
    if len(set(keys)) != len(keys):
        raise ValueError("judge task keys must be unique")
    params = {"temperature": settings.temperature, "max_tokens": settings.max_tokens}
    requests = [ChatRequest(t.key, review_messages(t), params=dict(params), validate=review_rejection)
                for t in tasks]
    results = client.run(requests, desc=desc)
    outcomes: dict[str, JudgeOutcome] = {}
    for key in keys:
        result = results.get(key)
        if result is None:
            outcomes[key] = JudgeOutcome(key, None, None, "no result from the client")
        elif not result.ok:
            outcomes[key] = JudgeOutcome(key, None, result.text, str(result.error or "request failed"))
        else:
            try:
                outcomes[key] = JudgeOutcome(key, parse_review(result.text), result.text)
            except ReviewParseError as e:  # a journal entry written before validation existed
                outcomes[key] = JudgeOutcome(key, None, result.text, f"unparsable review: {e}")
    return outcomes
