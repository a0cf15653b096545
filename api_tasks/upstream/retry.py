"""Retry policy as data, decisions as pure functions.

Retries happen at this one layer (the worker's call loop), never also in
Celery or urllib3. Retried: connection errors, timeouts, 408, 409, 429 and
5xx; never another 4xx, and never a stream that already published chunks.
Waits grow exponentially, capped, with jitter; a server's ``retry-after-ms``
or ``Retry-After`` (seconds or an HTTP date) wins, capped at ``max_retry_after``.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from api_tasks.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    InvalidResponseError,
    StreamError,
    UpstreamError,
)

__all__ = ["Health", "RetryPolicy", "backoff_delay", "health", "key_refused", "parse_duration",
           "parse_retry_after", "retry_delay"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_RESET_HEADERS = ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts a call gets and how long to wait between them."""

    max_attempts: int = 3
    initial_delay: float = 0.5
    max_delay: float = 8.0
    jitter: float = 0.25
    max_retry_after: float = 60.0
    rate_limited_for: float = 3600.0


def backoff_delay(policy: RetryPolicy, attempt: int, rand: float) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based); ``rand`` in [0, 1)."""
    base = min(policy.initial_delay * 2.0 ** (attempt - 1), policy.max_delay)
    return base * (1 - policy.jitter * rand)


def parse_duration(text: str) -> float | None:
    """Seconds in an OpenAI-style duration such as ``6m0s``, ``1.5s`` or ``20ms``."""
    parts = _DURATION.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    return sum(float(number) * _UNIT[unit] for number, unit in parts)


def parse_retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms``, ``Retry-After`` (seconds
    or an HTTP date), else the longest ``x-ratelimit-reset-*`` (OpenAI sends those)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    asked = _retry_after(lowered, now)
    if asked is not None:
        return asked
    resets = [parse_duration(lowered[name]) for name in _RESET_HEADERS if name in lowered]
    known = [seconds for seconds in resets if seconds is not None]
    return max(known) if known else None


def _retry_after(lowered: Mapping[str, str], now: float) -> float | None:
    millis = lowered.get("retry-after-ms")
    if millis is not None:
        try:
            return max(float(millis) / 1000.0, 0.0)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - now, 0.0)


def retry_delay(
    policy: RetryPolicy,
    error: UpstreamError,
    attempt: int,
    rand: float,
    chunks_published: int = 0,
) -> float | None:
    """Seconds to wait before the next attempt, or ``None`` when the error is final."""
    if not error.retryable or chunks_published > 0 or attempt >= policy.max_attempts:
        return None
    if error.retry_after is not None:
        # the server knows best, but a job never sleeps longer than the policy allows
        return min(error.retry_after, policy.max_retry_after)
    return backoff_delay(policy, attempt, rand)


class Health(StrEnum):
    """What one call says of its deployment, for the circuit breaker."""

    OK = "ok"  # it answered (even an error of the caller's, or a 429)
    FAILED = "failed"  # no answer, too slow, a 5xx, or a broken answer
    UNKNOWN = ""  # the call was stopped, or never went out


def health(error: UpstreamError | None) -> Health:
    """The breaker's verdict on a call that ended with ``error`` (None: it succeeded)."""
    if error is None:
        return Health.OK
    if isinstance(error, APIStatusError):
        return Health.FAILED if (error.status or 0) >= 500 else Health.OK
    if isinstance(error, (APIConnectionError, APITimeoutError, InvalidResponseError,
                          StreamError)):
        return Health.FAILED
    return Health.UNKNOWN


def key_refused(error: UpstreamError) -> bool:
    """Whether the upstream refused the key itself (401, 403, out of quota): final for one
    server, but a deployment with a key of its own may answer."""
    return isinstance(error, APIStatusError) and (
        error.status in (401, 403) or error.code == "insufficient_quota")
