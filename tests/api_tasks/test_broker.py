"""The task message producers build themselves equals the one Celery's ``send_task`` sends."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections import Counter
from typing import Any, cast

import pytest
import redis

from api_tasks.broker import create_app, task_message
from api_tasks.client import Client
from api_tasks.record.keys import Keys
from api_tasks.record.leases import LeaseStore
from api_tasks.record.scripts import script
from config.loader import load_settings
from config.settings import Settings
from tests.conftest import STATE_APART
from tests.support.services import wait_until

pytestmark = pytest.mark.integration
USER = [{"role": "user", "content": "Hello"}]

# what may differ: kombu's per-message tag, Celery's reply queue (no result backend reads it)
# and the reprs Celery copies into the properties too (they are the headers' own)
_PER_SENDER = {"delivery_tag", "reply_to", "argsrepr", "kwargsrepr"}


def _decoded(raw: bytes) -> dict[str, Any]:
    message = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    for name in _PER_SENDER:
        message["properties"].pop(name, None)
    return message


@pytest.mark.parametrize("kwargs", [
    {"model": "m", "temperature": 0.5, "max_tokens": 7},
    {"model": "m", "seed": 2**70, "stop": ["é", "\u2028"], "metadata": {"1": [None, True]}},
])
def test_our_message_is_celerys(settings: Settings, broker_client: redis.Redis,
                                kwargs: dict[str, Any]) -> None:
    keys = Keys(f"msg{uuid.uuid4().hex[:6]}")
    own = settings.model_copy(update={"redis": settings.redis.model_copy(
        update={"prefix": keys.prefix})})
    app = create_app(own)
    args = [[{"role": "user", "content": "hé \U0001f600"}]]
    try:
        task_id = str(uuid.uuid4())
        app.send_task("api_tasks.chat", args=args, kwargs=kwargs, task_id=task_id,
                      queue="bulk", argsrepr="(job)", kwargsrepr="(job)")
    finally:
        app.close()
    [celerys] = broker_client.lrange(keys.queue("bulk"), 0, -1)
    ours = task_message("api_tasks.chat", args, kwargs, task_id, "bulk")
    assert _decoded(ours) == _decoded(celerys)
    assert json.loads(ours)["properties"]["delivery_tag"] != json.loads(
        task_message("api_tasks.chat", args, kwargs, task_id, "bulk"))["properties"]["delivery_tag"]
    broker_client.delete(*broker_client.keys(f"{keys.prefix}:*"))


def test_a_sentinel_url_gives_the_broker_every_sentinel_and_keeps_the_transport() -> None:
    settings = load_settings(env={"REDIS_URL": "sentinel://:pw@s1:1,s2:2/main/4"
                                               "?sentinel_password=sp"})
    app = create_app(settings)
    options = app.conf.broker_transport_options
    assert app.conf.broker_transport == "worker.transport:SentinelTransport"
    # one URL: kombu would switch to its own transport when failing over to a second one
    assert app.conf.broker_url == "sentinel://:pw@s1:1/4"
    assert options["sentinels"] == [["s1", 1], ["s2", 2]] and options["master_name"] == "main"
    assert options["sentinel_kwargs"]["password"] == "sp"
    assert "pw" not in app.connection_for_write().as_uri()  # Celery's banner masks it


def test_no_sentinel_answering_is_said_in_a_line() -> None:
    import redis.sentinel

    from api_tasks.connections import reason
    from tests.support.services import free_port

    manager = redis.sentinel.Sentinel([("127.0.0.1", free_port()), ("127.0.0.1", free_port())],
                                      sentinel_kwargs={"socket_connect_timeout": 1})
    with pytest.raises(redis.sentinel.MasterNotFoundError) as caught:
        manager.discover_master("jobs")
    assert len(str(caught.value)) > 200  # redis-py spells out each Sentinel client
    assert reason(caught.value) == "No master found for 'jobs' (no Sentinel answered)"


def test_a_message_acked_after_its_channel_closed_is_a_connection_error(
        settings: Settings) -> None:
    """A job that ends after Redis went away acks on a channel Celery has closed meanwhile:
    that must be a connection error Celery logs, not one that stops the worker."""
    app = create_app(settings)
    with app.connection_for_read() as connection:
        queue = connection.SimpleQueue(f"acked-late-{uuid.uuid4().hex[:6]}")
        queue.put({"n": 1})
        message = queue.get(timeout=5)
        queue.channel.close()  # as Celery's reconnect does
        with pytest.raises(connection.connection_errors):
            message.ack()
        queue.close()


def test_a_finish_takes_its_unacked_entry_out_and_the_ack_makes_no_round_trip(
        client: Client, broker_client: redis.Redis, model: str) -> None:
    """With the broker and the state on one Redis, kombu's ack of a finished job is part of
    the finish's round trip: the unacked entry is gone when the result is, and the worker's
    ack sends no MULTI/EXEC of its own (nor does its delivery: a take writes the entry)."""
    if STATE_APART:
        pytest.skip("the broker apart from the state: kombu acks on its own")
    jobs = 20
    before = broker_client.info("commandstats").get("cmdstat_exec", {}).get("calls", 0)
    submitted = [client.submit_chat(USER, model=model) for _ in range(jobs)]
    ids = {job.id for job in submitted}
    for job in submitted:
        assert job.result(timeout=30) is not None

    def left() -> int:  # these jobs' unacked entries still in Redis
        raw = broker_client.hvals(client.keys.unacked())
        return sum(json.loads(entry)[0]["headers"]["id"] in ids for entry in raw)
    wait_until(lambda: left() == 0, 10, "the finished jobs' unacked entries to go")
    # kombu's own delivery and ack would be two each; allow a little for the idle worker's
    spent = broker_client.info("commandstats").get("cmdstat_exec", {}).get("calls", 0) - before
    assert spent < jobs / 4


def test_an_unacked_entry_goes_with_the_finish_only_once_it_ran(
        redis_client: redis.Redis) -> None:
    """The finish takes its delivery's unacked entry out when it ends the job, or finds it
    ended or held by another attempt; a finish that did not run (out of memory, a script
    error) leaves it, so that the requeue that follows finds the message."""
    if STATE_APART:
        pytest.skip("the broker apart from the state: kombu acks on its own")
    keys, job_id, tag = Keys(f"ack{uuid.uuid4().hex[:6]}"), uuid.uuid4().hex, "tag-1"
    store = LeaseStore(redis_client, keys, queued_ttl=60, lease_ms=5000, max_crashes=3)

    def delivered() -> None:
        redis_client.zadd(keys.unacked_index(), {tag: 1})
        redis_client.hset(keys.unacked(), tag, "[]")

    def kept() -> bool:
        return bool(redis_client.hexists(keys.unacked(), tag)) and redis_client.zscore(
            keys.unacked_index(), tag) is not None

    def finish(token: str) -> bytes:
        return cast("bytes", redis_client.execute_command(*store.finish_command(
            job_id, token, 60, "{}", "1-1", None, ["status", "succeeded"], delivery_tag=tag)))
    redis_client.script_load(script("finish"))
    assert store.claim(job_id, "mine", {}, time.time()).verdict == "run"
    delivered()
    redis_client.set(keys.events(job_id), "no stream")  # the finish's first write fails
    with pytest.raises(redis.ResponseError):
        finish("mine")
    assert kept() and redis_client.hget(keys.job(job_id), "status") == b"running"
    redis_client.delete(keys.events(job_id))
    assert finish("theirs") == b"lost" and not kept()  # kombu's ack would drop it too
    delivered()
    assert finish("mine") == b"ok" and not kept()
    assert redis_client.hget(keys.job(job_id), "status") == b"succeeded"
    delivered()
    assert finish("mine") == b"ended" and not kept()


def test_a_backlog_is_taken_off_the_queue_with_its_unacked_entries_in_one_step(
        settings: Settings, broker_client: redis.Redis) -> None:
    """Messages waiting behind the one a BRPOP popped are taken and recorded as unacked by one
    script, as many as the prefetch allows, in their order: none is off the queue without its
    entry. One the script cannot record (its properties not last, not JSON) is left to BRPOP
    and kombu's own way; one too large is dropped with a line; one recorded but then dropped
    (a body kombu cannot decode) has its entry taken out; one consumed without acks is never
    recorded."""
    keys = Keys(f"take{uuid.uuid4().hex[:6]}")
    own = settings.model_copy(update={"redis": settings.redis.model_copy(
        update={"prefix": keys.prefix})})
    app = create_app(own)
    queue_name = "backlog"
    ids = [str(uuid.uuid4()) for _ in range(12)]
    sent = [task_message("api_tasks.chat", [USER], {}, task_id, queue_name) for task_id in ids]
    moved = json.loads(sent[5])  # kombu's JSON with the properties first
    sent[5] = json.dumps({"properties": moved.pop("properties"), **moved})
    sent.insert(8, "not json {")
    sent.insert(2, json.dumps({"body": "x" * 4096, "properties": {}}))  # too large
    sent.insert(3, json.dumps({"body": "x", "properties": {  # recorded, then not decodable
        "body_encoding": "rot13", "delivery_tag": "odd",
        "delivery_info": {"exchange": "", "routing_key": queue_name}}}))
    try:
        with app.connection_for_read() as connection:
            connection.transport_options["max_message_bytes"] = 4000
            queue = connection.SimpleQueue(queue_name)
            queue.consumer.qos(prefetch_count=4)
            channel, reads = queue.channel, Counter[str]()
            for name in ("_popped", "_took"):  # which reply each read of the queue was
                read = getattr(channel, name)
                setattr(channel, name, lambda read=read, name=name, **options: (
                    reads.update([name]), read(**options))[1])
            broker_client.script_flush()  # a Redis that lacks the script: the take loads it
            broker_client.lpush(keys.queue(queue_name), *sent)
            got = [queue.get(timeout=5)]
            # three more were taken with it: one recorded, one too large, one whose entry went
            # once it could not be decoded; the rest waits for room
            assert broker_client.llen(keys.queue(queue_name)) == len(sent) - 4
            recorded = {json.loads(raw)[0]["headers"]["id"]
                        for raw in broker_client.hvals(keys.unacked())}
            assert recorded == set(ids[:2]) and broker_client.zcard(keys.unacked_index()) == 2
            got[0].ack()
            while len(got) < len(ids):  # then takes as the acks make room
                got.append(queue.get(timeout=5))
                got[-1].ack()
            assert [m.headers["id"] for m in got] == ids  # first in, first out
            assert broker_client.hlen(keys.unacked()) == 0
            assert broker_client.zcard(keys.unacked_index()) == 0
            assert broker_client.llen(keys.queue(queue_name)) == 0
            assert reads["_took"] >= 1
            queue.close()
            # a consumer without acks (Celery's replies): nothing recorded
            replies = connection.SimpleQueue(queue_name, no_ack=True)
            broker_client.lpush(keys.queue(queue_name), *(
                task_message("api_tasks.chat", [USER], {}, task_id, queue_name)
                for task_id in ids[:3]))
            assert [replies.get(timeout=5).headers["id"] for _ in range(3)] == ids[:3]
            assert broker_client.hlen(keys.unacked()) == 0
            replies.close()
    finally:
        app.close()
        broker_client.delete(*broker_client.keys(f"{keys.prefix}:*") or [keys.queue("x")])
