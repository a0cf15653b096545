"""Rate-limited bulk, beside the OpenAI cookbook's approach: ``python -m bench.limits``.

The fake upstream enforces 6,000 requests and 600,000 tokens a minute itself
(429 past a token bucket holding ``burst_seconds`` of budget, counted as
OpenAI counts: the prompt plus ``max_tokens`` when a request arrives). The
project is configured to the same limits and runs 20,000 requests as a detached
batch through 4 worker processes; then ``bench/cookbook.py`` sends the same
requests to the same upstream. Each request costs about 100 tokens, so both
limits bind at once. Figures come from the upstream's own arrival log.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from api_tasks.execution.tokens import estimate_cost
from bench.cookbook import run_cookbook
from bench.harness import child_env, local_services, log_warnings, start_workers
from bench.run import table
from bench.scenarios import Row
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.fake_upstream.quota import request_cost

__all__ = ["main"]

RPM, TPM = 6000, 600_000
BURST = 2.0  # seconds of budget the upstream lets through at once (ours defaults to 0.2)
MAX_TOKENS = 90  # with a 10-word prompt: 100 tokens a request, so both limits bind
WINDOW = 10.0
Outcome = tuple[dict[str, float], int, tuple[int, int, int]]  # rates, 429s, failed/lost/dup


def bodies(n: int, model: str) -> list[dict[str, Any]]:
    """The requests: short prompts, replies of exactly ``max_tokens`` words."""
    return [{"model": model, "max_tokens": MAX_TOKENS,
             "messages": [{"role": "user", "content": f"request {i} of the limits bench, "
                                                      "answer at length please"}]}
            for i in range(n)]


def arrivals_of(upstream: FakeUpstream, model: str) -> list[tuple[float, int]]:
    """The upstream's arrival log for ``model``: (time, token cost), in order."""
    return sorted((r.at, request_cost(r.body or {})) for r in upstream.requests(model))


def rates(arrivals: list[tuple[float, int]]) -> dict[str, float]:
    """Realised rates from an arrival log, as fractions of the limits.

    The busiest window is the busiest 10 s starting anywhere after the first 10 s (a
    sliding window: stricter than back-to-back windows).
    """
    times = [at for at, _ in arrivals]
    tokens = list(itertools.accumulate((cost for _, cost in arrivals), initial=0))
    start, end = times[0], times[-1]
    busiest_req = busiest_tok = 0.0
    for i in range(bisect.bisect_left(times, start + WINDOW), len(times)):
        if times[i] + WINDOW > end:
            break
        j = bisect.bisect_left(times, times[i] + WINDOW)
        busiest_req = max(busiest_req, (j - i) / (WINDOW * RPM / 60))
        busiest_tok = max(busiest_tok, (tokens[j] - tokens[i]) / (WINDOW * TPM / 60))
    elapsed = max(end - start, 1e-9)
    return {"window_req": busiest_req, "window_tok": busiest_tok,
            "all_req": len(arrivals) / (elapsed * RPM / 60),
            "all_tok": tokens[-1] / (elapsed * TPM / 60),
            "elapsed": elapsed, "sent": len(arrivals)}


def run_ours(stack: ExitStack, workdir: Path, upstream: FakeUpstream, redis_url: str,
             n: int, workers: int, burst: float | None = None) -> Outcome:
    """The requests as a detached batch through our workers."""
    model = f"ours-{uuid.uuid4().hex[:6]}"
    quota = _limited(upstream, model)
    config = workdir / "limits.yaml"
    limits: dict[str, float] = {"requests_per_minute": RPM, "tokens_per_minute": TPM}
    if burst is not None:
        limits["burst_seconds"] = burst
    config.write_text(yaml.safe_dump({"upstreams": [{
        "name": "limited", "base_url": upstream.base_url, "limits": limits}]}))
    env = child_env(redis_url, API_TASKS_CONFIG=str(config), API_TASKS_PREFIX="limits")
    client = start_workers(stack, env, workdir, workers, threads=50)
    batch = client.submit_batch(_batch_file(workdir / "batch.jsonl", bodies(n, model)),
                                window=500)
    state = batch.wait(timeout=n / (RPM / 60) * 3 + 120, poll=1.0)
    assert state["status"] == "completed", state
    ids = [r["custom_id"] for r in batch.records()]
    failed = [r["custom_id"] for r in batch.records(errors=True)]
    lines = (len(failed), n - len(set(ids) | set(failed)), len(ids) + len(failed) - n)
    arrivals = arrivals_of(upstream, model)
    (workdir / "arrivals.json").write_text(json.dumps(arrivals))
    return rates(arrivals), quota.rejected, lines


def _batch_file(path: Path, requests: list[dict[str, Any]]) -> Path:
    with path.open("w") as out:
        for i, body in enumerate(requests):
            out.write(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                  "url": "/v1/chat/completions", "body": body}) + "\n")
    return path


def run_reference(upstream: FakeUpstream, n: int) -> Outcome:
    """The same requests the cookbook's way."""
    model = f"cookbook-{uuid.uuid4().hex[:6]}"
    quota = _limited(upstream, model)
    run = run_cookbook(upstream.base_url + "/v1/chat/completions", bodies(n, model), RPM, TPM,
                       estimate_cost)
    lines = (len(run.given_up), n - len(run.results) - len(run.given_up), 0)
    return rates(arrivals_of(upstream, model)), quota.rejected, lines


def _limited(upstream: FakeUpstream, model: str) -> Any:
    upstream.script(model, Reply(pieces=[f"w{i} " for i in range(MAX_TOKENS)]))
    return upstream.enforce(model, rpm=RPM, tpm=TPM, burst=BURST)


def rows(n: int, ours: Outcome, ref: Outcome) -> list[Row]:
    (o, o429, olines), (r, r429, rlines) = ours, ref

    def pct(x: float) -> str:
        return f"{x * 100:.1f}%"
    return [
        ("requests sent / time from first to last", f"{o['sent']:.0f} in {o['elapsed']:.0f} s",
         f"{r['sent']:.0f} in {r['elapsed']:.0f} s", f"{r['elapsed'] / o['elapsed']:.2f}x faster"),
        ("busiest 10 s (sliding) after the first 10 s, requests", pct(o["window_req"]),
         pct(r["window_req"]), "target <= 100%"),
        ("busiest 10 s (sliding) after the first 10 s, tokens", pct(o["window_tok"]),
         pct(r["window_tok"]), "target <= 100%"),
        ("whole run, requests", pct(o["all_req"]), pct(r["all_req"]), "target >= 95%"),
        ("whole run, tokens", pct(o["all_tok"]), pct(r["all_tok"]), "target >= 95%"),
        ("429s from the upstream", str(o429), str(r429), "target 0"),
        ("lines failed / lost / duplicated", "{} / {} / {}".format(*olines),
         "{} / {} / {}".format(*rlines), "target 0 / 0 / 0"),
        ("upstream calls beyond one per line", f"{o['sent'] - n:.0f}", f"{r['sent'] - n:.0f}",
         "429 retries or repeats"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="2,000 requests, for a smoke run")
    parser.add_argument("--burst", type=float,
                        help=f"the project's burst_seconds (default: its default; the "
                             f"upstream's stays {BURST})")
    parser.add_argument("--keep", type=Path, help="keep the worker logs in this directory")
    parser.add_argument("--ours-only", action="store_true",
                        help="skip the cookbook run (its column repeats ours): for iterating")
    args = parser.parse_args()
    n = 2000 if args.quick else args.requests
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        redis, upstream = local_services(stack, workdir)
        started = time.monotonic()
        ours = run_ours(stack, workdir, upstream, redis.url, n, args.workers, args.burst)
        ref = ours if args.ours_only else run_reference(upstream, n)
        title = (f"\nrate limits: {n} requests, upstream enforcing {RPM} rpm / {TPM} tpm, "
                 f"{args.workers} workers (reference: the OpenAI cookbook's budgeting); "
                 f"{time.monotonic() - started:.0f} s")
        print(table(title, rows(n, ours, ref)), flush=True)
        print(log_warnings(workdir), flush=True)


if __name__ == "__main__":
    main()
