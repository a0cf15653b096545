"""On a Redis Cluster, a script a node lacks is sent whole to that node alone: redis-py's own
client would load it on every primary, and fail while any one of them is out of reach."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from api_tasks.connections import BLOCK_SLICE, UNAVAILABLE, connect, connect_async
from api_tasks.record.calls import SyncShell
from api_tasks.record.scripts import sha
from config.settings import RedisSettings
from tests.support.services import RedisClusterGroup, RedisServer


@contextmanager
def _primary_down(tmp_path: Path, socket_timeout: float = BLOCK_SLICE + 10.0,
                  quick: bool = False
                  ) -> Iterator[tuple[RedisSettings, redis.Redis, RedisServer, str, str]]:
    """A 3-primary cluster with one primary killed: its settings, a client for it (as
    ``connect`` builds it with these options), the dead primary, a key it served and a key
    a live one serves."""
    group = RedisClusterGroup(tmp_path).start()
    settings = RedisSettings(state_url=group.cluster_url, shards=6).state()
    client = connect(settings, socket_timeout=socket_timeout, quick=quick)
    try:
        owner = {node.port: node for node in group.nodes}
        keys = [f"s:{{t{n}}}" for n in range(40)]
        victim = owner[client.get_node_from_key(keys[0]).port]
        live = next(k for k in keys if owner[client.get_node_from_key(k).port] is not victim)
        victim.stop(crash=True)
        yield settings, client, victim, keys[0], live
    finally:
        client.close()
        group.stop()


def test_scripts_run_and_load_while_a_primary_is_down(tmp_path: Path) -> None:
    """A script runs on a node that lacks it (sync and asyncio clients), and a producer's
    warm-up loads its scripts on every primary that answers."""
    with _primary_down(tmp_path) as (settings, client, victim, _, live):
        # new scripts (their bodies unique to this run): no node has them yet
        sync_script = client.register_script(f"-- {uuid.uuid4()}\nreturn KEYS[1]")
        assert sync_script(keys=[live]) == live.encode()
        assert sync_script(keys=[live]) == live.encode()  # (by its SHA1 now)

        async def run_async() -> bytes:
            aclient = connect_async(settings)
            try:
                script = aclient.register_script(f"-- {uuid.uuid4()}\nreturn KEYS[1]")
                reply: bytes = await script(keys=[live])
                return reply
            finally:
                await aclient.aclose()
        assert asyncio.run(run_async()) == live.encode()

        SyncShell(client).load(["claim", "finish"])
        alive = [node for node in client.get_primaries() if node.port != victim.port]
        assert len(alive) == 2
        assert all(node.redis_connection.script_exists(sha("claim")) == [True]
                   for node in alive)


def test_a_quick_client_fails_a_call_to_a_dead_node_at_once(tmp_path: Path) -> None:
    """The watchdog's client (``quick``) does not retry a node out of reach: a round of lease
    renewals over every node must not wait on a dead one while the others' leases lapse."""
    with _primary_down(tmp_path, socket_timeout=0.5, quick=True) as (_, quick, _, dead, live):
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(UNAVAILABLE):
                quick.get(dead)
            assert time.monotonic() - started < 0.3
            assert quick.set(live, "1", ex=60)
