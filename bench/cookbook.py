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
    run = CookbookRun()
    retries: deque[_Request] = deque()
    pending = deque(_Request(i, body, cost(body)) for i, body in enumerate(bodies))
    local = threading.local()
    in_flight = [0]
    request_capacity, token_capacity, updated = rpm, tpm, time.monotonic()

    def call(request: _Request) -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        try:
            body = session.post(url, json=request.body, timeout=60).json()
        except (requests.RequestException, ValueError):
            body = {"error": {"message": "request failed"}}
        with run.lock:
            in_flight[0] -= 1
            error = body.get("error") if isinstance(body, dict) else None
            if error is None:
                run.results[request.index] = body
            elif "rate limit" in str(error.get("message", "")).lower():
                run.rate_limit_errors += 1
                run.last_rate_limit = time.monotonic()
                _retry(request, retries, run)
            else:
                _retry(request, retries, run)

    with ThreadPoolExecutor(threads) as pool:
        next_request: _Request | None = None
        while True:
            with run.lock:
                if next_request is None and retries:
                    next_request = retries.popleft()
                if next_request is None and pending:
                    next_request = pending.popleft()
                if next_request is None and not in_flight[0] and not retries:
                    break
            now = time.monotonic()
            request_capacity = min(request_capacity + rpm * (now - updated) / 60, rpm)
            token_capacity = min(token_capacity + tpm * (now - updated) / 60, tpm)
            updated = now
            if next_request and request_capacity >= 1 and token_capacity >= next_request.cost:
                request_capacity -= 1
                token_capacity -= next_request.cost
                next_request.attempts_left -= 1
                with run.lock:
                    in_flight[0] += 1
                pool.submit(call, next_request)
                next_request = None
            time.sleep(LOOP_SLEEP)
            paused = time.monotonic() - run.last_rate_limit
            if run.last_rate_limit and paused < PAUSE_AFTER_RATE_LIMIT:
                time.sleep(PAUSE_AFTER_RATE_LIMIT - paused)
    return run


def _retry(request: _Request, retries: deque[_Request], run: CookbookRun) -> None:
    if request.attempts_left:
        retries.append(request)
    else:
        run.given_up.append(request.index)
