"""The measurements. Each returns rows: (figure, ours, reference, ratio or target)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from api_tasks.client import Client
from bench.harness import Services, cpu_seconds, median, memory_mb, percentile
from config.loader import load_settings

__all__ = ["first_chunk", "in_flight", "latency", "our_client", "relay_rate", "throughput",
           "warm_up"]

USER = [{"role": "user", "content": "Hello"}]
Row = tuple[str, str, str, str]


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    """Seconds each of n sequential calls took."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def direct_post(services: Services) -> Callable[[], Any]:
    """One direct chat call with a pooled session, as the reference makes it."""
    session = requests.Session()
    url = services.upstream_url + "/chat/completions"
    return lambda: session.post(url, json={"messages": USER, "model": "echo"}).json()


def direct_first_chunk(services: Services, model: str) -> Callable[[], Any]:
    """A direct streaming call, timed to its first chunk, then drained."""
    session = requests.Session()
    url = services.upstream_url + "/chat/completions"

    def call() -> float:
        start = time.perf_counter()
        with session.post(url, json={"messages": USER, "model": model, "stream": True},
                          stream=True) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith(b"data:"))
            took = time.perf_counter() - start
            assert first
            for _ in lines:
                pass
        return took
    return call


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def latency(services: Services, client: Client, ref: Any, n: int) -> list[Row]:
    """Submit-to-result latency, sequential jobs, minus the direct call."""
    direct = timed(direct_post(services), n)
    url = services.upstream_url + "/chat/completions"
    payload = {"messages": USER, "model": "echo"}
    bare = timed(lambda: ref.apply_async(args=[url, payload]).get(timeout=30), n)
    ours = timed(lambda: client.submit_chat(USER, model="echo").result(timeout=30), n)
    d50, d99 = median(direct), percentile(direct, 99)
    # the typical direct call is what a job adds to, at every percentile
    o50, o99 = median(ours) - d50, percentile(ours, 99) - d50
    b50, b99 = median(bare) - d50, percentile(bare, 99) - d50
    return [
        ("direct call (p50 / p99)", f"{ms(d50)} / {ms(d99)}", "same call", "-"),
        ("added latency p50 (ours vs bare Celery)", ms(o50), ms(b50),
         f"{o50 / b50:.2f}x (target <= 1.2x)"),
        ("added latency p99 (ours vs bare Celery)", ms(o99), ms(b99), "target <= 10 ms"),
    ]


def throughput(services: Services, client: Client, ref: Any, pids: tuple[int, int],
               n: int) -> list[Row]:
    """n jobs submitted at once: jobs/s and worker CPU per job, ours vs the bare task."""
    url = services.upstream_url + "/chat/completions"
    payload = {"messages": USER, "model": "echo"}
    ours_pid, ref_pid = pids
    with ThreadPoolExecutor(50) as pool:
        call = direct_post(services)
        start = time.perf_counter()
        list(pool.map(lambda _: call(), range(n)))
        direct_rate = n / (time.perf_counter() - start)
    cpu0, start = cpu_seconds(ref_pid), time.perf_counter()
    handles = [ref.apply_async(args=[url, payload]) for _ in range(n)]
    for handle in handles:
        handle.get(timeout=300)
    ref_rate, ref_cpu = n / (time.perf_counter() - start), (cpu_seconds(ref_pid) - cpu0) / n
    cpu0, start = cpu_seconds(ours_pid), time.perf_counter()
    jobs = [client.submit_chat(USER, model="echo") for _ in range(n)]
    for job in jobs:
        job.result(timeout=300)
    our_rate, our_cpu = n / (time.perf_counter() - start), (cpu_seconds(ours_pid) - cpu0) / n
    return [
        (f"throughput, {n} jobs at once (direct: {direct_rate:.0f}/s)", f"{our_rate:.0f} jobs/s",
         f"{ref_rate:.0f} jobs/s", f"{our_rate / ref_rate:.2f}x (target >= 0.9x)"),
        ("worker CPU per job", ms(our_cpu), ms(ref_cpu),
         f"{our_cpu / ref_cpu:.2f}x (target <= 1.1x)"),
    ]


def first_chunk(services: Services, client: Client, n: int) -> list[Row]:
    """Time to the first chunk at the reader, ours vs a direct streaming call."""
    direct_call = direct_first_chunk(services, "stream-10")
    direct = [direct_call() for _ in range(n)]
    ours = []
    for _ in range(n):
        start = time.perf_counter()
        job = client.submit_chat(USER, model="stream-10", stream=True)
        chunks = job.stream(timeout=30)
        next(chunks)
        ours.append(time.perf_counter() - start)
        for _ in chunks:
            pass
    added = median(ours) - median(direct)
    return [("time to first chunk p50 (ours / direct)", ms(median(ours)), ms(median(direct)),
             f"+{added * 1000:.2f} ms (target <= 3 ms)")]


def direct_parse_rate(services: Services, pieces: int, streams: int = 20) -> float:
    """Chunks per CPU-second of a direct parse of the same streams in one thread: requests,
    ``iter_lines`` and ``json.loads`` of each chunk (the floor of any relay)."""
    session = requests.Session()
    url = services.upstream_url + "/chat/completions"
    chunks, cpu = 0, 0.0
    for _ in range(streams):
        start = time.thread_time()
        with session.post(url, json={"messages": USER, "model": f"stream-{pieces}",
                                     "stream": True}, stream=True) as response:
            for line in response.iter_lines():
                if line.startswith(b"data:") and line != b"data: [DONE]":
                    json.loads(line[5:])
                    chunks += 1
        cpu += time.thread_time() - start
    return chunks / cpu


def relay_rate(services: Services, client: Client, pid: int, jobs: int,
               pieces: int) -> list[Row]:
    """Chunks per second one worker process relays across concurrent streams, beside a
    direct parse of the same streams measured in this run."""
    direct = direct_parse_rate(services, pieces)
    cpu0, start = cpu_seconds(pid), time.perf_counter()
    submitted = [client.submit_chat(USER, model=f"stream-{pieces}", stream=True)
                 for _ in range(jobs)]
    chunks = 0
    for job in submitted:
        final = list(job.events(timeout=300))[-1]
        assert final["type"] == "done", final
        chunks += final["seq"]
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds(pid) - cpu0
    return [(f"chunks relayed/s, {jobs} streams x {pieces} (100 at a time)",
             f"{chunks / elapsed:,.0f}/s", f"{cpu / chunks * 1e6:.0f} us CPU/chunk", "-"),
            ("chunks per CPU-second: relayed / parsed directly", f"{chunks / cpu:,.0f}",
             f"{direct:,.0f}", f"{chunks / cpu / direct:.2f}x (target >= 0.6x)")]


def in_flight(client: Client, pid: int, n: int) -> list[Row]:
    """n streamed jobs against a 2-second upstream, all in flight on one process."""
    start = time.perf_counter()
    jobs = [client.submit_chat(USER, model="slow-2s", stream=True) for _ in range(n)]
    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            peak[0] = max(peak[0], memory_mb(pid))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ok = sum(1 for job in jobs if job.result(timeout=120) is not None)
    elapsed = time.perf_counter() - start
    stop.set()
    hwm = max(peak[0], memory_mb(pid, "VmHWM"))
    return [(f"{n} streamed jobs in flight, 2 s upstream", f"{ok}/{n} ok, {n / elapsed:.0f} jobs/s",
             f"ideal {n / 2:.0f} jobs/s", f"{n / elapsed / (n / 2):.2f} of ideal"),
            ("peak worker RSS during it", f"{hwm:.0f} MB", "-", "target <= 300 MB")]


def our_client(env: dict[str, str]) -> Client:
    """A producer for this run's prefix."""
    return Client(load_settings(env=env))


def warm_up(client: Client) -> None:
    """Wait for the worker by running one job through it."""
    client.submit_chat(USER, model="echo").result(timeout=120)
