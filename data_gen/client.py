"""The project's one OpenAI-compatible chat client: rate limits, retries, a crash-safe journal, progress and spend.

    config = ClientConfig(model="gpt-4o-mini", max_rpm=500, max_tpm=200_000)
    results = ChatClient(config, journal_path="out/journal.jsonl").run(
        [ChatRequest(key="img1/detail", messages=[{"role": "user", "content": "..."}], params={"temperature": 0.7})],
        desc="detail",
    )
    results["img1/detail"].text

Behaviour:
- Uses the official `openai.AsyncOpenAI` against any `base_url` (OpenAI, vLLM, any compatible server), with the
  library's own retries off; retries happen here: exponential backoff with jitter on 429 (Retry-After and
  retry-after-ms honoured, and all senders pause), 408/409, 5xx, timeouts, dropped connections and malformed
  replies. Other 4xx fail the request at once; 401 stops the whole run with `AuthenticationFailed`, and a 429
  with code "insufficient_quota" with `QuotaExhausted` (both `RunHalted`).
- At most `concurrency` requests in flight; sends are paced evenly at `max_rpm * (1 - rate_headroom)` and never
  exceed `max_rpm` in any 60 s window; prompt tokens are estimated before sending (plus `max_tokens` or an
  expected completion size) and kept under `max_tpm` over a 60 s window, corrected by the reply's usage.
- Every reply received is appended to a JSONL journal (flushed and fsynced per line) under a hash of (model,
  messages, params) and the attempt number; a rerun reads the journal and sends no request whose reply is there.
  A torn last line (killed mid-write) is cut off on open. (`data_gen.journal`; the pacing lives in `data_gen.ratelimit`.)
- `ChatRequest.validate(text)` may reject a reply (returns a reason); a rejected reply is regenerated once, then
  the request fails with that reason.
- The API key is read from the environment variable `api_key_env` only (secret header values likewise from the
  variables named in `header_envs`); it is never written or logged, and is masked in any error text kept.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import openai
from tqdm import tqdm

from data_gen.journal import Journal, request_hash
from data_gen.ratelimit import RateLimiter, estimate_prompt_tokens

log = logging.getLogger(__name__)


Validator = Callable[[str], "str | None"]

# USD per 1M tokens (prompt, completion). Public list prices at the time of writing; override in configs.
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "gpt-4o-mini": {"prompt": 0.15, "completion": 0.60},
    "gpt-4o": {"prompt": 2.50, "completion": 10.00},
    "gpt-4.1-mini": {"prompt": 0.40, "completion": 1.60},
    "gpt-4.1": {"prompt": 2.00, "completion": 8.00},
    "gpt-4-turbo": {"prompt": 10.00, "completion": 30.00},
    "gpt-4": {"prompt": 30.00, "completion": 60.00},
    "gpt-3.5-turbo": {"prompt": 0.50, "completion": 1.50},
}

_RETRYABLE_STATUS = {408, 409}
_MAX_RETRY_AFTER_S = 600.0
_PLACEHOLDER_KEY = "no-key"  # sent to custom servers that need no key
MAX_ATTEMPTS = 2  # a rejected reply is regenerated once


class RunHalted(RuntimeError):
    """A reply that makes every further request pointless; the whole run stops at once."""


class AuthenticationFailed(RunHalted):
    """The server answered 401: the key is missing, wrong or revoked. The whole run stops."""


class QuotaExhausted(RunHalted):
    """The server answered 429 with code "insufficient_quota": no retry can succeed. The whole run stops."""


class MissingAPIKeyError(RuntimeError):
    """No API key in the environment for a server that needs one."""


@dataclasses.dataclass
class ClientConfig:
    """Settings of a `ChatClient`. Rates are per minute; None or 0 disables a limit.

    `extra_headers` are sent as given (must not hold secrets); `header_envs` maps a header name to the environment
    variable holding its secret value (e.g. {"api-key": "AZURE_KEY"}). `prices` maps a model name to USD per 1M
    prompt and completion tokens.
    """

    model: str = "gpt-4o-mini"
    base_url: str | None = None
    max_rpm: float | None = 500.0
    max_tpm: float | None = 200_000.0
    concurrency: int = 16
    timeout_s: float = 120.0
    max_retries: int = 6
    max_malformed_retries: int = 2  # malformed 200 replies are retried at most this often (within max_retries)
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    rate_headroom: float = 0.02
    expected_completion_tokens: int = 400
    api_key_env: str = "OPENAI_API_KEY"
    extra_headers: dict[str, str] = dataclasses.field(default_factory=dict)
    header_envs: dict[str, str] = dataclasses.field(default_factory=dict)
    prices: dict[str, dict[str, float]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_PRICES))
    progress: bool = True

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ClientConfig:
        """Builds a config from a dict or ConfigDict, ignoring keys that are not fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in dict(values).items():
            if key in names:
                if hasattr(value, "to_dict"):
                    value = value.to_dict()
                kwargs[key] = value
        return cls(**kwargs)

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        """Estimated spend for the given token counts, or None when the model has no price entry."""
        price = self.prices.get(self.model)
        if price is None:
            return None
        return (prompt_tokens * price["prompt"] + completion_tokens * price["completion"]) / 1e6


@dataclasses.dataclass
class ChatRequest:
    """One chat completion to obtain. `key` names it in the results; `params` go into the request body as-is
    (temperature, max_tokens, ...). `validate(text)` returns None to accept a reply or a short rejection reason.
    """

    key: str
    messages: list[dict[str, Any]]
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    validate: Validator | None = None


@dataclasses.dataclass
class ChatResult:
    """Outcome of one request. `error` is a short categorical reason when not ok (e.g. "rate_limited",
    "http_400", "timeout", or the validator's reason); `detail` holds the longer message (key masked).
    Token counts add up every reply used for this request (journaled ones included); `from_journal` is True when
    no request was sent for it in this run; `sent` counts the HTTP attempts made in this run.
    """

    key: str
    ok: bool
    text: str | None
    error: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    from_journal: bool = False
    detail: str = ""
    finish_reason: str | None = None
    sent: int = 0


@dataclasses.dataclass
class RunStats:
    """Totals of one `run`: tokens and cost count replies received in this run only (journaled ones were paid
    for earlier); `failed` is by reason."""

    requested: int = 0
    unique: int = 0
    succeeded: int = 0
    from_journal: int = 0
    http_requests: int = 0
    retries: int = 0
    rejected_replies: int = 0
    failed: Counter = dataclasses.field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = 0.0
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        out = dataclasses.asdict(self)
        out["failed"] = dict(self.failed)
        return out



def _retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """Seconds asked for by retry-after-ms or Retry-After (seconds or an HTTP date), else None."""
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


@dataclasses.dataclass
class _Outcome:
    ok: bool
    text: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    usage_estimated: bool = False
    reason: str | None = None
    detail: str = ""
    retry_after: float | None = None
    retryable: bool = False


class MalformedReply(ValueError):
    pass


def parse_completion(body_text: str) -> tuple[str, int | None, int | None, str | None]:
    """(text, prompt_tokens, completion_tokens, finish_reason) from a chat.completion body; raises MalformedReply."""
    try:
        body = json.loads(body_text)
    except json.JSONDecodeError as e:
        raise MalformedReply(f"reply is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise MalformedReply("reply is not a JSON object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedReply("reply has no choices")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise MalformedReply("reply's first choice has no text content")
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    return (
        content,
        prompt if isinstance(prompt, int) else None,
        completion if isinstance(completion, int) else None,
        choices[0].get("finish_reason"),
    )


@dataclasses.dataclass
class Job:
    hash: str
    request: ChatRequest
    keys: list[str]
    est_tokens: int


class Secrets:
    """The API key and secret header values, read from the environment; `redact` masks them in any text."""

    def __init__(self, api_key: str, secret_headers: dict[str, str]):
        self.api_key = api_key
        self.secret_headers = secret_headers

    @classmethod
    def from_env(cls, config: ClientConfig) -> Secrets:
        """Reads `config.api_key_env` and `config.header_envs`. Raises MissingAPIKeyError when the default
        server would get no key, or a configured secret header's variable is unset."""
        key = os.environ.get(config.api_key_env, "")
        headers = {}
        for header, env_name in config.header_envs.items():
            value = os.environ.get(env_name)
            if not value:
                raise MissingAPIKeyError(f"header {header!r} needs the environment variable {env_name}, which is unset")
            headers[header] = value
        if not key:
            if config.base_url is None and not headers:
                raise MissingAPIKeyError(
                    f"set the environment variable {config.api_key_env} to your API key (the default server needs one)"
                )
            key = _PLACEHOLDER_KEY
        return cls(key, headers)

    def headers(self, config: ClientConfig) -> dict[str, str]:
        """Default headers for the openai client: the config's literal headers plus the secret ones."""
        return {**config.extra_headers, **self.secret_headers}

    def redact(self, text: str) -> str:
        """`text` with every secret value replaced by "[redacted]"."""
        for secret in [self.api_key, *self.secret_headers.values()]:
            if secret and secret != _PLACEHOLDER_KEY and len(secret) >= 4:
                text = text.replace(secret, "[redacted]")
        return text

    def __repr__(self) -> str:
        return "Secrets([redacted])"


def plan_jobs(model: str, requests: Iterable[ChatRequest], expected_completion_tokens: int) -> tuple[dict, int]:
    """Groups requests by request hash: ({hash: Job}, number of requests). Identical requests share one job."""
    jobs: dict[str, Job] = {}
    requested = 0
    for request in requests:
        requested += 1
        h = request_hash(model, request.messages, request.params)
        if h in jobs:
            jobs[h].keys.append(request.key)
            continue
        completion = request.params.get("max_tokens") or request.params.get("max_completion_tokens")
        est = estimate_prompt_tokens(request.messages) + int(completion or expected_completion_tokens)
        jobs[h] = Job(h, request, [request.key], est)
    return jobs, requested


def resolve(key: str, replies: Sequence[Mapping[str, Any]], validate: Validator | None, sent: int = 0
            ) -> ChatResult | None:
    """The result decided by the replies so far (in attempt order): the first accepted one, a failure once
    MAX_ATTEMPTS replies were rejected, or None when another attempt is needed."""
    prompt_tokens = completion_tokens = 0
    reasons: list[str] = []
    for entry in replies[:MAX_ATTEMPTS]:
        prompt_tokens += int(entry.get("prompt_tokens") or 0)
        completion_tokens += int(entry.get("completion_tokens") or 0)
        reason = validate(entry["text"]) if validate is not None else None
        if reason is None:
            return ChatResult(key, True, entry["text"], None, prompt_tokens, completion_tokens, sent == 0, "",
                              entry.get("finish_reason"), sent)
        reasons.append(reason)
    if len(reasons) >= MAX_ATTEMPTS:
        return ChatResult(key, False, None, reasons[-1], prompt_tokens, completion_tokens, sent == 0,
                          "rejected twice: " + "; ".join(reasons), None, sent)
    return None


def journal_entry(job: Job, attempt: int, model: str, text: str, prompt_tokens: int, completion_tokens: int,
                  finish_reason: str | None, usage_estimated: bool) -> dict[str, Any]:
    """One journal line for a received reply."""
    return {
        "hash": job.hash,
        "attempt": attempt,
        "key": job.keys[0],
        "model": model,
        "text": text,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "usage_estimated": usage_estimated,
        "finish_reason": finish_reason,
        "time": time.time(),
    }


class ChatClient:
    """Runs many chat requests against an OpenAI-compatible server; see the module docstring."""

    def __init__(self, config: ClientConfig, journal_path: str | os.PathLike | None = None):
        self.config = config
        self.journal_path = Path(journal_path) if journal_path is not None else None
        self.secrets = Secrets.from_env(config)
        self.last_stats = RunStats()
        self._halted: RunHalted | None = None

    # -- public API ----------------------------------------------------------------------------------------

    def run(self, requests: Iterable[ChatRequest], desc: str = "requests") -> dict[str, ChatResult]:
        """Synchronous `arun`. Raises RunHalted (AuthenticationFailed on a 401, QuotaExhausted) and keeps in the
        journal what arrived before."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.arun(requests, desc=desc))
        raise RuntimeError("ChatClient.run was called inside a running event loop; await ChatClient.arun instead")

    async def arun(self, requests: Iterable[ChatRequest], desc: str = "requests") -> dict[str, ChatResult]:
        """Obtains a result for every request (identical requests are sent once); returns {key: ChatResult}."""
        cfg = self.config
        jobs, requested = plan_jobs(cfg.model, requests, cfg.expected_completion_tokens)
        stats = self.last_stats = RunStats(requested=requested, unique=len(jobs))
        self._halted = None
        if cfg.prices.get(cfg.model) is None:
            stats.cost_usd = None
        journal = Journal(self.journal_path) if self.journal_path is not None else None
        limiter = RateLimiter(cfg.max_rpm, cfg.max_tpm, cfg.rate_headroom)
        semaphore = asyncio.Semaphore(max(1, cfg.concurrency))
        results: dict[str, ChatResult] = {}
        queue: asyncio.Queue[Job] = asyncio.Queue()
        for job in jobs.values():
            queue.put_nowait(job)
        bar = tqdm(total=len(jobs), desc=desc, unit="req", disable=not cfg.progress, dynamic_ncols=True)
        started = time.monotonic()
        client = openai.AsyncOpenAI(
            api_key=self.secrets.api_key,
            base_url=cfg.base_url,
            timeout=cfg.timeout_s,
            max_retries=0,
            default_headers=self.secrets.headers(cfg),
        )

        async def worker() -> None:
            while True:
                try:
                    job = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                result = await self._process(job, client, limiter, semaphore, journal, stats)
                for key in job.keys:
                    results[key] = dataclasses.replace(result, key=key)
                if result.ok:
                    stats.succeeded += 1
                    stats.from_journal += int(result.from_journal)
                else:
                    stats.failed[result.error or "unknown"] += 1
                bar.update(1)
                postfix = {"failed": sum(stats.failed.values())}
                if stats.cost_usd is not None:
                    postfix["spend"] = f"${stats.cost_usd:.4f}"
                bar.set_postfix(postfix, refresh=False)

        n_workers = min(len(jobs), max(1, cfg.concurrency) * 4)
        tasks = [asyncio.create_task(worker()) for _ in range(n_workers)]
        try:
            if tasks:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    if task.exception() is not None:
                        raise task.exception()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            stats.elapsed_s = time.monotonic() - started
            bar.close()
            await client.close()
            if journal is not None:
                journal.close()
        return results

    # -- one request ---------------------------------------------------------------------------------------

    async def _process(self, job, client, limiter, semaphore, journal, stats) -> ChatResult:
        """Journal lookup, then send (with retries) until a reply is accepted or MAX_ATTEMPTS were rejected."""
        replies = list(journal.replies(job.hash)) if journal is not None else []
        sent = 0
        while True:
            result = resolve(job.keys[0], replies, job.request.validate, sent)
            if result is not None:
                stats.rejected_replies += min(len(replies), MAX_ATTEMPTS) - int(result.ok)
                return result
            outcome, n_sent = await self._send(job, client, limiter, semaphore, stats)
            sent += n_sent
            if not outcome.ok:
                return ChatResult(job.keys[0], False, None, outcome.reason,
                                  sum(int(r.get("prompt_tokens") or 0) for r in replies),
                                  sum(int(r.get("completion_tokens") or 0) for r in replies),
                                  False, self.secrets.redact(outcome.detail), None, sent)
            entry = journal_entry(job, len(replies), self.config.model, outcome.text or "", outcome.prompt_tokens,
                                  outcome.completion_tokens, outcome.finish_reason, outcome.usage_estimated)
            if journal is not None:
                # fsync takes milliseconds: off the event loop, so it cannot delay the rate limiter's timers.
                await asyncio.to_thread(journal.append, entry)
            replies.append(entry)
            stats.prompt_tokens += outcome.prompt_tokens
            stats.completion_tokens += outcome.completion_tokens
            if stats.cost_usd is not None:
                stats.cost_usd = self.config.cost_usd(stats.prompt_tokens, stats.completion_tokens)

    async def _send(self, job, client, limiter, semaphore, stats) -> tuple[_Outcome, int]:
        """Sends one request, retrying transient failures. Returns (outcome, HTTP attempts made)."""
        cfg = self.config
        outcome = _Outcome(ok=False, reason="not_sent")
        malformed = 0
        retry = 0
        for retry in range(cfg.max_retries + 1):
            if retry:
                stats.retries += 1
                delay = self._backoff_s(retry - 1, outcome.retry_after)
                log.debug("request %s: %s, retry %d in %.2fs", job.keys[0], outcome.reason, retry, delay)
                await asyncio.sleep(delay)
            async with semaphore:
                reservation = await limiter.acquire(job.est_tokens)
                if self._halted is not None:
                    raise self._halted
                stats.http_requests += 1
                outcome = await self._attempt(job, client)
                limiter.settle(
                    reservation, outcome.prompt_tokens + outcome.completion_tokens if outcome.ok else None
                )
            if outcome.ok or not outcome.retryable:
                return outcome, retry + 1
            malformed += outcome.reason == "malformed_response"
            if malformed > cfg.max_malformed_retries:  # usually a server bug, not a passing fault
                break
            if outcome.retry_after is not None:
                limiter.pause(min(outcome.retry_after, _MAX_RETRY_AFTER_S))
            if outcome.reason == "rate_limited":
                limiter.slow_down()
        log.warning("request %s failed after %d attempts: %s", job.keys[0], retry + 1,
                    self.secrets.redact(outcome.detail))
        return outcome, retry + 1

    def _backoff_s(self, retry: int, retry_after: float | None) -> float:
        """Delay before retry number `retry` (0-based): Retry-After plus up to 10% jitter when given, else
        exponential backoff with jitter in [50%, 100%] of min(max, base * 2**retry)."""
        cfg = self.config
        if retry_after is not None:
            wait = min(retry_after, _MAX_RETRY_AFTER_S)
            return wait + random.uniform(0, 0.1 * wait + 0.01)
        ceiling = min(cfg.backoff_max_s, cfg.backoff_base_s * (2**retry))
        return random.uniform(0.5 * ceiling, ceiling)

    async def _attempt(self, job: Job, client: openai.AsyncOpenAI) -> _Outcome:
        """One HTTP request; maps every failure to a reason and whether it is worth retrying."""
        request = job.request
        try:
            # httpx's timeout bounds each network read; wait_for bounds the whole exchange, so a server that
            # trickles bytes cannot hold a request past timeout_s either.
            raw = await asyncio.wait_for(
                client.chat.completions.with_raw_response.create(
                    model=self.config.model, messages=request.messages, extra_body=request.params or None
                ),
                timeout=self.config.timeout_s,
            )
            text, prompt, completion, finish = parse_completion(raw.text)
        except openai.AuthenticationError as e:
            self._halted = AuthenticationFailed(
                f"the server at {self.config.base_url or 'api.openai.com'} rejected the credentials (HTTP 401): "
                f"{self.secrets.redact(str(e.message))[:300]}. Check the environment variable {self.config.api_key_env}."
            )
            raise self._halted from None
        except openai.RateLimitError as e:
            if e.code == "insufficient_quota":
                self._halted = QuotaExhausted(
                    f"the server at {self.config.base_url or 'api.openai.com'} reports no quota left (HTTP 429 "
                    f"insufficient_quota): {self.secrets.redact(str(e.message))[:300]}"
                )
                raise self._halted from None
            return _Outcome(False, reason="rate_limited", detail=str(e.message)[:500],
                            retry_after=_retry_after_s(e.response.headers), retryable=True)
        except openai.APIStatusError as e:
            status = e.status_code
            retryable = status >= 500 or status in _RETRYABLE_STATUS
            reason = "server_error" if status >= 500 else f"http_{status}"
            return _Outcome(False, reason=reason, detail=f"HTTP {status}: {str(e.message)[:500]}",
                            retry_after=_retry_after_s(e.response.headers) if retryable else None,
                            retryable=retryable)
        except (openai.APITimeoutError, asyncio.TimeoutError):
            return _Outcome(False, reason="timeout", detail=f"no reply within {self.config.timeout_s}s",
                            retryable=True)
        except openai.APIConnectionError as e:
            return _Outcome(False, reason="connection_error", detail=str(e)[:500], retryable=True)
        except MalformedReply as e:
            return _Outcome(False, reason="malformed_response", detail=str(e)[:500], retryable=True)
        usage_estimated = prompt is None or completion is None
        if prompt is None:
            prompt = estimate_prompt_tokens(request.messages)
        if completion is None:
            completion = len(text) // 4 + 1
        return _Outcome(True, text=text, prompt_tokens=prompt, completion_tokens=completion, finish_reason=finish,
                        usage_estimated=usage_estimated)


def summarize_failures(results: Mapping[str, ChatResult]) -> dict[str, int]:
    """Count of failed results by reason."""
    return dict(Counter(r.error or "unknown" for r in results.values() if not r.ok))
