"""The gateway's figures, each beside its reference from the same run: ``python -m bench.gateway
[--quick]``. Latency and time to first chunk stand beside a direct call and the Python
producer; readers, relay rate and submits are one gateway process's, with its memory. The
relay rate is measured with the jobs' events written by stand-ins for workers on other
machines (the worker's own event functions, no upstream call): on this 2-core machine a worker
relaying 1,000 live streams leaves too little CPU to find the gateway's limit."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis

from api_tasks.record.events import EVENT_FIELD, chunk_event, entry_id, final_event
from api_tasks.record.job_record import JobStatus
from api_tasks.record.keys import Keys
from bench.harness import Services, median, memory_mb, percentile, services
from bench.run import table
from bench.scenarios import USER, Row, direct_post, ms, our_client, timed
from tests.support.services import GatewayProcess, wait_until

__all__ = ["main"]

KEY = "sk-bench-gateway"
AUTH = {"Authorization": f"Bearer {KEY}"}
DRIP = "drip-40"  # 40 chunks, 0.1 s apart (bench/upstream.py)


def _gateway(stack: ExitStack, svc: Services, env: dict[str, str], name: str) -> GatewayProcess:
    process = GatewayProcess({**env, "API_TASKS_GATEWAY_KEY": KEY},
                             svc.workdir / f"{name}.log").start()
    stack.callback(process.stop)
    return process


_HEADERS = {**AUTH, "Content-Type": "application/json"}


def _connection(gateway: GatewayProcess) -> http.client.HTTPConnection:
    """A keep-alive connection with the lightest client there is, so the figures are the
    gateway's and not an HTTP library's (``requests`` adds about a millisecond here)."""
    return http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)


def latency(svc: Services, gateway: GatewayProcess, env: dict[str, str], n: int) -> list[Row]:
    """Submit-to-result of a non-streamed chat: gateway, Python producer, direct call."""
    client = our_client(env)
    direct = timed(direct_post(svc), n)
    client.submit_chat(USER, model="echo").result(timeout=30)
    producer = timed(lambda: client.submit_chat(USER, model="echo").result(timeout=30), n)
    http = _connection(gateway)
    body = json.dumps({"model": "echo", "messages": USER}).encode()

    def call() -> None:
        http.request("POST", "/v1/chat/completions", body=body, headers=_HEADERS)
        answer = http.getresponse()
        assert answer.status == 200, answer.read()
        json.loads(answer.read())
    call()  # each path's first call connects: not what is measured
    ours = timed(call, n)
    d50 = median(direct)
    p50, p99 = median(producer) - d50, percentile(producer, 99) - d50
    g50, g99 = median(ours) - d50, percentile(ours, 99) - d50
    return [
        ("direct call p50", ms(d50), "same call", "-"),
        ("added latency p50 (gateway / Python producer)", ms(g50), ms(p50),
         f"{(g50 - p50) * 1000:+.2f} ms (target <= 1.5 ms)"),
        ("added latency p99 (gateway / Python producer)", ms(g99), ms(p99),
         f"{(g99 - p99) * 1000:+.2f} ms (target <= 10 ms)"),
    ]


def first_chunk(svc: Services, gateway: GatewayProcess, env: dict[str, str],
                n: int) -> list[Row]:
    """Time to the first streamed chunk: gateway, Python producer, direct call."""
    client = our_client(env)
    upstream = http.client.HTTPConnection("127.0.0.1", int(svc.upstream_url.split(":")[2]
                                                                .split("/")[0]), timeout=30)
    body = json.dumps({"model": "stream-10", "messages": USER, "stream": True}).encode()

    def first(conn: http.client.HTTPConnection, path: str) -> float:
        start = time.perf_counter()
        conn.request("POST", path, body=body, headers=_HEADERS)
        answer = conn.getresponse()
        while not answer.readline().startswith(b"data: "):
            pass
        took = time.perf_counter() - start
        answer.read()
        return took
    first(upstream, "/v1/chat/completions")
    direct = [first(upstream, "/v1/chat/completions") for _ in range(n)]

    def producer() -> float:
        start = time.perf_counter()
        chunks = client.submit_chat(USER, model="stream-10", stream=True).stream(timeout=30)
        next(chunks)
        took = time.perf_counter() - start
        for _ in chunks:
            pass
        return took
    producer()
    python = [producer() for _ in range(n)]
    gateway_conn = _connection(gateway)
    first(gateway_conn, "/v1/chat/completions")
    ours = [first(gateway_conn, "/v1/chat/completions") for _ in range(n)]
    d50, g50, p50 = median(direct), median(ours), median(python)
    return [("time to first chunk p50 (gateway / Python producer)", ms(g50), ms(p50),
             f"{(g50 - d50) * 1000:+.2f} ms over a direct {ms(d50)} (target <= 4 ms)")]


def _post_jobs(port: int, count: int, threads: int) -> int:
    """``count`` POST /v1/jobs from ``threads`` keep-alive connections; how many got 202."""
    body = json.dumps({"url": "/v1/chat/completions",
                       "body": {"model": "echo", "messages": USER}}).encode()
    headers = {**AUTH, "Content-Type": "application/json"}
    accepted = [0] * threads

    def run(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(count // threads):
            conn.request("POST", "/v1/jobs", body=body, headers=headers)
            answer = conn.getresponse()
            answer.read()
            accepted[index] += answer.status == 202
        conn.close()
    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(accepted)


def _producer_rate(env: dict[str, str], n: int, threads: int) -> float:
    """Jobs a second one Python producer process submits from ``threads`` threads."""
    client = our_client(env)
    client.submit_chat(USER, model="echo")  # builds the Celery app
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: client.submit_chat(USER, model="echo"), range(n)))
    return n / (time.perf_counter() - start)


def submits(gateway: GatewayProcess, env: dict[str, str], n: int,
            clients: int = 50) -> list[Row]:
    """POST /v1/jobs a second from ``clients`` concurrent keep-alive clients (two processes),
    beside one Python producer process submitting from as many threads."""
    _post_jobs(gateway.port, 100, 10)  # warm
    start = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        done = list(pool.map(_post_jobs, [gateway.port] * 2, [n // 2] * 2, [clients // 2] * 2))
    elapsed = time.perf_counter() - start
    accepted = sum(done)
    rate, producer = accepted / elapsed, _producer_rate(env, n, clients)
    return [(f"POST /v1/jobs, {clients} clients, {n} jobs ({accepted} accepted)",
             f"{rate:,.0f}/s", f"Python producer {producer:,.0f}/s",
             f"{rate / producer:.2f}x (target >= 2,000/s)")]


async def _read(port: int, job_id: str,
                connected: asyncio.Semaphore | None = None) -> tuple[int, str]:
    """One SSE reader of a job's events to the end: (chunks, "" or what went wrong);
    ``connected`` is released once its first bytes came."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    writer.write(f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Authorization: Bearer {KEY}\r\nConnection: close\r\n\r\n".encode())
    data = bytearray()
    while piece := await reader.read(1 << 16):
        if connected is not None and not data:
            connected.release()
        data += piece
    writer.close()
    if not data.startswith(b"HTTP/1.1 200"):
        wrong = data.split(b"\r\n", 1)[0].decode(errors="replace") + " " + \
            data.rsplit(b"\r\n\r\n", 1)[-1][:120].decode(errors="replace")
    elif b'"type":"done"' not in data:
        wrong = "ended without done: " + data[-120:].decode(errors="replace")
    else:
        wrong = ""
    return data.count(b'"type":"chunk"'), wrong


async def _read_all(port: int, job_ids: list[str]) -> list[tuple[int, str]]:
    return await asyncio.gather(*(_read(port, job_id) for job_id in job_ids))


_CHUNK = ('{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1767225600,'
          '"model":"bench","choices":[{"index":0,"delta":{"content":"d%d "},'
          '"finish_reason":null}]}')


def _write_streams(redis_url: str, prefix: str, job_ids: list[str], chunks: int,
                   interval: float) -> None:
    """Stand in for workers on other machines: each job's chunks, then its final event, as
    a worker's relay writes them (stream entry and publish), a chunk for every job each
    ``interval`` seconds, one pipeline a round."""
    client = redis.Redis.from_url(redis_url)
    keys = Keys(prefix)
    start = time.perf_counter()
    for seq in range(chunks + 1):
        pipe = client.pipeline(transaction=False)
        for job_id in job_ids:
            event = chunk_event(seq, 1, _CHUNK % seq) if seq < chunks else final_event(
                JobStatus.SUCCEEDED, seq, 1, finish_reason="stop")
            pipe.xadd(keys.events(job_id), {EVENT_FIELD: event}, id=entry_id(1, seq))
            pipe.publish(keys.channel(job_id), event)
            if seq == 0:
                pipe.expire(keys.events(job_id), 3600)
        pipe.execute()
        time.sleep(max(0.0, start + (seq + 1) * interval - time.perf_counter()))
    client.close()


async def _relayed(port: int, job_ids: list[str], readers: int, write: Any) -> tuple[
        list[tuple[int, str]], float]:
    """``readers`` readers per job connected first, then the events written (``write()``
    in processes of its own); the readers' results and seconds from the first write."""
    connected = asyncio.Semaphore(0)
    tasks = [asyncio.create_task(_read(port, job_id, connected))
             for job_id in job_ids for _ in range(readers)]
    for _ in tasks:  # each has its answer's first bytes (the SSE retry line): listening
        await asyncio.wait_for(connected.acquire(), 120)
    start = time.perf_counter()
    await asyncio.get_running_loop().run_in_executor(None, write)
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def relay(gateway: GatewayProcess, env: dict[str, str], redis_url: str, jobs: int,
          chunks: int = 40, interval: float = 0.04) -> list[Row]:
    """Two readers for each of ``jobs`` jobs whose events come live from two stand-in
    writer processes, a chunk a job every ``interval`` seconds: what one gateway relays."""
    ids = _streamed_jobs(gateway, jobs)
    halves = [ids[: jobs // 2], ids[jobs // 2:]]

    def write() -> None:
        with ProcessPoolExecutor(2) as pool:
            list(pool.map(_write_streams, [redis_url] * 2, [env["API_TASKS_PREFIX"]] * 2,
                          halves, [chunks] * 2, [interval] * 2))
    with _peak_rss(gateway) as peak:
        results, elapsed = asyncio.run(_relayed(gateway.port, ids, 2, write))
    got = sum(count for count, _ in results)
    failed = _failures(results, "relay")
    lost = 2 * jobs * chunks - got
    written = jobs * (1 / interval)
    return [(f"{2 * jobs} SSE readers of {jobs} jobs written live at {written:,.0f} "
             f"chunks/s (stand-in workers)",
             f"{len(results) - failed}/{len(results)} ok, "
             f"{got / elapsed:,.0f} chunks/s, {lost} lost",
             f"peak RSS {peak[0]:.0f} MB", "target: >= 20,000 chunks/s, <= 300 MB")]


def _streamed_jobs(gateway: GatewayProcess, jobs: int) -> list[str]:
    """The ids of ``jobs`` streamed jobs submitted through ``POST /v1/jobs``."""
    with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=60,
                      limits=httpx.Limits(max_connections=50)) as http:
        return [http.post("/v1/jobs", json={"url": "/v1/chat/completions", "body": {
            "model": DRIP, "messages": USER, "stream": True}}).json()["id"]
            for _ in range(jobs)]


@contextmanager
def _peak_rss(gateway: GatewayProcess) -> Iterator[list[float]]:
    """The gateway's peak RSS (MB) over the block, sampled every 0.1 s (``[0]`` of what it
    yields, read after the block)."""
    assert gateway.proc is not None
    pid = gateway.proc.pid
    peak, stop = [memory_mb(pid)], threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            peak[0] = max(peak[0], memory_mb(pid))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


def _failures(results: list[tuple[int, str]], what: str) -> int:
    """How many readers went wrong; the three commonest reasons printed."""
    failures = Counter(wrong for _, wrong in results if wrong)
    for wrong, count in failures.most_common(3):
        print(f"{count} {what} reader(s): {wrong}", file=sys.stderr)
    return sum(failures.values())


def readers(gateway: GatewayProcess, jobs: int) -> list[Row]:
    """``jobs`` live streamed jobs, each read by two SSE readers at once; then the same
    streams replayed by as many readers after they ended (the gateway's relay alone)."""
    ids = _streamed_jobs(gateway, jobs)
    rows: list[Row] = []
    for phase in ("live", "replayed"):
        with _peak_rss(gateway) as peak:
            start = time.perf_counter()
            results = asyncio.run(_read_all(gateway.port, ids + ids))
            elapsed = time.perf_counter() - start
        chunks = sum(count for count, _ in results)
        failed = _failures(results, phase)
        readers_n = len(results)
        rows.append((f"{readers_n} SSE readers of {jobs} {phase} jobs ({DRIP})",
                     f"{readers_n - failed}/{readers_n} ok, {chunks / elapsed:,.0f} chunks/s",
                     f"peak RSS {peak[0]:.0f} MB",
                     "target: no error, <= 300 MB" if phase == "live" else
                     "target: no error, >= 20,000 chunks/s, <= 300 MB"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = {"latency": 300, "ttfc": 200, "submits": 10_000, "readers": 1000}
    if args.quick:
        sizes = {"latency": 50, "ttfc": 30, "submits": 1000, "readers": 100}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp, services(Path(tmp)) as svc, ExitStack() as stack:
        # submits first, on a prefix no worker reads: the accept rate alone
        queued_env = svc.env()
        queued = _gateway(stack, svc, queued_env, "gateway-submits")
        rows += submits(queued, queued_env, sizes["submits"])
        rows += relay(queued, queued_env, svc.redis.url, sizes["readers"])
        queued.stop()
        # latency at the default settings; then a worker with a thread for each live stream
        for phase in ("latency", "readers"):
            env = svc.env()
            threads = {"concurrency": sizes["readers"] + 100} if phase == "readers" else {}
            with svc.worker(env, name=f"worker-{phase}", **threads) as worker:
                gateway = _gateway(stack, svc, env, f"gateway-{phase}")
                our_client(env).submit_chat(USER, model="echo").result(timeout=120)
                ready = gateway.url + "/readyz"
                wait_until(lambda: httpx.get(ready).status_code == 200, 30,  # noqa: B023
                           "the gateway to see the worker")
                if phase == "latency":
                    rows += latency(svc, gateway, env, sizes["latency"])
                    rows += first_chunk(svc, gateway, env, sizes["ttfc"])
                else:
                    rows += readers(gateway, sizes["readers"])
                assert worker.proc is not None and worker.proc.poll() is None
                gateway.stop()
    print(table("\ngateway (one process)", rows), flush=True)


if __name__ == "__main__":
    main()
