"""The x-ratelimit-* headers read as upstreams send them, and followed by the limiter."""

from __future__ import annotations

import logging
import uuid

import pytest
import redis

from api_tasks.execution.limits import Limiter
from api_tasks.record.keys import Keys
from api_tasks.upstream.rate_headers import Reported, reported
from config.settings import Limits
from tests.conftest import STATE_SHARDS


def test_openais_headers_are_read() -> None:
    said = reported({"X-RateLimit-Limit-Requests": "500", "x-ratelimit-limit-tokens": "30000",
                     "x-ratelimit-remaining-requests": "499",
                     "x-ratelimit-remaining-tokens": "29950",
                     "x-ratelimit-reset-requests": "120ms", "x-ratelimit-reset-tokens": "6m0s",
                     "content-type": "application/json"}, "u")
    assert said == Reported(500, 30000, 499, 29950, 0.12, 360.0)
    assert reported({"x-ratelimit-reset-tokens": "2"}, "u").reset_tokens == 2.0
    assert not reported({"content-type": "text/plain"}, "u").said


def test_nonsense_is_ignored_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    upstream = f"u{uuid.uuid4().hex[:6]}"
    bad = {"x-ratelimit-remaining-tokens": "lots", "x-ratelimit-limit-requests": "-5",
           "x-ratelimit-reset-tokens": "soon", "x-ratelimit-remaining-requests": "nan",
           "x-ratelimit-limit-tokens": "inf"}
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert reported(bad, upstream) == Reported()
    warned = [r for r in caplog.records if upstream in r.getMessage()]
    assert len(warned) == len(bad)  # once per header, not once per answer


def test_an_upstream_with_little_left_holds_every_workers_next_calls(
        redis_client: redis.Redis) -> None:
    keys = Keys(f"rh{uuid.uuid4().hex[:6]}", shards=STATE_SHARDS)
    limiter = Limiter(redis_client, keys, reserve_ahead=5.0, lease_ms=10_000)
    scopes = [("u", Limits(tokens_per_minute=60000, utilization=1.0, burst_seconds=1.0))]
    limiter.observe(scopes, Reported(remaining_tokens=0))  # the upstream is out
    held = limiter.admit("j1", scopes, 100)
    # an empty bucket: the call's own 100 tokens must come back first, at 1,000 a second
    assert 0.09 <= held.wait <= 0.15, held
    other = [("v", Limits(tokens_per_minute=60000, utilization=1.0, burst_seconds=1.0))]
    assert limiter.admit("k1", other, 100).wait == 0
    limiter.observe(other, Reported(remaining_tokens=5000))  # what it holds when idle
    assert limiter.admit("k2", other, 100).wait == 0
    # 1,000 less than that, 200 of it this scope's own: others spent 800 and more; the scope
    # waits as long as its pace takes to make the 1,000 up, so the reserve is not drawn down
    limiter.observe(other, Reported(remaining_tokens=4000))
    assert 0.09 <= limiter.admit("k3", other, 100).wait <= 0.15


def test_an_upstream_limit_below_the_configured_one_paces_the_scope(
        redis_client: redis.Redis) -> None:
    keys = Keys(f"rh{uuid.uuid4().hex[:6]}", shards=STATE_SHARDS)
    limiter = Limiter(redis_client, keys, reserve_ahead=5.0, lease_ms=10_000)
    scopes = [("u/m*", Limits(tokens_per_minute=600000, utilization=1.0, burst_seconds=0.1))]
    # the model's scope says 10,000 tokens a second; the upstream says 1,000 a second
    limiter.observe(scopes, Reported(limit_tokens=60000, remaining_tokens=0), "m1")
    assert 0.09 <= limiter.admit("j1", scopes, 100).wait <= 0.12  # 100 tokens at 1,000/s
    assert 0.19 <= limiter.admit("j2", scopes, 100).wait <= 0.22
    # it says its limit is back up: the configured pace stands again
    limiter.observe(scopes, Reported(limit_tokens=600000))
    assert limiter.admit("j3", scopes, 100).wait <= 0.23
    waits = [limiter.admit(f"k{i}", scopes, 100).wait for i in range(5)]
    assert waits[-1] - waits[0] <= 0.05  # 10 ms apart now, not 100
    # an upstream-wide scope may serve several models: it learns no model's limit
    wide = [("u", Limits(tokens_per_minute=600000, utilization=1.0, burst_seconds=0.1))]
    limiter.observe(wide, Reported(limit_tokens=60000), "m1")
    waits = [limiter.admit(f"w{i}", wide, 100).wait for i in range(5)]
    assert waits[-1] - waits[0] <= 0.05
