"""Client-side rate limiting for chat requests: even pacing under requests and tokens per minute."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def estimate_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Rough prompt size in tokens (about 4 characters per token plus per-message overhead), for rate limiting."""
    chars = 0
    for message in messages:
        content = message.get("content", "")
        chars += len(content) if isinstance(content, str) else len(json.dumps(content))
    return chars // 4 + 4 * len(messages) + 3



class _Reservation:
    __slots__ = ("entry",)

    def __init__(self, entry: list[float] | None):
        self.entry = entry


class RateLimiter:
    """Paces sends evenly under a requests-per-minute limit and keeps tokens under a tokens-per-minute limit.

    Requests: one send every 60 / (max_rpm * (1 - headroom)) s, and never more than max_rpm in any 60 s window.
    Tokens: the estimated tokens of sends in the last 60 s (corrected by `settle` once usage is known) plus the
    new request's estimate stay under max_tpm; a single request larger than max_tpm waits for an empty window.
    `pause(s)` holds every sender back (after a 429) and `slow_down()` stretches the interval a little.
    """

    window_s = 60.0

    def __init__(
        self,
        max_rpm: float | None,
        max_tpm: float | None,
        headroom: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ):
        self.max_rpm = max_rpm or 0
        self.max_tpm = max_tpm or 0
        self.interval = 60.0 / (self.max_rpm * (1.0 - headroom)) if self.max_rpm else 0.0
        self.base_interval = self.interval
        self.clock = clock
        self.sleep = sleep
        self.next_send = 0.0
        self.pause_until = 0.0
        self.sends: deque[float] = deque()
        self.tokens: deque[list[float]] = deque()
        self._lock = asyncio.Lock()

    def _purge(self, now: float) -> None:
        while self.sends and self.sends[0] <= now - self.window_s:
            self.sends.popleft()
        while self.tokens and self.tokens[0][0] <= now - self.window_s:
            self.tokens.popleft()

    def _wait_s(self, now: float, est_tokens: int) -> float:
        wait = max(0.0, self.next_send - now, self.pause_until - now)
        if self.max_rpm and len(self.sends) >= int(self.max_rpm):
            wait = max(wait, self.sends[len(self.sends) - int(self.max_rpm)] + self.window_s - now)
        if self.max_tpm and self.tokens:
            used = sum(t for _, t in self.tokens)
            if used + est_tokens > self.max_tpm:
                # Earliest moment enough old entries have left the window (or the window is empty).
                for when, amount in self.tokens:
                    used -= amount
                    if used + est_tokens <= self.max_tpm or used <= 0:
                        wait = max(wait, when + self.window_s - now)
                        break
        return wait

    async def acquire(self, est_tokens: int) -> _Reservation:
        """Waits until a request of about `est_tokens` tokens may be sent now, and records it."""
        async with self._lock:
            while True:
                now = self.clock()
                self._purge(now)
                wait = self._wait_s(now, est_tokens)
                if wait <= 0:
                    break
                await self.sleep(wait)
            if self.interval:
                # Keep to the planned schedule, recovering up to a tenth of an interval of lateness (timer jitter
                # on a busy host would otherwise slow the rate): consecutive sends are >= 0.9 interval apart and
                # no window of T seconds holds more than T / interval + 1.1 sends. After an idle spell (later
                # than a whole interval) the next send waits a full interval.
                late = now - self.next_send
                if late > self.interval:
                    self.next_send = now + self.interval
                else:
                    self.next_send = max(self.next_send + self.interval, now + 0.9 * self.interval)
            self.sends.append(now)
            entry = None
            if self.max_tpm:
                entry = [now, float(est_tokens)]
                self.tokens.append(entry)
            return _Reservation(entry)

    def settle(self, reservation: _Reservation, actual_tokens: int | None) -> None:
        """Replaces a reservation's estimate by the tokens the server reported (None keeps the estimate)."""
        if reservation.entry is not None and actual_tokens is not None:
            reservation.entry[1] = float(actual_tokens)

    def pause(self, seconds: float) -> None:
        """Holds every sender back for `seconds` from now."""
        self.pause_until = max(self.pause_until, self.clock() + seconds)

    def slow_down(self, factor: float = 1.02, most: float = 1.25) -> None:
        """After a 429: stretch the send interval by `factor`, up to `most` times the configured one (for
        servers that count over windows shorter than a minute, where arrival jitter can cross the limit)."""
        if self.interval:
            self.interval = min(self.interval * factor, self.base_interval * most)
