"""data_gen.batch: the Batch API path (upload, create, poll, download) against the local server's emulation."""

from __future__ import annotations

import json

import pytest
from openai_server import LocalOpenAIServer, Reply, chat_completion, error_body

from data_gen.batch import BatchRunner, BatchTimeout
from data_gen.client import AuthenticationFailed, ChatRequest, ClientConfig

SECRET = "sk-batch-SECRET-5d1e0b2a"


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def config(server) -> ClientConfig:
    return ClientConfig(model="gpt-4o-mini", base_url=server.base_url, max_retries=0, timeout_s=5, progress=False)


def requests_for(n: int) -> list[ChatRequest]:
    def no_bad_word(text):
        return "bad_word" if "BAD" in text else None

    return [ChatRequest(f"k{i}", [{"role": "user", "content": f"q{i}"}], {"temperature": 0.5}, no_bad_word)
            for i in range(n)]


def posts(server, suffix):
    return [r for r in server.requests if r.method == "POST" and r.path.rstrip("/").endswith(suffix)]


def test_batch_rounds_regenerate_rejections_and_rerun_sends_nothing(tmp_path):
    calls: dict[str, int] = {}

    def handler(request_json, n):
        q = request_json["messages"][-1]["content"]
        calls[q] = calls.get(q, 0) + 1
        if q == "q1" and calls[q] == 1:
            return Reply(body=chat_completion("BAD first try"))
        if q == "q2":
            return Reply(body=chat_completion("BAD always"))
        if q == "q3":
            return Reply(status=400, body=error_body("invalid"))
        return Reply(body=chat_completion(f"answer {q}", prompt_tokens=100, completion_tokens=10))

    journal = tmp_path / "j.jsonl"
    with LocalOpenAIServer(handler, expected_api_key=SECRET) as server:
        runner = BatchRunner(config(server), journal, poll_s=0.01)
        results = runner.run(requests_for(5))
        assert len(posts(server, "/batches")) == 2  # second round: q1 and q2 regenerated
        first_batch = next(iter(server.batches.values()))
        first_input = server.files[first_batch["input_file_id"]].decode().splitlines()
        assert len(first_input) == 5
        line = json.loads(first_input[0])
        assert line["method"] == "POST" and line["url"] == "/v1/chat/completions"
        assert line["body"] == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "q0"}],
                                "temperature": 0.5}
        assert results["k0"].ok and results["k0"].text == "answer q0" and results["k0"].sent == 1
        assert results["k1"].ok and results["k1"].text == "answer q1" and results["k1"].sent == 2
        assert not results["k2"].ok and results["k2"].error == "bad_word"
        assert not results["k3"].ok and results["k3"].error == "http_400"
        assert runner.last_stats.cost_usd == pytest.approx(
            0.5 * ((3 * 100 + 2 * 10) * 0.15 + (3 * 10 + 2 * 2) * 0.60) / 1e6, rel=0.2)
        n_posts = len(posts(server, "/batches"))
        # Rerun: everything answered or finally rejected is in the journal; only the 400 is tried again.
        again = BatchRunner(config(server), journal, poll_s=0.01).run(requests_for(5))
        assert len(posts(server, "/batches")) == n_posts + 1
        last_input = server.files[list(server.batches.values())[-1]["input_file_id"]].decode().splitlines()
        assert [json.loads(x)["custom_id"].endswith(":0") for x in last_input] == [True]
        assert again["k0"].from_journal and again["k2"].from_journal and again["k3"].error == "http_400"
    assert SECRET not in "".join(p.read_text() for p in tmp_path.iterdir())


def test_batch_resumes_the_same_batch_after_a_crash(tmp_path):
    journal = tmp_path / "j.jsonl"
    with LocalOpenAIServer(batch_polls_before_done=10**6) as server:
        with pytest.raises(BatchTimeout, match="rerun"):
            BatchRunner(config(server), journal, poll_s=0.01, max_wait_s=0.05).run(requests_for(3))
        state = json.loads((tmp_path / "j.jsonl.batch.json").read_text())
        assert len(posts(server, "/batches")) == 1 and len(posts(server, "/files")) == 1
        server.batch_polls_before_done = 0
        results = BatchRunner(config(server), journal, poll_s=0.01).run(requests_for(3))
        assert len(posts(server, "/batches")) == 1 and len(posts(server, "/files")) == 1  # nothing resubmitted
        assert [r for r in server.requests if r.path.endswith(state["batch_id"])]
    assert all(r.ok for r in results.values()) and results["k2"].text == "q2"
    assert not (tmp_path / "j.jsonl.batch.json").exists()


def test_batch_401_raises(tmp_path):
    with LocalOpenAIServer(expected_api_key="sk-other") as server:
        with pytest.raises(AuthenticationFailed, match="401") as info:
            BatchRunner(config(server), tmp_path / "j.jsonl", poll_s=0.01).run(requests_for(2))
    assert SECRET not in str(info.value)


def test_instruct_batch_mode_writes_the_same_output(tmp_path):
    from data_gen.instruct import generate, load_config

    images = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in range(2)]
    (tmp_path / "c.json").write_text(json.dumps({"images": images, "annotations": [
        {"image_id": i, "caption": f"A cat number {i} on a mat."} for i in range(2)]}))

    def handler(request_json, n):
        system = request_json["messages"][0]["content"]
        if "single rich paragraph" in system:
            text = "A small grey cat rests calmly on a woven mat in a quiet, softly lit room near a window."
        else:
            text = "Q: What animal is this?\nA: A cat resting on a mat."
        return Reply(body=chat_completion(text, prompt_tokens=1000, completion_tokens=100))

    with LocalOpenAIServer(handler) as server:
        cfg = load_config()
        cfg.client.base_url = server.base_url
        cfg.batch.poll_s = 0.01
        summary = generate(cfg, tmp_path / "c.json", None, tmp_path / "out.json", batch=True)
        assert len(posts(server, "/batches")) == 1 and server.chat_requests() == []
    records = json.loads((tmp_path / "out.json").read_text())
    assert sorted(r["id"] for r in records) == sorted(f"{i}_{k}" for i in range(2)
                                                      for k in ("conversation", "detail", "complex"))
    assert summary["mode"] == "batch" and summary["succeeded"] == 6
    assert summary["estimated_cost_usd"] == pytest.approx(0.5 * (6000 * 0.15 + 600 * 0.60) / 1e6)
