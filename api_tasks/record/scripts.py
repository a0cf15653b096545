"""The Lua scripts, one ``.lua`` file each under ``api_tasks/record/lua/``, read once.

Each file starts with what it takes (KEYS, ARGV) and returns; the Python
wrapper that runs it (``LeaseStore.claim``...) names its arguments. Every
script is preceded by the helpers of ``_prelude.lua`` it names (the server's clock
in ms, adding a stream entry...) and by ``ended(status)``, built from
``job_record.TERMINAL`` so the statuses that end a job are named in one place.
"""

from __future__ import annotations

import functools
import hashlib
import re
from importlib import resources

from api_tasks.record.job_record import TERMINAL

__all__ = ["named", "script", "sha"]


def _read(name: str) -> str:
    return (resources.files("api_tasks.record") / "lua" / f"{name}.lua").read_text(
        encoding="utf-8")


@functools.cache
def _helpers() -> list[tuple[frozenset[str], str]]:
    """The prelude's helpers, each block (blank-line apart) with the names it defines."""
    ended = " or ".join(f"s == '{status.value}'" for status in sorted(TERMINAL))
    blocks = [f"local function ended(s) return {ended} end",
              *(block.strip() for block in _read("_prelude").split("\n\n"))]
    return [(frozenset(re.findall(r"^local (?:function )?(\w+)", block, re.M)), block)
            for block in blocks if re.search(r"^local ", block, re.M)]


def _words(source: str) -> set[str]:
    return set(re.findall(r"\w+", source))


@functools.cache
def script(name: str) -> str:
    """The source of ``api_tasks/record/lua/<name>.lua``, after the prelude's helpers it
    names (each a script runs costs it a little, every time it runs)."""
    body = _read(name)
    named, chosen = _words(body), set[int]()
    while True:  # the helpers' own helpers too
        more = {i for i, (names, block) in enumerate(_helpers()) if names & named} - chosen
        if not more:
            break
        chosen |= more
        for i in more:
            named |= _words(_helpers()[i][1])
    return "".join(f"{block}\n\n" for i, (_, block) in enumerate(_helpers())
                   if i in chosen) + body


_NAMES: dict[str, str] = {}  # the SHA1 of each script ``sha`` gave, and its name


@functools.cache
def sha(name: str) -> str:
    """The SHA1 Redis knows script ``name`` by, for ``EVALSHA``."""
    digest = hashlib.sha1(script(name).encode(), usedforsecurity=False).hexdigest()
    _NAMES[digest] = name
    return digest


def named(digest: str) -> str | None:
    """The name of the script whose SHA1 ``sha`` gave as ``digest``, if any."""
    return _NAMES.get(digest)
