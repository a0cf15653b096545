"""A 50,000-line batch through OpenAI's Batches API on the gateway (the ``openai`` SDK's upload,
create, poll and download), beside the same file through ``batch run`` on the same workers:
``python -m bench.batches [--quick]``."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TypeVar

import httpx
import openai
import redis

from bench.gateway import AUTH, KEY, _gateway, _peak_rss
from bench.harness import memory_mb, services
from bench.run import table
from bench.scenarios import USER, Row, our_client
from tests.support.services import ROOT, wait_until

__all__ = ["main"]

T = TypeVar("T")


def _write(path: Path, lines: int) -> None:
    with path.open("w") as out:
        for i in range(lines):
            out.write(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                  "url": "/v1/chat/completions",
                                  "body": {"model": "echo", "max_tokens": 16, "messages": [
                                      {"role": "user", "content": f"line {i}"}]}}) + "\n")


def _batch_run(env: dict[str, str], source: Path, out: Path) -> float:
    """Seconds ``batch run`` takes over the file (the reference)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "api_tasks", "batch", "run", str(source), "-o",
                    str(out), "--window", "200", "--queue", "bulk"], env=env, cwd=ROOT,
                   check=True, capture_output=True)
    return time.perf_counter() - start


def _sampled(pid: int, work: Callable[[], T]) -> tuple[T, float]:
    """What ``work`` returns, and process ``pid``'s peak RSS (MB) while it ran."""
    peak, stop = [memory_mb(pid)], threading.Event()
    sampler = threading.Thread(target=_peak_rss, args=(pid, stop, peak), daemon=True)
    sampler.start()
    try:
        return work(), peak[0]
    finally:
        stop.set()
        sampler.join()


def _redis_peak(client: redis.Redis, stop: threading.Event, peak: list[int]) -> None:
    while not stop.wait(0.25):
        peak[0] = max(peak[0], int(client.info("memory")["used_memory"]))


def _through_the_api(gateway_url: str, source: Path, out: Path, pid: int,
                     client: redis.Redis) -> tuple[float, float, float, int, int, float]:
    """Upload, run and download through the SDK: (seconds, peak RSS during the upload, during
    the download, lines out, distinct custom_ids, Redis's peak growth while the batch ran
    beyond its uploaded file, in MB)."""
    sdk = openai.OpenAI(base_url=gateway_url + "/v1", api_key=KEY, max_retries=0, timeout=600)
    start = time.perf_counter()

    def upload() -> str:
        with source.open("rb") as lines:
            return sdk.files.create(file=lines, purpose="batch").id

    file_id, up = _sampled(pid, upload)
    uploaded = int(client.info("memory")["used_memory"])
    peak, stop = [uploaded], threading.Event()
    sampler = threading.Thread(target=_redis_peak, args=(client, stop, peak), daemon=True)
    sampler.start()
    batch_id = sdk.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                  completion_window="24h").id
    try:
        batch = wait_until(lambda: (b := sdk.batches.retrieve(batch_id)).status in (
            "completed", "failed", "expired", "cancelled") and b, 3600, "the batch to end",
            interval=0.2)
    finally:
        stop.set()
        sampler.join()
    assert batch.status == "completed", batch

    def download() -> None:
        with httpx.stream("GET", f"{gateway_url}/v1/files/{batch.output_file_id}/content",
                          headers=AUTH, timeout=600) as answer, out.open("wb") as sink:
            for piece in answer.iter_bytes(1 << 20):
                sink.write(piece)

    _, down = _sampled(pid, download)
    elapsed = time.perf_counter() - start
    ids = [json.loads(line)["custom_id"] for line in out.read_text().splitlines()]
    return elapsed, up, down, len(ids), len(set(ids)), (peak[0] - uploaded) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="5,000 lines, for a smoke run")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    lines = 5_000 if args.quick else 50_000
    with tempfile.TemporaryDirectory() as tmp, services(Path(tmp)) as svc, ExitStack() as stack:
        work = Path(tmp)
        env = svc.env()
        stack.enter_context(svc.worker(env))  # the default 200 threads
        gateway = _gateway(stack, svc, env, "gateway-batches")
        our_client(env).submit_chat(USER, model="echo").result(timeout=120)
        source = work / "input.jsonl"
        _write(source, lines)
        size = source.stat().st_size
        reference = _batch_run(env, source, work / "reference.jsonl")
        assert gateway.proc is not None
        ours, up, down, out, distinct, grown = _through_the_api(
            gateway.url, source, work / "output.jsonl", gateway.proc.pid,
            redis.Redis.from_url(svc.redis.url))
        output_mb = (work / "output.jsonl").stat().st_size / 1e6
    rows: list[Row] = [
        (f"{lines:,}-line batch ({size / 1e6:.1f} MB): upload, run, download (SDK)",
         f"{ours:.1f} s", f"batch run: {reference:.1f} s",
         f"{ours / reference:.2f}x (target <= 1.1x)"),
        ("gateway peak RSS, upload / download", f"{up:.0f} / {down:.0f} MB", "-",
         "target <= 300 MB"),
        ("output lines", f"{out:,} ({distinct:,} custom_ids)", f"{lines:,}",
         "every line once" if out == distinct == lines else "MISMATCH"),
        ("Redis growth while it ran, beyond the uploaded file", f"{grown:.1f} MB",
         f"its output file: {output_mb:.1f} MB", f"{grown / output_mb:.2f}x"),
    ]
    print(table("\nbatches through the gateway (one process)", rows), flush=True)


if __name__ == "__main__":
    main()
