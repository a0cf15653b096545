"""JSON in and out: orjson on the hot paths, the standard library where orjson would refuse
or change a value (a lone surrogate escape, an integer past 64 bits)."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

__all__ = ["dumps", "loads", "loads_exact"]

# orjson reads an integer past 64 bits as a float: 10**20 would reach an upstream as 1e+20
_LONG_NUMBER = re.compile(rb"[0-9]{20}")


def loads(raw: bytes | bytearray | str) -> Any:
    """JSON by orjson; what orjson refuses (a lone surrogate escape) by json, which takes it
    (``ValueError`` if neither does)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def loads_exact(raw: bytes | bytearray) -> Any:
    """``loads`` that keeps every number as written: a body with a run of 20 digits anywhere
    (an integer orjson would turn into a float) is read by json."""
    return json.loads(raw) if _LONG_NUMBER.search(raw) else loads(raw)


def dumps(value: Any, sort_keys: bool = False) -> bytes:
    """Compact JSON bytes by orjson; what it refuses (integers past 64 bits, keys that are not
    strings) by json, in the same compact form."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else None)
    except (orjson.JSONEncodeError, TypeError):
        # ASCII escapes keep a lone surrogate encodable; NaN beside a long integer is a
        # ValueError here, never the invalid bare NaN
        return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
                          sort_keys=sort_keys).encode()
