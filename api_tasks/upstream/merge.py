"""Payload merging: one pure function.

Layers are applied in order, each later one winning key by key::

    global defaults < upstream defaults < model defaults < job parameters

A value of ``None`` (JSON ``null``) in a later layer removes the key, so a job
or a model can drop a default that its server rejects. The merge is shallow on
purpose: a nested value such as ``response_format`` or ``stream_options`` is
replaced whole, never blended. Keys the project does not know pass through.

>>> merge_payload({"temperature": 0.1, "top_p": 0.75}, {"top_p": None, "seed": 7})
{'temperature': 0.1, 'seed': 7}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["merge_payload"]


def merge_payload(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Merge mappings left to right; later values win, ``None`` removes the key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    return {key: value for key, value in merged.items() if value is not None}
