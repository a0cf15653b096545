"""Rate-limited bulk against an upstream that counts as OpenAI does: ``python -m bench.limits``.

The fake upstream enforces 6,000 requests and 600,000 tokens a minute itself: it charges each
request its prompt plus ``max_tokens`` when it arrives, gives nothing back, answers 429 past a
bucket holding 2 s of budget, and reports what it has left in OpenAI's ``x-ratelimit-*``
headers. The replies echo prompts of 5 to 80 words, so they are much shorter than their
``max_tokens`` (200), as real replies usually are. The project, configured to the same limits,
runs the requests as a detached batch through 4 worker processes, twice: alone, and beside a
second application that sends a steady 30% of the token budget on the same key without the
project being told. The reference, in the same run, is the former rule: reservations settled
down to the reported usage, the headers not followed. Figures come from what the upstream
itself accepted.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import random
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

from bench.harness import child_env, local_services, log_warnings, start_workers
from bench.run import table
from bench.scenarios import Row
from tests.support.fake_upstream import FakeUpstream, Quota
from tests.support.fake_upstream.quota import request_cost

__all__ = ["main"]

RPM, TPM = 6000, 600_000
BURST = 2.0  # seconds of budget the upstream lets through at once (ours defaults to 0.2)
MAX_TOKENS = 200
SHARE = 0.3  # of the token budget, the other application's
WINDOW = 10.0


@dataclass
class Outcome:
    """One scenario's figures, from the upstream's own accounting."""

    window_req: float  # the busiest 10 s of everything accepted, as a share of the limit
    window_tok: float
    used: float  # the project's tokens accepted, as a share of what was left to it
    calls: int  # the project's calls (429s included)
    rejected: int  # of them, answered 429
    lines: tuple[int, int, int]  # failed / lost / duplicated
    elapsed: float


def bodies(n: int, model: str) -> list[dict[str, Any]]:
    """The requests: prompts of 5 to 80 words (the same every run), max_tokens 200."""
    rng = random.Random(7)
    return [{"model": model, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": (
        f"request {i} " + " ".join(f"w{j}" for j in range(rng.randint(5, 80))))}]}
        for i in range(n)]


def busiest(taken: list[tuple[float, int, str]]) -> tuple[float, float]:
    """The busiest 10 s (sliding, starting anywhere after the first 10 s) of what the
    upstream accepted: (requests, tokens), as shares of its limits."""
    times = [at for at, _, _ in taken]
    tokens = list(itertools.accumulate((cost for _, cost, _ in taken), initial=0))
    most_req = most_tok = 0.0
    for i in range(bisect.bisect_left(times, times[0] + WINDOW), len(times)):
        if times[i] + WINDOW > times[-1]:
            break
        j = bisect.bisect_left(times, times[i] + WINDOW)
        most_req = max(most_req, (j - i) / (WINDOW * RPM / 60))
        most_tok = max(most_tok, (tokens[j] - tokens[i]) / (WINDOW * TPM / 60))
    return most_req, most_tok


def other_application(url: str, model: str, stop: threading.Event) -> None:
    """A steady ``SHARE`` of the token budget, sent straight to the upstream."""
    session, requests_ = requests.Session(), bodies(2000, model)
    due = time.monotonic()
    for body in itertools.cycle(requests_):
        if stop.is_set():
            return
        session.post(url, json=body, timeout=30)
        due += request_cost(body) / (SHARE * TPM / 60)
        time.sleep(max(due - time.monotonic(), 0))


def scenario(upstream: FakeUpstream, client: Any, workdir: Path, n: int,
             shared: bool) -> Outcome:
    """The requests as one detached batch, beside the other application if ``shared``."""
    model = f"m{uuid.uuid4().hex[:6]}"
    quota: Quota = upstream.enforce(model, rpm=RPM, tpm=TPM, burst=BURST)
    stop = threading.Event()
    other = threading.Thread(target=other_application, daemon=True, args=(
        upstream.base_url + "/v1/chat/completions", model + "-other", stop))
    if shared:
        other.start()
        time.sleep(WINDOW)  # it was there first: its share is taken before the batch starts
    path = workdir / f"{model}.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                        "url": "/v1/chat/completions", "body": body}) + "\n"
                            for i, body in enumerate(bodies(n, model))))
    batch = client.submit_batch(path, window=500)
    try:
        state = batch.wait(timeout=n / (TPM / 60 / 250) * 4 + 120, poll=1.0)
    finally:
        stop.set()
    assert state["status"] == "completed", state
    ids = [r["custom_id"] for r in batch.records()]
    failed = [r["custom_id"] for r in batch.records(errors=True)]
    ours = [(at, cost) for at, cost, who in quota.taken if who == model]
    elapsed = max(ours[-1][0] - ours[0][0], 1e-9)
    during = [entry for entry in quota.taken if ours[0][0] <= entry[0] <= ours[-1][0]]
    calls = len(upstream.requests(model))
    window_req, window_tok = busiest(during)
    left = (1 - SHARE) if shared else 1.0
    return Outcome(window_req, window_tok,
                   sum(cost for _, cost in ours) / (elapsed * left * TPM / 60), calls,
                   calls - len(ours),
                   (len(failed), n - len(set(ids) | set(failed)), len(ids) + len(failed) - n),
                   elapsed)


def run_rule(upstream: FakeUpstream, redis_url: str, workdir: Path, n: int, workers: int,
             former: bool) -> tuple[Outcome, Outcome]:
    """Both scenarios on workers of one rule: the providers' (ours), or the former one."""
    limits: dict[str, Any] = {"requests_per_minute": RPM, "tokens_per_minute": TPM,
                              "accounting": "usage" if former else "arrival"}
    name = "former" if former else "ours"
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"upstreams": [{
        "name": "limited", "base_url": upstream.base_url, "limits": limits,
        "follow_rate_headers": not former}]}))
    env = child_env(redis_url, API_TASKS_CONFIG=str(config), API_TASKS_PREFIX=name)
    with ExitStack() as stack:
        client = start_workers(stack, env, workdir / name, workers, threads=50)
        return (scenario(upstream, client, workdir, n, shared=False),
                scenario(upstream, client, workdir, n, shared=True))


def rows(ours: tuple[Outcome, Outcome], former: tuple[Outcome, Outcome]) -> list[Row]:
    def pct(x: float) -> str:
        return f"{x * 100:.1f}%"
    out: list[Row] = []
    for label, o, f in (("alone", ours[0], former[0]),
                        (f"beside another app taking {SHARE:.0%}", ours[1], former[1])):
        out += [
            (f"{label}: busiest 10 s, requests (all callers)", pct(o.window_req),
             pct(f.window_req), "target <= 100%"),
            (f"{label}: busiest 10 s, tokens (all callers)", pct(o.window_tok),
             pct(f.window_tok), "target <= 100%"),
            (f"{label}: token budget left to the project, used", pct(o.used), pct(f.used),
             "target >= 95%"),
            (f"{label}: 429s / the project's calls", f"{o.rejected} / {o.calls}",
             f"{f.rejected} / {f.calls}",
             "target 0" if label == "alone" else "target <= 0.5%"),
            (f"{label}: lines failed / lost / duplicated", "{} / {} / {}".format(*o.lines),
             "{} / {} / {}".format(*f.lines), "target 0 / 0 / 0"),
            (f"{label}: first to last call", f"{o.elapsed:.0f} s", f"{f.elapsed:.0f} s",
             f"{f.elapsed / o.elapsed:.2f}x"),
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="1,000 requests, for a smoke run")
    parser.add_argument("--keep", type=Path, help="keep the worker logs in this directory")
    args = parser.parse_args()
    n = 1000 if args.quick else args.requests
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        workdir = args.keep or Path(tmp)
        for name in ("ours", "former"):
            (workdir / name).mkdir(parents=True, exist_ok=True)
        redis, upstream = local_services(stack, workdir)
        started = time.monotonic()
        ours = run_rule(upstream, redis.url, workdir, n, args.workers, former=False)
        former = run_rule(upstream, redis.url, workdir, n, args.workers, former=True)
        title = (f"\nrate limits: {n} requests twice, upstream enforcing {RPM} rpm / {TPM} "
                 f"tpm on arrival, {args.workers} workers (reference: the former rule, "
                 f"settled to usage, headers not followed); "
                 f"{time.monotonic() - started:.0f} s")
        print(table(title, rows(ours, former)), flush=True)
        for name in ("ours", "former"):
            print(f"{name}: " + log_warnings(workdir / name), flush=True)


if __name__ == "__main__":
    main()
