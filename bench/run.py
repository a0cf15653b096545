"""Run the benchmarks and print one table: ``python -m bench.run [--quick] [--pools ...]``.

Every figure stands beside its reference from the same run: a direct
``requests`` call, or the bare Celery task in ``bench/reference.py``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench import scenarios
from bench.harness import Services, memory_mb, services
from bench.scenarios import Row

__all__ = ["main", "run_pool", "table"]


def run_pool(svc: Services, pool: str, sizes: dict[str, int]) -> list[Row]:
    """Every scenario on one pool implementation."""
    env = svc.env()
    os.environ["REDIS_URL"] = svc.redis.url
    from bench.reference import post  # reads REDIS_URL at import

    rows: list[Row] = []
    with svc.worker(env, pool=pool, concurrency=200, name=f"ours-{pool}") as ours, \
            svc.worker(svc.env(), app="bench.reference", pool=pool, concurrency=200,
                       name=f"ref-{pool}") as ref:
        client = scenarios.our_client(env)
        scenarios.warm_up(client)
        post.apply_async(args=[svc.upstream_url + "/chat/completions",
                               {"messages": scenarios.USER}]).get(timeout=120)
        time.sleep(1)  # let start-up settle before reading idle memory
        rows.append(("idle worker RSS", f"{memory_mb(ours.pid):.0f} MB",
                     f"{memory_mb(ref.pid):.0f} MB", "-"))
        rows += scenarios.latency(svc, client, post, sizes["latency"])
        rows += scenarios.throughput(svc, client, post, (ours.pid, ref.pid), sizes["jobs"])
        rows += scenarios.first_chunk(svc, client, sizes["ttfc"])
    with svc.worker(env, pool=pool, concurrency=100, name=f"relay-{pool}") as relay:
        scenarios.warm_up(client)
        rows += scenarios.relay_rate(svc, client, relay.pid, sizes["streams"], 500)
    with svc.worker(env, pool=pool, concurrency=1000, name=f"flight-{pool}") as flight:
        scenarios.warm_up(client)
        rows += scenarios.in_flight(client, flight.pid, sizes["in_flight"])
    return rows


def table(title: str, rows: list[Row]) -> str:
    header = ("figure", "ours", "reference", "ratio / target")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [title, line, " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    out += [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join([*out, line])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--pools", default="threads,gevent")
    args = parser.parse_args()
    # a SIGTERM unwinds like Ctrl-C, so the workers, Redis and upstream started here stop too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = {"latency": 300, "jobs": 5000, "ttfc": 200, "streams": 200, "in_flight": 1000}
    if args.quick:
        sizes = {"latency": 50, "jobs": 500, "ttfc": 30, "streams": 40, "in_flight": 200}
    with tempfile.TemporaryDirectory() as tmp, services(Path(tmp)) as svc:
        for pool in args.pools.split(","):
            print(table(f"\npool: {pool}", run_pool(svc, pool, sizes)), flush=True)


if __name__ == "__main__":
    main()
