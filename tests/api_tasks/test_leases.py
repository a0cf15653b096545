"""Lease renewal tells a takeover from this attempt's own end (real Redis, no Celery)."""

from __future__ import annotations

import time
import uuid

import redis

from api_tasks.keys import Keys
from api_tasks.leases import LeaseStore


def _store(redis_client: redis.Redis) -> tuple[LeaseStore, Keys, str]:
    keys = Keys(f"lease{uuid.uuid4().hex[:6]}")
    store = LeaseStore(redis_client, keys, queued_ttl=60, lease_ms=5000, max_crashes=3)
    job_id = uuid.uuid4().hex
    assert store.claim(job_id, "mine", {}, time.time()).verdict == "run"
    return store, keys, job_id


def test_a_held_lease_is_renewed(redis_client: redis.Redis) -> None:
    store, keys, job_id = _store(redis_client)
    redis_client.pexpire(keys.lease(job_id), 100)
    assert store.renew(redis_client, [(job_id, "mine", [])]) == []
    assert redis_client.pttl(keys.lease(job_id)) > 1000


def test_a_job_this_attempt_ended_or_parked_is_not_reported_lost(
        redis_client: redis.Redis) -> None:
    # the watchdog may renew in the moment between a job's last write and the end of its
    # call: that is no takeover, and warning about it would cry wolf
    for status in ("succeeded", "failed", "cancelled", "waiting"):
        store, keys, job_id = _store(redis_client)
        redis_client.hset(keys.job(job_id), "status", status)
        redis_client.hdel(keys.job(job_id), "token")
        assert store.renew(redis_client, [(job_id, "mine", [])]) == [], status


def test_a_job_taken_over_or_given_back_is_reported_lost(redis_client: redis.Redis) -> None:
    store, keys, job_id = _store(redis_client)
    redis_client.hset(keys.job(job_id), "token", "another")
    assert store.renew(redis_client, [(job_id, "mine", [])]) == [job_id]
    store, keys, job_id = _store(redis_client)  # the reaper gave its message back
    redis_client.hset(keys.job(job_id), "status", "queued")
    redis_client.hdel(keys.job(job_id), "token")
    assert store.renew(redis_client, [(job_id, "mine", [])]) == [job_id]
