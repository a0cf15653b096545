"""Redis calls as data, so a sync and an async caller share one implementation.

A ``Call`` says what to send (a command, or a Lua script with its keys and
arguments) and how to read the reply. The record's logic (``JobRecords``,
the reader's parsing) builds calls and parses replies and does no I/O; a thin
shell runs them: ``SyncShell`` on a ``redis.Redis`` (the producer, the
workers), ``AsyncShell`` on a ``redis.asyncio.Redis`` (the HTTP gateway).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import redis
import redis.asyncio
from redis.exceptions import NoScriptError, RedisClusterException

from api_tasks.connections import UNAVAILABLE, is_cluster
from api_tasks.record.scripts import script, sha

__all__ = ["AsyncShell", "Call", "Failed", "SyncShell", "Writes", "command", "first_key", "lua",
           "packed"]

T = TypeVar("T")
log = logging.getLogger(__name__)


def _same(reply: Any) -> Any:
    return reply


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One Redis command or script call, and how to read its reply."""

    args: tuple[Any, ...]  # the command and its arguments; for a script, its ARGV
    parse: Callable[[Any], T]
    script: str = ""  # a Lua script's name (``api_tasks/record/lua/<name>.lua``)
    keys: tuple[str, ...] = ()  # the script's KEYS


class Writes(NamedTuple):
    """The calls that make a record: the record itself (one transaction: its keys share a
    slot), then what lives on other slots on a Redis Cluster (its owner's index, the wake-up
    of whatever sweeps for it), after it: a listing that met an id before its record would
    drop it from the index."""

    record: list[Call[Any]]
    after: list[Call[Any]]


def command(*args: Any, parse: Callable[[Any], T] = _same) -> Call[T]:
    """A plain command, e.g. ``command("HGET", key, "status", parse=...)``."""
    return Call(args, parse)


def lua(name: str, keys: Sequence[str], args: Sequence[Any],
        parse: Callable[[Any], T] = _same) -> Call[T]:
    """A call of the Lua script ``name``."""
    return Call(tuple(args), parse, name, tuple(keys))


def packed(call: Call[Any]) -> tuple[Any, ...]:
    """A call as one raw command, for a pipeline or the event writer: a script by EVALSHA
    alone (redis-py's pipelined scripts cost a ``SCRIPT EXISTS`` round trip first, each
    time), sent whole again by its runner to a Redis that lacks it."""
    if not call.script:
        return call.args
    return ("EVALSHA", sha(call.script), len(call.keys), *call.keys, *call.args)


def _logged(replies: list[list[Any] | Failed]) -> None:
    """Log the failures among replies of calls that follow a write."""
    for failed in replies:
        if isinstance(failed, Failed):
            log.warning("a call after a write failed, the write stands (%s)", failed.error)


def _first(first: list[Any] | Failed, rest: list[list[Any] | Failed]) -> Any:
    """The first call's reply of ``run_then`` (raised if it failed); the others' failures
    logged."""
    _logged(rest)
    if isinstance(first, Failed):
        raise first.error
    return first[0]


def _grouped(groups: Sequence[Sequence[Call[Any]]], replies: list[Any]) -> list[list[Any]]:
    """A pipeline's replies cut back into its groups."""
    out, at = [], 0
    for group in groups:
        out.append(replies[at:at + len(group)])
        at += len(group)
    return out


def first_key(command: tuple[Any, ...]) -> Any:
    """A packed command's first key (a script's first KEYS entry), None for none (the key
    a Redis Cluster routes it by)."""
    if command[0] in ("EVALSHA", "EVAL"):
        return command[3] if int(command[2]) else None
    return command[1] if len(command) > 1 else None


def _by_node(cluster: Any, groups: Sequence[Sequence[Call[Any]]]) -> list[list[int]]:
    """The groups (their indexes) by the Redis Cluster node that serves their first key, so
    that a node out of reach fails only its own."""
    parts: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        key = next((k for k in (first_key(packed(call)) for call in group) if k is not None),
                   None)
        try:
            node = "" if key is None else \
                cluster.nodes_manager.get_node_from_slot(cluster.keyslot(key)).name
        except (redis.RedisError, RedisClusterException):
            node = "?"  # no node serves its slot now: these groups fail, on their own
        parts.setdefault(node, []).append(index)
    return list(parts.values())


def _merged(groups: Sequence[Sequence[Call[Any]]], parts: list[list[int]],
            outcomes: Sequence[list[list[Any] | Failed] | BaseException]
            ) -> list[list[Any] | Failed]:
    """The nodes' outcomes back in the groups' order, a node's failed round trip as
    ``Failed`` for each of its groups; raised if every node's failed."""
    if all(isinstance(outcome, BaseException) for outcome in outcomes):
        raise next(o for o in outcomes if isinstance(o, BaseException))
    out: list[list[Any] | Failed] = [[] for _ in groups]
    for at, outcome in zip(parts, outcomes, strict=True):
        for position, index in enumerate(at):
            if isinstance(outcome, BaseException):
                error = outcome if isinstance(outcome, Exception) else Exception(outcome)
                out[index] = Failed(error, [error] * len(groups[index]))
            else:
                out[index] = outcome[position]
    return out


@dataclass(frozen=True, slots=True)
class Failed:
    """A group of calls that did not all succeed: the first error, and every reply (an
    exception where a call failed) to tell what did run."""

    error: Exception
    replies: list[Any]


def _failure(replies: list[Any]) -> Exception | None:
    """A group's first error reply other than a missing script's."""
    return next((reply for reply in replies
                 if isinstance(reply, Exception) and not isinstance(reply, NoScriptError)), None)


def _unloaded(replies: list[Any]) -> list[int]:
    """Where a group's replies say Redis lacked the script (it restarted or flushed its
    scripts), to run those calls again, after the others (in a transaction too: Redis
    refuses an unknown script when it runs it, not when it queues it)."""
    return [index for index, reply in enumerate(replies) if isinstance(reply, NoScriptError)]


def _parsed(group: Sequence[Call[Any]], replies: list[Any]) -> list[Any]:
    return [call.parse(reply) for call, reply in zip(group, replies, strict=True)]


class SyncShell:
    """Runs calls on a sync client (scripts by EVALSHA, loaded when Redis lacks them)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self.cluster = is_cluster(client)  # transactions keep to one slot
        self._scripts: dict[str, Any] = {}

    def run(self, call: Call[T]) -> T:
        """Send one call and read its reply."""
        if call.script:
            return call.parse(self._script(call.script)(keys=call.keys, args=call.args))
        return call.parse(self.redis.execute_command(*call.args))  # type: ignore[no-untyped-call]

    def run_all(self, calls: Sequence[Call[T]], *, transaction: bool = False) -> list[T]:
        """Send calls in one round trip; their replies in order (an error reply is raised).
        A ``transaction`` runs whole (MULTI/EXEC): no other client sees it half done."""
        if not calls:
            return []
        [replies] = self.run_groups([calls], transaction=transaction)
        if isinstance(replies, Failed):
            raise replies.error
        return replies

    def write(self, writes: Writes) -> None:
        """Run a record's ``Writes`` in their order; an error is raised only if the record
        was not written (what follows it is harmless to lose: logged)."""
        self.run_all(writes.record, transaction=len(writes.record) > 1)
        self.follow(writes.after)

    def follow(self, calls: Sequence[Call[Any]]) -> None:
        """Run calls that follow a write and are harmless to lose (an index entry, a
        wake-up), in one round trip: their failures, and the round trip's, only logged."""
        try:
            _logged(self.run_groups([[call] for call in calls]))
        except (redis.RedisError, RedisClusterException) as err:
            log.warning("calls after a write failed, the write stands (%s)", err)

    def run_then(self, call: Call[T], after: Sequence[Call[Any]]) -> T:
        """Run ``call`` and the calls that follow it in one round trip: its reply (its error
        raised); theirs, harmless to lose, only logged if they fail."""
        first, *rest = self.run_groups([[call], *([a] for a in after)])
        reply: T = _first(first, rest)
        return reply

    def run_groups(self, groups: Sequence[Sequence[Call[Any]]], *,
                   transaction: bool = False) -> list[list[Any] | Failed]:
        """Send groups of calls in one round trip (a ``transaction`` runs whole: MULTI/EXEC):
        each group's parsed replies, or ``Failed``. A script Redis lacked is loaded and run
        again, after the rest of its group. Raises only if the round trip itself failed (on
        a Redis Cluster, one a node: a node out of reach fails its own groups)."""
        if not any(groups):
            return [[] for _ in groups]
        if self.cluster and not transaction and len(groups) > 1:
            parts = _by_node(self.redis, groups)
            if len(parts) > 1:
                outcomes: list[list[list[Any] | Failed] | BaseException] = []
                for at in parts:
                    try:
                        outcomes.append(self._run_groups([groups[i] for i in at], False))
                    except UNAVAILABLE as err:
                        outcomes.append(err)
                return _merged(groups, parts, outcomes)
        return self._run_groups(groups, transaction)

    def _run_groups(self, groups: Sequence[Sequence[Call[Any]]],
                    transaction: bool) -> list[list[Any] | Failed]:
        pipe = self.redis.pipeline(transaction=transaction)
        for call in (call for group in groups for call in group):
            pipe.execute_command(*packed(call))  # type: ignore[no-untyped-call]
        out: list[list[Any] | Failed] = []
        for group, replies in zip(groups, _grouped(groups, pipe.execute(raise_on_error=False)),
                                  strict=True):
            if (failed := _failure(replies)) is not None:
                out.append(Failed(failed, replies))
                continue
            try:
                for index in _unloaded(replies):
                    call = group[index]
                    replies[index] = self._script(call.script)(keys=call.keys, args=call.args)
            except redis.RedisError as err:
                out.append(Failed(err, replies))
                continue
            out.append(_parsed(group, replies))
        return out

    def load(self, names: Sequence[str]) -> None:
        """Load scripts into Redis now, so the first calls find them (on a Redis Cluster, into
        each primary that answers: one out of reach gets them later, sent whole by the first
        call that needs them there; raised only if none answers)."""
        if not self.cluster:
            for name in names:
                self.redis.script_load(script(name))
            return
        cluster: Any = self.redis
        errors = []
        primaries = cluster.get_primaries()
        for node in primaries:
            try:
                for name in names:
                    cluster.execute_command("SCRIPT LOAD", script(name), target_nodes=node)
            except UNAVAILABLE as err:
                errors.append(err)
        if errors and len(errors) == len(primaries):
            raise errors[0]

    def _script(self, name: str) -> Any:
        if name not in self._scripts:
            self._scripts[name] = self.redis.register_script(script(name))
        return self._scripts[name]


class AsyncShell:
    """Runs calls on an asyncio client, the same way ``SyncShell`` does."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.redis = client
        self.cluster = is_cluster(client)  # transactions keep to one slot
        self._scripts: dict[str, Any] = {}

    async def run(self, call: Call[T]) -> T:
        """Send one call and read its reply."""
        if call.script:
            return call.parse(await self._script(call.script)(keys=call.keys, args=call.args))
        return call.parse(await self.redis.execute_command(*call.args))  # type: ignore[no-untyped-call]

    async def run_all(self, calls: Sequence[Call[T]], *, transaction: bool = False) -> list[T]:
        """Send calls in one round trip, as ``SyncShell.run_all``."""
        if not calls:
            return []
        [replies] = await self.run_groups([calls], transaction=transaction)
        if isinstance(replies, Failed):
            raise replies.error
        return replies

    async def write(self, writes: Writes) -> None:
        """Run a record's ``Writes`` in their order, as ``SyncShell.write``."""
        await self.run_all(writes.record, transaction=len(writes.record) > 1)
        await self.follow(writes.after)

    async def follow(self, calls: Sequence[Call[Any]]) -> None:
        """``SyncShell.follow`` on asyncio."""
        try:
            _logged(await self.run_groups([[call] for call in calls]))
        except (redis.RedisError, RedisClusterException) as err:
            log.warning("calls after a write failed, the write stands (%s)", err)

    async def run_then(self, call: Call[T], after: Sequence[Call[Any]]) -> T:
        """``SyncShell.run_then`` on asyncio."""
        first, *rest = await self.run_groups([[call], *([a] for a in after)])
        reply: T = _first(first, rest)
        return reply

    async def run_groups(self, groups: Sequence[Sequence[Call[Any]]], *,
                         transaction: bool = False) -> list[list[Any] | Failed]:
        """Send groups of calls in one round trip, as ``SyncShell.run_groups`` (a cluster's
        nodes at once)."""
        if not any(groups):
            return [[] for _ in groups]
        if self.cluster and not transaction and len(groups) > 1:
            await self.redis.initialize()  # the cluster's slots known
            parts = _by_node(self.redis, groups)
            if len(parts) > 1:
                outcomes = await asyncio.gather(
                    *(self._run_groups([groups[i] for i in at], False) for at in parts),
                    return_exceptions=True)
                for outcome in outcomes:  # a failure other than a node out of reach: raised
                    if isinstance(outcome, BaseException) and not isinstance(outcome, UNAVAILABLE):
                        raise outcome
                return _merged(groups, parts, outcomes)
        return await self._run_groups(groups, transaction)

    async def _run_groups(self, groups: Sequence[Sequence[Call[Any]]],
                          transaction: bool) -> list[list[Any] | Failed]:
        pipe = self.redis.pipeline(transaction=transaction)
        for call in (call for group in groups for call in group):
            pipe.execute_command(*packed(call))
        out: list[list[Any] | Failed] = []
        replies_of = _grouped(groups, await pipe.execute(raise_on_error=False))
        for group, replies in zip(groups, replies_of, strict=True):
            if (failed := _failure(replies)) is not None:
                out.append(Failed(failed, replies))
                continue
            try:
                for index in _unloaded(replies):
                    call = group[index]
                    replies[index] = await self._script(call.script)(keys=call.keys,
                                                                      args=call.args)
            except redis.RedisError as err:
                out.append(Failed(err, replies))
                continue
            out.append(_parsed(group, replies))
        return out

    async def load(self, names: Sequence[str]) -> None:
        """Load scripts into Redis now, as ``SyncShell.load``."""
        if not self.cluster:
            for name in names:
                await self.redis.script_load(script(name))
            return
        cluster: Any = self.redis
        await cluster.initialize()  # (its primaries known)
        errors = []
        primaries = cluster.get_primaries()
        for node in primaries:
            try:
                for name in names:
                    await cluster.execute_command("SCRIPT LOAD", script(name),
                                                  target_nodes=node)
            except UNAVAILABLE as err:
                errors.append(err)
        if errors and len(errors) == len(primaries):
            raise errors[0]

    def _script(self, name: str) -> Any:
        if name not in self._scripts:
            self._scripts[name] = self.redis.register_script(script(name))
        return self._scripts[name]
