"""Priority lanes under a big backlog: ``python -m bench.lanes [--backlog 50000]``.

Two worker processes, 20 threads each, every thread busy with a one-second
bulk job and 50,000 more bulk jobs queued behind them. Interactive jobs are
then submitted one at a time: each should start within one bulk job's
duration (a thread frees up at least that often), not behind the backlog.
The reference is the same job on one shared queue: it would start after the
whole backlog, ``backlog / (threads / duration)`` seconds later.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from api_tasks.client import Client
from bench.harness import child_env, local_services, median, percentile, start_workers
from bench.run import table
from bench.scenarios import USER, Row
from tests.support.fake_upstream import Reply

__all__ = ["main"]

DURATION = 1.0  # seconds each bulk job takes upstream
WORKERS, THREADS = 2, 20


def fill(client: Client, backlog: int) -> float:
    """Queue ``backlog`` bulk jobs from a few producer threads; seconds it took."""
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: client.submit_chat(USER, model="bulk-1s", queue="bulk"),
                      range(backlog)))
    return time.perf_counter() - start


def interactive_waits(client: Client, n: int) -> list[float]:
    """Seconds each interactive job waited between its submit and its start."""
    waits = []
    for _ in range(n):
        job = client.submit_chat(USER, model="echo", queue="interactive")
        job.result(timeout=120)
        info = job.info()
        waits.append(float(info["started_at"]) - float(info["created_at"]))
    return waits


def measure(client: Client, backlog: int, samples: int) -> list[Row]:
    """Fill the backlog, then time interactive jobs behind it."""
    filled = fill(client, backlog)
    queued = client.redis.llen(client.keys.celery_prefix() + "bulk")
    waits = interactive_waits(client, samples)
    capacity = WORKERS * THREADS / DURATION
    return [
        ("bulk backlog when measuring", f"{queued:,} queued",
         f"filled in {filled:.0f} s", f"{WORKERS}x{THREADS} threads busy"),
        ("interactive job: submit to start, p50", f"{median(waits) * 1000:.0f} ms",
         f"one bulk job: {DURATION * 1000:.0f} ms",
         f"{median(waits) / DURATION:.2f}x (target <= 1x)"),
        ("interactive job: submit to start, max", f"{max(waits) * 1000:.0f} ms",
         f"p90 {percentile(waits, 90) * 1000:.0f} ms",
         f"{max(waits) / DURATION:.2f}x (target <= 1x)"),
        ("same job on one shared queue (computed)", "-",
         f"{queued / capacity:,.0f} s behind the backlog", "-"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backlog", type=int, default=50_000)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="a 5,000-job backlog")
    args = parser.parse_args()
    backlog = 5000 if args.quick else args.backlog
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        redis, upstream = local_services(stack, workdir, record=False)
        upstream.script("bulk-1s", Reply(delay=DURATION))
        env = child_env(redis.url, OPENAI_BASE_URL=upstream.base_url + "/v1",
                        API_TASKS_PREFIX="lanes")
        rows = measure(start_workers(stack, env, workdir, WORKERS, THREADS), backlog,
                       args.samples)
        print(table(f"\npriority lanes: {args.samples} interactive jobs behind a "
                    f"{backlog:,}-job bulk backlog", rows), flush=True)


if __name__ == "__main__":
    main()
