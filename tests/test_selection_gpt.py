"""The GPT score: rating parser, and the scorer end to end against the local OpenAI-compatible server."""

from __future__ import annotations

import pytest
from openai_server import LocalOpenAIServer, Reply, chat_completion

from selection.gpt_score import GptScorer, RatingParseError, parse_rating, rating_rejection
from selection.records import Example
from selection.scores import compute_scores, distinct_sentences


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("Clear and detailed.\nScore: 87", 87.0),
        ("**Score:** 92/100", 92.0),
        ("Reasons... score = 40.5", 40.5),
        ("I would give it a score of 55.", 55.0),
        ("Rating: 70", 70.0),
        ("First draft Score: 30. On reflection, Score: 65", 65.0),
        ("It deserves 80/100 overall.", 80.0),
        ("75 out of 100", 75.0),
        ("  90 ", 90.0),
        ("0", 0.0),
    ],
)
def test_parse_rating_accepts(text, value):
    assert parse_rating(text) == value


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("This answer is good but lacks 3 details.", "no rating"),
        ("Between 60/100 and 70/100.", "conflicting"),
        ("Score: 150", "outside"),
        ("9 or 10", "no rating"),
    ],
)
def test_parse_rating_rejects(text, why):
    with pytest.raises(RatingParseError, match=why):
        parse_rating(text)
    assert rating_rejection(text).startswith("unparsable_rating")


def reviewer(request_json: dict, n: int) -> Reply:
    """A deterministic stand-in for the rating model: it reads the answer out of the prompt and rates it the way
    the system message asks (empty, cut-off and repetitive answers low, complete detailed ones high)."""
    prompt = request_json["messages"][-1]["content"]
    answer = prompt.split("Answer to rate:\n", 1)[1].strip()
    if "UNPARSABLE" in answer:
        return Reply(body=chat_completion("I cannot decide on a number here."))
    sentences = answer.replace("\n", " ").split(". ")
    distinct = distinct_sentences(answer)
    score = 5
    if answer:
        score = min(95, 30 + 4 * len(answer.split()))
        if not answer.rstrip().endswith((".", "!", "?")):
            score = min(score, 35)  # stops mid-sentence
        if len(distinct) < len([s for s in sentences if s.strip()]):
            score = min(score, 25)  # repeats itself
    return Reply(body=chat_completion(f"Judged on completeness and clarity.\nScore: {score}"))


def _ex(key: str, answer: str) -> Example:
    return Example(0, key, f"{key}.jpg", "Describe this image in detail.", answer)


INTACT = [
    "A red double-decker bus waits at a stop while two people climb aboard and a cyclist rides past.",
    "Three sailboats drift on a calm lake at sunset, with pine trees lining the far shore.",
    "A child in a yellow raincoat jumps into a puddle on a quiet street lined with brick houses.",
]
PLANTED = {
    "empty": "",
    "truncated": "A red double-decker bus waits at a stop while two",
    "repeated": "A bus. A bus. A bus. A bus. A bus. A bus.",
}


def _client(base_url: str) -> dict:
    return {"model": "local-test-model", "base_url": base_url, "max_rpm": None, "max_tpm": None,
            "concurrency": 4, "max_retries": 1, "progress": False}


def test_gpt_score_ranks_planted_low_quality_below_intact_and_caches(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    examples = [_ex(f"ok{i}", text) for i, text in enumerate(INTACT)]
    examples += [_ex(key, text) for key, text in PLANTED.items()]
    examples.append(_ex("odd", "UNPARSABLE reply follows."))
    with LocalOpenAIServer(reviewer) as server:
        scorer = GptScorer(_client(server.base_url), tmp_path)
        column = compute_scores(scorer, examples, tmp_path)
        first_requests = len(server.chat_requests())
        # 7 examples, the unparsable one asked twice (regenerated once), then failed, never defaulted.
        assert first_requests == 8
        assert column.errors.keys() == {"odd"} and column.errors["odd"].startswith("unparsable_rating")
        values = dict(zip([ex.key for ex in examples], column.values, strict=True))
        assert min(values[f"ok{i}"] for i in range(3)) > max(values[k] for k in PLANTED)
        # A rerun with the same settings sends nothing for the scored examples; only the failure is retried,
        # and the client's journal answers it without a request.
        again = compute_scores(GptScorer(_client(server.base_url), tmp_path), examples, tmp_path)
        assert len(server.chat_requests()) == first_requests
        assert again.cached == 6 and again.computed == 1
        sent = server.chat_requests()[0].json
        assert sent["model"] == "local-test-model" and sent["temperature"] == 0.0
        assert "Answer to rate:" in sent["messages"][-1]["content"]
