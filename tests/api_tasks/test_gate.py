"""The gate in-process, against a real Redis: cool-downs and limits, waited here or outside."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from api_tasks.errors import RequestTooLarge
from api_tasks.execution.delivery import Delivery
from api_tasks.execution.gate import Gate, Park
from api_tasks.execution.limits import Cooldowns, Hold, Limiter
from api_tasks.record.keys import Keys
from api_tasks.record.leases import LeaseStore
from api_tasks.spec import JobSpec
from api_tasks.upstream.call_handle import CallHandle
from config.settings import Limits, Upstream
from tests.conftest import STATE_SHARDS

AHEAD = 0.3  # worker.reserve_ahead: waits up to this long happen in the worker


def _gate(client: redis.Redis) -> tuple[Gate, Cooldowns, Keys]:
    keys = Keys(f"gate{uuid.uuid4().hex[:6]}", shards=STATE_SHARDS)
    leases = LeaseStore(client, keys, queued_ttl=60, lease_ms=5000, max_crashes=3)
    cooldowns = Cooldowns(client, keys)
    return Gate(Limiter(client, keys, AHEAD, 5000), cooldowns, leases, AHEAD), cooldowns, keys


def _run(upstream: Upstream, cooldown: float = 0.0) -> tuple[Delivery, CallHandle]:
    job_id = uuid.uuid4().hex
    spec = JobSpec("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    run = Delivery(job_id, spec, upstream, 1, time.time(), "token", cooldown=cooldown)
    run.calls = 1
    return run, CallHandle(job_id, "token")


def test_a_long_cooldown_parks_the_job_and_a_short_one_is_waited_here(
        redis_client: redis.Redis) -> None:
    gate, _, _ = _gate(redis_client)
    upstream = Upstream(name="u", base_url="http://u.example")
    run, handle = _run(upstream, cooldown=5.0)
    with pytest.raises(Park) as parked:
        gate.cooldown(run, handle, "u", run.cooldown)
    assert parked.value.reason is Hold.COOLDOWN and parked.value.wait == 5.0
    run, handle = _run(upstream, cooldown=0.1)
    started = time.monotonic()
    gate.cooldown(run, handle, "u", run.cooldown)  # no Park: waited in the worker, then let through
    assert time.monotonic() - started >= 0.09


def test_a_rate_limit_lets_the_first_call_go_and_parks_the_next_with_its_turn_kept(
        redis_client: redis.Redis) -> None:
    gate, _, _ = _gate(redis_client)
    limits = Limits(requests_per_minute=60, utilization=1.0, burst_seconds=0.01)
    upstream = Upstream(name="u", base_url="http://u.example", limits=limits)
    scopes = upstream.limit_scopes("m")
    first, handle = _run(upstream)
    started = time.monotonic()
    gate.admit(first, handle, scopes, cost=0)
    assert time.monotonic() - started < 2  # no wait for the first (a Redis round trip)
    second, handle = _run(upstream)
    with pytest.raises(Park) as parked:
        gate.admit(second, handle, scopes, cost=0)
    # one request a second: its turn is about a second away, kept while it waits outside
    assert parked.value.reason is Hold.REQUESTS
    assert parked.value.turn is not None and 0.5 < parked.value.turn <= 1.05


def test_a_call_bigger_than_its_token_limit_fails_at_once(redis_client: redis.Redis) -> None:
    gate, _, _ = _gate(redis_client)
    upstream = Upstream(name="u", base_url="http://u.example",
                        limits=Limits(tokens_per_minute=100))
    run, handle = _run(upstream)
    with pytest.raises(RequestTooLarge, match="more than the tokens_per_minute of u"):
        gate.admit(run, handle, upstream.limit_scopes("m"), cost=500)


def test_a_call_under_its_group_and_its_key_gives_back_the_turn_one_kept_when_the_other_says_wait(
        redis_client: redis.Redis) -> None:
    """On a Redis Cluster's layout an upstream group's scope and a gateway key's own live on
    different slots, so they are admitted one after the other: a turn the upstream reserved
    for a call its key then refuses is given back, not lost to the calls behind it."""
    keys = Keys(f"both{uuid.uuid4().hex[:6]}", shards=4)
    assert keys.limit("u").split("}")[0] != keys.limit("key:k").split("}")[0]  # two hash tags
    limiter = Limiter(redis_client, keys, reserve_ahead=5.0, lease_ms=5000)
    paced = Limits(requests_per_minute=60, utilization=1.0, burst_seconds=0.01)
    scopes = [("u", paced), ("key:k", Limits(max_in_flight=1))]
    first = limiter.admit("job-a", scopes, cost=1)
    assert first.go and first.wait == 0.0
    refused = limiter.admit("job-b", scopes, cost=1)  # the upstream says 1 s; the key is full
    assert not refused.go and refused.reason is Hold.CONCURRENCY
    assert redis_client.zrange(keys.in_flight("key:k"), 0, -1) == [b"job-a"]
    limiter.settle("job-a", scopes, unused=0)
    again = limiter.admit("job-b", scopes, cost=1)
    # the turn a second from the first call is still free: had job-b's first turn been
    # kept, this one would be two seconds away
    assert again.go and 0.5 < again.wait <= 1.0, again
    assert redis_client.zrange(keys.in_flight("key:k"), 0, -1) == [b"job-b"]
