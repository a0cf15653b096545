"""The admission script's line rules, against a real Redis without Celery."""

from __future__ import annotations

import uuid

import redis

from api_tasks.execution.limits import Limiter
from api_tasks.record.keys import Keys
from config.settings import Limits
from tests.conftest import STATE_SHARDS

ONE_A_SECOND = Limits(requests_per_minute=60, burst_seconds=1, utilization=1.0)
# slow refills (a call every 6 s, a token every 60 ms): no answer below hangs on the clock
TEN_A_MINUTE = Limits(requests_per_minute=10, burst_seconds=60, utilization=1.0)  # 10 in burst
THOUSAND_TOKENS = Limits(tokens_per_minute=1000, burst_seconds=60, utilization=1.0)
BULK = 0.05  # a bulk job books at most this far ahead (reserve_ahead)


def _limiter(redis_client: redis.Redis) -> tuple[Limiter, Keys]:
    keys = Keys(f"line{uuid.uuid4().hex[:6]}", shards=STATE_SHARDS)
    return Limiter(redis_client, keys, reserve_ahead=BULK, lease_ms=5000), keys


def _spend(limiter: Limiter, scopes: list[tuple[str, Limits]], calls: int) -> None:
    for i in range(calls):
        assert limiter.admit(f"x{i}", scopes, 1).go


def test_a_job_behind_older_ones_waits_while_budget_is_short(redis_client: redis.Redis) -> None:
    limiter, _ = _limiter(redis_client)
    scopes = [("u", TEN_A_MINUTE)]
    _spend(limiter, scopes, 10)  # the burst is gone: the next turn is 6 s away
    old = limiter.admit("old", scopes, 1, horizon=BULK, place=1.0)
    new = limiter.admit("new", scopes, 1, horizon=BULK, place=2.0)
    assert not old.go and not new.go
    assert new.wait > old.wait  # it counts the older job ahead of it


def test_budget_free_now_goes_to_a_newer_job_but_a_call_is_kept_for_the_head(
        redis_client: redis.Redis) -> None:
    limiter, keys = _limiter(redis_client)
    scopes = [("u", TEN_A_MINUTE)]
    _spend(limiter, scopes, 10)
    assert not limiter.admit("old", scopes, 1, horizon=BULK, place=1.0).go  # in line
    redis_client.hset(keys.limit("u"), "req", "0")  # a lull: the bucket is full again
    # 10 calls free: newer jobs take all but one, unused they would be lost
    taken = [limiter.admit(f"new{i}", scopes, 1, horizon=BULK, place=2.0 + i).go
             for i in range(10)]
    assert taken == [True] * 9 + [False]
    assert limiter.admit("old", scopes, 1, horizon=BULK, place=1.0).go  # the head's call


def test_newer_small_calls_leave_a_big_head_of_the_line_room_for_its_tokens(
        redis_client: redis.Redis) -> None:
    limiter, keys = _limiter(redis_client)
    scopes = [("u", THOUSAND_TOKENS)]
    _spend(limiter, scopes, 1)  # one 1-token call; then 999 of 1,000 are reserved below
    assert limiter.admit("filler", scopes, 999).go
    assert not limiter.admit("old", scopes, 500, horizon=BULK, place=1.0).go  # in line
    redis_client.hset(keys.limit("u"), "tok", "0")  # a lull: 1,000 tokens free
    taken = [limiter.admit(f"new{i}", scopes, 100, horizon=BULK, place=2.0 + i).go
             for i in range(10)]
    assert taken == [True] * 5 + [False] * 5  # 500 are kept for the head, not just 100
    assert limiter.admit("old", scopes, 500, horizon=BULK, place=1.0).go


def test_a_job_that_must_wait_in_one_scope_takes_no_turn_ahead_of_older_jobs_in_another(
        redis_client: redis.Redis) -> None:
    limiter, keys = _limiter(redis_client)
    upstream, model = ("u", TEN_A_MINUTE), ("u/m*", ONE_A_SECOND)  # its model scope
    _spend(limiter, [upstream], 10)
    assert not limiter.admit("old", [upstream], 1, horizon=BULK, place=1.0).go
    redis_client.hset(keys.limit("u"), "req", "0")  # the upstream has budget free now
    assert limiter.admit("first", [model], 1).go  # the model's one call a second is spent
    before = redis_client.hget(keys.limit("u"), "req")
    # its turn under the model is 1 s away, near enough to book: not past older jobs
    answer = limiter.admit("new", [upstream, model], 1, horizon=2.0, place=2.0)
    assert not answer.go and answer.reason == "requests"
    assert redis_client.hget(keys.limit("u"), "req") == before  # nothing booked upstream
    assert redis_client.zscore(keys.line("u"), "new") == 2000  # it waits in both lines
    assert redis_client.zscore(keys.line("u/m*"), "new") == 2000
