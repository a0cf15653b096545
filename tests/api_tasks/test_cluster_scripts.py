"""On a Redis Cluster, a script a node lacks is sent whole to that node alone: redis-py's own
client would load it on every primary, and fail while any one of them is out of reach."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from api_tasks.connections import connect, connect_async
from api_tasks.record.calls import SyncShell
from api_tasks.record.scripts import sha
from config.settings import RedisSettings
from tests.support.services import RedisClusterGroup


def test_a_script_runs_on_a_node_that_lacks_it_while_another_primary_is_down(
        tmp_path: Path) -> None:
    group = RedisClusterGroup(tmp_path).start()
    settings = RedisSettings(state_url=group.cluster_url, shards=6).state()
    client = connect(settings)
    try:
        owner = {node.port: node for node in group.nodes}
        keys = [f"s:{{t{n}}}" for n in range(40)]
        victim = owner[client.get_node_from_key(keys[0]).port]
        live = next(k for k in keys if owner[client.get_node_from_key(k).port] is not victim)
        victim.stop(crash=True)
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
    finally:
        client.close()
        group.stop()


def test_a_producer_warms_up_while_a_primary_is_down(tmp_path: Path) -> None:
    """Its scripts go to every primary that answers; the one out of reach gets them later."""
    group = RedisClusterGroup(tmp_path).start()
    settings = RedisSettings(state_url=group.cluster_url, shards=6).state()
    client = connect(settings)
    try:
        group.nodes[0].stop(crash=True)
        shell = SyncShell(client)
        shell.load(["claim", "finish"])
        alive = [node for node in client.get_primaries()
                 if node.port != group.nodes[0].port]
        assert all(node.redis_connection.script_exists(sha("claim")) == [True]
                   for node in alive)
    finally:
        client.close()
        group.stop()
