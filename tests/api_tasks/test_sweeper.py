"""One worker process of a cluster sweeps at a time (``execution.sweeper``), another takes
over when it stops or dies, and the parts of the sweeping sleep until their work is due or
a token on their wake list says there is more."""

from __future__ import annotations

import json
import logging
import signal
import time
import uuid
from pathlib import Path

import pytest
import redis

from api_tasks.background import Sweep
from api_tasks.client import Client
from api_tasks.connections import UNAVAILABLE, connect
from api_tasks.execution import sweeper
from api_tasks.execution.scheduler import Scheduler
from api_tasks.execution.sweeper import SweeperRole
from api_tasks.record.keys import Keys
from api_tasks.record.leases import LeaseStore
from api_tasks.record.scripts import script
from config.loader import load_settings
from config.settings import RedisSettings
from tests.conftest import STATE_SHARDS
from tests.support.services import RedisClusterGroup, RedisServer, primaries, wait_until

pytestmark = pytest.mark.integration


def test_one_process_holds_the_role_and_another_takes_it_when_it_stops_or_dies(
        redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweeper, "_EVERY", 0.1)
    monkeypatch.setattr(sweeper, "_TTL", 2.0)  # a starved thread keeps the role 1.5 s
    monkeypatch.setattr(sweeper, "_MARGIN", 0.5)
    keys = Keys(f"sweep{uuid.uuid4().hex[:8]}", shards=STATE_SHARDS)
    first, second = (SweeperRole(redis_client, keys, name) for name in ("first", "second"))
    first.start()
    second.start()
    try:
        assert first.held and not second.held  # the first to ask has it
        renewals: set[float] = set()

        def renewed() -> bool:
            assert first.held and not second.held
            renewals.add(first._until)
            return len(renewals) >= 25  # past its TTL of 2 s: renewed, never taken over
        wait_until(renewed, 5, "the holder to renew its role a few times")
        first.stop()  # hands it back: the other takes it at its next ask
        assert not first.held
        wait_until(lambda: second.held, 2, "the second process to take the role")
        assert redis_client.get(keys.sweeper()) == b"second"
        second._stopping.set()  # dies: no renewal, no hand-back
        second._thread.join(2)
        third = SweeperRole(redis_client, keys, "third")
        third.start()
        assert not third.held  # the dead holder's role has not lapsed yet
        wait_until(lambda: third.held, 6, "the role to lapse and be taken")
        assert not second.held  # its own view lapsed before the role did
        third.stop()
    finally:
        first.stop()
        second.stop()


def test_the_sweeping_scheduler_sends_a_job_parked_while_it_slept(
        redis_client: redis.Redis) -> None:
    """An idle scheduler blocks on the wake list for up to a second; a job parked meanwhile
    for 50 ms leaves a token there, and is sent within a few tenths of a second, not a
    second later."""
    keys = Keys(f"sweep{uuid.uuid4().hex[:8]}", shards=STATE_SHARDS)
    leases = LeaseStore(redis_client, keys, 3600, 30_000, 3)
    sent: list[tuple[str, float]] = []
    scheduler = Scheduler(redis_client, keys, leases,
                          lambda job_id, _message: sent.append((job_id, time.monotonic())))
    scheduler.start()
    try:
        wait_until(lambda: any(c.get("cmd") == "blpop" for node in primaries(redis_client)
                               for c in node.client_list()), 5,
                   "the scheduler to wait on its wake list")
        token = "t1"
        job_id = f"job-{uuid.uuid4().hex[:8]}"
        until = int(time.time() * 1000) + 30_000  # (this machine's clock is Redis's)
        redis_client.hset(keys.job(job_id), mapping={"status": "running", "token": token,
                                                     "lease_until": until})
        parked_at = time.monotonic()
        leases.park(job_id, token, 0.05, "limit", '{"task": "t"}')
        wait_until(lambda: sent, 5, "the parked job to be sent again")
        assert sent[0][0] == job_id
        assert sent[0][1] - parked_at < 0.5
    finally:
        scheduler.stop()


class _Rounds(Sweep):
    """A part of the sweeping that counts its rounds and has nothing more to do after each."""

    def __init__(self, client: redis.Redis, wake: str, role: list[bool]) -> None:
        super().__init__("test-sweep", client, wake, 60, lambda: role[0], None,
                         logging.getLogger(__name__))
        self.rounds: list[float] = []

    def sweep(self) -> float | None:
        self.rounds.append(time.monotonic())
        return None  # until woken


def test_an_idle_sweep_sleeps_on_its_wake_list_until_a_token_and_hands_on_one_not_its_own(
        tmp_path: Path) -> None:
    """Idle, a part of the sweeping runs no round (one blocking pop every ten seconds); a
    token ends the wait at once; a process that lost the role leaves the token it took for
    the holder."""
    server = RedisServer(tmp_path / "redis").start()  # its own: the only one blocked there
    try:
        own = redis.Redis.from_url(server.url)
        wake = "sweep:wake"
        leave = own.register_script(script("wake"))
        role = [True]
        part = _Rounds(connect(RedisSettings(url=server.url)), wake, role)

        def waiting() -> bool:
            return any(c.get("cmd") == "blpop" for c in own.client_list())
        part.start()
        try:
            wait_until(lambda: part.rounds and waiting(), 5, "the wait on the wake list")
            woken = time.monotonic()
            leave(keys=[wake], args=[60])
            wait_until(lambda: len(part.rounds) == 2, 5, "a round for the token")
            assert part.rounds[1] - woken < 0.3
            assert own.llen(wake) == 0
            wait_until(waiting, 5, "the wait again")
            role[0] = False  # the role moved on while this process waited
            leave(keys=[wake], args=[60])
            wait_until(lambda: own.llen(wake) == 1, 5, "the token handed on")
            assert not waiting() and len(part.rounds) == 2  # idle: no round, no wait
        finally:
            part.stop()
    finally:
        server.stop()


def test_starting_or_cancelling_a_batch_leaves_a_token_for_the_batch_pump(
        redis_client: redis.Redis, worker_env: dict[str, str], tmp_path: Path) -> None:
    # a prefix no worker sweeps: the tokens stay for the test to see
    client = Client(load_settings(env={**worker_env,
                                       "API_TASKS_PREFIX": f"tok{uuid.uuid4().hex[:6]}"}))
    wake = client.keys.batches_wake()
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(line) + "\n")
    batch = client.submit_batch(source, window=1, queue="bulk")
    assert redis_client.lpop(wake) == b"1"
    assert batch.cancel() == "cancelling"
    assert redis_client.lpop(wake) == b"1"


class _FlakyRedis:
    """A Redis that hands a token to the wait once and then fails every call."""

    def __init__(self) -> None:
        self.popped = 0

    def register_script(self, _source: str) -> object:
        def run(**_: object) -> None:
            raise redis.ConnectionError("Redis went away")
        return run

    def blpop(self, _keys: list[str], timeout: float = 0) -> tuple[bytes, bytes]:
        self.popped += 1
        if self.popped == 1:
            return b"wake", b"1"
        raise redis.ConnectionError("Redis went away")


def test_a_sweep_outlives_a_failed_hand_on_of_its_token() -> None:
    """Woken after the role moved on, a part hands the token on; Redis failing then must not
    end its thread (the role lapses when Redis is flaky, just then)."""
    asked: list[bool] = []

    def sweeping() -> bool:  # held for its first round and its wait, then lost
        asked.append(len(asked) < 2)
        return asked[-1]
    part = _Rounds(_FlakyRedis(), "wake", [True])  # type: ignore[arg-type]
    part._sweeping = sweeping  # type: ignore[method-assign]
    part.start()
    try:
        wait_until(lambda: len(asked) >= 4, 5, "a look at the role after the failed hand-on")
        assert part._thread.is_alive() and len(part.rounds) == 1
    finally:
        part.stop()


def test_on_a_cluster_the_role_goes_on_from_a_stand_in_while_its_node_is_down(
        tmp_path: Path) -> None:
    """While the node serving the role answers nothing (stopped, as behind a network that
    drops its packets), the processes ask for the first stand-in whose node answers: one of
    them sweeps for the other shards, and the node costs them one wait, not one a tick. Once
    it answers again, the stand-in's holder takes the role back and hands the stand-in back,
    the others leaving it to do so."""
    group = RedisClusterGroup(tmp_path).start()
    settings = RedisSettings(state_url=group.cluster_url, shards=6).state()
    client = connect(settings, socket_timeout=0.5)  # as a worker's quick client
    keys = Keys(f"sweep{uuid.uuid4().hex[:8]}", shards=6)
    first, second = (SweeperRole(client, keys, name) for name in ("first", "second"))
    owner = {node.port: node for node in group.nodes}
    role_node = owner[client.get_node_from_key(keys.sweeper()).port]
    assert role_node.proc is not None
    try:
        first.tick()
        second.tick()
        assert first.held and not second.held
        role_node.proc.send_signal(signal.SIGSTOP)
        try:
            first.tick()  # waits once for the node, then takes a stand-in
            second.tick()
            assert first.held and not second.held
            stand_in = first._key
            assert stand_in in keys.sweeper_stand_ins()
            assert owner[client.get_node_from_key(stand_in).port] is not role_node
            started = time.monotonic()
            first.tick()
            second.tick()
            assert time.monotonic() - started < 0.5  # the node is passed over meanwhile
            assert first.held and not second.held
        finally:
            role_node.proc.send_signal(signal.SIGCONT)
        # a token left behind on the role (a keep that landed late): the stand-in's holder
        # sweeps on until it lapses, and nobody else starts meanwhile
        wait_until(lambda: _set(client, keys.sweeper(), "stale"), 15, "the role's node to answer")

        def back() -> bool:
            first.tick()
            second.tick()
            assert first.held and not second.held  # never nobody, never both
            return first._key == keys.sweeper()
        wait_until(back, 15, "the stand-in's holder to take the role back")
        assert first.held and client.get(keys.sweeper()) == b"first"
        assert client.get(stand_in) is None  # handed back
    finally:
        first.stop()
        second.stop()
        client.close()
        group.stop()


def _set(client: redis.Redis, key: str, value: str) -> bool:
    try:
        return bool(client.set(key, value, px=2000))
    except UNAVAILABLE:
        return False
