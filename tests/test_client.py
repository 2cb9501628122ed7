"""data_gen.client against a real local HTTP server (tests/openai_server.py) through the real openai client."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from openai_server import LocalOpenAIServer, Reply, chat_completion, error_body

from data_gen.client import (
    AuthenticationFailed,
    ChatClient,
    ChatRequest,
    ClientConfig,
    MissingAPIKeyError,
    QuotaExhausted,
)
from data_gen.journal import Journal, JournalError, request_hash
from data_gen.ratelimit import RateLimiter

SECRET = "sk-test-SECRET-4f9a1c77e2"


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def make_config(server: LocalOpenAIServer, **overrides) -> ClientConfig:
    values = dict(model="gpt-4o-mini", base_url=server.base_url, max_rpm=None, max_tpm=None, concurrency=4,
                  timeout_s=5.0, max_retries=3, backoff_base_s=0.01, backoff_max_s=0.05, progress=False)
    values.update(overrides)
    return ClientConfig(**values)


def requests_for(n: int, **kwargs) -> list[ChatRequest]:
    return [ChatRequest(f"k{i}", [{"role": "user", "content": f"question {i}"}], **kwargs) for i in range(n)]


def echo(request_json: dict, n: int) -> Reply:
    return Reply(body=chat_completion("answer to " + request_json["messages"][-1]["content"], prompt_tokens=7))


def test_plain_run_returns_texts_tokens_and_sends_key(tmp_path):
    with LocalOpenAIServer(echo, expected_api_key=SECRET) as server:
        client = ChatClient(make_config(server), tmp_path / "j.jsonl")
        results = client.run(requests_for(5, params={"temperature": 0.2, "max_tokens": 64}))
        sent = server.chat_requests()
    assert sorted(results) == [f"k{i}" for i in range(5)]
    assert all(r.ok and r.text == f"answer to question {r.key[1:]}" for r in results.values())
    assert results["k0"].prompt_tokens == 7 and results["k0"].completion_tokens == 4
    assert len(sent) == 5
    assert sent[0].json["temperature"] == 0.2 and sent[0].json["max_tokens"] == 64
    assert sent[0].json["model"] == "gpt-4o-mini"
    stats = client.last_stats
    assert stats.succeeded == 5 and stats.prompt_tokens == 35 and stats.completion_tokens == 20
    assert stats.cost_usd == pytest.approx((35 * 0.15 + 20 * 0.60) / 1e6)


def test_429_honours_retry_after_then_succeeds():
    def handler(request_json, n):
        if n == 0:
            return Reply(status=429, body=error_body("rate limit", type_="requests"), headers={"Retry-After": "0.6"})
        return echo(request_json, n)

    with LocalOpenAIServer(handler) as server:
        results = ChatClient(make_config(server, concurrency=1)).run(requests_for(1))
        times = [r.time for r in server.chat_requests()]
    assert results["k0"].ok and results["k0"].sent == 2
    assert times[1] - times[0] >= 0.6


def test_429_retry_after_ms_and_exhaustion_reason():
    with LocalOpenAIServer(lambda j, n: Reply(status=429, body=error_body("busy"),
                                              headers={"retry-after-ms": "50"})) as server:
        results = ChatClient(make_config(server, max_retries=2)).run(requests_for(1))
        assert len(server.chat_requests()) == 3
    assert not results["k0"].ok and results["k0"].error == "rate_limited"


def test_500_is_retried_and_exhausts_with_reason():
    def flaky(request_json, n):
        return Reply(status=500, body=error_body("boom", type_="server_error")) if n < 2 else echo(request_json, n)

    with LocalOpenAIServer(flaky) as server:
        ok = ChatClient(make_config(server, concurrency=1)).run(requests_for(1))
    assert ok["k0"].ok and ok["k0"].sent == 3

    with LocalOpenAIServer(lambda j, n: Reply(status=503, body="oops")) as server:
        failed = ChatClient(make_config(server, max_retries=2)).run(requests_for(1))
        assert len(server.chat_requests()) == 3
    assert failed["k0"].error == "server_error" and "503" in failed["k0"].detail


def test_slow_reply_times_out_and_is_retried():
    def slow_first(request_json, n):
        return Reply(body=chat_completion("late"), delay_s=2.0) if n == 0 else echo(request_json, n)

    with LocalOpenAIServer(slow_first) as server:
        started = time.monotonic()
        results = ChatClient(make_config(server, timeout_s=0.4, concurrency=1)).run(requests_for(1))
        elapsed = time.monotonic() - started
    assert results["k0"].ok and results["k0"].text == "answer to question 0" and results["k0"].sent == 2
    assert elapsed < 1.9

    with LocalOpenAIServer(lambda j, n: Reply(body=chat_completion("late"), delay_s=1.0)) as server:
        results = ChatClient(make_config(server, timeout_s=0.2, max_retries=1)).run(requests_for(1))
    assert results["k0"].error == "timeout"


def test_trickling_reply_is_cut_off_at_the_timeout():
    def handler(request_json, n):
        if n == 0:  # every piece arrives within the read timeout, the whole reply does not
            return Reply(body=chat_completion("slow " * 50), chunk_delay_s=0.15)
        return echo(request_json, n)

    with LocalOpenAIServer(handler) as server:
        started = time.monotonic()
        results = ChatClient(make_config(server, timeout_s=0.5, concurrency=1)).run(requests_for(1))
        elapsed = time.monotonic() - started
    assert results["k0"].ok and results["k0"].text == "answer to question 0" and results["k0"].sent == 2
    assert elapsed < 1.1


@pytest.mark.parametrize(
    "bad_body",
    ['{"choices": [', {"id": "x", "object": "chat.completion"}, {"choices": []}, {"choices": [{"message": {}}]}],
    ids=["truncated_json", "no_choices", "empty_choices", "no_content"],
)
def test_malformed_reply_is_retried_then_failed(bad_body):
    def handler(request_json, n):
        return Reply(body=bad_body) if n == 0 else echo(request_json, n)

    with LocalOpenAIServer(handler) as server:
        results = ChatClient(make_config(server)).run(requests_for(1))
    assert results["k0"].ok and results["k0"].sent == 2

    with LocalOpenAIServer(lambda j, n: Reply(body=bad_body)) as server:
        results = ChatClient(make_config(server, max_retries=5, max_malformed_retries=2)).run(requests_for(1))
        assert len(server.chat_requests()) == 3
    assert results["k0"].error == "malformed_response" and results["k0"].sent == 3


def test_dropped_connection_is_retried():
    def handler(request_json, n):
        return Reply(drop=True) if n < 2 else echo(request_json, n)

    with LocalOpenAIServer(handler) as server:
        results = ChatClient(make_config(server, concurrency=1)).run(requests_for(1))
    assert results["k0"].ok and results["k0"].sent == 3


def test_other_4xx_is_not_retried():
    with LocalOpenAIServer(lambda j, n: Reply(status=400, body=error_body("context too long"))) as server:
        results = ChatClient(make_config(server)).run(requests_for(3))
        assert len(server.chat_requests()) == 3
    assert {r.error for r in results.values()} == {"http_400"}
    assert "context too long" in results["k0"].detail


def test_401_stops_the_run_and_never_shows_the_key(tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)

    def handler(request_json, n):
        time.sleep(0.05)
        return Reply(status=401, body=error_body(f"Incorrect API key provided: {SECRET}", code="invalid_api_key"))

    journal = tmp_path / "j.jsonl"
    with LocalOpenAIServer(handler) as server:
        with pytest.raises(AuthenticationFailed, match="OPENAI_API_KEY") as info:
            ChatClient(make_config(server, concurrency=2, progress=True), journal).run(requests_for(50))
        assert len(server.chat_requests()) <= 2
    assert SECRET not in str(info.value)
    out, err = capfd.readouterr()
    assert SECRET not in caplog.text and SECRET not in out and SECRET not in err


def test_insufficient_quota_stops_the_run():
    body = error_body("You exceeded your current quota.", type_="insufficient_quota", code="insufficient_quota")
    with LocalOpenAIServer(lambda j, n: Reply(status=429, body=body)) as server:
        with pytest.raises(QuotaExhausted, match="quota"):
            ChatClient(make_config(server, concurrency=1)).run(requests_for(20))
        assert len(server.chat_requests()) == 1


def test_key_never_written_or_logged(tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)

    def handler(request_json, n):
        if n % 4 == 0:
            return Reply(status=429, body=error_body(f"key {SECRET} is over quota"), headers={"retry-after-ms": "10"})
        if n % 4 == 1:
            return Reply(status=400, body=error_body(f"bad request with {SECRET}")) if n == 1 else echo(request_json, n)
        return echo(request_json, n)

    with LocalOpenAIServer(handler, expected_api_key=SECRET) as server:
        client = ChatClient(make_config(server, progress=True), tmp_path / "out" / "journal.jsonl")
        results = client.run(requests_for(12))
    assert any(r.ok for r in results.values()) and any(r.error == "http_400" for r in results.values())
    assert all(SECRET not in (r.detail + (r.text or "")) for r in results.values())
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace")
    out, err = capfd.readouterr()
    assert SECRET not in caplog.text and SECRET not in out and SECRET not in err


def test_missing_key_for_default_server(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(MissingAPIKeyError, match="OPENAI_API_KEY"):
        ChatClient(ClientConfig(progress=False))


def test_custom_secret_header_from_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("MY_GATEWAY_TOKEN", "gw-token-123456")
    with LocalOpenAIServer(echo) as server:
        config = make_config(server, header_envs={"X-Gateway-Token": "MY_GATEWAY_TOKEN"},
                             extra_headers={"X-Team": "vision"})
        results = ChatClient(config).run(requests_for(1))
        headers = {k.lower(): v for k, v in server.chat_requests()[0].headers.items()}
    assert results["k0"].ok
    assert headers["x-gateway-token"] == "gw-token-123456" and headers["x-team"] == "vision"
    with pytest.raises(MissingAPIKeyError, match="MISSING_VAR"):
        ChatClient(ClientConfig(header_envs={"X-Token": "MISSING_VAR"}, progress=False))


def test_journal_rerun_sends_nothing_and_torn_line_is_resent(tmp_path):
    journal = tmp_path / "j.jsonl"
    with LocalOpenAIServer(echo) as server:
        first = ChatClient(make_config(server), journal).run(requests_for(6))
        assert len(server.chat_requests()) == 6
        second = ChatClient(make_config(server), journal).run(requests_for(6))
        assert len(server.chat_requests()) == 6
        assert all(r.from_journal and r.ok for r in second.values())
        assert {k: r.text for k, r in first.items()} == {k: r.text for k, r in second.items()}
        # Tear the last line as a kill -9 mid-write would.
        data = journal.read_bytes()
        journal.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 1] + data.rstrip(b"\n").rsplit(b"\n", 1)[1][:20])
        third = ChatClient(make_config(server), journal).run(requests_for(6))
        assert len(server.chat_requests()) == 7
    assert sum(not r.from_journal for r in third.values()) == 1
    assert len(Journal(journal)) == 6


def test_journal_corruption_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text('{"hash": "a", "attempt": 0, "text": "x"}\nnot json\n{"hash": "b", "attempt": 0, "text": "y"}\n')
    with pytest.raises(JournalError, match=":2:"):
        Journal(path)


def test_rejected_reply_is_regenerated_once_then_failed(tmp_path):
    def counting(request_json, n):
        return Reply(body=chat_completion(f"reply number {n}"))

    def reject_first(text):
        return "too_short" if text == "reply number 0" else None

    with LocalOpenAIServer(counting) as server:
        results = ChatClient(make_config(server, concurrency=1)).run(requests_for(1, validate=reject_first))
    assert results["k0"].ok and results["k0"].text == "reply number 1" and results["k0"].sent == 2

    journal = tmp_path / "j.jsonl"
    with LocalOpenAIServer(counting) as server:
        results = ChatClient(make_config(server), journal).run(requests_for(1, validate=lambda t: "mentions_coordinates"))
        assert len(server.chat_requests()) == 2
        assert results["k0"].error == "mentions_coordinates" and "rejected twice" in results["k0"].detail
        rerun = ChatClient(make_config(server), journal).run(requests_for(1, validate=lambda t: "mentions_coordinates"))
        assert len(server.chat_requests()) == 2
        assert rerun["k0"].error == "mentions_coordinates" and rerun["k0"].from_journal
        # A looser validator on rerun accepts the journaled reply without sending anything.
        accepted = ChatClient(make_config(server), journal).run(requests_for(1, validate=lambda t: None))
        assert len(server.chat_requests()) == 2 and accepted["k0"].text == "reply number 0"


def test_identical_requests_are_sent_once():
    same = [{"role": "user", "content": "same question"}]
    with LocalOpenAIServer(echo) as server:
        results = ChatClient(make_config(server)).run([ChatRequest("a", same), ChatRequest("b", same)])
        assert len(server.chat_requests()) == 1
    assert results["a"].text == results["b"].text == "answer to same question"
    assert results["a"].key == "a" and results["b"].key == "b"


def test_in_flight_requests_are_bounded():
    lock = threading.Lock()
    active = [0, 0]

    def handler(request_json, n):
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        time.sleep(0.1)
        with lock:
            active[0] -= 1
        return echo(request_json, n)

    with LocalOpenAIServer(handler) as server:
        results = ChatClient(make_config(server, concurrency=3)).run(requests_for(12))
    assert all(r.ok for r in results.values())
    assert active[1] == 3


def test_requests_per_minute_pacing():
    with LocalOpenAIServer(echo) as server:
        started = time.monotonic()
        results = ChatClient(make_config(server, max_rpm=600, concurrency=8)).run(requests_for(11))
        elapsed = time.monotonic() - started
        times = sorted(r.time for r in server.chat_requests())
    assert all(r.ok for r in results.values())
    interval = 60 / (600 * 0.98)
    assert times[-1] - times[0] >= 10 * interval * 0.95
    assert elapsed < 10 * interval + 1.5


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_rate_limiter_windows_with_fake_clock():
    clock = FakeClock()
    limiter = RateLimiter(max_rpm=120, max_tpm=1000, headroom=0.0, clock=clock, sleep=clock.sleep)

    async def scenario():
        sends = []
        for _ in range(4):
            reservation = await limiter.acquire(300)
            sends.append(clock.now)
            limiter.settle(reservation, 300)
        # 3 x 300 tokens fit in the minute; the 4th waits for the first to leave the 60 s window.
        assert sends[:3] == pytest.approx([1000.0, 1000.5, 1001.0])
        assert sends[3] == pytest.approx(1060.0)
        # Usage smaller than estimated frees room at once: 900 + 10 + 90 fits, 900 + 100 + 90 would not.
        reservation = await limiter.acquire(100)
        limiter.settle(reservation, 10)
        before = clock.now
        await limiter.acquire(90)
        assert clock.now - before == pytest.approx(0.5)
        # A pause after a 429 holds every sender back.
        limiter.pause(5.0)
        before = clock.now
        await limiter.acquire(1)
        assert clock.now - before >= 5.0

    asyncio.run(scenario())


def test_request_hash_depends_on_model_messages_and_params():
    messages = [{"role": "user", "content": "hi"}]
    base = request_hash("m", messages, {"temperature": 0.2})
    assert base == request_hash("m", [{"content": "hi", "role": "user"}], {"temperature": 0.2})
    assert base != request_hash("m2", messages, {"temperature": 0.2})
    assert base != request_hash("m", messages, {"temperature": 0.3})
    assert base != request_hash("m", [{"role": "user", "content": "hi!"}], {"temperature": 0.2})


@pytest.mark.parametrize("jitter", [0.1, 0.3])
def test_rate_limiter_recovers_timer_jitter_without_bursts(jitter):
    import random

    rng = random.Random(0)
    clock = FakeClock()
    interval = 60 / (600 * 0.98)

    async def late_sleep(seconds: float) -> None:  # every wake-up is late by up to `jitter` of an interval
        clock.now += seconds + rng.uniform(0, jitter * interval)

    limiter = RateLimiter(max_rpm=600, max_tpm=None, headroom=0.02, clock=clock, sleep=late_sleep)

    async def scenario():
        sends = []
        for _ in range(600):
            await limiter.acquire(1)
            sends.append(clock.now)
        return sends

    sends = asyncio.run(scenario())
    gaps = [sends[i + 1] - sends[i] for i in range(len(sends) - 1)]
    assert min(gaps) >= 0.9 * interval - 1e-9
    for width in (1.0, 10.0, 60.0):
        most = max(sum(1 for t in sends[i:] if t < sends[i] + width) for i in range(len(sends)))
        assert most <= width / interval + 1.1
    achieved_rpm = (len(sends) - 1) / (sends[-1] - sends[0]) * 60
    # Lateness up to a tenth of an interval is fully made up; beyond that only partly.
    assert achieved_rpm >= (0.975 if jitter <= 0.1 else 0.9) * 600


def test_rate_limiter_slows_down_after_429_up_to_a_cap():
    limiter = RateLimiter(max_rpm=600, max_tpm=None, headroom=0.0)
    limiter.slow_down()
    assert limiter.interval == pytest.approx(0.102)
    for _ in range(50):
        limiter.slow_down()
    assert limiter.interval == pytest.approx(0.125)
