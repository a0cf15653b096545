"""Lease renewal tells a takeover from this attempt's own end (real Redis, no Celery)."""

from __future__ import annotations

import time
import uuid

import redis

from api_tasks.record.calls import SyncShell
from api_tasks.record.keys import Keys
from api_tasks.record.leases import _DEFER_MARGIN_MS, LeaseStore, Parked, Requeue
from api_tasks.record.scripts import script
from tests.conftest import STATE_SHARDS

MESSAGE = '{"task": "t"}'


def _store(redis_client: redis.Redis) -> tuple[LeaseStore, Keys, str]:
    keys = Keys(f"lease{uuid.uuid4().hex[:6]}", shards=STATE_SHARDS)
    store = LeaseStore(redis_client, keys, queued_ttl=60, lease_ms=5000, max_crashes=3)
    job_id = uuid.uuid4().hex
    assert store.claim(job_id, "mine", {}, time.time()).verdict == "run"
    return store, keys, job_id


def _redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def _lapse(client: redis.Redis, keys: Keys, job_id: str) -> None:
    """Its worker died: the lease beside its token lapsed."""
    client.hset(keys.job(job_id), "lease_until", _redis_ms(client) - 1)


def _lapsed_long_ago(client: redis.Redis, keys: Keys, job_id: str, lease_ms: int) -> None:
    """Its worker died a while ago: its lease lapsed, and a sweep saw it so a lease period
    ago."""
    now = _redis_ms(client)
    client.hset(keys.job(job_id), mapping={"lease_until": now - 2 * lease_ms,
                                           "lapse_seen": now - lease_ms - 1})


def test_a_held_lease_is_renewed(redis_client: redis.Redis) -> None:
    store, keys, job_id = _store(redis_client)
    _lapse(redis_client, keys, job_id)  # while Redis was away
    assert not store.held(job_id)
    assert store.renew(SyncShell(redis_client), [(job_id, "mine", [])]) == []
    assert store.held(job_id)
    [until] = redis_client.hmget(keys.job(job_id), "lease_until")
    assert int(until) - _redis_ms(redis_client) > 4000


def _finish(client: redis.Redis, store: LeaseStore, job_id: str, token: str) -> str:
    command = store.finish_command(job_id, token, 60, "{}", "1-1", None, ["status", "succeeded"])
    client.script_load(script("finish"))  # by its SHA1: the writer sends it whole if need be
    return client.execute_command(*command).decode()


def test_a_job_this_attempt_just_ended_parked_or_released_is_not_lost(
        redis_client: redis.Redis) -> None:
    # the watchdog may renew in the moment between a job's last write and the end of its
    # call: that is no takeover, and warning about it would cry wolf
    store, _, job_id = _store(redis_client)
    assert _finish(redis_client, store, job_id, "mine") == "ok"
    assert store.renew(SyncShell(redis_client), [(job_id, "mine", [])]) == []
    store, _, job_id = _store(redis_client)
    assert store.park(job_id, "mine", 5.0, "requests", '{"task": "t"}')
    assert store.renew(SyncShell(redis_client), [(job_id, "mine", [])]) == []
    store, _, job_id = _store(redis_client)
    assert store.release(job_id, "mine")
    assert store.renew(SyncShell(redis_client), [(job_id, "mine", [])]) == []


def test_a_job_another_attempt_took_is_lost_whatever_it_did_with_it(
        redis_client: redis.Redis) -> None:
    store, keys, job_id = _store(redis_client)
    redis_client.hset(keys.job(job_id), "token", "another")  # claimed again
    assert store.renew(SyncShell(redis_client), [(job_id, "mine", [])]) == [(job_id, "mine")]
    assert store.park(job_id, "another", 5.0, "requests", '{"task": "t"}')  # ... and parked
    assert store.renew(SyncShell(redis_client), [(job_id, "mine", [])]) == [(job_id, "mine")]
    store, keys, job_id = _store(redis_client)
    redis_client.hset(keys.job(job_id), "token", "another")
    assert _finish(redis_client, store, job_id, "another") == "ok"  # ... and finished
    assert store.renew(SyncShell(redis_client), [(job_id, "mine", [])]) == [(job_id, "mine")]


def test_only_the_attempt_that_lost_its_job_is_lost(redis_client: redis.Redis) -> None:
    """A job given back and delivered again to the same process has two attempts there: the
    old one is told it lost the job, the new one holds it."""
    store, keys, job_id = _store(redis_client)
    _lapsed_long_ago(redis_client, keys, job_id, store.lease_ms)
    assert store.restore(job_id) is Requeue.RESTORED  # as the reaper does after an outage
    assert store.claim(job_id, "new", {}, time.time()).verdict == "run"
    assert store.renew(SyncShell(redis_client), [(job_id, "mine", []), (job_id, "new", [])]) \
        == [(job_id, "mine")]


def test_a_job_given_back_or_gone_is_lost(redis_client: redis.Redis) -> None:
    store, keys, job_id = _store(redis_client)  # the reaper gave its message back
    redis_client.hset(keys.job(job_id), "status", "queued")
    redis_client.hdel(keys.job(job_id), "token")
    assert store.renew(SyncShell(redis_client), [(job_id, "mine", [])]) == [(job_id, "mine")]
    store, keys, job_id = _store(redis_client)  # its record expired or was deleted
    redis_client.delete(keys.job(job_id))
    assert store.renew(SyncShell(redis_client), [(job_id, "mine", [])]) == [(job_id, "mine")]


def test_a_job_cancelled_before_it_parks_is_not_parked(redis_client: redis.Redis) -> None:
    store, keys, job_id = _store(redis_client)
    redis_client.set(keys.cancel(job_id), "1")
    assert store.park(job_id, "mine", 5.0, "requests", '{"task": "t"}') is Parked.CANCELLED
    assert redis_client.zscore(keys.delayed(0), job_id) is None  # its worker ends it instead


def test_a_dead_workers_job_is_taken_back_by_what_its_record_says(
        redis_client: redis.Redis) -> None:
    """Running: queued again, its message to go back (a crash counted); parked for a limit:
    left to the delayed set (its old message would skip the wait); ended: dropped."""
    store, keys, job_id = _store(redis_client)
    _lapsed_long_ago(redis_client, keys, job_id, store.lease_ms)
    assert store.restore(job_id) is Requeue.RESTORED
    assert redis_client.hget(keys.job(job_id), "status") == b"queued"
    assert redis_client.hget(keys.job(job_id), "crashes") == b"1"
    assert redis_client.hmget(keys.job(job_id), "token", "lease_until", "lapse_seen") == [
        None, None, None]
    assert not redis_client.zscore(keys.running(0), job_id)
    redis_client.hset(keys.job(job_id), "status", "waiting")
    assert store.restore(job_id) is Requeue.WAITING
    redis_client.hset(keys.job(job_id), "status", "succeeded")
    assert store.restore(job_id) is Requeue.ENDED
    redis_client.hset(keys.job(job_id), mapping={"token": "other",
                                                 "lease_until": _redis_ms(redis_client) + 5000})
    assert store.restore(job_id) is Requeue.ALIVE


def test_a_lapsed_lease_is_left_to_its_worker_a_lease_period_whoever_sweeps(
        redis_client: redis.Redis) -> None:
    """After an outage every lease on the shard has lapsed, while the workers that run those
    jobs are about to renew them: a sweep notes the lapse in the record and takes the job only
    a lease period later, and a sweep of another process (the role moved) reads the same
    note."""
    store, keys, job_id = _store(redis_client)
    _lapse(redis_client, keys, job_id)
    assert store.restore(job_id) is Requeue.LAPSING
    seen = redis_client.hget(keys.job(job_id), "lapse_seen")
    assert seen is not None and redis_client.hget(keys.job(job_id), "status") == b"running"
    heir = LeaseStore(redis_client, keys, queued_ttl=60, lease_ms=store.lease_ms, max_crashes=3)
    assert heir.restore(job_id) is Requeue.LAPSING
    assert redis_client.hget(keys.job(job_id), "lapse_seen") == seen  # the first sight counts
    shard = keys.shard(job_id)
    redis_client.zadd(keys.running(shard), {job_id: 1})
    assert heir.recover(shard, 10) == []  # the backstop waits as long
    assert redis_client.zscore(keys.running(shard), job_id) == 1
    # its worker renews: the job is its own again, and a later lapse is a new one
    assert store.renew(SyncShell(redis_client), [(job_id, "mine", [])]) == []
    assert heir.restore(job_id) is Requeue.ALIVE
    _lapse(redis_client, keys, job_id)
    assert heir.restore(job_id) is Requeue.LAPSING
    again, lapsed_at = redis_client.hmget(keys.job(job_id), "lapse_seen", "lease_until")
    assert int(again or 0) >= int(lapsed_at or 1 << 62)  # noted anew: after the new lapse
    # no renewal for a lease period after the sweep saw it: its worker is gone
    _lapsed_long_ago(redis_client, keys, job_id, store.lease_ms)
    assert heir.restore(job_id) is Requeue.RESTORED
    assert redis_client.hget(keys.job(job_id), "crashes") == b"1"


def test_a_delivery_leaves_a_lately_lapsed_lease_to_its_worker_and_comes_back_after(
        redis_client: redis.Redis) -> None:
    """A second delivery of a running job whose lease lapsed lately (an outage) does not take
    it: its claim defers it to when its worker's time to renew it is over (counted from the
    first sight of the lapse, its own or an earlier one); then it claims it. With no message
    to keep, the claim only says busy."""
    store, keys, job_id = _store(redis_client)
    shard, wait = keys.shard(job_id), store.lease_ms + _DEFER_MARGIN_MS
    _lapse(redis_client, keys, job_id)
    assert store.claim(job_id, "second", {}, time.time()).verdict == "busy"
    assert redis_client.zscore(keys.delayed(shard), job_id) is None
    # this claim is the first to see the lapse: the wait counts from now
    redis_client.hdel(keys.job(job_id), "lapse_seen")
    assert store.claim(job_id, "second", {}, time.time(), message=MESSAGE).verdict == "deferred"
    seen = int(redis_client.hget(keys.job(job_id), "lapse_seen") or 0)
    assert seen and redis_client.zscore(keys.delayed(shard), job_id) == seen + wait
    assert redis_client.hget(keys.delayed_messages(shard), job_id) == MESSAGE.encode()
    # lapsed three seconds ago, seen two seconds ago by another: the wait counts from then
    earlier = _redis_ms(redis_client) - 2000
    redis_client.hset(keys.job(job_id), mapping={"lease_until": earlier - 1000,
                                                 "lapse_seen": earlier})
    assert store.claim(job_id, "third", {}, time.time(), message=MESSAGE).verdict == "deferred"
    assert redis_client.zscore(keys.delayed(shard), job_id) == earlier + wait
    # its worker is gone: once the wait is over, a delivery claims it
    _lapsed_long_ago(redis_client, keys, job_id, store.lease_ms)
    assert store.claim(job_id, "second", {}, time.time(), message=MESSAGE).verdict == "run"
    assert store.held(job_id)


def test_a_delivery_of_a_job_another_attempt_holds_waits_for_that_lease(
        redis_client: redis.Redis) -> None:
    """A claim that finds the lease held defers its message to just after that lease would
    lapse, in the same step, and wakes the scheduler: no delivery of it is ever dropped. The
    first message kept stays; a later delivery moves the wait to the lease's new end."""
    store, keys, job_id = _store(redis_client)
    shard = keys.shard(job_id)
    redis_client.delete(keys.delayed_wake())
    lease_until = _redis_ms(redis_client) + 1500
    redis_client.hset(keys.job(job_id), "lease_until", lease_until)
    assert store.claim(job_id, "second", {}, time.time(), message=MESSAGE).verdict == "deferred"
    assert redis_client.zscore(keys.delayed(shard), job_id) == lease_until + _DEFER_MARGIN_MS
    assert redis_client.llen(keys.delayed_wake()) == 1
    # the holder renews: a later delivery moves the wait along, the first message kept
    assert store.renew(SyncShell(redis_client), [(job_id, "mine", [])]) == []
    renewed = int(redis_client.hget(keys.job(job_id), "lease_until") or 0)
    assert renewed > lease_until
    assert store.claim(job_id, "third", {}, time.time(),
                       message='{"task": "other"}').verdict == "deferred"
    assert redis_client.zscore(keys.delayed(shard), job_id) == renewed + _DEFER_MARGIN_MS
    assert redis_client.hget(keys.delayed_messages(shard), job_id) == MESSAGE.encode()
    assert redis_client.ttl(keys.delayed(shard)) > 0
    assert redis_client.ttl(keys.delayed_messages(shard)) > 0


def test_a_deferral_made_while_the_scheduler_sends_the_same_job_is_kept(
        redis_client: redis.Redis) -> None:
    """The scheduler holds a due job while it sends it, then drops the entry; the message it
    sent may meet a lapse just seen and be deferred before that: the deferral stays."""
    store, keys, job_id = _store(redis_client)
    shard = keys.shard(job_id)
    # a second delivery, while the lease holds
    assert store.claim(job_id, "second", {}, time.time(), message=MESSAGE).verdict == "deferred"
    redis_client.zadd(keys.delayed(shard), {job_id: 1})  # ... now due
    _lapse(redis_client, keys, job_id)
    [(due_id, _, held)], _ = store.due(shard)
    assert due_id == job_id
    # the message it sends meets the lapse, seen just now: deferred again
    assert store.claim(job_id, "second", {}, time.time(), message=MESSAGE).verdict == "deferred"
    store.sent(job_id, held)
    again = redis_client.zscore(keys.delayed(shard), job_id)
    assert again is not None and again != float(held)
    assert redis_client.hexists(keys.delayed_messages(shard), job_id)


def test_the_running_index_forgets_a_job_with_nothing_to_send_again(
        redis_client: redis.Redis) -> None:
    """A job in the running index whose record is gone, or whose claim kept no message, is
    dropped from it, not a failed sweep."""
    store, keys, job_id = _store(redis_client)  # claimed with no message kept
    _lapsed_long_ago(redis_client, keys, job_id, store.lease_ms)
    shard = keys.shard(job_id)
    expired = next(other for other in (uuid.uuid4().hex for _ in range(1000))
                   if keys.shard(other) == shard)  # a job of the same shard, long gone
    redis_client.zadd(keys.running(shard), {job_id: 1, expired: 1})
    assert store.recover(shard, 10) == []
    assert redis_client.zcard(keys.running(shard)) == 0


def test_a_claim_retried_after_a_lost_reply_gets_the_first_ones_answer(
        redis_client: redis.Redis) -> None:
    """A worker that lost a claim's reply (a failover) claims again with the same token: it
    must not run a job the first claim found cancelled or poisonous, nor lose its turn."""
    keys = Keys(f"lease{uuid.uuid4().hex[:6]}", shards=STATE_SHARDS)
    store = LeaseStore(redis_client, keys, queued_ttl=60, lease_ms=5000, max_crashes=3)
    cancelled, poisonous, parked = (uuid.uuid4().hex for _ in range(3))
    redis_client.set(keys.cancel(cancelled), "1")
    redis_client.hset(keys.job(poisonous), mapping={"status": "queued", "crashes": 3})
    redis_client.hset(keys.job(parked), mapping={
        "status": "queued", "turn_at": int(time.time() * 1000) + 60_000,
        "turn_on": '["dep", "m"]'})
    for job_id, verdict in ((cancelled, "cancel"), (poisonous, "poison"), (parked, "run")):
        first = store.claim(job_id, "mine", {}, time.time())
        again = store.claim(job_id, "mine", {}, time.time())
        assert first.verdict == verdict and again == first
    assert first.turn is not None and first.turn_on == ("dep", "m")  # the turn it reserved
    # and a claim by another attempt still finds the job held
    assert store.claim(parked, "other", {}, time.time()).verdict == "busy"


def test_a_claim_keeps_its_lease_in_the_record_and_its_message_beside_it(
        redis_client: redis.Redis) -> None:
    """While it runs the record holds its token and lease (hidden from callers), and its
    message is kept beside it (the record stays a compact listpack); the end drops them, and
    its final event follows whatever its stream holds."""
    keys = Keys(f"lease{uuid.uuid4().hex[:6]}", shards=STATE_SHARDS)
    store = LeaseStore(redis_client, keys, queued_ttl=60, lease_ms=5000, max_crashes=3)
    job_id = uuid.uuid4().hex
    assert store.claim(job_id, "mine", {}, time.time(), message='{"task": "t"}').verdict == "run"
    token, until = redis_client.hmget(keys.job(job_id), "token", "lease_until")
    assert token == b"mine"
    shard = keys.shard(job_id)
    assert redis_client.hget(keys.running_messages(shard), job_id) == b'{"task": "t"}'
    assert redis_client.object("encoding", keys.job(job_id)) == b"listpack"
    assert 4000 < int(until) - _redis_ms(redis_client) <= 5000
    assert redis_client.zscore(keys.running(shard), job_id) == int(until)
    assert 0 < redis_client.ttl(keys.job(job_id)) <= 60
    assert store.claim(job_id, "other", {}, time.time()).verdict == "busy"
    redis_client.xadd(keys.events(job_id), {"event": "{}"}, id="1-5")  # chunks went ahead
    assert _finish(redis_client, store, job_id, "mine") == "ok"  # it wanted 1-1
    assert [entry_id for entry_id, _ in redis_client.xrange(keys.events(job_id))] == [
        b"1-5", b"1-6"]
    assert redis_client.hmget(keys.job(job_id), "token", "lease_until") == [None, None]
    assert redis_client.hget(keys.running_messages(shard), job_id) is None
    assert not store.held(job_id)
    assert redis_client.zscore(keys.running(shard), job_id) is None
