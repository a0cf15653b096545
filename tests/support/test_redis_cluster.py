"""The Redis Cluster the state is headed for: three primaries that refuse a script whose keys
span slots, and take one whose keys share a hash tag."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from tests.support.services import RedisClusterGroup


def test_a_cluster_takes_one_slot_scripts_and_refuses_the_others(tmp_path: Path) -> None:
    group = RedisClusterGroup(tmp_path).start()
    try:
        client = RedisCluster.from_url(group.url)
        assert len(client.get_primaries()) == 3
        for n in range(30):  # keys spread over every node
            client.set(f"spread:{n}", n, ex=60)
        assert {client.get_node_from_key(f"spread:{n}").port for n in range(30)} == {
            node.port for node in group.nodes}
        both = "redis.call('SET', KEYS[1], '1', 'EX', 60); return redis.call('SET', KEYS[2], " \
               "'2', 'EX', 60)"
        assert client.eval(both, 2, "p:{job1}:record", "p:{job1}:lease") == b"OK"
        # the server refuses it (the cluster client refuses it before sending, too)
        owner = redis.Redis(port=client.get_node_from_key("p:job:1").port)
        with pytest.raises(redis.ResponseError, match="same slot"):  # CROSSSLOT
            owner.eval(both, 2, "p:job:1", "p:lease:1")
    finally:
        group.stop()
