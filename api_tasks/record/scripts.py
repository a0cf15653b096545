"""The Lua scripts, one ``.lua`` file each under ``api_tasks/record/lua/``, read once.

Each file starts with what it takes (KEYS, ARGV) and returns; the Python
wrapper that runs it (``LeaseStore.claim``...) names its arguments. Every
script is preceded by ``_prelude.lua`` (the server's clock in ms, the next free
stream entry id) and by ``ended(status)``, built from ``job_record.TERMINAL`` so
the statuses that end a job are named in one place.
"""

from __future__ import annotations

import functools
from importlib import resources

from api_tasks.record.job_record import TERMINAL

__all__ = ["script"]


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
