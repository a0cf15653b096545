"""Redis calls as data, so a sync and an async caller share one implementation.

A ``Call`` says what to send (a command, or a Lua script with its keys and
arguments) and how to read the reply. The record's logic (``JobRecords``,
the reader's parsing) builds calls and parses replies and does no I/O; a thin
shell runs them: ``SyncShell`` on a ``redis.Redis`` (the producer, the
workers), ``AsyncShell`` on a ``redis.asyncio.Redis`` (the HTTP gateway).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis
import redis.asyncio
from redis.exceptions import NoScriptError

from api_tasks.record.scripts import script

__all__ = ["AsyncShell", "Call", "SyncShell", "command", "lua"]

T = TypeVar("T")


def _same(reply: Any) -> Any:
    return reply


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One Redis command or script call, and how to read its reply."""

    args: tuple[Any, ...]  # the command and its arguments; for a script, its ARGV
    parse: Callable[[Any], T]
    script: str = ""  # a Lua script's name (``api_tasks/record/lua/<name>.lua``)
    keys: tuple[str, ...] = ()  # the script's KEYS


def command(*args: Any, parse: Callable[[Any], T] = _same) -> Call[T]:
    """A plain command, e.g. ``command("HGET", key, "status", parse=...)``."""
    return Call(args, parse)


def lua(name: str, keys: Sequence[str], args: Sequence[Any],
        parse: Callable[[Any], T] = _same) -> Call[T]:
    """A call of the Lua script ``name``."""
    return Call(tuple(args), parse, name, tuple(keys))


def _command(call: Call[Any], script: Callable[[str], Any]) -> tuple[Any, ...]:
    """A call as one pipelined command: a script by EVALSHA alone (redis-py's pipelined
    scripts cost a ``SCRIPT EXISTS`` round trip first, each time)."""
    if not call.script:
        return call.args
    return ("EVALSHA", script(call.script).sha, len(call.keys), *call.keys, *call.args)


def _unloaded(replies: list[Any]) -> list[int]:
    """Where a pipeline's replies say Redis lacked the script (it restarted or flushed its
    scripts), to run those calls again; any other error reply is raised."""
    for reply in replies:
        if isinstance(reply, Exception) and not isinstance(reply, NoScriptError):
            raise reply
    return [index for index, reply in enumerate(replies) if isinstance(reply, NoScriptError)]


class SyncShell:
    """Runs calls on a sync client (scripts by EVALSHA, loaded when Redis lacks them)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._scripts: dict[str, Any] = {}

    def run(self, call: Call[T]) -> T:
        """Send one call and read its reply."""
        if call.script:
            return call.parse(self._script(call.script)(keys=call.keys, args=call.args))
        return call.parse(self.redis.execute_command(*call.args))  # type: ignore[no-untyped-call]

    def run_all(self, calls: Sequence[Call[T]]) -> list[T]:
        """Send calls in one round trip (not a transaction); their replies in order."""
        if not calls:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command(*_command(call, self._script))  # type: ignore[no-untyped-call]
        replies = pipe.execute(raise_on_error=False)
        for index in _unloaded(replies):
            call = calls[index]
            replies[index] = self._script(call.script)(keys=call.keys, args=call.args)
        return [call.parse(reply) for call, reply in zip(calls, replies, strict=True)]

    def _script(self, name: str) -> Any:
        if name not in self._scripts:
            self._scripts[name] = self.redis.register_script(script(name))
        return self._scripts[name]


class AsyncShell:
    """Runs calls on an asyncio client, the same way ``SyncShell`` does."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.redis = client
        self._scripts: dict[str, Any] = {}

    async def run(self, call: Call[T]) -> T:
        """Send one call and read its reply."""
        if call.script:
            return call.parse(await self._script(call.script)(keys=call.keys, args=call.args))
        return call.parse(await self.redis.execute_command(*call.args))  # type: ignore[no-untyped-call]

    async def run_all(self, calls: Sequence[Call[T]]) -> list[T]:
        """Send calls in one round trip (not a transaction); their replies in order."""
        if not calls:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command(*_command(call, self._script))
        replies = await pipe.execute(raise_on_error=False)
        for index in _unloaded(replies):
            call = calls[index]
            replies[index] = await self._script(call.script)(keys=call.keys, args=call.args)
        return [call.parse(reply) for call, reply in zip(calls, replies, strict=True)]

    def _script(self, name: str) -> Any:
        if name not in self._scripts:
            self._scripts[name] = self.redis.register_script(script(name))
        return self._scripts[name]
