"""Our own prompts for the three instruction types, and the chat messages built from them.

Files beside this module: `{type}.json` = {"system": str, "examples": [{"context": str, "response": str}, ...]}
for each of `TYPES`, `detail_questions.txt` (phrasings of "describe this image in detail", one per line) and
`brief_questions.txt` (phrasings of "describe this image briefly", for stage-1 caption data).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from llava_jax.io import read_json

PROMPT_DIR = Path(__file__).resolve().parent
TYPES = ("conversation", "detail", "complex")
# Whether each type's query includes the object boxes (conversation reads captions only).
USES_BOXES = {"conversation": False, "detail": True, "complex": True}


class PromptError(ValueError):
    """A prompt file is missing or malformed, or an unknown instruction type was asked for."""


@functools.cache
def load_prompt(kind: str) -> dict[str, Any]:
    """The system message and few-shot examples of one instruction type."""
    if kind not in TYPES:
        raise PromptError(f"unknown instruction type {kind!r}; expected one of {', '.join(TYPES)}")
    path = PROMPT_DIR / f"{kind}.json"
    prompt = read_json(path)
    if not isinstance(prompt.get("system"), str) or not isinstance(prompt.get("examples"), list):
        raise PromptError(f"{path}: needs a 'system' string and an 'examples' list")
    for example in prompt["examples"]:
        if not isinstance(example.get("context"), str) or not isinstance(example.get("response"), str):
            raise PromptError(f"{path}: every example needs 'context' and 'response' strings")
    return prompt


def _read_lines(name: str) -> tuple[str, ...]:
    path = PROMPT_DIR / name
    lines = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not lines:
        raise PromptError(f"{path} is empty")
    return lines


@functools.cache
def detail_questions() -> tuple[str, ...]:
    """Phrasings of "describe this image in detail" (the question paired with a detailed description)."""
    return _read_lines("detail_questions.txt")


@functools.cache
def brief_questions() -> tuple[str, ...]:
    """Phrasings of "describe this image briefly" (the instruction paired with a caption in stage 1)."""
    return _read_lines("brief_questions.txt")


def build_messages(kind: str, context_text: str) -> list[dict[str, str]]:
    """Chat messages for one query: system, each few-shot example as a user/assistant pair, then the query."""
    prompt = load_prompt(kind)
    messages = [{"role": "system", "content": prompt["system"]}]
    for example in prompt["examples"]:
        messages.append({"role": "user", "content": example["context"]})
        messages.append({"role": "assistant", "content": example["response"]})
    messages.append({"role": "user", "content": context_text})
    return messages
