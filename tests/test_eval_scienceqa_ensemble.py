"""ScienceQA with a text-only GPT: its answers file, and the complement / judge ensembles against the local
OpenAI-compatible server (counts, requeries, failures, the journal, LLaVA's file layouts)."""

from __future__ import annotations

import json
import re

import pytest
from openai_server import LocalOpenAIServer, Reply, chat_completion, error_body

from llava_jax.eval import scienceqa
from llava_jax.eval import scienceqa_ensemble as ens

FAST = ["--judge-max-rpm", "100000", "--judge-max-tpm", "100000000", "--judge-concurrency", "4",
        "--judge-max-retries", "0", "--judge-model", "gpt-test"]
LLAVA_FIELDS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}

# pid: (right answer, our reply or None if missing, the GPT's first reply or None if missing)
CASES = {
    "p1": ("A", "A", "Plants make food. The answer is A."),  # agreement
    "p2": ("C", "B", "Heat flows from hot to cold. The answer is C."),  # disagreement
    "p3": ("A", "A", "I cannot tell without seeing the picture."),  # the GPT gives no option
    "p4": ("B", "not sure", "The answer is B."),  # we give no option
    "p5": ("C", "C", "The answer is A."),  # disagreement; its requery fails (HTTP 400) -> ours
    "p6": ("C", "B", None),  # the GPT's answer is missing
    "p7": ("A", None, "The answer is A."),  # our answer is missing
    "p8": ("B", "D", "The answer is D."),  # both name an option beyond the 3 choices
}
# What the GPT says when asked again (p4: unparsable twice -> failed requery, kept ours).
REQUERY = {"p2": "Assistant 2 is right. The answer is C.", "p3": "The picture decides. The answer is A.",
           "p4": "Both could be right.", "p6": "The answer is C.", "p7": "The answer is A.",
           "p8": "Neither. The answer is B."}


def _pid_of(request_json):
    return re.search(r"Question: Question (p\d)\?", request_json["messages"][-1]["content"]).group(1)


def _handler(log):
    def handler(request_json, n):
        pid = _pid_of(request_json)
        content = request_json["messages"][-1]["content"]
        requery = "[Assistant 1]" in content
        log.append((pid, "requery" if requery else "answer", content))
        if not requery:  # gpt-answer: the GPT's first reply; where the case has none, the call fails
            reply = CASES[pid][2]
            if reply is None:
                return Reply(status=400, body=error_body("bad request"))
            return Reply(body=chat_completion(reply))
        if pid == "p5":
            return Reply(status=400, body=error_body("content policy"))
        return Reply(body=chat_completion(REQUERY[pid]))
    return handler


@pytest.fixture()
def files(tmp_path):
    problems = {}
    for i, (pid, (right, _, _)) in enumerate(CASES.items()):
        problems[pid] = {"question": f"Question {pid}?", "choices": ["x", "y", "z"], "answer": "ABC".index(right),
                         "hint": "Some context." if i % 2 else "", "image": "image.png" if i < 4 else None,
                         "subject": "natural science", "grade": "grade4", "split": "test"}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": list(problems)}))
    ours = [{"question_id": pid, "prompt": ("<image>\n" if problems[pid]["image"] else "") + f"Question {pid}?",
             "text": reply, "answer_id": f"a{pid}", "model_id": "llava-tiny", "metadata": {}}
            for pid, (_, reply, _) in CASES.items() if reply is not None]
    theirs = [{"question_id": pid, "prompt": f"Question {pid}?", "text": reply, "answer_id": f"g{pid}",
               "model_id": "gpt-4", "metadata": {}} for pid, (_, _, reply) in CASES.items() if reply is not None]
    (tmp_path / "ours.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ours))
    (tmp_path / "gpt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in theirs))
    return tmp_path


def _ensemble(files, mode, out, *extra):
    return scienceqa.main(["ensemble", "--data-dir", str(files), "--answers", str(files / "ours.jsonl"),
                           "--judge-answers", str(files / "gpt.jsonl"), "--mode", mode, "--out", str(out), *extra])


def test_complement_uses_the_gpt_unless_it_gave_no_option(files, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    out = files / "complement"
    # No GPT call is needed, so no key or server either.
    assert _ensemble(files, "complement", out, "--judge-api-key-env", "NO_SUCH_KEY_VAR") == 0
    summary = json.loads((out / "ensemble.json").read_text())
    rows = {r["question_id"]: r for r in map(json.loads, (out / "answers.jsonl").read_text().splitlines())}
    assert {pid: r["text"] for pid, r in rows.items()} == {
        "p1": "A", "p2": "C", "p3": "A", "p4": "B", "p5": "A", "p6": "B", "p7": "A", "p8": "D"}
    assert {pid: r["metadata"]["source"] for pid, r in rows.items()} == {
        "p1": "judge", "p2": "judge", "p3": "ours", "p4": "judge", "p5": "judge", "p6": "ours", "p7": "judge",
        "p8": "ours"}
    assert all(LLAVA_FIELDS <= set(r) for r in rows.values())
    counts = summary["counts"]
    assert (counts["agreements"], counts["disagreements"], counts["requeries"]) == (1, 2, 0)
    assert counts["failures"] == {"ours": 3, "judge_answer": 3, "requery": 0}
    assert counts["missing"] == {"ours": 1, "judge": 1}
    assert counts["used"] == {"judge": 5, "ours": 3}
    assert summary["accuracy"] == 62.5 and summary["score"]["correct"] == 5
    assert (summary["ours_accuracy"], summary["judge_accuracy"]) == (37.5, 50.0)
    assert summary["upper_bound"] == 75.0  # p6 and p8: neither reply is right
    assert summary["mode"] == "complement" and summary["rules"] == "official" and summary["client"] is None
    assert summary["judge_answers_model"] == "gpt-4"
    # Scoring the ensemble's answers file gives the ensemble's accuracy.
    rescored = scienceqa.score(scienceqa.load_problems(files), scienceqa.read_answers(out / "answers.jsonl"))
    assert rescored["accuracy"] == 62.5


def test_judge_requeries_disagreements_and_keeps_ours_on_failure(files):
    log = []
    out = files / "judge"
    with LocalOpenAIServer(_handler(log)) as server:
        assert _ensemble(files, "judge", out, "--judge-base-url", server.base_url, *FAST) == 0
        first_run = len(server.chat_requests())
        # A rerun reads the journal: only the request that got no reply (p5's HTTP 400) is sent again.
        assert _ensemble(files, "judge", out, "--judge-base-url", server.base_url, *FAST) == 0
        assert len(server.chat_requests()) - first_run == 1
    assert first_run == 8  # 7 requeries, p4's unparsable reply regenerated once
    summary = json.loads((out / "ensemble.json").read_text())
    counts = summary["counts"]
    assert (counts["agreements"], counts["requeries"]) == (1, 7)
    assert counts["failures"] == {"ours": 3, "judge_answer": 3, "requery": 2}
    assert counts["used"] == {"agreement": 1, "kept_ours": 2, "requery": 5}
    assert counts["requery_picked"] == {"ours": 1, "judge": 2, "other": 2}
    assert summary["accuracy"] == 87.5 and summary["score"]["results"]["p4"] == -1
    assert summary["client"]["rejected_replies"] == 2

    rows = {r["question_id"]: r for r in map(json.loads, (out / "answers.jsonl").read_text().splitlines())}
    assert {pid: r["text"] for pid, r in rows.items()} == {
        "p1": "A", "p2": "C", "p3": "A", "p4": "not sure", "p5": "C", "p6": "C", "p7": "A", "p8": "B"}
    requery = {r["question_id"]: r for r in map(json.loads, (out / "requery.jsonl").read_text().splitlines())}
    assert sorted(requery) == ["p2", "p3", "p4", "p5", "p6", "p7", "p8"]
    assert all(LLAVA_FIELDS <= set(r) and r["model_id"] == "gpt-test" for r in requery.values())
    assert requery["p5"]["text"] == "" and requery["p5"]["metadata"]["error"]
    assert requery["p2"]["text"] == REQUERY["p2"] and requery["p2"]["metadata"]["pick"] == 2

    # The requery shows the question, the context, the options and both replies in full, never an image.
    sent = {pid: content for pid, kind, content in log if kind == "requery"}
    assert "Context: Some context." in sent["p2"] and "(C) z" in sent["p2"]
    assert "[Assistant 1]\nB\n[End of Assistant 1]" in sent["p2"]
    assert f"[Assistant 2]\n{CASES['p2'][2]}\n[End of Assistant 2]" in sent["p2"]
    assert f"[Assistant 2]\n{ens.NO_REPLY}\n" in sent["p6"] and f"[Assistant 1]\n{ens.NO_REPLY}\n" in sent["p7"]


def test_gpt_answer_writes_llava_rows_then_feeds_the_ensemble(files, capsys):
    log = []
    gpt = files / "gpt_new.jsonl"
    with LocalOpenAIServer(_handler(log)) as server:
        rc = scienceqa.main(["gpt-answer", "--data-dir", str(files), "--out", str(gpt), "--judge-base-url",
                             server.base_url, *FAST])
        requests = [r.json for r in server.chat_requests()]
    assert rc == 0
    rows = [json.loads(x) for x in gpt.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == list(CASES)
    assert all(LLAVA_FIELDS <= set(r) and r["model_id"] == "gpt-test" for r in rows)
    assert rows[0]["text"] == CASES["p1"][2]
    assert rows[5]["text"] == "" and rows[5]["metadata"]["error"] == "http_400"  # p6: the call failed
    # Text only: every message is a string; image problems say so; the context goes in.
    assert all(isinstance(m["content"], str) for r in requests for m in r["messages"])
    assert "cannot see" in rows[0]["prompt"] and "cannot see" not in rows[4]["prompt"]
    assert "Context: Some context." in rows[1]["prompt"] and "Context:" not in rows[0]["prompt"]
    assert "5 name an option, 2 do not, 1 calls failed" in capsys.readouterr().out  # p3 and p8 (D of 3)
    # LLaVA's eval_science_qa.py reads rows by exact question_id, `text` and `prompt`: ours score the same way.
    score = scienceqa.score(scienceqa.load_problems(files), scienceqa.read_answers(gpt))
    assert score["correct"] == 4 and score["image_n"] == 0  # the GPT's prompt never holds <image>
    # ... and the ensemble reads it.
    out = files / "complement_new"
    assert scienceqa.main(["ensemble", "--data-dir", str(files), "--answers", str(files / "ours.jsonl"),
                           "--judge-answers", str(gpt), "--mode", "complement", "--out", str(out)]) == 0
    summary = json.loads((out / "ensemble.json").read_text())
    assert summary["accuracy"] == 62.5 and summary["counts"]["used"] == {"judge": 5, "ours": 3}
    assert summary["judge_answers_model"] == "gpt-test" and summary["requery_model"] is None


def test_ensemble_errors_are_one_line(files, monkeypatch, capsys):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    rc = _ensemble(files, "judge", files / "o", "--judge-api-key-env", "NO_SUCH_KEY_VAR")
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "NO_SUCH_KEY_VAR" in err and err.count("\n") == 1
    rc = scienceqa.main(["ensemble", "--data-dir", str(files), "--answers", str(files / "absent.jsonl"),
                         "--judge-answers", str(files / "gpt.jsonl"), "--mode", "complement", "--out",
                         str(files / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: answers file not found") and err.count("\n") == 1
