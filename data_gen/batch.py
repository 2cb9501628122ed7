"""OpenAI Batch API mode: the same requests, journal and results as `ChatClient.run`, at batch prices.

Each round writes the requests still needed as a Batch input file (JSONL lines {"custom_id", "method": "POST",
"url": "/v1/chat/completions", "body": {model, messages, **params}}), uploads it, creates the batch, polls until it
ends, downloads the output and error files and journals every reply. Rejected replies are regenerated in a second
round. The id of the batch in flight is kept in <journal>.batch.json, so a rerun after a crash resumes polling the
same batch instead of submitting (and paying for) it again; a rerun after completion sends nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import openai

from data_gen.client import (
    MAX_ATTEMPTS,
    AuthenticationFailed,
    ChatRequest,
    ChatResult,
    ClientConfig,
    Job,
    Journal,
    MalformedReply,
    RunStats,
    Secrets,
    journal_entry,
    parse_completion,
    plan_jobs,
    resolve,
)
from llava_jax.io import atomic_write_bytes, atomic_write_json, read_json

log = logging.getLogger(__name__)

TERMINAL = ("completed", "failed", "expired", "cancelled")
ENDPOINT = "/v1/chat/completions"


class BatchTimeout(TimeoutError):
    """The batch did not finish within `max_wait_s`; rerun the same command to keep polling it."""


def custom_id(job: Job, attempt: int) -> str:
    """The Batch line id of one attempt of one request."""
    return f"{job.hash}:{attempt}"


def batch_line(job: Job, attempt: int, model: str) -> dict[str, Any]:
    """One line of a Batch input file."""
    body = {"model": model, "messages": job.request.messages, **job.request.params}
    return {"custom_id": custom_id(job, attempt), "method": "POST", "url": ENDPOINT, "body": body}


class BatchRunner:
    """Runs requests through the Batch API; `run` returns {key: ChatResult} like `ChatClient.run`."""

    def __init__(
        self,
        config: ClientConfig,
        journal_path: str | os.PathLike,
        *,
        poll_s: float = 30.0,
        completion_window: str = "24h",
        max_wait_s: float = 26 * 3600.0,
        discount: float = 0.5,
    ):
        self.config = config
        self.journal_path = Path(journal_path)
        self.state_path = self.journal_path.with_name(self.journal_path.name + ".batch.json")
        self.poll_s = poll_s
        self.completion_window = completion_window
        self.max_wait_s = max_wait_s
        self.discount = discount
        self.secrets = Secrets.from_env(config)
        self.last_stats = RunStats()

    def _client(self) -> openai.OpenAI:
        cfg = self.config
        return openai.OpenAI(api_key=self.secrets.api_key, base_url=cfg.base_url, timeout=cfg.timeout_s,
                             max_retries=cfg.max_retries, default_headers=self.secrets.headers(cfg))

    def run(self, requests: Iterable[ChatRequest]) -> dict[str, ChatResult]:
        """Submits what the journal lacks (at most MAX_ATTEMPTS rounds), then resolves every request.

        Raises AuthenticationFailed on 401 and BatchTimeout when a batch outlives `max_wait_s`.
        """
        started = time.monotonic()
        jobs, requested = plan_jobs(self.config.model, requests, self.config.expected_completion_tokens)
        stats = self.last_stats = RunStats(requested=requested, unique=len(jobs))
        journal = Journal(self.journal_path)
        failures: dict[str, tuple[str, str]] = {}
        sent: dict[str, int] = {}
        try:
            with self._client() as client:
                for _ in range(MAX_ATTEMPTS + 1):  # +1: a resumed batch may cover only part of a round
                    pending = {
                        custom_id(job, len(journal.replies(h))): job
                        for h, job in jobs.items()
                        if h not in failures and resolve(job.keys[0], journal.replies(h), job.request.validate) is None
                    }
                    if not pending:
                        break
                    self._round(client, pending, journal, failures, sent, stats)
        except openai.AuthenticationError as e:
            raise AuthenticationFailed(
                f"the server at {self.config.base_url or 'api.openai.com'} rejected the credentials (HTTP 401): "
                f"{self.secrets.redact(str(e.message))[:300]}. Check {self.config.api_key_env}."
            ) from None
        finally:
            journal.close()

        results: dict[str, ChatResult] = {}
        for h, job in jobs.items():
            replies = journal.replies(h)
            result = resolve(job.keys[0], replies, job.request.validate, sent.get(h, 0))
            if result is None:
                reason, detail = failures.get(h, ("batch_missing", "no reply after all rounds"))
                result = ChatResult(job.keys[0], False, None, reason, detail=self.secrets.redact(detail),
                                    sent=sent.get(h, 0))
            for key in job.keys:
                results[key] = ChatResult(**{**result.__dict__, "key": key})
            if result.ok:
                stats.succeeded += 1
                stats.from_journal += int(result.from_journal)
            else:
                stats.failed[result.error or "unknown"] += 1
        cost = self.config.cost_usd(stats.prompt_tokens, stats.completion_tokens)
        stats.cost_usd = None if cost is None else cost * self.discount
        stats.elapsed_s = time.monotonic() - started
        return results

    # -- one round -----------------------------------------------------------------------------------------

    def _round(self, client: openai.OpenAI, pending: dict[str, Job], journal: Journal,
               failures: dict[str, tuple[str, str]], sent: dict[str, int], stats: RunStats) -> None:
        batch_id = self._resumable_batch(pending)
        if batch_id is None:
            batch_id = self._submit(client, pending)
            for job in pending.values():
                sent[job.hash] = sent.get(job.hash, 0) + 1
            stats.http_requests += len(pending)
        batch = self._wait(client, batch_id)
        seen: set[str] = set()
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                content = client.files.content(file_id).content
                self._ingest(content, pending, journal, failures, seen, stats)
        for cid, job in pending.items():
            if cid not in seen and job.hash not in failures:
                failures[job.hash] = (f"batch_{batch.status}", f"no result line in batch {batch_id}")
        self.state_path.unlink(missing_ok=True)

    def _resumable_batch(self, pending: dict[str, Job]) -> str | None:
        if not self.state_path.exists():
            return None
        state = read_json(self.state_path)
        if set(state.get("custom_ids", [])) <= set(pending):
            log.info("resuming batch %s from %s", state["batch_id"], self.state_path)
            return str(state["batch_id"])
        log.warning("%s names a batch for other requests; submitting a new one", self.state_path)
        return None

    def _submit(self, client: openai.OpenAI, pending: dict[str, Job]) -> str:
        lines = [json.dumps(batch_line(job, int(cid.rsplit(":", 1)[1]), self.config.model), ensure_ascii=False)
                 for cid, job in pending.items()]
        data = ("\n".join(lines) + "\n").encode("utf-8")
        input_path = self.journal_path.with_name(self.journal_path.name + ".batch_input.jsonl")
        atomic_write_bytes(input_path, data)
        uploaded = client.files.create(file=(input_path.name, data, "application/jsonl"), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT,
                                      completion_window=self.completion_window)
        atomic_write_json(self.state_path, {"batch_id": batch.id, "input_file_id": uploaded.id,
                                            "custom_ids": list(pending)})
        log.info("submitted batch %s with %d requests", batch.id, len(pending))
        return batch.id

    def _wait(self, client: openai.OpenAI, batch_id: str) -> Any:
        deadline = time.monotonic() + self.max_wait_s
        while True:
            batch = client.batches.retrieve(batch_id)
            counts = getattr(batch, "request_counts", None)
            log.info("batch %s: %s %s", batch_id, batch.status, counts.model_dump() if counts is not None else "")
            if batch.status in TERMINAL:
                return batch
            if time.monotonic() > deadline:
                raise BatchTimeout(f"batch {batch_id} still {batch.status} after {self.max_wait_s:.0f}s; rerun to "
                                   "keep polling it")
            time.sleep(self.poll_s)

    def _ingest(self, content: bytes, pending: dict[str, Job], journal: Journal,
                failures: dict[str, tuple[str, str]], seen: set[str], stats: RunStats) -> None:
        for line in content.decode("utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            cid = row.get("custom_id")
            job = pending.get(cid)
            if job is None:
                continue
            seen.add(cid)
            response = row.get("response") or {}
            status = response.get("status_code")
            if status != 200:
                message = json.dumps(row.get("error") or response.get("body"))[:300]
                failures[job.hash] = (f"http_{status}" if status else "batch_error", message)
                continue
            try:
                text, prompt, completion, finish = parse_completion(json.dumps(response.get("body")))
            except MalformedReply as e:
                failures[job.hash] = ("malformed_response", str(e))
                continue
            attempt = int(cid.rsplit(":", 1)[1])
            estimated = prompt is None or completion is None
            prompt = prompt if prompt is not None else 0
            completion = completion if completion is not None else len(text) // 4 + 1
            journal.append(journal_entry(job, attempt, self.config.model, text, prompt, completion, finish, estimated))
            stats.prompt_tokens += prompt
            stats.completion_tokens += completion
