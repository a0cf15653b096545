"""The event writer in-process, against a real Redis: group commit in order, replies and errors
to their own submitter, re-sent stream ids ignored, and back-pressure while Redis is away."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from api_tasks.connections import connect
from api_tasks.record.scripts import sha
from api_tasks.record.writer import EventWriter
from config.settings import RedisSettings
from tests.support.services import RedisClusterGroup, RedisServer, free_port, wait_until


def test_many_threads_commands_land_in_order_with_their_replies(
        redis_client: redis.Redis, writer: EventWriter) -> None:
    prefix = f"w{uuid.uuid4().hex[:8]}"

    def produce(n: int) -> None:
        for i in range(200):
            writer.submit([("RPUSH", f"{prefix}:{n}", i), ("EXPIRE", f"{prefix}:{n}", 60)])

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # every command queued before is in Redis (one key a write: on a Redis Cluster the
    # commands handed over together keep to one slot)
    replies = [writer.write([("LLEN", f"{prefix}:{n}")], timeout=10)[0] for n in range(8)]
    assert replies == [200] * 8
    for n in range(8):
        assert [int(v) for v in redis_client.lrange(f"{prefix}:{n}", 0, -1)] == list(range(200))
        assert 0 < redis_client.ttl(f"{prefix}:{n}") <= 60


def test_an_error_reaches_only_its_own_submitter(redis_client: redis.Redis,
                                                writer: EventWriter) -> None:
    key = f"w{uuid.uuid4().hex[:8]}"
    bad = writer.submit([("SET", key, "x", "EX", 60), ("LPUSH", key, "y")], wait=True)
    good = writer.submit([("GET", key)], wait=True)
    assert bad is not None and good is not None
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        bad.result(timeout=10)
    assert good.result(timeout=10) == [b"x"]


def test_a_stream_entry_sent_again_is_not_an_error(redis_client: redis.Redis,
                                                  writer: EventWriter) -> None:
    key = f"w{uuid.uuid4().hex[:8]}"
    first = writer.write([("XADD", key, "1-1", "event", "a"), ("EXPIRE", key, 60)], timeout=10)
    again = writer.write([("XADD", key, "1-1", "event", "a")], timeout=10)  # a retried batch
    assert first[0] == b"1-1" and isinstance(again[0], redis.ResponseError)
    assert redis_client.xlen(key) == 1


def test_a_thread_waits_for_room_while_redis_is_away_then_gives_up() -> None:
    gone = redis.Redis(port=free_port(), socket_connect_timeout=0.2)  # nothing listens there
    events = EventWriter(gone, retry_for=3.0, max_pending_bytes=1000)
    events.start()
    try:
        stuck = events.submit([("SET", "k", "v" * 800)], wait=True)  # the writer retries it
        with pytest.raises(TimeoutError, match="too far behind"):
            events.submit([("SET", "k2", "v" * 800)], timeout=0.3)
        assert stuck is not None
        with pytest.raises(redis.ConnectionError):
            stuck.result(timeout=10)  # given up after retry_for, not hung
    finally:
        events.close()


def test_a_write_after_the_writer_closed_fails_at_once(redis_client: redis.Redis) -> None:
    """A job still finishing when the process stops hands its write to a writer that has
    taken its last batch: it is told so, rather than waiting for a write nobody makes."""
    events = EventWriter(redis_client)
    events.start()
    key = f"closed:{uuid.uuid4().hex}"
    assert events.write([("SET", key, "1", "EX", 60)], timeout=5) == [b"OK"]  # one went
    events.close()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="closed"):
        events.write([("SET", key, "2", "EX", 60)], timeout=30)
    assert time.monotonic() - started < 1
    assert redis_client.get(key) == b"1"


def test_a_script_redis_lacks_is_sent_whole_and_runs_once(tmp_path: Path) -> None:
    """A job's finish goes by its SHA1; a Redis that lost its scripts (restarted, flushed)
    runs it from its source, in the same write, and the rest of the batch is not repeated."""
    server = RedisServer(tmp_path / "redis").start()
    events = EventWriter(redis.Redis.from_url(server.url))
    events.start()
    try:
        own = redis.Redis.from_url(server.url)
        own.script_flush()
        replies = events.write([("RPUSH", "seen", "before"),
                                ("EVALSHA", sha("wake"), 1, "woken", 60),
                                ("RPUSH", "seen", "after")], timeout=5)
        assert replies[0] == 1 and replies[2] == 2
        assert own.lrange("woken", 0, -1) == [b"1"]
        assert own.lrange("seen", 0, -1) == [b"before", b"after"]
    finally:
        events.close()
        server.stop()


def test_on_a_cluster_a_node_out_of_reach_holds_only_its_own_slots_writes(
        tmp_path: Path) -> None:
    """Each node's share of a batch goes on a connection of its own: while one primary is
    down its slots' writes wait, in order, and every other slot's go on (a steady stream of
    them, as under load); past the writer's bound, a job writing to it waits, not the
    others, and nothing is dropped; they land once it is back."""
    group = RedisClusterGroup(tmp_path, persist=True).start()
    client = connect(RedisSettings(state_url=group.cluster_url, shards=6).state())
    writer = EventWriter(client, max_pending_bytes=2000)  # 200 entries of ~30 bytes: past it
    writer.start()
    done = threading.Event()
    try:
        victim = group.nodes[1]
        owner = {node.port: node for node in group.nodes}
        names = [f"w:{{s{n}}}:events" for n in range(40)]  # spread over every node
        down = next(k for k in names if owner[client.get_node_from_key(k).port] is victim)
        up = [k for k in names if owner[client.get_node_from_key(k).port] is not victim]
        written: list[float] = []

        def steady() -> None:  # other slots' writes all along, a flush every few ms
            seq = 0
            while not done.is_set():
                seq += 1
                writer.write([("XADD", up[seq % len(up)], f"1-{seq}", "n", seq)], timeout=5)
                written.append(time.monotonic())
                time.sleep(0.005)

        traffic = threading.Thread(target=steady)
        traffic.start()
        victim.stop(crash=True)
        handed: list[int] = []

        def stranded() -> None:  # a job streaming to the dead node's slot, as the relay does
            for seq in range(1, 201):
                writer.submit([("XADD", down, f"1-{seq}", "n", "x" * 20)])
                handed.append(seq)

        blocked = threading.Thread(target=stranded)
        blocked.start()
        stopped_at = time.monotonic()
        wait_until(lambda: sum(1 for at in written if at > stopped_at) > 50, 10,
                   "other slots' writes to go on while the node is down")
        assert blocked.is_alive() and len(handed) < 200  # it waits for room: held ones are kept
        victim.start()
        back_at = time.monotonic()
        blocked.join(30)
        last = writer.submit([("XADD", down, "1-201", "n", "x")], wait=True)
        assert last is not None and last.result(timeout=30)
        assert time.monotonic() - back_at < 15  # not at the end of retry_for (120 s)
        ids = [entry_id for entry_id, _ in client.xrange(down)]
        assert ids == [f"1-{seq}".encode() for seq in range(1, 202)]  # all, in order
        assert traffic.is_alive()  # the steady writes never failed
    finally:
        done.set()
        writer.close()
        group.stop()


def test_on_a_cluster_a_node_that_stops_answering_holds_only_its_own_slots_writes(
        tmp_path: Path) -> None:
    """A primary that takes writes but answers nothing (stopped, as behind a network that
    drops its packets) holds its own slots' writes for as long as its connection waits, and
    no other slot's: they land at once all along, and its own land in order once it answers."""
    group = RedisClusterGroup(tmp_path).start()
    client = connect(RedisSettings(state_url=group.cluster_url, shards=6).state())
    writer = EventWriter(client)
    writer.start()
    victim = group.nodes[1]
    assert victim.proc is not None
    try:
        owner = {node.port: node for node in group.nodes}
        names = [f"w:{{s{n}}}:events" for n in range(40)]
        stuck = next(k for k in names if owner[client.get_node_from_key(k).port] is victim)
        up = [k for k in names if owner[client.get_node_from_key(k).port] is not victim]
        writer.write([("XADD", stuck, "1-1", "n", "x")], timeout=5)  # its connections open
        with pytest.raises(ValueError, match="one slot"):  # a node's share carries items whole
            writer.submit([("XADD", up[0], "1-1", "n", "x"), ("XADD", stuck, "1-9", "n", "x")])
        victim.proc.send_signal(signal.SIGSTOP)
        try:
            handed = writer.submit([("XADD", stuck, "1-2", "n", "x")], wait=True)
            slowest = 0.0
            for seq in range(1, 41):  # two seconds of other slots' writes
                started = time.monotonic()
                writer.write([("XADD", up[seq % len(up)], f"1-{seq}", "n", seq)], timeout=10)
                slowest = max(slowest, time.monotonic() - started)
                time.sleep(0.05)
            assert handed is not None and not handed.done()  # its own write still waits
            assert slowest < 1.0  # no other slot's write waited on its connection
        finally:
            victim.proc.send_signal(signal.SIGCONT)
        assert handed.result(timeout=30)
        writer.write([("XADD", stuck, "1-3", "n", "x")], timeout=30)
        assert [entry_id for entry_id, _ in client.xrange(stuck)] == [b"1-1", b"1-2", b"1-3"]
    finally:
        writer.close()
        group.stop()
