"""The job record is defined once: every field a Lua script touches on a job's hash is a
``Field``, every status it writes is a ``JobStatus``, and the views read what is written."""

from __future__ import annotations

import re
from importlib import resources

from api_tasks.record.job_record import (
    TERMINAL,
    Field,
    JobStatus,
    finish_fields,
    job_view,
    meta_from,
    submit_fields,
)
from api_tasks.record.scripts import script
from api_tasks.spec import build_spec

LUA = resources.files("api_tasks.record") / "lua"
_CALL = re.compile(r"redis\.call\('(H[A-Z]+)', KEYS\[(\d+)\]([^)]*)")


def _job_key_index(source: str) -> int | None:
    """Where the job's hash is among a script's KEYS (from its header), if it takes it."""
    header = " ".join(line.removeprefix("--").strip() for line in source.splitlines()
                      if line.startswith("--"))
    match = re.search(r"KEYS: (.*?)\. ARGV", header)
    names = [name.strip() for name in match.group(1).split(",")] if match else []
    return names.index("job") + 1 if "job" in names else None


def test_every_job_hash_field_and_status_in_the_scripts_is_defined_once() -> None:
    fields, statuses, scripts = set(), set(), 0
    for path in LUA.iterdir():
        source = path.read_text(encoding="utf-8")
        index = _job_key_index(source)
        if path.name.startswith("_") or index is None:
            continue
        scripts += 1
        for command, key, rest in _CALL.findall(source):
            if int(key) != index:
                continue
            literals = re.findall(r"'([a-z_]+)'", rest)
            if command == "HSET":  # field, value, field, value...
                pairs = dict(zip(literals[::2], literals[1::2], strict=False))
                fields |= set(pairs)
                statuses |= {v for k, v in pairs.items() if k == Field.STATUS}
            else:
                fields |= set(literals)
        statuses |= set(re.findall(r"s [~=]= '([a-z_]+)'", source))
    assert scripts >= 9  # the header parse found the job scripts
    assert fields - {f.value for f in Field} == set()
    assert {Field.STATUS, Field.TOKEN, Field.DELIVERIES, Field.CRASHES} <= fields
    assert statuses - {s.value for s in JobStatus} == set()
    assert {"running", "cancelled", "queued", "waiting"} <= statuses


def test_the_scripts_share_one_ended_check_built_from_terminal() -> None:
    claim = script("claim")
    for status in JobStatus:
        assert (f"s == '{status.value}'" in claim.split("\n", 1)[0]) == (status in TERMINAL)
    for path in LUA.iterdir():  # no script spells the list out again
        assert "== 'succeeded' or" not in path.read_text(encoding="utf-8"), path.name


def test_each_script_gets_the_helpers_it_names_and_no_line_of_them_is_lost() -> None:
    prelude = (LUA / "_prelude.lua").read_text(encoding="utf-8")
    code = [line for line in prelude.splitlines() if line and not line.startswith("--")]
    finish, claim = script("finish"), script("claim")
    everything = "".join(script(path.name.removesuffix(".lua")) for path in LUA.iterdir()
                         if not path.name.startswith("_"))
    assert [line for line in code if line not in everything] == []  # every helper is whole
    assert "local function add_entry" in finish and "local function paced" not in finish
    assert "local function lapsing" not in finish  # (HELD's comment names no helper)
    assert "local function lease_holder" in claim and "local function now_ms" in claim
    held = re.search(r"local HELD = \{(.*)\}", prelude)
    assert held and set(re.findall(r"'([a-z_]+)'", held.group(1))) == {
        Field.TOKEN, Field.LEASE_UNTIL, Field.LAPSE_SEEN}


def test_views_read_what_submit_and_finish_write() -> None:
    spec = build_spec("chat", [{"role": "user", "content": "hi"}],
                      {"model": "m", "stream": True, "result_ttl": 60}, 1 << 20)
    record = {**submit_fields(spec, "local", "bulk"), Field.STATUS: JobStatus.RUNNING.value,
              Field.CREATED_AT: "10.5", Field.STARTED_AT: "11.0", Field.DELIVERIES: "2",
              Field.TOKEN: "w/1"}
    assert record[Field.RESULT_TTL] == "60" and record[Field.STREAM] == "1"
    view = job_view("j1", record)
    assert view["status"] == "running" and view["attempt"] == 2 and view["calls"] is None
    assert view["queue"] == "bulk" and view["stream"] is True and view["model"] == "m"
    ended = dict(zip(*[iter(finish_fields(JobStatus.FAILED, 12.0, 3, {"code": "x"}))] * 2,
                     strict=True))
    record.update(ended)
    view = job_view("j1", record)
    assert view["calls"] == 3 and view["finished_at"] == 12.0 and view["error"] == {"code": "x"}
    assert meta_from(record) == {"kind": "chat", "upstream": "local", "model": "m",
                                 "deployment": None, "attempts": 3, "tries": [],
                                 "created_at": 10.5,
                                 "started_at": 11.0, "finished_at": 12.0}
    assert "w/1" not in str(view)  # the attempt's token is the workers' business


def test_entries_parse_fast_and_what_orjson_refuses_still_parses() -> None:
    from api_tasks.record.events import chunk_event, parse_entries

    plain = chunk_event(0, 1, '{"choices":[{"delta":{"content":"hé"}}]}')
    lone = chunk_event(1, 1, '{"choices":[{"delta":{"content":"\\ud800"}}]}')  # a lone surrogate
    events = parse_entries([(b"1-1", {b"event": plain.encode()}),
                            (b"1-2", {b"event": lone.encode()})])
    assert [e["id"] for e in events] == ["1-1", "1-2"]
    assert events[0]["data"]["choices"][0]["delta"]["content"] == "hé"
    assert events[1]["data"]["choices"][0]["delta"]["content"] == "\ud800"
