"""The Lua scripts, one ``.lua`` file each under ``api_tasks/record/lua/``, read once.

Each file starts with what it takes (KEYS, ARGV) and returns; the Python
wrapper that runs it (``LeaseStore.claim``...) names its arguments. Every
script is preceded by ``_prelude.lua`` (the server's clock in ms, the next free
stream entry id) and by ``ended(status)``, built from ``job_record.TERMINAL`` so
the statuses that end a job are named in one place.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

from api_tasks.record.job_record import TERMINAL

__all__ = ["named", "script", "sha"]


def _read(name: str) -> str:
    return (resources.files("api_tasks.record") / "lua" / f"{name}.lua").read_text(
        encoding="utf-8")


@functools.cache
def _prelude() -> str:
    ended = " or ".join(f"s == '{status.value}'" for status in sorted(TERMINAL))
    return f"local function ended(s) return {ended} end\n{_read('_prelude')}\n"


@functools.cache
def script(name: str) -> str:
    """The source of ``api_tasks/record/lua/<name>.lua``, after the shared prelude."""
    return _prelude() + _read(name)


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
