"""The Lua scripts, one ``.lua`` file each under ``api_tasks/record/lua/``, read once.

Each file starts with what it takes (KEYS, ARGV) and returns; the Python
wrapper that runs it (``LeaseStore.claim``...) names its arguments.
"""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["script"]


@functools.cache
def script(name: str) -> str:
    """The source of ``api_tasks/record/lua/<name>.lua``."""
    return (resources.files("api_tasks.record") / "lua" / f"{name}.lua").read_text(encoding="utf-8")
