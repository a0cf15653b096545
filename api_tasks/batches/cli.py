"""``python -m api_tasks batch ...``: batch files, attached (``run``) or detached.

``run`` drives the file from this process and writes results as they land;
``submit`` hands it to the workers and returns a batch id for ``status``,
``cancel`` and ``results``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from api_tasks.batches.attached import BatchSummary, run_batch
from api_tasks.batches.detached import MAX_WINDOW, Batch, upload_batch
from api_tasks.batches.lines import check_file
from api_tasks.batches.state import ENDED, BatchStatus
from api_tasks.client import Client
from api_tasks.errors import InvalidBatch
from api_tasks.exit_codes import ExitCode
from api_tasks.spec import QUEUES

__all__ = ["add_batch_commands", "batch_command"]

_LOG_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal


def add_batch_commands(sub: Any) -> None:
    """The ``batch`` command and its subcommands."""
    batch = sub.add_parser("batch", help="run an OpenAI Batch-format JSONL file")
    commands = batch.add_subparsers(dest="batch_command", required=True)
    run = commands.add_parser("run", help="submit every line and write results as they land")
    run.add_argument("input", type=Path)
    run.add_argument("-o", "--output", type=Path, required=True)
    run.add_argument("--errors", type=Path, help="failed lines (default: OUTPUT.errors.jsonl)")
    run.add_argument("--fresh", action="store_true",
                     help="call again the lines an earlier run with this output file finished "
                          "(their results are still in Redis); lines in the output are kept")
    submit = commands.add_parser("submit", help="hand the file to the workers; prints its id")
    submit.add_argument("input", type=Path)
    for cmd in (run, submit):
        cmd.add_argument("--window", type=_window, default=200,
                         help=f"jobs queued or running at once (1 to {MAX_WINDOW})")
        cmd.add_argument("--queue", choices=QUEUES, default="bulk")
    status = commands.add_parser("status", help="a detached batch's state, counts and usage")
    cancel = commands.add_parser("cancel", help="stop sending; queued lines are cancelled")
    results = commands.add_parser("results", help="write a detached batch's output files")
    for cmd in (status, cancel, results):
        cmd.add_argument("batch_id")
    results.add_argument("-o", "--output", type=Path, required=True)
    results.add_argument("--errors", type=Path, help="failed lines (default: OUTPUT.errors.jsonl)")
    results.add_argument("--wait", action="store_true", help="wait for the batch to end first")
    results.add_argument("--timeout", type=float, default=None)


def _window(value: str) -> int:
    number = int(value)
    if not 1 <= number <= MAX_WINDOW:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_WINDOW}")
    return number


def batch_command(client: Client, args: argparse.Namespace) -> int:
    """Dispatch ``batch <subcommand>``."""
    return _SUBCOMMANDS[args.batch_command](client, args)


def _run(client: Client, args: argparse.Namespace) -> int:
    """Check the whole file, then run it; resumes when the output already has lines."""
    checked = check_file(args.input, client.settings.jobs.max_request_bytes)
    if checked.problems:
        return _refuse(InvalidBatch(str(args.input), checked.problems))
    errors = args.errors or args.output.with_suffix(".errors.jsonl")
    show = _progress(checked.lines)
    try:
        summary = run_batch(client, args.input, args.output, errors, window=args.window,
                            queue=args.queue, progress=show, fresh=args.fresh)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the results so far are in {args.output}; run the same command "
              "again to resume (jobs still running are collected, not sent again)",
              file=sys.stderr)
        return ExitCode.INTERRUPTED
    show(summary, final=True)
    earlier = ""
    if summary.collected:
        earlier = (f" ({summary.collected} of them collected from an earlier run's jobs, not "
                   "called again; --fresh calls them again)")
    print(f"{summary.completed} completed, {summary.failed} failed{earlier}, {summary.skipped} "
          f"already in the output; usage {json.dumps(summary.usage)}; results in "
          f"{args.output}, errors in {errors}", file=sys.stderr)
    return ExitCode.FAILED if summary.failed else ExitCode.OK


def _submit(client: Client, args: argparse.Namespace) -> int:
    try:
        batch = upload_batch(client, args.input, window=args.window, queue=args.queue)
    except InvalidBatch as err:
        return _refuse(err)
    print(batch.id)
    return ExitCode.OK


def _status(client: Client, args: argparse.Namespace) -> int:
    print(json.dumps(Batch(client, args.batch_id).status(), indent=2))
    return ExitCode.OK


def _cancel(client: Client, args: argparse.Namespace) -> int:
    state = Batch(client, args.batch_id).cancel()
    print(f"{args.batch_id}: {state}")
    stopping = state in (BatchStatus.CANCELLING, BatchStatus.CANCELLED)
    return ExitCode.OK if stopping else ExitCode.FAILED


def _results(client: Client, args: argparse.Namespace) -> int:
    batch = Batch(client, args.batch_id)
    state = batch.wait(args.timeout) if args.wait else batch.status()
    errors = args.errors or args.output.with_suffix(".errors.jsonl")
    with args.output.open("w", encoding="utf-8") as out, errors.open("w", encoding="utf-8") as err:
        written, failed = batch.write_results(out, err)
    note = "" if state["status"] in ENDED else f" so far (the batch is {state['status']})"
    print(f"{written} result(s) in {args.output}, {failed} error(s) in {errors}{note}",
          file=sys.stderr)
    return ExitCode.FAILED if failed else ExitCode.OK


def _refuse(err: InvalidBatch) -> int:
    print(f"{len(err.problems)} invalid line(s), nothing was sent:", file=sys.stderr)
    for problem in err.problems:
        print(f"  {problem}", file=sys.stderr)
    return ExitCode.USAGE


_SUBCOMMANDS = {"run": _run, "submit": _submit, "status": _status, "cancel": _cancel,
                "results": _results}


def _progress(total: int) -> Any:
    """A tqdm bar (done, failed, rate, ETA) on a terminal; plain log lines otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, unit="job", file=sys.stderr)

        def draw(summary: BatchSummary, final: bool = False) -> None:
            bar.n = summary.skipped + summary.completed + summary.failed
            bar.set_postfix(done=summary.completed, failed=summary.failed, refresh=False)
            bar.refresh()
            if final:
                bar.close()
        return draw
    last: list[Any] = [0.0, None]  # when the last line was printed, and its counts

    def log(summary: BatchSummary, final: bool = False) -> None:
        now = time.monotonic()
        counts = (summary.completed, summary.failed, summary.skipped)
        if counts != last[1] and (final or now - last[0] >= _LOG_EVERY):
            last[0], last[1] = now, counts
            elapsed = max(now - summary.started, 1e-9)
            finished = summary.completed + summary.failed
            rate = finished / elapsed
            left = total - summary.skipped - finished
            eta = f", ETA {left / rate:.0f}s" if rate > 0 and left > 0 else ""
            print(f"batch: {summary.completed} done, {summary.failed} failed, "
                  f"{summary.skipped} skipped, {rate:.1f}/s{eta}", file=sys.stderr)
    return log
