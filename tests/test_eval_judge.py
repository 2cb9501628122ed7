"""The GPT judge against the local OpenAI-compatible server: review parsing, failures, LLaVA-Bench review and
summary, and pairwise comparison in both orders."""

from __future__ import annotations

import json
import re

import pytest
from openai_server import LocalOpenAIServer, Reply, chat_completion

from llava_jax.eval import compare, judge, llava_bench

FAST = ["--judge-max-rpm", "100000", "--judge-max-tpm", "100000000", "--judge-concurrency", "4"]


@pytest.mark.parametrize(
    "text, scores",
    [
        ("8 6\nAnswer 1 is more precise.", (8.0, 6.0)),
        ("7, 9", (7.0, 9.0)),
        ("**Scores: 8.5 6**\n", (8.5, 6.0)),
        ("\n  10/10 3/10\nreasons", (10.0, 3.0)),
    ],
)
def test_parse_review_accepts(text, scores):
    assert judge.parse_review(text) == scores


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Answer 1 is better.\n8 6",  # scores not on the first line
        "8\n6",
        "8 6 7",
        "Assistant 1: 8, Assistant 2: 6",  # four numbers: ambiguous
        "11 4",
        "eight six",
        "8 six",
    ],
)
def test_parse_review_rejects_malformed_first_lines(text):
    with pytest.raises(judge.ReviewParseError):
        judge.parse_review(text)
    assert judge.review_rejection(text) is not None


def test_format_context_captions_and_boxes():
    ctx = judge.format_context({"image": "x.jpg", "captions": ["A dog.", "A brown dog."],
                                "instances": [{"category": "dog", "bbox": [0.1, 0.2, 0.5, 0.9]}]})
    assert ctx.splitlines() == ["A dog.", "A brown dog.", "dog: [0.1, 0.2, 0.5, 0.9]"]
    assert judge.format_context(None) == judge.NO_DESCRIPTION


def _answers_in(request_json):
    content = request_json["messages"][-1]["content"]
    a1 = re.search(r"\[Answer 1\]\n(.*?)\n\[End of Answer 1\]", content, re.S).group(1)
    a2 = re.search(r"\[Answer 2\]\n(.*?)\n\[End of Answer 2\]", content, re.S).group(1)
    return a1, a2


def test_run_judge_regenerates_once_then_fails(tmp_path):
    calls = {}

    def handler(request_json, n):
        a1, _ = _answers_in(request_json)
        calls[a1] = calls.get(a1, 0) + 1
        if a1 == "always garbage":
            return Reply(body=chat_completion("I prefer the first one."))
        if a1 == "garbage once" and calls[a1] == 1:
            return Reply(body=chat_completion("Both are fine"))
        return Reply(body=chat_completion("9 4\nexplanation"))

    tasks = [judge.JudgeTask(k, "What is it?", a1, "other") for k, a1 in
             [("q1", "fine"), ("q2", "always garbage"), ("q3", "garbage once")]]
    settings = judge.JudgeSettings(max_rpm=100000, max_tpm=10**8)
    with LocalOpenAIServer(handler) as server:
        settings.base_url = server.base_url
        client = judge.make_client(settings, tmp_path / "journal.jsonl")
        outcomes = judge.run_judge(client, tasks, settings)
    assert outcomes["q1"].scores == (9.0, 4.0)
    assert outcomes["q3"].scores == (9.0, 4.0) and calls["garbage once"] == 2
    assert outcomes["q2"].scores is None and "unparsable" in outcomes["q2"].error
    assert calls["always garbage"] == 2  # regenerated exactly once, never scored by default


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def bench_files(tmp_path):
    questions = _write_jsonl(tmp_path / "questions.jsonl", [
        {"question_id": 0, "image": "a.jpg", "text": "What animal is this?", "category": "conv"},
        {"question_id": 1, "image": "a.jpg", "text": "Describe the scene.", "category": "detail"},
        {"question_id": 2, "image": "b.jpg", "text": "Why is the road wet?", "category": "complex"},
        {"question_id": 3, "image": "b.jpg", "text": "What color is the car?", "category": "conv"},
    ])
    context = _write_jsonl(tmp_path / "context.jsonl", [
        {"image": "a.jpg", "caption": "A brown dog on a lawn."},
        {"image": "b.jpg", "captions": ["A red car on a wet road."], "instances": [{"category": "car", "bbox": [0, 0, 1, 1]}]},
    ])
    refs = _write_jsonl(tmp_path / "refs.jsonl", [{"question_id": i, "text": f"reference {i}"} for i in range(4)])
    answers = _write_jsonl(tmp_path / "answers.jsonl", [{"question_id": i, "text": f"model {i}", "model_id": "m"}
                                                        for i in range(4)])
    return tmp_path, questions, context, refs, answers


def test_llava_bench_review_and_summary(bench_files, capsys):
    tmp_path, questions, context, refs, answers = bench_files
    replies = {"model 0": "8 6\nok", "model 1": "5 10\nok", "model 2": "not a score line", "model 3": "6 6\nok"}
    seen_contexts = []

    def handler(request_json, n):
        _, a2 = _answers_in(request_json)
        seen_contexts.append(request_json["messages"][-1]["content"])
        return Reply(body=chat_completion(replies[a2]))

    out = tmp_path / "reviews.jsonl"
    with LocalOpenAIServer(handler) as server:
        rc = llava_bench.main(["review", "--questions", questions, "--context", context, "--references", refs,
                               "--answers", answers, "--out", str(out), "--judge-base-url", server.base_url, *FAST])
    assert rc == 0
    assert any("A red car on a wet road.\ncar: [0, 0, 1, 1]" in c for c in seen_contexts)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["scores"] for r in rows] == [[8.0, 6.0], [5.0, 10.0], None, [6.0, 6.0]]
    assert rows[2]["error"] and rows[0]["model_id"] == "m"

    summary_path = tmp_path / "summary.json"
    assert llava_bench.main(["summarize", "--reviews", str(out), "--out", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    conv = summary["by_category"]["conv"]
    assert (conv["mean_reference"], conv["mean_model"], conv["relative"]) == (7.0, 6.0, round(600 / 7, 1))
    assert summary["by_category"]["detail"]["relative"] == 200.0
    assert summary["by_category"]["complex"] == {
        "n": 0, "failed": 1, "failed_ids": [2], "mean_reference": None, "mean_model": None, "relative": None}
    overall = summary["overall"]
    assert overall["n"] == 3 and overall["failed"] == 1
    assert overall["relative"] == round(100 * (22 / 3) / (19 / 3), 1)


def test_llava_bench_review_missing_answer_is_an_error(bench_files, capsys):
    tmp_path, questions, context, refs, _ = bench_files
    partial = _write_jsonl(tmp_path / "partial.jsonl", [{"question_id": 0, "text": "x"}])
    rc = llava_bench.main(["review", "--questions", questions, "--references", refs, "--answers", partial,
                           "--out", str(tmp_path / "r.jsonl"), "--judge-base-url", "http://127.0.0.1:9/v1"])
    assert rc == 2 and "has no model answer" in capsys.readouterr().err


def test_pair_outcome_rules():
    assert compare.pair_outcome((8, 6), (6, 8)) == "win"  # wins both orders
    assert compare.pair_outcome((8, 6), (7, 7)) == "win"  # wins one, ties one
    assert compare.pair_outcome((8, 6), (8, 6)) == "tie"  # wins one, loses one
    assert compare.pair_outcome((7, 7), (5, 5)) == "tie"
    assert compare.pair_outcome((5, 5), (9, 2)) == "lose"
    assert compare.pair_outcome((2, 9), (9, 2)) == "lose"


def _run_compare(tmp_path, handler, questions, answers_a, answers_b, name):
    out = tmp_path / name
    with LocalOpenAIServer(handler) as server:
        rc = compare.main(["--questions", questions, "--answers-a", answers_a, "--answers-b", answers_b,
                           "--out", str(out), "--judge-base-url", server.base_url, *FAST])
        requests = [r.json for r in server.chat_requests()]
    assert rc == 0
    return json.loads((out / "summary.json").read_text()), out, requests


def test_compare_first_position_bias_gives_all_ties(bench_files):
    tmp_path, questions, _, refs, answers = bench_files
    summary, out, requests = _run_compare(
        tmp_path, lambda req, n: Reply(body=chat_completion("9 3\nThe first answer is better.")),
        questions, answers, refs, "bias")
    assert summary["overall"] == {"n": 4, "wins": 0, "ties": 4, "losses": 0, "failed": 0, "win_score": 1.0,
                                  "failed_ids": []}
    # Both orders were shown for every question.
    shown = {_answers_in(r) for r in requests}
    for i in range(4):
        assert (f"model {i}", f"reference {i}") in shown and (f"reference {i}", f"model {i}") in shown
    rows = [json.loads(x) for x in (out / "judgments.jsonl").read_text().splitlines()]
    assert all(r["outcome"] == "tie" and r["scores_ab"] == [9.0, 3.0] for r in rows)


def test_compare_counts_wins_losses_and_failures(bench_files):
    tmp_path, questions, _, refs, answers = bench_files

    def handler(request_json, n):
        a1, a2 = _answers_in(request_json)
        if "3" in a1:  # question 3: unparsable in every order
            return Reply(body=chat_completion("no scores here"))
        if "2" in a1:  # question 2: equal scores -> tie
            return Reply(body=chat_completion("5 5"))
        model_first = a1.startswith("model")
        if "0" in a1:  # question 0: the model answer is better in both orders -> A (model) wins
            return Reply(body=chat_completion("8 4" if model_first else "4 8"))
        # question 1: the reference is better when shown first, equal otherwise -> A (model) loses
        return Reply(body=chat_completion("6 6" if model_first else "9 5"))

    summary, out, _ = _run_compare(tmp_path, handler, questions, answers, refs, "mixed")
    overall = summary["overall"]
    assert (overall["wins"], overall["ties"], overall["losses"], overall["failed"]) == (1, 1, 1, 1)
    assert overall["n"] == 3 and overall["win_score"] == pytest.approx(1.0)
    assert overall["failed_ids"] == [3]
    assert summary["by_category"]["conv"] == {"n": 1, "wins": 1, "ties": 0, "losses": 0, "failed": 1,
                                              "win_score": 2.0}
    assert summary["by_category"]["detail"]["win_score"] == 0.0


def test_summarize_reads_llava_review_files():
    rows = [
        {"question_id": 0, "category": "llava_bench_conv", "tuple": [8.0, 4.0]},
        {"question_id": 1, "category": "llava_bench_conv", "tuple": [-1, -1]},  # LLaVA's failed parse
        {"question_id": 2, "category": "llava_bench_conv", "tuple": [6, 8]},
    ]
    conv = llava_bench.summarize(rows)["by_category"]["conv"]
    assert (conv["n"], conv["failed"], conv["relative"]) == (2, 1, round(100 * 6 / 7, 1))
    with pytest.raises(llava_bench.EvalDataError, match="malformed"):
        llava_bench.summarize([{"question_id": 0, "scores": [8]}])


def test_compare_without_api_key_names_the_variable(bench_files, monkeypatch, capsys):
    tmp_path, questions, _, refs, answers = bench_files
    monkeypatch.delenv("EVAL_TEST_KEY", raising=False)
    rc = compare.main(["--questions", questions, "--answers-a", answers, "--answers-b", refs,
                       "--out", str(tmp_path / "nokey"), "--judge-api-key-env", "EVAL_TEST_KEY"])
    assert rc == 2 and "EVAL_TEST_KEY" in capsys.readouterr().err


def test_compare_resumes_from_its_journal(bench_files):
    tmp_path, questions, _, refs, answers = bench_files
    handler = lambda req, n: Reply(body=chat_completion("6 5"))  # noqa: E731
    first, out, requests = _run_compare(tmp_path, handler, questions, answers, refs, "journal")
    assert len(requests) == 8
    second, _, requests_again = _run_compare(tmp_path, handler, questions, answers, refs, "journal")
    assert requests_again == [] and second["overall"] == first["overall"]
