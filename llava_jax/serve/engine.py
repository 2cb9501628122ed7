"""The serving engine: a fixed set of KV-cache slots decoded together, with requests admitted into free slots
between decode steps (continuous batching).

One background thread owns the model and the slot cache. Each loop iteration it
  1. admits waiting requests into free slots: a jitted prefill (batch 1, prompt padded to a bucket length)
     writes the request's keys and values into its slot's row of the cache and picks its first token;
  2. runs one jitted decode step over all `max_batch` slots (static shapes; idle slots are masked and their
     write index does not move), each row at its own write index (`LlamaForCausalLM`'s per-row slot cache);
  3. hands every new token to its request, which ends at an end-of-sequence token, a stop string or its
     `max_tokens`, and frees its slot at once.
Compilations: one decode step, plus one prefill per prompt bucket (with and without an image).

Greedy decoding gives the same tokens as `llava_jax.generate.generate` for the same prompt (same model code,
same prompt bucketing, the same `argmax`); texts are finished the way `python -m llava_jax.generate` does it
(special tokens dropped, cut at the first stop string, stripped).

  engine = Engine(loaded, max_batch=16, max_len=2048); engine.start()
  req = engine.submit(prompt_ids, pixels, SamplingParams(max_tokens=64))
  for event in req.events(): ...          # TokenEvent(token_id, text_delta) ..., then FinishEvent
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.generate import BUCKET, eos_ids_of, left_pad, stop_strings_of


class EngineError(ValueError):
    """A request the engine cannot take (too long for the context, bad sampling values, shutting down)."""

    code = "invalid_request"


class ContextLengthError(EngineError):
    code = "context_length_exceeded"


class ShuttingDownError(EngineError):
    code = "shutting_down"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request decodes: greedy when temperature is 0; else temperature + top-p sampling from `seed`.
    `stop`: extra stop strings (the model's template stop strings always apply)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # decode exactly max_tokens (benchmarks): EOS and template stops do not end it


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """A generated token and the text it made visible (may be "" while a stop string or a character is
    incomplete)."""

    token_id: int
    text: str


@dataclasses.dataclass(frozen=True)
class FinishEvent:
    """The end of a request: the whole answer, its token ids and why it ended ("stop", "length",
    "cancelled", or "error" with `error`). `text_delta` is what the TokenEvents had not yet shown."""

    reason: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    text_delta: str = ""
    error: str | None = None


class TextTracker:
    """Turns a growing token list into the answer's text the way `python -m llava_jax.generate` finishes it:
    decoded without special tokens, cut at the first stop string, stripped. `delta()` returns only text that
    can no longer change (a possible start of a stop string, trailing spaces and an incomplete character are
    held back), so the deltas joined with the final `rest()` equal `final()`."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer, self.stops = tokenizer, tuple(s for s in stops if s)
        self.sent = ""

    def _visible(self, tokens: Sequence[int]) -> str:
        text = self.tokenizer.decode(list(tokens), skip_special_tokens=True)
        for s in self.stops:
            text = text.split(s)[0]
        return text

    def final(self, tokens: Sequence[int]) -> str:
        return self._visible(tokens).strip()

    def delta(self, tokens: Sequence[int]) -> str:
        raw = self._visible(tokens)
        text = raw.lstrip()
        keep = len(text.rstrip())
        for s in self.stops:  # hold back a tail that may grow into a stop string
            for n in range(min(len(s) - 1, len(raw)), 0, -1):
                if raw.endswith(s[:n]):
                    keep = min(keep, len(text) - n)
                    break
        text = text[:max(keep, 0)]
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        out, self.sent = text[len(self.sent):], text
        return out

    def rest(self, tokens: Sequence[int]) -> str:
        final = self.final(tokens)
        return final[len(self.sent):] if final.startswith(self.sent) else ""


class Request:
    """One admitted request. Events arrive through `sink` (called from the engine thread) or, by default, a
    thread-safe queue read with `events()`."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: Sequence[int], pixels: np.ndarray | None, params: SamplingParams,
                 tracker: TextTracker, stops: tuple[str, ...], sink: Callable[[Any], None] | None = None):
        self.id = next(Request._ids)
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.pixels = pixels
        self.params = params
        self.tracker, self.stops = tracker, stops
        self.tokens: list[int] = []
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.submitted = time.perf_counter()
        self._queue: queue.Queue | None = None
        if sink is None:
            self._queue = queue.Queue()
            sink = self._queue.put
        self._sink = sink

    def cancel(self) -> None:
        """Asks the engine to drop this request (its slot is freed before the next decode step)."""
        self.cancelled.set()

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent | FinishEvent]:
        """The request's events until its FinishEvent (only without a custom sink)."""
        assert self._queue is not None, "this request has a custom sink"
        while True:
            event = self._queue.get(timeout=timeout)
            yield event
            if isinstance(event, FinishEvent):
                return

    def result(self, timeout: float | None = None) -> FinishEvent:
        """Waits for the FinishEvent."""
        *_, last = self.events(timeout)
        return last

    def emit(self, event) -> None:
        self._sink(event)


# ------------------------------------------------------------------------------------------------ jitted steps


def _sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """Next tokens [B] from logits [B, V]; each row greedy (temperature 0) or top-p sampled with its own key,
    temperature and top_p [B]."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)[:, None]
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]  # the smallest prefix whose mass reaches top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
    sampled = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature <= 0.0, greedy, sampled)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _prefill_into_slot(graphdef, state, cache, input_ids, attention_mask, pixel_values, slot, temperature,
                       top_p, key):
    """Prefills one prompt (ids / mask [1, P], pixels [1, H, W, 3] or None) into row `slot` of the slot cache
    (k [Lyr, B, K, Hd, S], v [Lyr, B, K, S, Hd], valid [B, S], index [B]); returns (cache, first token [1])."""
    model = nnx.merge(graphdef, state)
    row = model.language_model.init_cache(1, cache["valid"].shape[1], cache["k"].dtype)
    hidden, row = model(input_ids, pixel_values, None, attention_mask, cache=row, return_hidden=True)
    logits = model.language_model.logits(hidden[:, -1])
    first = _sample_rows(logits, key[None], temperature[None], top_p[None])
    new = {
        "k": jax.lax.dynamic_update_slice(cache["k"], row["k"], (0, slot, 0, 0, 0)),
        "v": jax.lax.dynamic_update_slice(cache["v"], row["v"], (0, slot, 0, 0, 0)),
        "valid": jax.lax.dynamic_update_slice(cache["valid"], row["valid"], (slot, 0)),
        "index": cache["index"].at[slot].set(row["index"]),
    }
    return new, first


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _decode_step(graphdef, state, cache, last, active, temperature, top_p, keys):
    """One decode step for every slot: last [B] tokens in, next [B] tokens out; idle rows (active [B] False)
    write nothing visible and keep their index."""
    model = nnx.merge(graphdef, state)
    index = cache["index"]
    logits, cache = model.language_model(last[:, None], attention_mask=active[:, None].astype(jnp.int32),
                                         cache=cache)
    cache = dict(cache, index=jnp.where(active, cache["index"], index))
    split = jax.vmap(jax.random.split)(keys)  # [B, 2]
    nxt = _sample_rows(logits[:, -1], split[:, 1], temperature, top_p)
    return cache, nxt, split[:, 0]


# ------------------------------------------------------------------------------------------------ engine


class Engine:
    """Continuous-batching decoder over `max_batch` KV-cache slots of `max_len` positions (see module doc).

    Args:
      loaded: a `llava_jax.convert.model_dir.LoadedModel` (model, config, tokenizer, image config, template).
      max_batch: slots decoded together.
      max_len: the context: prompt tokens + max_tokens must fit in it.
      bucket: prompts are padded to a multiple of this (the same rule as `generate`).
    """

    def __init__(self, loaded, max_batch: int = 16, max_len: int | None = None, bucket: int = BUCKET):
        if max_batch < 1:
            raise EngineError(f"max_batch must be >= 1, got {max_batch}")
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        if self.tokenizer is None:
            raise EngineError("the model has no tokenizer")
        text = loaded.config.text
        model_limit = int(text.max_position_embeddings)
        self.max_len = int(max_len or min(model_limit, 4096))
        if not 1 < self.max_len <= model_limit:
            raise EngineError(f"max_len must be in 2..{model_limit} (the model's max_position_embeddings), "
                              f"got {self.max_len}")
        self.max_batch, self.bucket = int(max_batch), int(bucket)
        # a prompt of up to max_len - 1 tokens is padded to its bucket; room for that padding
        self.cache_len = _round_up(self.max_len, bucket) + bucket
        self.eos_ids = eos_ids_of(self.tokenizer, loaded.config)
        self.template_stops = tuple(stop_strings_of(loaded.template))
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.graphdef, self.state = nnx.split(loaded.model)
        self._pending: queue.Queue[Request] = queue.Queue()
        self._wake = threading.Condition()
        self._slots: list[Request | None] = [None] * self.max_batch
        self._draining = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.finished: dict[str, int] = {}  # requests ended, by reason
        self.error: BaseException | None = None

    # ---------------------------------------------------------------------------------------- public
    def start(self) -> Engine:
        """Starts the engine thread (allocates the slot cache)."""
        lm = self.loaded.model.language_model
        self._cache = dict(lm.init_cache(self.max_batch, self.cache_len),
                           index=jnp.zeros((self.max_batch,), jnp.int32))
        self._last = np.zeros((self.max_batch,), np.int32)
        self._keys = jax.random.split(jax.random.key(0), self.max_batch)  # each slot's sampling key
        self._thread = threading.Thread(target=self._loop, name="llava-engine", daemon=True)
        self._thread.start()
        return self

    def check(self, prompt_len: int, params: SamplingParams) -> None:
        """Raises EngineError / ContextLengthError when a request cannot be served."""
        if not isinstance(params.max_tokens, int) or params.max_tokens < 1:
            raise EngineError(f"max_tokens must be a positive integer, got {params.max_tokens!r}")
        if params.max_tokens >= self.max_len:
            raise EngineError(f"max_tokens {params.max_tokens} is beyond this server's limit "
                              f"({self.max_len - 1}: the context is {self.max_len} tokens)")
        if prompt_len + params.max_tokens > self.max_len:
            raise ContextLengthError(f"the prompt has {prompt_len} tokens; with max_tokens {params.max_tokens} "
                                     f"that exceeds the context of {self.max_len} tokens")
        if not params.temperature >= 0.0:
            raise EngineError(f"temperature must be >= 0, got {params.temperature}")
        if not 0.0 < params.top_p <= 1.0:
            raise EngineError(f"top_p must be in (0, 1], got {params.top_p}")

    def submit(self, prompt_ids: Sequence[int], pixels: np.ndarray | None, params: SamplingParams,
               sink: Callable[[Any], None] | None = None) -> Request:
        """Queues a request (prompt ids with the image tokens expanded; pixels [H, W, 3] or None)."""
        if self._draining.is_set() or self._stop.is_set():
            raise ShuttingDownError("the server is shutting down and admits no new requests")
        if self.error is not None:
            raise RuntimeError(f"the engine stopped after an error: {self.error}")
        self.check(len(prompt_ids), params)
        stops = () if params.ignore_eos else tuple(self.template_stops) + tuple(params.stop)
        req = Request(prompt_ids, pixels, params, TextTracker(self.tokenizer, stops), stops, sink)
        self._pending.put(req)
        with self._wake:
            self._wake.notify()
        return req

    def active(self) -> int:
        """Requests holding a slot now."""
        return sum(s is not None for s in self._slots)

    def waiting(self) -> int:
        return self._pending.qsize()

    def drain(self) -> None:
        """Stops admitting new requests; those already submitted still finish."""
        self._draining.set()

    def stop(self, timeout: float | None = None) -> None:
        """Finishes the submitted requests, then stops the thread."""
        self._draining.set()
        self._stop.set()
        with self._wake:
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        try:
            while True:
                self._admit()
                if not any(self._slots):
                    if self._stop.is_set() and self._pending.empty():
                        return
                    with self._wake:
                        if self._pending.empty() and not self._stop.is_set():
                            self._wake.wait(0.5)
                    continue
                self._step()
        except BaseException as e:  # a bug: fail every open request instead of leaving clients waiting
            self.error = e
            for i, req in enumerate(self._slots):
                if req is not None:
                    self._finish(i, "error", error=f"{type(e).__name__}: {e}")
            while not self._pending.empty():
                req = self._pending.get_nowait()
                req.emit(FinishEvent("error", "", [], len(req.prompt_ids), error=str(e)))
            raise

    def _admit(self) -> None:
        for i in range(self.max_batch):
            req = self._slots[i]
            if req is not None and req.cancelled.is_set():
                self._finish(i, "cancelled")
        while not self._pending.empty() and None in self._slots:
            req = self._pending.get_nowait()
            if req.cancelled.is_set():
                self.finished["cancelled"] = self.finished.get("cancelled", 0) + 1
                req.emit(FinishEvent("cancelled", "", [], len(req.prompt_ids)))
                req.done.set()
                continue
            i = self._slots.index(None)
            p = req.params
            seed = p.seed if p.seed is not None else int(np.random.default_rng().integers(2**31))
            key, sub = jax.random.split(jax.random.key(seed))
            plen = _round_up(len(req.prompt_ids), self.bucket)
            ids, mask = left_pad([req.prompt_ids], self.pad_id, plen)
            pixels = None if req.pixels is None else jnp.asarray(req.pixels, jnp.float32)[None]
            self._cache, first = _prefill_into_slot(
                self.graphdef, self.state, self._cache, jnp.asarray(ids), jnp.asarray(mask), pixels,
                jnp.int32(i), jnp.float32(p.temperature), jnp.float32(p.top_p), sub)
            self._keys = self._keys.at[i].set(key)
            self._slots[i] = req
            self._accept(i, int(np.asarray(first)[0]))

    def _step(self) -> None:
        active = np.array([s is not None for s in self._slots])
        temps = np.array([r.params.temperature if r else 0.0 for r in self._slots], np.float32)
        top_p = np.array([r.params.top_p if r else 1.0 for r in self._slots], np.float32)
        self._cache, nxt, self._keys = _decode_step(
            self.graphdef, self.state, self._cache, jnp.asarray(self._last), jnp.asarray(active),
            jnp.asarray(temps), jnp.asarray(top_p), self._keys)
        self.steps += 1
        nxt = np.asarray(nxt)
        for i, req in enumerate(self._slots):
            if req is not None:
                self._accept(i, int(nxt[i]))

    def _accept(self, i: int, token: int) -> None:
        """Records slot i's new token, emits it and ends the request when it is done."""
        req = self._slots[i]
        req.tokens.append(token)
        self._last[i] = token
        reason = None
        if req.params.ignore_eos:
            reason = "length" if len(req.tokens) >= req.params.max_tokens else None
        elif token in self.eos_ids:
            reason = "stop"
        elif req.stops and any(s in self.tokenizer.decode(req.tokens, skip_special_tokens=False)
                               for s in req.stops):
            reason = "stop"  # generate's rule: the output ends with the token that completes a stop string
        elif len(req.tokens) >= req.params.max_tokens:
            reason = "length"
        if reason is None:
            req.emit(TokenEvent(token, req.tracker.delta(req.tokens)))
        else:
            req.emit(TokenEvent(token, ""))
            self._finish(i, reason)

    def _finish(self, i: int, reason: str, error: str | None = None) -> None:
        req = self._slots[i]
        self._slots[i] = None
        self.finished[reason] = self.finished.get(reason, 0) + 1
        text = req.tracker.final(req.tokens) if reason != "error" else ""
        rest = req.tracker.rest(req.tokens) if reason != "error" else ""
        req.emit(FinishEvent(reason, text, list(req.tokens), len(req.prompt_ids), rest, error))
        req.done.set()
