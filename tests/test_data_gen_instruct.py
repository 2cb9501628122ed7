"""data_gen.instruct end to end against the local OpenAI-compatible server, including kill -9 and rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from openai_server import LocalOpenAIServer, Reply, chat_completion, error_body

from data_gen import prompts
from data_gen.client import MissingAPIKeyError
from data_gen.instruct import generate, load_config, summary_path
from data_gen.journal import Journal, request_hash

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-instruct-SECRET-93ab77f0c1"
TYPES = ("conversation", "detail", "complex")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """The synthetic set's COCO files (70 images -> 210 requests)."""
    out = tmp_path_factory.mktemp("synthetic")
    subprocess.run([sys.executable, "-m", "llava_jax.data.synthetic", "--out", str(out), "--num", "70"],
                   check=True, cwd=ROOT, capture_output=True)
    return out / "coco" / "captions.json", out / "coco" / "instances.json"


def kind_of(request_json: dict) -> str:
    system = request_json["messages"][0]["content"]
    for kind in TYPES:
        if system == prompts.load_prompt(kind)["system"]:
            return kind
    raise AssertionError("unknown system message")


def fake_gpt_text(request_json: dict) -> str:
    """A well-formed reply of the right type that quotes the image's first caption."""
    query = request_json["messages"][-1]["content"]
    first_caption = query.splitlines()[1]
    kind = kind_of(request_json)
    if kind == "conversation":
        return f"Q: What does the picture show?\nA: {first_caption}\nQ: Is it colourful?\nA: Yes, it is bright."
    if kind == "detail":
        return (f"{first_caption} The shapes sit on a plain light background, clearly apart from each other, "
                "and the whole picture looks tidy and simple.")
    return f"Q: What could this picture be used for?\nA: {first_caption} It could teach shapes, step by step."


def fake_gpt(request_json: dict, n: int) -> Reply:
    return Reply(body=chat_completion(fake_gpt_text(request_json), prompt_tokens=1000, completion_tokens=100))


def body_hash(request_json: dict) -> str:
    params = {k: v for k, v in request_json.items() if k not in ("model", "messages")}
    return request_hash(request_json["model"], request_json["messages"], params)


def make_cfg(server, **client):
    cfg = load_config()
    cfg.client.base_url = server.base_url
    cfg.client.max_rpm = 0.0
    cfg.client.max_tpm = 0.0
    cfg.client.progress = False
    cfg.client.backoff_base_s = 0.01
    cfg.client.backoff_max_s = 0.05
    cfg.client.max_retries = 2
    for key, value in client.items():
        cfg.client[key] = value
    return cfg


def check_records(records, images):
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    sides = Counter()
    for record in records:
        assert record["image"] in images
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        first = turns[0]["value"]
        assert first.startswith("<image>\n") or first.endswith("\n<image>")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        sides[first.startswith("<image>")] += 1
        if record["id"].endswith("_detail"):
            assert first.replace("<image>", "").strip() in prompts.detail_questions()
    assert sides[True] > 0 and sides[False] > 0


def test_generate_writes_records_summary_and_reruns_from_journal(tmp_path, coco, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    captions, instances = coco
    out = tmp_path / "instruct.json"
    with LocalOpenAIServer(fake_gpt, expected_api_key=SECRET) as server:
        cfg = make_cfg(server)
        cfg.limit = 10
        cfg.price.prompt_per_1m = 1.0
        cfg.price.completion_per_1m = 2.0
        summary = generate(cfg, captions, instances, out)
        first_requests = server.chat_requests()
        assert len(first_requests) == 30
        records = json.loads(out.read_text())
        images = {json.loads(captions.read_text())["images"][i]["file_name"] for i in range(10)}
        check_records(records, images)
        assert sorted(r["id"].rsplit("_", 1)[1] for r in records) == sorted(TYPES * 10)
        assert summary["requested"] == 30 and summary["succeeded"] == 30 and summary["failed"] == {}
        assert summary["prompt_tokens"] == 30_000 and summary["completion_tokens"] == 3_000
        assert summary["estimated_cost_usd"] == pytest.approx(0.036)
        assert json.loads(summary_path(out).read_text()) == summary
        # Requests: the right system prompt per type; boxes only for detail and complex; the config's params.
        for request in first_requests:
            kind = kind_of(request.json)
            assert ("\nObjects:\n" in request.json["messages"][-1]["content"]) == prompts.USES_BOXES[kind]
            assert request.json["max_tokens"] == cfg.params[kind].max_tokens
        # Same command again: nothing sent, same output. Another seed: nothing sent, other placements.
        again = generate(cfg, captions, instances, out)
        assert len(server.chat_requests()) == 30 and again["this_run"]["from_journal"] == 30
        assert json.loads(out.read_text()) == records
        cfg.seed = 1
        generate(cfg, captions, instances, tmp_path / "seed1.json")  # journal of seed1.json is new ...
        assert len(server.chat_requests()) == 60
        generate(cfg, captions, instances, tmp_path / "seed1b.json", journal=tmp_path / "instruct.journal.jsonl")
        assert len(server.chat_requests()) == 60  # ... but the first journal answers everything
        other = json.loads((tmp_path / "seed1b.json").read_text())
        assert [r["id"] for r in other] == [r["id"] for r in records] and other != records


def test_rejections_regeneration_and_failures_are_counted(tmp_path, coco, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    captions, instances = coco
    seen = Counter()
    lock = threading.Lock()

    def handler(request_json, n):
        kind = kind_of(request_json)
        image = request_json["messages"][-1]["content"].splitlines()[1]
        with lock:
            seen[(image, kind)] += 1
            count = seen[(image, kind)]
        text = fake_gpt_text(request_json)
        if kind == "detail":  # first reply leaks coordinates; the regenerated one is fine
            return Reply(body=chat_completion(text + " It spans [0.1, 0.2, 0.3, 0.4]." if count == 1 else text))
        if kind == "complex":  # always two questions: rejected twice, then failed
            return Reply(body=chat_completion(text + "\nQ: And another?\nA: Yes."))
        with lock:
            seen["conversation"] += 1
            refuse = seen["conversation"] == 1
        return Reply(status=400, body=error_body("model refuses")) if refuse else fake_gpt(request_json, n)

    out = tmp_path / "out.json"
    with LocalOpenAIServer(handler) as server:
        cfg = make_cfg(server)
        cfg.limit = 4
        summary = generate(cfg, captions, instances, out)
        sent = Counter(kind_of(r.json) for r in server.chat_requests())
    assert sent == {"detail": 8, "complex": 8, "conversation": 4}
    assert summary["by_type"]["detail"] == {"requested": 4, "succeeded": 4}
    assert summary["by_type"]["complex"] == {"requested": 4, "failed:not_one_question": 4}
    assert summary["by_type"]["conversation"] == {"requested": 4, "succeeded": 3, "failed:http_400": 1}
    assert summary["failed"] == {"not_one_question": 4, "http_400": 1} and summary["succeeded"] == 7
    records = json.loads(out.read_text())
    assert all("[0." not in t["value"] for r in records for t in r["conversations"])


def run_cli(args, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "data_gen.instruct", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_kill_9_then_rerun_completes_exactly_once_without_resending(tmp_path, coco):
    captions, instances = coco

    def handler(request_json, n):
        time.sleep(0.01 if n < 50 else 0.05)  # slower later, so the kill lands mid-run even on a busy machine
        if n % 23 == 5:
            return Reply(status=429, body=error_body("slow down"), headers={"retry-after-ms": "30"})
        if n % 31 == 7:
            return Reply(status=500, body=error_body("oops", type_="server_error"))
        return fake_gpt(request_json, n)

    out = tmp_path / "data" / "llava_instruct.json"
    env = {**os.environ, "OPENAI_API_KEY": SECRET, "PYTHONUNBUFFERED": "1"}
    with LocalOpenAIServer(handler, expected_api_key=SECRET) as server:
        args = ["--captions", str(captions), "--instances", str(instances), "--out", str(out),
                "--base-url", server.base_url, "--max-rpm", "0", "--max-tpm", "0", "--concurrency", "8",
                "--timeout-s", "10", "--max-retries", "4",
                "--config.client.backoff_base_s=0.01", "--config.client.backoff_max_s=0.05"]
        first = run_cli(args, env)
        deadline = time.monotonic() + 60
        while len(server.chat_requests()) < 60 and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGKILL)
        _, first_err = first.communicate(timeout=30)
        assert first.returncode == -signal.SIGKILL
        assert not out.exists()
        journal_path = out.with_name("llava_instruct.journal.jsonl")
        journaled = set(Journal(journal_path).entries)
        sent_before = len(server.chat_requests())
        assert 0 < len(journaled) < 210

        second = run_cli(args, env)
        _, second_err = second.communicate(timeout=120)
        assert second.returncode == 0, second_err[-2000:]
        rerun_hashes = [body_hash(r.json) for r in server.chat_requests()[sent_before:]]

    assert not journaled & set(rerun_hashes), "a journaled request was sent again"
    records = json.loads(out.read_text())
    images = {img["file_name"] for img in json.loads(captions.read_text())["images"]}
    assert Counter((r["image"], r["id"].rsplit("_", 1)[1]) for r in records) == Counter(
        {(image, kind): 1 for image in images for kind in TYPES})
    check_records(records, images)
    summary = json.loads(summary_path(out).read_text())
    assert summary["requested"] == summary["succeeded"] == 210
    assert summary["this_run"]["from_journal"] == len(journaled)
    # The key is in no file the runs wrote and in none of their output.
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path
    assert SECRET not in first_err and SECRET not in second_err


def test_cli_stops_on_401_with_exit_code_3(tmp_path, coco):
    captions, instances = coco
    with LocalOpenAIServer(fake_gpt, expected_api_key="sk-the-right-one") as server:
        args = ["--captions", str(captions), "--instances", str(instances), "--out", str(tmp_path / "o.json"),
                "--base-url", server.base_url, "--limit", "20", "--concurrency", "2"]
        proc = run_cli(args, {**os.environ, "OPENAI_API_KEY": SECRET})
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 3 and "401" in err and "OPENAI_API_KEY" in err and SECRET not in err
        assert len(server.chat_requests()) <= 2
    assert not (tmp_path / "o.json").exists()


def test_missing_key_for_the_default_server(tmp_path, coco, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(MissingAPIKeyError, match="OPENAI_API_KEY"):
        generate(load_config(), coco[0], None, tmp_path / "o.json")
    assert not (tmp_path / "o.json").exists()
