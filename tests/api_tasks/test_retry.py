"""Retry decisions are pure functions of the policy, the error and the attempt."""

import email.utils

import pytest

from api_tasks.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    InvalidResponseError,
    StreamError,
)
from api_tasks.upstream.retry import RetryPolicy, backoff_delay, parse_retry_after, retry_delay

POLICY = RetryPolicy(max_attempts=5, initial_delay=0.5, max_delay=4.0, jitter=0.25)


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504, 599])
def test_retryable_statuses(status: int) -> None:
    assert retry_delay(POLICY, APIStatusError("x", status=status), 1, 0.0) == 0.5


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 422])
def test_other_4xx_are_final(status: int) -> None:
    assert retry_delay(POLICY, APIStatusError("x", status=status), 1, 0.0) is None


def test_transport_errors_retry_and_bad_responses_do_not() -> None:
    assert retry_delay(POLICY, APITimeoutError("t"), 1, 0.0) is not None
    assert retry_delay(POLICY, APIConnectionError("c"), 1, 0.0) is not None
    assert retry_delay(POLICY, InvalidResponseError("i"), 1, 0.0) is None
    assert retry_delay(POLICY, StreamError("s"), 1, 0.0) is None


def test_never_after_chunks_were_published_or_past_the_last_attempt() -> None:
    error = APIStatusError("x", status=503)
    assert retry_delay(POLICY, error, 1, 0.0, chunks_published=1) is None
    assert retry_delay(POLICY, error, 5, 0.0) is None


def test_backoff_is_exponential_capped_and_jittered() -> None:
    assert [backoff_delay(POLICY, n, 0.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert backoff_delay(POLICY, 2, 0.999) == pytest.approx(0.75, rel=0.01)


def test_retry_after_wins_capped_by_the_policy() -> None:
    asked = APIStatusError("x", status=429, retry_after=7.0)
    assert retry_delay(POLICY, asked, 1, 0.0) == 7.0
    too_long = APIStatusError("x", status=429, retry_after=3600.0)
    assert retry_delay(POLICY, too_long, 1, 0.0) == POLICY.max_retry_after


def test_parse_retry_after_forms() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after({"retry-after-ms": "1500"}, now) == 1.5
    assert parse_retry_after({"Retry-After": "3"}, now) == 3.0
    date = email.utils.formatdate(now + 10, usegmt=True)
    assert parse_retry_after({"Retry-After": date}, now) == pytest.approx(10, abs=1)
    assert parse_retry_after({"Retry-After": "soon"}, now) is None
    assert parse_retry_after({}, now) is None
    assert parse_retry_after({"retry-after-ms": "x", "retry-after": "2"}, now) == 2.0


def test_openai_reset_headers_and_durations() -> None:
    from api_tasks.upstream.retry import parse_duration

    assert parse_duration("6m0s") == 360.0 and parse_duration("1.5s") == 1.5
    assert parse_duration("20ms") == pytest.approx(0.02) and parse_duration("1h2m") == 3720.0
    assert parse_duration("soon") is None and parse_duration("5") is None
    headers = {"x-ratelimit-reset-requests": "120ms", "x-ratelimit-reset-tokens": "2s"}
    assert parse_retry_after(headers, 0.0) == 2.0
    assert parse_retry_after({**headers, "Retry-After": "1"}, 0.0) == 1.0


def test_insufficient_quota_is_final() -> None:
    quota = APIStatusError("x", status=429, code="insufficient_quota", retry_after=1.0)
    assert retry_delay(POLICY, quota, 1, 0.0) is None
