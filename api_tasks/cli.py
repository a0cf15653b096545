"""``python -m api_tasks``: submit, watch, inspect and cancel jobs.

Exit codes: 0 success; 1 the job failed or was cancelled; 2 bad input or
settings; 3 timed out waiting; 4 Redis unavailable or no such job; 130
interrupted (`batch run`). They are `api_tasks.exit_codes.ExitCode`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import redis

from api_tasks.batches.cli import add_batch_commands, batch_command
from api_tasks.client import Client
from api_tasks.connections import reason
from api_tasks.errors import (
    BrokerUnavailable,
    InvalidJob,
    JobFailed,
    JobNotFound,
    JobTimeout,
)
from api_tasks.exit_codes import ExitCode
from api_tasks.record.deployments import deployment_states
from api_tasks.record.job_record import JobStatus
from api_tasks.record.reader import Job, text_of
from api_tasks.record.workers import STALE_AFTER, alive, records
from api_tasks.spec import QUEUES, Kind
from config.errors import ConfigError

__all__ = ["main", "parse_param"]


def parse_param(text: str) -> tuple[str, Any]:
    """``key=value``: the value is JSON when it parses (0.5, null, [..]), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


_SUBMITS = {"chat": "a chat job with a user message", "complete": "a completion job",
            "embed": "an embeddings job", "respond": "a responses job (/v1/responses)"}
_KINDS = {"chat": Kind.CHAT, "complete": Kind.COMPLETION, "embed": Kind.EMBEDDING,
          "respond": Kind.RESPONSE}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m api_tasks",
                                     description="Submit and follow OpenAI-format LLM jobs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, what in _SUBMITS.items():
        cmd = sub.add_parser(name, help=f"submit {what}")
        cmd.add_argument("text", help="the input text")
        cmd.add_argument("--system", help="a system message (chat), instructions (respond)")
        cmd.add_argument("--model", "-m")
        cmd.add_argument("--upstream", "-u", help="a configured upstream name")
        cmd.add_argument("--queue", choices=QUEUES)
        cmd.add_argument("--stream", "-s", action="store_true",
                         help="print tokens as they come (not embed)")
        cmd.add_argument("--param", "-p", action="append", type=parse_param, default=[],
                         metavar="KEY=VALUE", help="any OpenAI field; JSON values, null removes")
        cmd.add_argument("--detach", "-d", action="store_true",
                         help="print the job id and return at once")
        cmd.add_argument("--dry-run", action="store_true",
                         help="print the upstream, URL and JSON body the job would send; "
                              "enqueue nothing")
        cmd.add_argument("--json", action="store_true", help="print the whole response")
        cmd.add_argument("--timeout", type=float, default=600.0)
    add_batch_commands(sub)
    health = sub.add_parser("health", help="exit 0 when Redis answers and a worker (the named "
                                           "one, if given) renewed its liveness record lately")
    health.add_argument("--worker", help="a worker id, or its start (host, host.pid)")
    health.add_argument("--json", action="store_true")
    top = sub.add_parser("top", help="a live view of the cluster: lanes, workers, limits, "
                                     "deployments, batches, failures (reads Redis only)")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--once", action="store_true", help="print one view and exit")
    gateway = sub.add_parser("gateway", help="run the HTTP gateway (OpenAI-compatible, jobs API)")
    gateway.add_argument("--host", help="address to listen on (default gateway.host, 127.0.0.1)")
    gateway.add_argument("--port", type=int, help="port (default gateway.port, 8000)")
    for name, what in (("status", "show a job's status; with no job, the upstreams' "
                                  "deployments (breakers, calls in flight, cool-downs)"),
                       ("cancel", "cancel a job"),
                       ("result", "wait for and print a job's result")):
        cmd = sub.add_parser(name, help=what)
        cmd.add_argument("job_id", nargs="?" if name == "status" else None)
        cmd.add_argument("--timeout", type=float, default=600.0)
        cmd.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    args = _parser().parse_args(argv)
    try:
        client = Client()
        return _COMMANDS[args.command](client, args)
    except (ConfigError, InvalidJob) as err:
        return _fail(ExitCode.USAGE, f"error: {err}")
    except JobTimeout as err:
        return _fail(ExitCode.TIMEOUT, f"timeout: {err}")
    except (BrokerUnavailable, JobNotFound) as err:
        return _fail(ExitCode.UNAVAILABLE, f"error: {err}")
    except JobFailed as err:
        return _fail(ExitCode.FAILED, f"{err}\n{json.dumps(err.error, indent=2)}")
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


def _fail(code: int, message: str) -> int:
    print(message, file=sys.stderr)
    return code


def _submit(client: Client, args: argparse.Namespace) -> int:
    params: dict[str, Any] = dict(args.param)
    for name in ("model", "upstream", "queue"):
        if getattr(args, name):
            params[name] = getattr(args, name)
    if args.stream:
        params["stream"] = True
    kind = _KINDS[args.command]
    first: Any = args.text
    if kind is Kind.CHAT:
        system = [{"role": "system", "content": args.system}] if args.system else []
        first = [*system, {"role": "user", "content": args.text}]
    elif kind is Kind.RESPONSE and args.system is not None:
        params["instructions"] = args.system
    elif args.system is not None:
        raise InvalidJob("--system", f"is for chat and respond jobs, not {args.command}")
    if args.dry_run:
        print(json.dumps(client.dry_run(kind, first, params).to_dict(), indent=2,
                         ensure_ascii=False))
        return ExitCode.OK
    job = client.submit(kind, first, params)
    print(f"job {job.id} submitted", file=sys.stderr)
    if args.detach:
        print(job.id)
        return ExitCode.OK
    if args.stream and not args.json:
        return _print_stream(job, args.timeout)
    return _print_result(job, args)


def _print_stream(job: Job, timeout: float) -> int:
    for piece in job.text_stream(timeout=timeout):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return ExitCode.OK


def _print_result(job: Job, args: argparse.Namespace) -> int:
    response = job.result(timeout=args.timeout)
    if response is None:
        print(f"job {job.id} succeeded (no stored result)", file=sys.stderr)
    elif args.json:
        print(json.dumps(response, indent=2, ensure_ascii=False))
    elif isinstance(response.get("data"), list):  # embeddings: one vector a line
        for item in response["data"]:
            print(json.dumps(item.get("embedding") if isinstance(item, dict) else item))
    else:
        print(text_of(response))
    return ExitCode.OK


def _status(client: Client, args: argparse.Namespace) -> int:
    if args.job_id is None:
        return _upstreams(client, args)
    view = client.get_job(args.job_id).describe()
    print(json.dumps(view, indent=2, ensure_ascii=False) if args.json else
          f"{args.job_id} {view['status']} ({_details(view)})")
    return ExitCode.OK


def _health(client: Client, args: argparse.Namespace) -> int:
    """A probe that costs the workers nothing: their liveness records, read from Redis."""
    try:
        ids = client.store.shell.run(alive(client.keys))
        if args.worker:
            ids = [i for i in ids if i == args.worker or i.startswith(args.worker + ".")]
        workers = client.store.shell.run(records(client.keys, ids)) if ids else []
        if client.apart:  # the broker's Redis must answer too
            client.broker.redis.ping()
    except redis.RedisError as err:
        report = {"status": "unavailable", "redis": f"unavailable: {reason(err)}", "workers": []}
        print(json.dumps(report) if args.json else
              f"unhealthy: Redis unavailable ({reason(err)})",
              file=sys.stdout if args.json else sys.stderr)
        return ExitCode.UNAVAILABLE
    now = time.time()
    for worker in workers:
        worker["seen_ago"] = round(now - worker.pop("seen_at", now), 3)
    healthy = bool(workers)
    if args.json:
        print(json.dumps({"status": "ok" if healthy else "no_workers", "redis": "ok",
                          "workers": workers}))
    elif healthy:
        print("\n".join(f"ok: {w['id']} (seen {w['seen_ago']:.1f}s ago)" for w in workers))
    else:
        named = f" named {args.worker}" if args.worker else ""
        print(f"unhealthy: Redis answers, but no worker{named} renewed its liveness record "
              f"in the last {STALE_AFTER:g}s", file=sys.stderr)
    return ExitCode.OK if healthy else ExitCode.FAILED


def _upstreams(client: Client, args: argparse.Namespace) -> int:
    try:
        states = deployment_states(client.redis, client.keys, client.settings)
    except redis.RedisError as err:
        raise BrokerUnavailable(f"Redis is unreachable: {err}") from err
    if args.json:
        print(json.dumps(states, indent=2))
        return ExitCode.OK
    for state in states:
        breaker = state["breaker"]
        if breaker == "open":
            breaker = f"open for {state['open_for']:.1f}s more"
        parts = [f"{state['upstream']}/{state['deployment']}", state["base_url"]]
        if breaker is not None:
            parts += [f"breaker {breaker}", f"{state['calls_in_flight']} in flight",
                      f"{state['recent_failures']} recent failures"]
        if state["cooldown"]:
            parts.append(f"cooling down {state['cooldown']:.1f}s after a 429")
        print("  ".join(parts))
    return ExitCode.OK


def _details(view: dict[str, Any]) -> str:
    """One line on where a job is: its attempt, its wait, or how it ended."""
    now = time.time()
    status, attempt = view["status"], view["attempt"]
    if status == JobStatus.QUEUED:
        since = now - (view["created_at"] or now)
        return f"queued {since:.1f}s ago" + (f", attempt {attempt + 1} next" if attempt else "")
    if status == JobStatus.WAITING:
        due = max((view["waiting_until"] or now) - now, 0.0)
        return f"waiting for its {view['waiting_for']} limit, due in {due:.1f}s"
    if status == JobStatus.RUNNING:
        return f"attempt {attempt}, started {now - (view['started_at'] or now):.1f}s ago"
    took = (view["finished_at"] or now) - (view["started_at"] or view["created_at"] or now)
    calls = view["calls"] or 0
    ended = f"attempt {attempt}, {calls} call{'s' if calls != 1 else ''}, {took:.1f}s"
    error = view["error"]
    return f"{ended}; {error.get('code')}: {error.get('message')}" if error else ended


def _cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.get_job(args.job_id)
    if job.cancel():
        print(f"{job.id}: cancel requested")
    else:  # the job is not running either way: nothing to do is not an error
        print(f"{job.id}: already {job.status().value}; nothing to cancel")
    return ExitCode.OK


def _result(client: Client, args: argparse.Namespace) -> int:
    return _print_result(client.get_job(args.job_id), args)


def _top(client: Client, args: argparse.Namespace) -> int:
    from api_tasks.top import run  # rich loads for this only

    if args.interval <= 0:
        return _fail(ExitCode.USAGE, "error: --interval: must be more than 0")
    return run(client, args.interval, once=args.once)


def _gateway(client: Client, args: argparse.Namespace) -> int:
    from api_tasks.gateway.server import serve  # uvicorn and starlette load for this only

    return serve(client.settings, args.host, args.port)


_COMMANDS = {**dict.fromkeys(_SUBMITS, _submit), "status": _status, "cancel": _cancel,
             "result": _result, "batch": batch_command, "gateway": _gateway,
             "health": _health, "top": _top}
