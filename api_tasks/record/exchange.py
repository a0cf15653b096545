"""Packed commands to Redis and their raw replies: one connection's pipeline, or a Redis
Cluster's nodes each with its share (the event writer's I/O).

Packed with hiredis and read raw: redis-py's ``Pipeline`` spends more per command (callbacks,
hooks, bookkeeping) than the relay spends on a whole chunk. A Redis out of reach is a reply
(its error, for each of its commands), not an exception, so that on a cluster one node's
failure is only its own commands'.
"""

from __future__ import annotations

from typing import Any

import hiredis
import redis
import redis.cluster
from redis.exceptions import NoScriptError, RedisClusterException

from api_tasks.connections import UNAVAILABLE
from api_tasks.record.calls import first_key
from api_tasks.record.scripts import named, script

__all__ = ["ANY", "Command", "exchange", "followed", "pool_of", "slot_of"]

Command = tuple[Any, ...]
ANY = -1  # the "slot" of a command with no key (a ``PING``): the cluster's default node


def slot_of(cluster: redis.cluster.RedisCluster, command: Command) -> int:
    """The slot of a command's first key (a job's keys and its channel share one)."""
    key = first_key(command)
    return ANY if key is None else int(cluster.keyslot(key))  # type: ignore[no-untyped-call]


def pool_of(cluster: redis.cluster.RedisCluster, slot: int) -> Any:
    """The connection pool of the node serving ``slot`` (the default node's for ``ANY``);
    raises ``redis.ConnectionError`` when no node serves it."""
    try:
        if slot == ANY:
            node = cluster.get_default_node()  # type: ignore[no-untyped-call]
        else:
            node = cluster.nodes_manager.get_node_from_slot(slot)
    except (redis.RedisError, RedisClusterException) as err:
        if isinstance(err, UNAVAILABLE):
            raise
        raise redis.ConnectionError(f"no node serves slot {slot}: {err}") from err
    return node.redis_connection.connection_pool


def followed(cluster: redis.cluster.RedisCluster, command: Command) -> Any:
    """A command sent again through the cluster client's own routing, which follows an
    ``ASK`` to the node taking its slot in (a script that node lacks sent whole): its reply,
    or its error."""
    try:
        try:
            return cluster.execute_command(*command)  # type: ignore[no-untyped-call]
        except NoScriptError:
            name = named(command[1]) if command[0] == "EVALSHA" else None
            if name is None:
                raise
            return cluster.execute_command(  # type: ignore[no-untyped-call]
                "EVAL", script(name), *command[2:])
    except (redis.RedisError, RedisClusterException) as err:
        return err


def exchange(work: dict[Any, list[Command]]) -> dict[Any, list[Any]]:
    """Send each pool's commands on one of its connections, then read each's replies (all
    the sends first: a cluster's nodes work at once). A pool whose Redis is out of reach has
    the error for every reply."""
    out: dict[Any, list[Any]] = {}
    sent: list[tuple[Any, Any]] = []
    try:
        for pool, commands in work.items():
            try:
                connection = pool.get_connection()
            except UNAVAILABLE as err:
                out[pool] = [err] * len(commands)
                continue
            sent.append((pool, connection))
            try:
                connection.send_packed_command([b"".join(map(hiredis.pack_command, commands))])
            except UNAVAILABLE as err:
                connection.disconnect()
                out[pool] = [err] * len(commands)
        for pool, connection in sent:
            if pool not in out:
                try:
                    out[pool] = _replies(connection, work[pool])
                except UNAVAILABLE as err:
                    connection.disconnect()  # replies may be unread
                    out[pool] = [err] * len(work[pool])
    except BaseException:
        for _, connection in sent:
            connection.disconnect()  # replies may be unread
        raise
    finally:
        for pool, connection in sent:
            pool.release(connection)
    return out


def _replies(connection: Any, commands: list[Command]) -> list[Any]:
    """Every reply to ``commands`` sent on ``connection``; a script Redis lacked (restarted,
    flushed) ran nothing, and it is its job's last write, so it runs now, sent whole, after
    the rest."""
    replies = _read(connection, len(commands))
    unloaded = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)
                and commands[i][0] == "EVALSHA" and named(commands[i][1])]
    if unloaded:
        connection.send_packed_command([b"".join(hiredis.pack_command(
            ("EVAL", script(str(named(commands[i][1]))), *commands[i][2:]))
            for i in unloaded)])
        for i, reply in zip(unloaded, _read(connection, len(unloaded)), strict=True):
            replies[i] = reply
    return replies


def _read(connection: Any, count: int) -> list[Any]:
    """``count`` replies, an error reply as its exception."""
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(connection.read_response())
        except redis.ResponseError as err:
            replies.append(err)
    return replies
