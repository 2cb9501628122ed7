"""Quality scores of examples, computed once per example and cached.

Five scorers share one shape (`Scorer`): `length` (here), `gpt` (selection.gpt_score), `reward`
(selection.reward_score), `clip` (selection.clip_score) and `mllm` (selection.mllm_score). `compute_scores` runs
a scorer on the examples its cache does not hold and returns one `ScoreColumn`: a float value per example, NaN
where scoring failed, with the failure reasons kept and counted; a failed score is never replaced by a default.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from selection.cache import ScoreCache
from selection.records import Example

log = logging.getLogger(__name__)

SCORE_NAMES = ("clip", "length", "reward", "gpt", "mllm")
# scores computed by a local model; without its directory such a score is dropped (weight 0), see select.py
MODEL_DIR_KEYS = {"clip": "clip.model_dir", "reward": "reward.model_dir", "mllm": "mllm.model_dir"}


@dataclasses.dataclass(frozen=True)
class Failure:
    """A score that could not be computed, with the reason."""

    reason: str


class Scorer(Protocol):
    """Computes one scalar per example. `settings()` must name everything the values depend on."""

    name: str

    def settings(self) -> dict[str, Any]: ...

    def score(self, examples: Sequence[Example]) -> list[float | Failure]: ...


@dataclasses.dataclass
class ScoreColumn:
    """The values of one scorer for all examples: `values` [N] float64 (NaN where failed); `errors` maps an
    example key to its failure reason; `computed` and `cached` count how values were obtained."""

    name: str
    values: np.ndarray
    errors: dict[str, str]
    computed: int
    cached: int

    def error_counts(self) -> dict[str, int]:
        """Failure reason -> count (reasons cut at their first colon so similar failures group)."""
        return dict(Counter(reason.split(":")[0] for reason in self.errors.values()))


def compute_scores(scorer: Scorer, examples: Sequence[Example], cache_dir: str | os.PathLike) -> ScoreColumn:
    """Scores the examples the cache lacks with `scorer`, stores the successes, returns every example's value."""
    cache = ScoreCache(cache_dir, scorer.name, scorer.settings())
    values = np.full(len(examples), np.nan, np.float64)
    hashes = [ex.content_hash() for ex in examples]
    todo = []
    for i, (ex, h) in enumerate(zip(examples, hashes, strict=True)):
        cached = cache.get(ex.key, h)
        if cached is None:
            todo.append(i)
        else:
            values[i] = cached
    errors: dict[str, str] = {}
    if todo:
        results = scorer.score([examples[i] for i in todo])
        if len(results) != len(todo):
            raise RuntimeError(f"scorer {scorer.name} returned {len(results)} results for {len(todo)} examples")
        for i, result in zip(todo, results, strict=True):
            if isinstance(result, Failure):
                errors[examples[i].key] = result.reason
                continue
            value = float(result)
            if not np.isfinite(value):
                errors[examples[i].key] = f"non-finite value: {value}"
                continue
            values[i] = value
            cache.put(examples[i].key, hashes[i], value)
        cache.save()
    if errors:
        log.warning("%s score failed for %d of %d examples: %s", scorer.name, len(errors), len(examples),
                    dict(Counter(r.split(":")[0] for r in errors.values())))
    return ScoreColumn(scorer.name, values, errors, computed=len(todo), cached=len(examples) - len(todo))


# --------------------------------------------------------------------------------------------------- text helpers

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    """Splits text after ".", "!" or "?" followed by whitespace, and at line breaks; drops empty pieces."""
    return [piece.strip() for piece in _SENTENCE_END.split(text) if piece and piece.strip()]


def _normalise_sentence(sentence: str) -> str:
    return " ".join(sentence.lower().split()).rstrip(".!?")


def distinct_sentences(text: str) -> list[str]:
    """The sentences of `text` with repeats (case- and whitespace-insensitive) removed, first occurrence kept."""
    seen, kept = set(), []
    for sentence in split_sentences(text):
        norm = _normalise_sentence(sentence)
        if norm and norm not in seen:
            seen.add(norm)
            kept.append(sentence)
    return kept


# ------------------------------------------------------------------------------------------------------- length


class LengthScorer:
    """Answer length in characters, words or tokens (of a tokenizer directory).

    With `dedupe_sentences` (the default), repeated sentences count once, so an answer padded by repeating itself
    does not score longer than the same answer said once.
    """

    name = "length"

    def __init__(self, unit: str = "chars", tokenizer_dir: str = "", dedupe_sentences: bool = True):
        if unit not in ("chars", "words", "tokens"):
            raise ValueError(f"length unit must be 'chars', 'words' or 'tokens', got {unit!r}")
        if unit == "tokens" and not tokenizer_dir:
            raise ValueError("length unit 'tokens' needs length.tokenizer_dir")
        self.unit = unit
        self.tokenizer_dir = tokenizer_dir
        self.dedupe_sentences = dedupe_sentences
        self._tokenizer = None

    def settings(self) -> dict[str, Any]:
        return {"unit": self.unit, "tokenizer_dir": os.path.abspath(self.tokenizer_dir) if self.tokenizer_dir
                else "", "dedupe_sentences": self.dedupe_sentences, "version": 1}

    def _text(self, answer: str) -> str:
        return " ".join(distinct_sentences(answer)) if self.dedupe_sentences else answer.strip()

    def score(self, examples: Sequence[Example]) -> list[float | Failure]:
        texts = [self._text(ex.answer) for ex in examples]
        if self.unit == "chars":
            return [float(len(t)) for t in texts]
        if self.unit == "words":
            return [float(len(t.split())) for t in texts]
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        ids = self._tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [float(len(x)) for x in ids]
