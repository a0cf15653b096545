"""``python -m api_tasks batch run``: a batch file through the queue, with progress."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from api_tasks.batch import BatchSummary, check_file, run_batch
from api_tasks.client import Client
from api_tasks.spec import QUEUES

__all__ = ["add_batch_commands", "batch_run"]

_LOG_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal


def add_batch_commands(sub: Any) -> None:
    """The ``batch`` command and its ``run`` subcommand."""
    batch = sub.add_parser("batch", help="run an OpenAI Batch-format JSONL file")
    commands = batch.add_subparsers(dest="batch_command", required=True)
    run = commands.add_parser("run", help="submit every line and write results as they land")
    run.add_argument("input", type=Path)
    run.add_argument("-o", "--output", type=Path, required=True)
    run.add_argument("--errors", type=Path, help="failed lines (default: OUTPUT.errors.jsonl)")
    run.add_argument("--window", type=int, default=200, help="jobs queued at once")
    run.add_argument("--queue", choices=QUEUES, default="bulk")


def batch_run(client: Client, args: argparse.Namespace) -> int:
    """Check the whole file, then run it; resumes when the output already has lines."""
    problems = check_file(args.input, client.settings.jobs.max_request_bytes)
    if problems:
        print(f"{args.input}: {len(problems)} invalid line(s), nothing was sent:",
              file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    errors = args.errors or args.output.with_suffix(".errors.jsonl")
    show = _progress()
    summary = run_batch(client, args.input, args.output, errors, window=args.window,
                        queue=args.queue, progress=show)
    show(summary, final=True)
    print(f"{summary.completed} completed, {summary.failed} failed, {summary.skipped} already "
          f"done; usage {summary.usage}; results in {args.output}, errors in {errors}",
          file=sys.stderr)
    return 1 if summary.failed else 0


def _progress() -> Any:
    """A tqdm bar on a terminal; plain log lines otherwise (CI, files, pipes)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(unit="job", file=sys.stderr)

        def draw(summary: BatchSummary, final: bool = False) -> None:
            bar.n = summary.completed + summary.failed
            bar.set_postfix(done=summary.completed, failed=summary.failed, refresh=False)
            bar.refresh()
            if final:
                bar.close()
        return draw
    last = [0.0]

    def log(summary: BatchSummary, final: bool = False) -> None:
        now = time.monotonic()
        if final or now - last[0] >= _LOG_EVERY:
            last[0] = now
            elapsed = max(now - summary.started, 1e-9)
            finished = summary.completed + summary.failed
            print(f"batch: {summary.completed} done, {summary.failed} failed, "
                  f"{finished / elapsed:.1f}/s", file=sys.stderr)
    return log
