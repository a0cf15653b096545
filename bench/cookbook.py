"""The OpenAI cookbook's bulk approach, for comparison: its budgeting, reimplemented.

``api_request_parallel_processor.py`` (openai-cookbook, examples/) runs one
process against one rate limit like this, and so does this module, on threads
instead of asyncio (the budgeting is what is compared, not the event loop):

- request and token capacities start full (a whole minute's budget) and refill
  linearly at the limit per minute, capped at a minute's worth;
- a request goes when both capacities cover it (one request, its estimated
  tokens: prompt plus ``max_tokens`` times ``n``), with no cap on calls in flight;
- after a rate-limit error every send pauses until 15 s after that error, and
  the request is retried, at most 5 attempts in all; then it is given up.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests

__all__ = ["CookbookRun", "run_cookbook"]

PAUSE_AFTER_RATE_LIMIT = 15.0
MAX_ATTEMPTS = 5
LOOP_SLEEP = 0.001


@dataclass
class CookbookRun:
    """What came back: responses by request index, and the counts it keeps."""

    results: dict[int, Any] = field(default_factory=dict)
    given_up: list[int] = field(default_factory=list)
    rate_limit_errors: int = 0
    last_rate_limit: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Request:
    index: int
    body: dict[str, Any]
    cost: int
    attempts_left: int = MAX_ATTEMPTS


def run_cookbook(url: str, bodies: list[dict[str, Any]], rpm: float, tpm: float,
                 cost: Callable[[dict[str, Any]], int], threads: int = 256) -> CookbookRun:
    """Send every body to ``url`` the cookbook's way; returns when all are done or given up."""
    processor = _Processor(url, rpm, tpm)
    processor.pending.extend(_Request(i, body, cost(body)) for i, body in enumerate(bodies))
    with ThreadPoolExecutor(threads) as pool:
        processor.loop(pool)
    return processor.run


class _Processor:
    """The cookbook's main loop and its status tracker."""

    def __init__(self, url: str, rpm: float, tpm: float) -> None:
        self.url, self.rpm, self.tpm = url, rpm, tpm
        self.run = CookbookRun()
        self.pending: deque[_Request] = deque()
        self.retries: deque[_Request] = deque()
        self.in_flight = 0
        self.capacity = [rpm, tpm]  # requests, tokens: a whole minute's worth at the start
        self.updated = time.monotonic()
        self.local = threading.local()

    def loop(self, pool: ThreadPoolExecutor) -> None:
        upcoming: _Request | None = None
        while True:
            with self.run.lock:
                upcoming = upcoming or (self.retries.popleft() if self.retries else None)
                upcoming = upcoming or (self.pending.popleft() if self.pending else None)
                if upcoming is None and not self.in_flight and not self.retries:
                    return
            self._refill()
            if upcoming and self.capacity[0] >= 1 and self.capacity[1] >= upcoming.cost:
                self.capacity[0] -= 1
                self.capacity[1] -= upcoming.cost
                upcoming.attempts_left -= 1
                with self.run.lock:
                    self.in_flight += 1
                pool.submit(self._call, upcoming)
                upcoming = None
            time.sleep(LOOP_SLEEP)
            self._cool_down()

    def _refill(self) -> None:
        now = time.monotonic()
        elapsed, self.updated = now - self.updated, now
        self.capacity = [min(self.capacity[0] + self.rpm * elapsed / 60, self.rpm),
                         min(self.capacity[1] + self.tpm * elapsed / 60, self.tpm)]

    def _cool_down(self) -> None:
        since = time.monotonic() - self.run.last_rate_limit
        if self.run.last_rate_limit and since < PAUSE_AFTER_RATE_LIMIT:
            time.sleep(PAUSE_AFTER_RATE_LIMIT - since)

    def _call(self, request: _Request) -> None:
        session = getattr(self.local, "session", None) or requests.Session()
        self.local.session = session
        try:
            body = session.post(self.url, json=request.body, timeout=60).json()
        except (requests.RequestException, ValueError):
            body = {"error": {"message": "request failed"}}
        error = body.get("error") if isinstance(body, dict) else {"message": "not an object"}
        with self.run.lock:
            self.in_flight -= 1
            if error is None:
                self.run.results[request.index] = body
                return
            if "rate limit" in str(error.get("message", "")).lower():
                self.run.rate_limit_errors += 1
                self.run.last_rate_limit = time.monotonic()
            if request.attempts_left:
                self.retries.append(request)
            else:
                self.run.given_up.append(request.index)
