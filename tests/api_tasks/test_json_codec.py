"""The one JSON codec: orjson where it keeps every value, the standard library where not."""

from __future__ import annotations

import json
import math

import pytest

from api_tasks.json_codec import dumps, loads, loads_exact


def test_what_orjson_would_change_or_refuse_comes_out_as_valid_json() -> None:
    assert dumps({"seed": 10**20, "n": 1}) == b'{"seed":100000000000000000000,"n":1}'
    assert dumps({1: "a"}) == b'{"1":"a"}'  # as json writes a key that is not a string
    assert dumps({"x": math.nan}) == b'{"x":null}'  # orjson's null, never a bare NaN
    with pytest.raises(ValueError):  # beside a long integer: refused, not invalid JSON
        dumps({"seed": 10**20, "x": math.nan})
    lone = dumps({"s": "\ud800", "t": "é"})  # a lone surrogate: escaped, still JSON
    assert json.loads(lone) == {"s": "\ud800", "t": "é"}
    assert dumps({"b": 1, "a": 2}, sort_keys=True) == b'{"a":2,"b":1}'


def test_a_request_body_keeps_its_numbers_as_written() -> None:
    assert loads_exact(b'{"seed": 100000000000000000000}')["seed"] == 10**20
    assert loads(b'{"a": "\\ud800"}') == {"a": "\ud800"}  # orjson refuses it; json takes it
