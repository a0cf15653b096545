"""``python -m api_tasks top``: a live view of the cluster, read from Redis only.

Lanes and their depth, each worker's jobs and rate (from its liveness record),
each limit scope's use of its budget and how far ahead it is booked, the deployments'
breakers and cool-downs, running batches and recent failures. Any process with
the settings can run it; it costs the workers nothing.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import redis
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from api_tasks.connections import reason, text, text_map
from api_tasks.record.cluster import cluster_state, limit_budgets
from api_tasks.record.keys import Keys
from api_tasks.record.workers import alive, records

if TYPE_CHECKING:
    from rich.console import RenderableType

    from api_tasks.client import Client

__all__ = ["render", "run", "snapshot"]

_BATCHES_SHOWN = 10


def snapshot(client: Client) -> dict[str, Any]:
    """Everything the view shows, read now (``error`` when Redis did not answer)."""
    keys: Keys = client.keys
    try:
        state = cluster_state(client.redis, keys, client.settings,
                              client.broker.redis if client.apart else None)
        ids = client.store.shell.run(alive(keys))
        workers = client.store.shell.run(records(keys, ids)) if ids else []
        batch_ids = sorted(text(b) for shard in keys.every_shard
                           for b in client.redis.smembers(keys.batches(shard)))
        pipe = client.redis.pipeline(transaction=False)
        for batch_id in batch_ids[:_BATCHES_SHOWN]:
            pipe.hgetall(keys.batch(batch_id))
        batches = [(batch_id, text_map(info)) for batch_id, info in
                   zip(batch_ids, pipe.execute(), strict=False)]
    except redis.RedisError as err:
        return {"at": time.time(), "error": reason(err)}
    return {"at": time.time(), "state": state, "workers": workers, "batches": batches,
            "batches_total": len(batch_ids), "budgets": limit_budgets(client.settings)}


def _ended(worker: dict[str, Any]) -> int:
    return sum((worker.get("ended") or {}).values())


def render(now: dict[str, Any], before: dict[str, Any] | None, prefix: str) -> RenderableType:
    """The view of one snapshot (rates against the one before)."""
    title = Text(f"api-tasks top · prefix {prefix} · "
                 f"{time.strftime('%H:%M:%S', time.localtime(now['at']))} · Ctrl-C quits",
                 style="bold")
    if "error" in now:
        return Group(title, Text(f"Redis unavailable: {now['error']} (trying again)",
                                 style="red"))
    state = now["state"]
    lanes = Table(title="lanes", title_justify="left")
    for column in ("queue", "queued"):
        lanes.add_column(column)
    for lane, depth in state["queues"].items():
        lanes.add_row(lane, str(depth))
    lanes.add_row("waiting (limits)", str(state["waiting"]))
    lanes.add_row("running", str(state["running"]))

    seconds = now["at"] - before["at"] if before and "workers" in before else 0.0
    was = {w["id"]: _ended(w) for w in (before or {}).get("workers", [])}
    workers = Table(title=f"workers ({len(now['workers'])} alive)", title_justify="left")
    for column in ("worker", "running", "succeeded", "failed", "cancelled", "jobs/s", "seen"):
        workers.add_column(column)
    total_rate = 0.0
    for worker in now["workers"]:
        ended = worker.get("ended") or {}
        rate = (_ended(worker) - was[worker["id"]]) / seconds \
            if seconds > 0 and worker["id"] in was else 0.0
        total_rate += rate
        workers.add_row(worker["id"], f"{worker.get('running', 0)}/{worker.get('concurrency')}",
                        str(ended.get("succeeded", 0)), str(ended.get("failed", 0)),
                        str(ended.get("cancelled", 0)), f"{rate:.1f}",
                        f"{now['at'] - worker.get('seen_at', now['at']):.1f}s ago")
    workers.caption = f"cluster: {total_rate:.1f} jobs/s"

    limits = _limits(now, before, seconds)

    deployments = Table(title="deployments", title_justify="left")
    for column in ("upstream/deployment", "breaker", "in flight", "cool-down"):
        deployments.add_column(column)
    for row in state["deployments"]:
        breaker = row["breaker"] or "-"
        if breaker == "open":
            breaker = f"open {row['open_for']:.0f}s"
        deployments.add_row(f"{row['upstream']}/{row['deployment']}", breaker,
                            "-" if row["calls_in_flight"] is None else
                            str(row["calls_in_flight"]),
                            f"{row['cooldown']:.1f}s" if row["cooldown"] else "-")

    batches = Table(title=f"batches running ({now['batches_total']})", title_justify="left")
    for column in ("batch", "status", "done", "failed", "total"):
        batches.add_column(column)
    for batch_id, info in now["batches"]:
        batches.add_row(batch_id, info.get("status", "?"), info.get("completed", "0"),
                        info.get("failed", "0"), info.get("total", "?"))

    failures = Table(title="recent failures", title_justify="left")
    for column in ("when", "job", "upstream", "code", "status"):
        failures.add_column(column)
    recent = sorted((f for w in now["workers"] for f in w.get("failures") or []),
                    key=lambda f: f["at"], reverse=True)[:8]
    for failure in recent:
        failures.add_row(time.strftime("%H:%M:%S", time.localtime(failure["at"])),
                         failure["job_id"], failure["upstream"], str(failure["code"]),
                         str(failure["status"] or "-"))
    return Group(title, lanes, workers, limits, deployments, batches, failures)


def _limits(now: dict[str, Any], before: dict[str, Any] | None, seconds: float) -> Table:
    """Each configured scope's budget, what it reserved since the last frame, how far ahead
    its budget is booked (a call past the burst waits that long) and the jobs in its line."""
    state, was = now["state"], (before or {}).get("state") or {}
    table = Table(title="limits", title_justify="left")
    for column in ("scope", "unit", "budget/min", "reserved/min", "of budget", "booked ahead",
                   "in line"):
        table.add_column(column)
    for (scope, unit), budget in sorted(now["budgets"].items()):
        spent = state["limits_used"].get((scope, unit), 0) - \
            was.get("limits_used", {}).get((scope, unit), 0)
        rate = spent / seconds * 60 if seconds > 0 and spent >= 0 else None
        table.add_row(scope, unit, f"{budget:g}", "-" if rate is None else f"{rate:.0f}",
                      "-" if rate is None else f"{rate / budget:.0%}",
                      f"{state['limits'].get((scope, unit), 0.0):.2f}s",
                      str(state["lines"].get(scope, 0)))
    return table


def run(client: Client, interval: float, once: bool = False) -> int:
    """Show the view until Ctrl-C (``once``: print one frame and return 0, or 4 when Redis
    did not answer)."""
    prefix = client.settings.redis.prefix
    if once:
        from rich.console import Console

        now = snapshot(client)
        Console().print(render(now, None, prefix))
        return 4 if "error" in now else 0
    before: dict[str, Any] | None = None
    try:
        with Live(render({"at": time.time(), "error": "connecting"}, None, prefix),
                  auto_refresh=False, screen=False) as live:
            while True:
                now = snapshot(client)
                live.update(render(now, before, prefix), refresh=True)
                before = now
                time.sleep(interval)
    except KeyboardInterrupt:
        return 0
