"""What a Redis Cluster would refuse of the commands a Redis saw: keys spanning hash slots.

``SlotAudit`` records a Redis's ``MONITOR`` feed to a file (raw bytes, parsed once at the
end, so the tests it watches pay little) and names every script whose keys span slots or
that touches a key it was not given, every transaction whose keys span slots, and every
multi-key command whose keys span slots that a cluster client cannot split.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import redis
from redis._parsers import CommandsParser
from redis.crc import key_slot

from api_tasks.record import scripts

__all__ = ["CROSS_SLOT_LEFT", "SlotAudit", "cross_slot"]

# What the state's commands may still run across slots on a plain Redis, and why a cluster
# does not: with the broker apart, a round trip's records (several jobs, any shards) are one
# transaction on a plain Redis, so that a failed round trip wrote none; on a cluster, one
# script each (``enqueue._whole``). The audit fails on anything not listed.
CROSS_SLOT_LEFT: frozenset[str] = frozenset({"transaction job_create"})

_TOKEN = re.compile(rb'"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|.)", re.DOTALL)
_SIMPLE = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b"}
# multi-key commands a cluster client splits by slot itself (redis-py's RedisCluster)
_SPLIT = {b"DEL", b"UNLINK", b"EXISTS", b"TOUCH"}
_LUA = Path(scripts.__file__).parent / "lua"


def _unescape(token: bytes) -> bytes:
    def one(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        if code.startswith(b"x") and len(code) == 3:
            return bytes([int(code[1:], 16)])
        return _SIMPLE.get(code, code)
    return _ESCAPE.sub(one, token)


def _parse(line: bytes) -> tuple[str, list[bytes]] | None:
    """(source, arguments) of one MONITOR line: the client's address, or ``lua``."""
    start = line.find(b" [")
    end = line.find(b"] ", start)
    if start < 0 or end < 0:
        return None
    source = line[start + 2:end].split(b" ", 1)[-1].decode()
    return source, [_unescape(t) for t in _TOKEN.findall(line, end)]


def _label(args: list[bytes], names: dict[str, str]) -> str:
    """A command's name, or for a script the name of its file."""
    name = args[0].upper()
    if name == b"EVALSHA":
        return names.get(args[1].decode(), "EVALSHA")
    if name == b"EVAL":
        digest = hashlib.sha1(args[1], usedforsecurity=False).hexdigest()
        return names.get(digest, "EVAL")
    return name.decode()


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as feed:
        for line in feed:
            if line.startswith(b"+"):
                yield line[1:].rstrip(b"\r\n")


def cross_slot(path: Path, client: redis.Redis) -> dict[str, bytes]:
    """What a cluster would refuse in the MONITOR feed at ``path``: a name (``script
    <name>``, ``script <name> undeclared``, ``transaction <commands>``, ``command <NAME>``)
    for each, with one example of the keys."""
    parser = CommandsParser(client)
    found: dict[str, bytes] = {}
    names = {scripts.sha(path.stem): path.stem for path in _LUA.glob("*.lua")}

    def keys_of(args: list[bytes]) -> list[bytes]:
        name = args[0].upper()
        if name in (b"EVALSHA", b"EVAL", b"EVALSHA_RO", b"EVAL_RO"):
            return args[3:3 + int(args[2])]
        if len(args) < 2 or name in (b"PUBLISH", b"SPUBLISH", b"TIME", b"PING", b"SCRIPT",
                                     b"HELLO", b"CLIENT", b"INFO", b"SELECT", b"MULTI",
                                     b"EXEC", b"DISCARD", b"WATCH", b"UNWATCH"):
            return []
        keys = parser.get_keys(client, name.decode().lower(), *args[1:]) or []
        return [k if isinstance(k, bytes) else str(k).encode() for k in keys]

    def spans(keys: Iterable[bytes]) -> bool:
        return len({key_slot(k) for k in keys}) > 1

    def single(args: list[bytes]) -> tuple[str, set[bytes]] | None:
        """Check one command outside a transaction; the script it opens, if it is one."""
        name, keys = args[0].upper(), keys_of(args)
        if name in (b"EVALSHA", b"EVAL"):
            label = _label(args, names)
            if spans(keys):
                found.setdefault(f"script {label}", b" ".join(keys[:4]))
            return label, set(keys)
        if name not in _SPLIT and spans(keys):
            found.setdefault(f"command {name.decode()}", b" ".join(keys[:4]))
        return None

    script: tuple[str, set[bytes]] | None = None  # the script whose commands follow
    # each client's open transaction: Redis shows its MULTI when it comes, and the commands
    # it queued at its EXEC, so other clients' lines may come between
    blocks: dict[str, list[list[bytes]]] = {}
    for line in _lines(path):
        parsed = _parse(line)
        if parsed is None or not parsed[1]:
            continue
        source, args = parsed
        name = args[0].upper()
        if source == "lua":
            if script is not None:
                undeclared = [k for k in keys_of(args) if k not in script[1]]
                if undeclared:
                    found.setdefault(f"script {script[0]} undeclared", undeclared[0])
            continue
        script = None
        if name == b"MULTI":
            blocks[source] = []
            continue
        block = blocks.get(source)
        if block is None:
            script = single(args)
            continue
        if name in (b"EXEC", b"DISCARD"):
            del blocks[source]
            keys = [k for command in block for k in keys_of(command)]
            if spans(keys):
                commands = " ".join(sorted({_label(c, names) for c in block}))
                found.setdefault(f"transaction {commands}", b" ".join(keys[:4]))
            continue
        block.append(args)
        if name in (b"EVALSHA", b"EVAL"):
            script = (_label(args, names), set(keys_of(args)))
            if spans(script[1]):
                found.setdefault(f"script {script[0]}", b" ".join(keys_of(args)[:4]))
    return found


class SlotAudit:
    """Records a Redis's MONITOR feed to a file while it runs."""

    def __init__(self, host: str, port: int, path: Path) -> None:
        self.path = path
        self._sock = socket.create_connection((host, port))
        self._thread = threading.Thread(target=self._record, name="slot-audit", daemon=True)

    def start(self) -> SlotAudit:
        self._sock.sendall(b"MONITOR\r\n")
        self._thread.start()
        return self

    def _record(self) -> None:
        with self.path.open("wb") as out:
            while chunk := self._sock.recv(1 << 20):
                out.write(chunk)

    def stop(self) -> None:
        """Stop recording; the file holds every line seen."""
        self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)
        self._sock.close()
