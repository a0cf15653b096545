"""Cluster-wide limits: requests and tokens per minute and calls in flight, across workers."""

from __future__ import annotations

import itertools
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from api_tasks import JobFailed, JobStatus, top
from api_tasks.client import Client
from config.errors import ConfigError
from config.loader import load_settings
from tests.support.fake_upstream import FakeUpstream, HttpError, Quota, Reply
from tests.support.scrape import metrics_ports, scrape, value, workers_value
from tests.support.services import Spawn, WorkerProcess, wait_until
from tests.support.top_view import top_rows

pytestmark = pytest.mark.integration
USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def limited(worker_env: dict[str, str], workdir: Path, fake: FakeUpstream,
            spawn: Spawn) -> tuple[Client, list[WorkerProcess]]:
    """Two worker processes sharing one upstream's limits."""
    config = workdir / f"limits-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(yaml.safe_dump({
        "worker": {"reserve_ahead": 0.3, "lease_ttl": 2, "watchdog_interval": 0.2},
        "upstreams": [{
            # told ten times what the upstream allows; 429s cost no attempt here
            "name": "following", "base_url": fake.base_url, "models": ["follow-*"],
            "model_limits": {"follow-*": {"tokens_per_minute": 300000}}}, {
            # its limits learnt from the upstream's headers, per model
            "name": "learning", "base_url": fake.base_url, "models": ["learn-*"],
            "limits": "auto"}, {
            # a 429 fails the job once its attempts are spent (no waiting it out)
            "name": "limited", "base_url": fake.base_url,
            "retry": {"max_attempts": 1, "rate_limited_for": 0},
            "limits": {"requests_per_minute": 600, "burst_seconds": 1, "utilization": 1.0},
            "model_limits": {
                "tok-*": {"tokens_per_minute": 6000, "burst_seconds": 1, "utilization": 1.0,
                          "accounting": "usage"},
                "arrive-*": {"tokens_per_minute": 60000, "burst_seconds": 1,
                             "utilization": 1.0},
                "pair-*": {"max_in_flight": 2},
                "one-*": {"requests_per_minute": 60, "burst_seconds": 1, "utilization": 1.0}}}]}))
    env = {**worker_env, "API_TASKS_CONFIG": str(config),
           "API_TASKS_PREFIX": f"lim{uuid.uuid4().hex[:6]}"}
    workers = [spawn(env, name, concurrency=8) for name in ("l1", "l2")]
    return Client(load_settings(env=env)), workers


def _booked(port: int, scope: str) -> float:
    """A worker's ``api_tasks_limit_booked_seconds`` of ``scope``'s requests."""
    return value(scrape(f"http://127.0.0.1:{port}/metrics"), "api_tasks_limit_booked_seconds",
                 scope=scope, unit="requests")


def _most_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max(sum(1 for t in times if start <= t < start + window) for start in times)


def test_requests_per_minute_hold_across_worker_processes(
        limited: tuple[Client, list[WorkerProcess]], fake: FakeUpstream, model: str) -> None:
    client, workers = limited
    # the upstream's own limit, with a little more burst than ours (as real ones have):
    # two processes each pacing alone to 600 a minute would get 429s here
    quota = fake.enforce(model, rpm=600, burst=2.0)
    before = top.snapshot(client)
    jobs = [client.submit_chat(USER, model=model) for _ in range(40)]
    # the scope's use of its budget, read from Redis at a worker's scrape: booked ahead
    [port, _] = metrics_ports(client)
    wait_until(lambda: _booked(port, "limited") >= 1.0, 10, "the scope booked ahead")
    for job in jobs:
        assert job.result(timeout=60) is not None
    times = [r.at for r in fake.requests(model)]
    assert len(times) == 40 and quota.rejected == 0  # not one 429
    # each scope's use of its budget, counted by the workers that admitted the calls, beside
    # the budget each of them exports (Prometheus: sum of rate(used) over max(budget))
    assert workers_value(client, "api_tasks_limit_used_total", scope="limited",
                         unit="requests") == 40
    assert workers_value(client, "api_tasks_limit_budget_per_minute", scope="limited",
                         unit="requests") == 600 * len(workers)
    # and in Redis for the whole cluster, which `top` shows against the budget
    after = top.snapshot(client)
    assert after["state"]["limits_used"][("limited", "requests")] == 40
    [row] = [row for row in top_rows(after, before) if row[0] == "limited"]
    assert row[:3] == ["limited", "requests", "600"]
    rate = 40 / (after["at"] - before["at"]) * 60  # what it reserved, as a minute's rate
    assert row[3:5] == [f"{rate:.0f}", f"{rate / 600:.0%}"]
    assert float(row[5].removesuffix("s")) >= 0 and row[6] == "0"  # booked ahead; in line
    # 10 a second, with a one-second burst: never more than 21 in any second
    assert _most_in_window(times, 1.0) <= 21
    assert max(times) - min(times) >= (40 - 11) * 0.1 - 0.05
    assert sum("waits" in w.log() for w in workers) >= 1  # jobs queued up for their turn


def test_token_reservations_are_settled_with_reported_usage(
        limited: tuple[Client, list[WorkerProcess]], fake: FakeUpstream, model: str) -> None:
    client, _ = limited
    tok = "tok-" + model
    # each reserves ~1,000 tokens of a 6,000-a-minute budget but uses a handful:
    # without settling, 20 jobs would take minutes
    jobs = [client.submit_chat(USER, model=tok, max_tokens=1000) for _ in range(20)]
    for job in jobs:
        assert job.result(timeout=60) is not None
    times = [r.at for r in fake.requests(tok)]
    assert max(times) - min(times) < 20


def test_tokens_counted_on_arrival_are_never_given_back(
        limited: tuple[Client, list[WorkerProcess]], fake: FakeUpstream, model: str) -> None:
    client, _ = limited
    arrive = "arrive-" + model
    # each reserves its prompt and 500 tokens of a 1,000-a-second budget (1 s of burst) and
    # uses a handful: counted as OpenAI counts them, the reservations are all spent
    jobs = [client.submit_chat(USER, model=arrive, max_tokens=500) for _ in range(8)]
    for job in jobs:
        assert job.result(timeout=60) is not None
    times = sorted(r.at for r in fake.requests(arrive))
    assert times[-1] - times[0] >= 2.5  # (8 x ~510 - 1,000) / 1,000 a second
    used = workers_value(client, "api_tasks_limit_used_total", scope="limited/arrive-*",
                         unit="tokens")
    assert 8 * 500 < used < 8 * 600  # each its prompt and its ceiling, as reserved


def test_pacing_follows_what_the_upstream_says_it_has_left(
        limited: tuple[Client, list[WorkerProcess]], fake: FakeUpstream, model: str) -> None:
    client, workers = limited
    # the upstream allows 1,000 tokens at once and 500 a second, ten times less than the
    # scope is told; 40 calls of ~101 tokens each
    def run(name: str, report: bool, stopped: bool = False) -> Quota:
        quota = fake.enforce(name, tpm=30000, burst=2.0, report=report)
        for worker in workers if stopped else ():
            worker.signal(signal.SIGSTOP)
        try:
            jobs = [client.submit_chat(USER, model=name, max_tokens=100) for _ in range(40)]
        finally:
            for worker in workers if stopped else ():
                worker.signal(signal.SIGCONT)
        for job in jobs:
            assert job.result(timeout=90) is not None  # a 429 costs no attempt
        return quota

    # the control first, while the scope knows nothing: an upstream that says nothing gets
    # a 429 for many of the calls (all waiting when the workers start on them, so that a
    # busy machine picking them up slowly cannot spread them out and spare it its 429s)
    assert run("follow-silent-" + model, report=False, stopped=True).rejected >= 10
    # saying what it has left and its own limit in x-ratelimit-* headers, as OpenAI does
    said = "follow-" + model
    assert run(said, report=True).rejected <= 2
    arrivals = sorted(r.at for r in fake.requests(said))
    # paced, not stalled: (4,040 - 1,000) / 500 a second is 6.1 s; a scope that waited out
    # whole reset windows, or took the upstream's 429s as the pace, would take much longer
    assert arrivals[-1] - arrivals[0] <= 20


def test_pacing_leaves_room_for_another_application_on_the_key(
        limited: tuple[Client, list[WorkerProcess]], fake: FakeUpstream, model: str) -> None:
    client, _ = limited
    name = "follow-" + model  # told 300,000 tokens a minute; the upstream says 60,000
    quota = fake.enforce(name, tpm=60000, burst=2.0)  # shared with name + "-other"
    stop = threading.Event()

    def other_application() -> None:  # a steady 300 tokens a second, about 100 a call
        session, due = requests.Session(), time.monotonic()
        while not stop.is_set():
            session.post(fake.base_url + "/v1/chat/completions", timeout=10, json={
                "model": name + "-other", "max_tokens": 90,
                "messages": [{"role": "user", "content": "another application"}]})
            due += 1 / 3
            time.sleep(max(due - time.monotonic(), 0))

    other = threading.Thread(target=other_application, daemon=True)
    other.start()
    try:
        time.sleep(2)  # it was there first
        jobs = [client.submit_chat(USER, model=name, max_tokens=90) for _ in range(80)]
        for job in jobs:
            assert job.result(timeout=90) is not None
    finally:
        stop.set()
        other.join(10)
    pace = client.keys.limit(f"following/{name.split('-')[0]}-*")
    others = client.redis.hget(pace, "tok_others")
    assert others is not None, "no estimate of the other application's rate"
    # tokens a millisecond: the other application's 0.3, seen through calls of ~100 tokens
    assert 0.15 <= float(others) <= 0.45
    assert client.redis.hget(pace, "tok_oiv") is not None  # and the scope paces around it
    ours = [at for at, _, who in quota.taken if who == name]
    assert len(ours) == 80


def test_auto_limits_are_learnt_from_the_upstreams_headers(
        limited: tuple[Client, list[WorkerProcess]], fake: FakeUpstream, model: str) -> None:
    client, _ = limited
    name = "learn-" + model
    quota = fake.enforce(name, rpm=120, burst=1.0)  # two at once, then one each half second
    jobs = [client.submit_chat(USER, model=name) for _ in range(12)]
    for job in jobs:
        assert job.result(timeout=60) is not None  # a 429 costs no attempt
    # the limit it reported, paced to utilization (0.98), per model
    learnt = client.redis.hget(client.keys.limit(f"learning/{name}"), "req_iv")
    assert learnt is not None and float(learnt) == pytest.approx(60000 / (120 * 0.98))
    # told nothing before the first answers, the opening calls met 429s; from then on the
    # calls went at the learnt pace (unpaced, each cool-down's end would bring more 429s)
    assert quota.rejected <= 12
    taken = sorted(at for at, _, _ in quota.taken)
    assert len(taken) == 12
    # the call the cool-down released goes when its worker has it again, which can be a
    # little after the turn it holds: the next, at its own turn, comes that much sooner
    assert taken[3] - taken[2] >= 0.3
    assert min(b - a for a, b in itertools.pairwise(taken[3:])) >= 0.4


def test_auto_limits_name_no_rates(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({"upstreams": [{"name": "u", "base_url": "http://u",
                                                   "limits": {"auto": True,
                                                              "requests_per_minute": 60}}]}))
    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.limits.*leave them out"):
        load_settings(env={}, path=str(path))


def test_a_call_larger_than_the_whole_budget_is_refused(
        limited: tuple[Client, list[WorkerProcess]], fake: FakeUpstream, model: str) -> None:
    client, _ = limited
    with pytest.raises(JobFailed) as caught:
        client.submit_chat(USER, model="tok-" + model, max_tokens=7000).result(timeout=20)
    assert caught.value.error["code"] == "request_too_large"
    assert fake.requests("tok-" + model) == []


def test_max_in_flight_holds_across_worker_processes(
        limited: tuple[Client, list[WorkerProcess]], fake: FakeUpstream, model: str) -> None:
    client, _ = limited
    pair = "pair-" + model
    fake.script(pair, Reply(delay=2.5))  # longer than a lease: slots must be renewed
    jobs = [client.submit_chat(USER, model=pair) for _ in range(6)]
    for job in jobs:
        assert job.result(timeout=60) is not None
    starts = sorted(r.at for r in fake.requests(pair))
    overlapping = max(sum(1 for s in starts if t <= s < t + 2.45) for t in starts)
    assert len(starts) == 6 and overlapping <= 2


def test_a_job_over_its_limit_waits_outside_the_worker(
        limited: tuple[Client, list[WorkerProcess]], fake: FakeUpstream, model: str) -> None:
    client, _ = limited
    jobs = [client.submit_chat(USER, model=model) for _ in range(30)]
    seen: list[dict[str, Any]] = []

    def some_wait() -> bool:
        seen.extend(j.info() for j in jobs)
        return any(i.get("status") == JobStatus.WAITING.value for i in seen)

    wait_until(some_wait, 10, "a job waiting for its turn")
    waiting = next(i for i in seen if i.get("status") == "waiting")
    assert waiting["waiting_for"] == "requests" and float(waiting["waiting_until"]) > 0
    for job in jobs:
        assert job.result(timeout=60) is not None


def test_a_429_on_the_last_attempt_still_cools_the_upstream_down(
        limited: tuple[Client, list[WorkerProcess]], fake: FakeUpstream, model: str) -> None:
    client, _ = limited  # this upstream makes one attempt only
    fake.script(model + "-a", HttpError(429, headers={"Retry-After": "2"}))
    with pytest.raises(JobFailed):
        client.submit_chat(USER, model=model + "-a").result(timeout=20)
    [limited_call] = fake.requests(model + "-a")
    assert client.submit_chat(USER, model=model + "-b").result(timeout=20) is not None
    [next_call] = fake.requests(model + "-b")
    assert next_call.at - limited_call.at >= 1.9


def test_the_fake_upstream_really_enforces_its_limit(fake: FakeUpstream, model: str) -> None:
    """The control for the test above: calls that ignore the limit do get 429s."""
    import requests

    quota = fake.enforce(model, rpm=600, burst=1.0)
    url = fake.base_url + "/v1/chat/completions"
    codes = [requests.post(url, json={"model": model, "messages": USER}, timeout=5).status_code
             for _ in range(30)]
    assert codes.count(429) == quota.rejected > 0


def test_interactive_jobs_go_first_under_a_limit_shared_with_a_bulk_backlog(
        limited: tuple[Client, list[WorkerProcess]], fake: FakeUpstream, model: str) -> None:
    client, _ = limited  # one limit for both lanes: 10 calls a second
    quota = fake.enforce(model, rpm=600, burst=2.0)
    bulk = [client.submit_chat(USER, model=model, queue="bulk") for _ in range(40)]
    fake.wait_for_requests(model, 12, timeout=20)  # the backlog is pacing now
    submitted = time.monotonic()
    urgent = client.submit_chat([{"role": "user", "content": "urgent"}], model=model,
                                queue="interactive")
    assert urgent.result(timeout=30) is not None
    calls = fake.requests(model)
    [urgent_call] = [c for c in calls if c.body and c.body["messages"][0]["content"] == "urgent"]
    overtaken_by = sum(1 for c in calls if submitted < c.at < urgent_call.at)
    # the bulk backlog still had ~25 calls (2.5 s) to go: the interactive call waits for
    # the turns already promised, at most a few tenths of a second, not behind them all
    assert urgent_call.at - submitted < 1.0 and overtaken_by <= 6, overtaken_by
    for job in bulk:
        assert job.result(timeout=60) is not None
    assert quota.rejected == 0


def test_bulk_jobs_waiting_for_a_limit_keep_their_place_in_line(
        limited: tuple[Client, list[WorkerProcess]], fake: FakeUpstream, model: str) -> None:
    client, _ = limited  # 10 calls a second: 60 jobs wait up to 6 s, most outside a worker
    jobs = [client.submit_chat([{"role": "user", "content": f"j{i}"}], model=model,
                               queue="bulk") for i in range(60)]
    for job in jobs:
        assert job.result(timeout=60) is not None
    arrivals = sorted(fake.requests(model), key=lambda r: r.at)
    order = [int(r.body["messages"][0]["content"][1:]) for r in arrivals if r.body]
    # the two workers' 16 threads ask at once: the burst and the turns within reserve_ahead
    # (13) go to whichever asks first, and a thread slow to start loses them; after that
    # wave, each goes in submit order (without the line: a random order)
    wave = 16
    assert sorted(order) == list(range(60))
    assert max(abs(position - i) for position, i in enumerate(order)) <= wave, order
    assert max(abs(position - i) for position, i in enumerate(order)
               if position >= wave and i >= wave) <= 8, order


def test_jobs_held_by_one_models_limit_do_not_hold_up_other_models(
        limited: tuple[Client, list[WorkerProcess]], fake: FakeUpstream, model: str) -> None:
    client, _ = limited  # one-*: a call a second, under the upstream's 10 a second
    held = [client.submit_chat(USER, model="one-" + model, queue="bulk") for _ in range(50)]
    wait_until(lambda: any(j.status() == JobStatus.WAITING for j in held), 10, "a waiting job")
    start = time.monotonic()
    others = [client.submit_chat(USER, model=model, queue="bulk") for _ in range(5)]
    for job in others:
        assert job.result(timeout=30) is not None
    # the upstream's own budget is free: they must not queue behind the one-* jobs
    # (counted in the upstream's line, 50 of them would hold them up 5 s)
    assert time.monotonic() - start < 2.0
    for job in held:
        job.cancel()
