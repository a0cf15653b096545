"""What jobs and idle workers cost Redis: ``python -m bench.redis_cost [--quick]``.

One Redis of its own, our worker and one running the bare Celery task of ``bench/reference.py``
(Celery's Redis result backend and ``get()``) side by side, the fake upstream in its own
process. The figures are ``INFO commandstats`` and ``INFO cpu`` deltas (commands run inside
Lua scripts count one each): per non-streamed job, submitted at once and each result read by
its producer, less what the idle workers spend over the same time, in rounds that take turns
(ours, then the bare task's) so that a drift of the machine's speed meets both alike, the
median round kept; the same for jobs submitted each after the last one's end (the worker
waits on BRPOP for each, where it takes a backlog off the queue many at a time); per relayed
chunk (streamed jobs of 100 chunks, 100 at once, less a non-streamed job each); and per
second of an idle worker. One Redis core's ceiling is one second over the CPU per job.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis

from api_tasks.record.workers import alive
from bench.harness import Services, services
from bench.run import table
from bench.scenarios import USER, Row, our_client, warm_up
from tests.support.services import wait_until

__all__ = ["main"]

IDLE_SECONDS = 20.0
ROUNDS = 5  # per-job rounds of each, taking turns
ONE_BY_ONE = 100  # jobs a round of jobs submitted one after another's end


class Meter:
    """Redis's command counts and CPU seconds between two looks (its own INFO calls left out)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def look(self) -> tuple[Counter[str], float]:
        stats = self.client.info("commandstats")
        calls = Counter({name.removeprefix("cmdstat_"): int(value["calls"])
                         for name, value in stats.items() if name != "cmdstat_info"})
        cpu = self.client.info("cpu")
        return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    def over(self, action: Callable[[], Any]) -> tuple[Counter[str], float, float]:
        """(commands by name, Redis CPU seconds, wall seconds) while ``action`` runs."""
        calls, cpu = self.look()
        start = time.perf_counter()
        action()
        elapsed = time.perf_counter() - start
        after, cpu_after = self.look()
        after.subtract(calls)
        return +after, cpu_after - cpu, elapsed


def _idle(meter: Meter) -> tuple[float, float, Counter[str]]:
    """An idle worker's commands and Redis CPU seconds per second, and its commands."""
    calls, cpu, elapsed = meter.over(lambda: time.sleep(IDLE_SECONDS))
    return sum(calls.values()) / elapsed, cpu / elapsed, calls


def _per_job(meter: Meter, run: Callable[[], Any], n: int, idle: tuple[float, float]
             ) -> tuple[float, float, Counter[str]]:
    """Commands and Redis CPU seconds per job over ``run()`` (n jobs), less the idle worker's
    over the same time; the commands by name, per n jobs."""
    calls, cpu, elapsed = meter.over(run)
    return ((sum(calls.values()) - idle[0] * elapsed) / n, (cpu - idle[1] * elapsed) / n,
            calls)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


Round = tuple[float, float, Counter[str]]


def _in_turns(meter: Meter, ours: Callable[[], Any], bare: Callable[[], Any], n: int,
              idle: tuple[float, float], rounds: int) -> tuple[list[Round], list[Round]]:
    """``rounds`` per-job rounds of ours and of the bare task's (``n`` jobs each), taking
    turns."""
    mine: list[Round] = []
    theirs: list[Round] = []
    for _ in range(rounds):
        mine.append(_per_job(meter, ours, n, idle))
        theirs.append(_per_job(meter, bare, n, idle))
    return mine, theirs


def _median_round(mine: list[Round], theirs: list[Round]) -> tuple[float, int]:
    """The median of the rounds' CPU ratios (ours over the bare task's), and its round."""
    ratios = [o[1] / b[1] for o, b in zip(mine, theirs, strict=True)]
    ratio = _median(ratios)
    return ratio, ratios.index(ratio)


def _measure(svc: Services, n: int, streams: int, chunks: int, shards: int,
             rounds: int) -> dict[str, Any]:
    """Our worker's figures and the bare task's, their per-job rounds taking turns."""
    env = {**svc.env(), "API_TASKS_REDIS_SHARDS": str(shards)}
    os.environ["REDIS_URL"] = svc.redis.url
    from bench.reference import post  # reads REDIS_URL at import

    meter = Meter(redis.Redis.from_url(svc.redis.url))
    url = svc.upstream_url + "/chat/completions"
    payload = {"messages": USER, "model": "echo"}
    client = our_client(env)

    def ours(model: str, count: int, stream: bool) -> None:
        submitted = [client.submit_chat(USER, model=model, stream=stream)
                     for _ in range(count)]
        list(pool.map(lambda job: job.result(timeout=120), submitted))

    def bare(count: int) -> None:
        sent = [post.apply_async(args=[url, payload]) for _ in range(count)]
        list(pool.map(lambda result: result.get(timeout=120), sent))

    def ours_in_turn(count: int) -> None:  # each job alone: its worker waits on BRPOP
        for _ in range(count):
            client.submit_chat(USER, model="echo").result(timeout=120)

    def bare_in_turn(count: int) -> None:
        for _ in range(count):
            post.apply_async(args=[url, payload]).get(timeout=120)

    with ThreadPoolExecutor(50) as pool, ExitStack() as bare_worker:
        with svc.worker(env, name="ours"):
            warm_up(client)
            ours("echo", 50, False)  # every pool and script warm
            ours(f"stream-{chunks}", 10, True)
            time.sleep(2)  # the warm-up's last renewals and releases
            alone = _idle(meter)
            bare_worker.enter_context(svc.worker(svc.env(), app="bench.reference",
                                                 name="bare"))
            post.apply_async(args=[url, payload]).get(timeout=120)
            bare(50)
            time.sleep(2)
            both = _idle(meter)
            idle = (both[0], both[1])  # both idle: what each round's figure leaves out
            mine, theirs = _in_turns(meter, lambda: ours("echo", n, False), lambda: bare(n),
                                     n, idle, rounds)
            alone_mine, alone_theirs = _in_turns(
                meter, lambda: ours_in_turn(ONE_BY_ONE), lambda: bare_in_turn(ONE_BY_ONE),
                ONE_BY_ONE, idle, rounds)
            streamed = _per_job(meter, lambda: ours(f"stream-{chunks}", streams, True),
                                streams, idle)
        time.sleep(2)
        bare_idle = _idle(meter)  # the bare task's worker alone
    with ExitStack() as others:  # four of ours: one of them sweeps for the cluster
        for name in ("first", "second", "third", "fourth"):
            others.enter_context(svc.worker(env, name=name))
        warm_up(client)
        wait_until(lambda: len(client.store.shell.run(alive(client.keys))) == 4, 60,
                   "four live workers")
        time.sleep(2)  # their start-up's writes done
        four = _idle(meter)
    return {"idle": alone, "bare_idle": bare_idle, "job": mine, "bare_job": theirs,
            "stream": streamed, "four": four, "in_turn": alone_mine,
            "bare_in_turn": alone_theirs}


def _top(calls: Counter[str], n: int, count: int = 10) -> str:
    return ", ".join(f"{name} {value / n:.1f}" for name, value in calls.most_common(count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer jobs and rounds")
    parser.add_argument("--shards", type=int, default=1,
                        help="job shards (redis.shards), as for a Redis Cluster")
    args = parser.parse_args()
    n, streams, chunks, rounds = (100, 20, 100, 3) if args.quick else (300, 100, 100, ROUNDS)
    with tempfile.TemporaryDirectory() as tmp, services(Path(tmp)) as svc:
        started = time.monotonic()
        got = _measure(svc, n, streams, chunks, args.shards, rounds)
    mine, theirs = got["job"], got["bare_job"]
    o_cmds, o_cpu = _median([r[0] for r in mine]), _median([r[1] for r in mine])
    b_cmds, b_cpu = _median([r[0] for r in theirs]), _median([r[1] for r in theirs])
    ratio, middle = _median_round(mine, theirs)  # the median round's commands by name
    o_calls, b_calls = mine[middle][2], theirs[middle][2]
    alone_ratio, one = _median_round(got["in_turn"], got["bare_in_turn"])
    a_cmds, a_cpu = got["in_turn"][one][0], got["in_turn"][one][1]
    ab_cmds, ab_cpu = got["bare_in_turn"][one][0], got["bare_in_turn"][one][1]
    s_cmds, s_cpu, _ = got["stream"]
    chunk_cmds, chunk_cpu = (s_cmds - o_cmds) / chunks, (s_cpu - o_cpu) / chunks
    o_idle, b_idle = got["idle"], got["bare_idle"]
    print(f"ours, commands per job: {_top(o_calls, n, 16)}")
    print(f"bare Celery, commands per job: {_top(b_calls, n)}")
    print("Redis CPU per job, round by round (ours / bare): " + ", ".join(
        f"{o[1] * 1e6:.0f}/{b[1] * 1e6:.0f} us" for o, b in zip(mine, theirs, strict=True)))
    print(f"one at a time, ours, commands per job: {_top(got['in_turn'][one][2], ONE_BY_ONE, 16)}")
    print("one at a time, round by round (ours / bare): " + ", ".join(
        f"{o[1] * 1e6:.0f}/{b[1] * 1e6:.0f} us"
        for o, b in zip(got["in_turn"], got["bare_in_turn"], strict=True)))
    print(f"ours idle, commands per second: {_top(o_idle[2], int(IDLE_SECONDS))}")
    print(f"four of ours idle, commands per second: "
          f"{_top(got['four'][2], int(IDLE_SECONDS))}")
    rows: list[Row] = [
        (f"Redis commands per non-streamed job ({n} at once, result read)",
         f"{o_cmds:.1f}", f"{b_cmds:.1f}", f"{o_cmds / b_cmds:.2f}x"),
        (f"Redis CPU per job (median of {rounds} rounds taking turns)",
         f"{o_cpu * 1e6:.0f} us", f"{b_cpu * 1e6:.0f} us",
         f"{ratio:.2f}x (median round; target <= 1.1x)"),
        ("one Redis core's ceiling, jobs/s", f"{1 / o_cpu:,.0f}", f"{1 / b_cpu:,.0f}", "-"),
        (f"Redis per job, one at a time ({ONE_BY_ONE} in turn, median of {rounds} rounds)",
         f"{a_cmds:.1f} commands, {a_cpu * 1e6:.0f} us", f"{ab_cmds:.1f}, {ab_cpu * 1e6:.0f} us",
         f"{alone_ratio:.2f}x CPU (no target: each job alone)"),
        (f"Redis per relayed chunk ({streams} streams of {chunks} at once)",
         f"{chunk_cmds:.2f} commands, {chunk_cpu * 1e6:.1f} us CPU", "-",
         f"one core's ceiling {1 / chunk_cpu:,.0f} chunks/s" if chunk_cpu > 0 else "-"),
        ("idle worker process, alone: Redis commands per second", f"{o_idle[0]:.1f}",
         f"{b_idle[0]:.1f}", "target <= 5/s"),
        ("idle worker process, one of four: Redis commands per second",
         f"{got['four'][0] / 4:.1f}", "-", "target <= 5/s"),
        ("idle worker process: Redis CPU", f"{o_idle[1] * 1e3:.2f} ms/s",
         f"{b_idle[1] * 1e3:.2f} ms/s", "-"),
    ]
    title = (f"\nRedis cost: our worker and the bare task's on one Redis, {n} jobs a round, "
             f"{args.shards} job shard{'s' if args.shards > 1 else ''}; "
             f"{time.monotonic() - started:.0f} s")
    print(table(title, rows), flush=True)


if __name__ == "__main__":
    main()
