"""The Prometheus metrics every worker and gateway process exports, defined once.

Each process counts what it did itself (jobs it submitted, ran, relayed); what
only Redis knows (queue depth, jobs waiting, running, batches, breakers) is read
once per scrape by whichever process is scraped (``ClusterCollector``), never
summed across workers. Label values come from the settings or from enums, never
from a job's raw strings: a model matching no configured name is labelled with
the glob it matched.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

if TYPE_CHECKING:
    from config.settings import Settings

__all__ = [
    "BATCH_LINES",
    "CALLS_IN_FLIGHT",
    "CHUNKS",
    "FIRST_CHUNK",
    "JOBS_ENDED",
    "JOBS_SUBMITTED",
    "LIMIT_BUDGET",
    "LIMIT_USED",
    "LIMIT_WAIT",
    "QUEUE_TIME",
    "RATE_LIMITED",
    "RESPONSES",
    "RETRIES",
    "RUN_TIME",
    "TOKENS",
    "WEBHOOKS",
    "ClusterCollector",
    "exposition",
    "model_label",
    "register_cluster",
    "serve",
    "status_class",
    "submitted",
    "turn_off",
]

log = logging.getLogger(__name__)


class _Labelled:
    """``labels()`` without the lock once a child exists (every job looks up several: the
    locked path costs eight times as much, and label values are bounded)."""

    def labels(self, *values: Any, **named: Any) -> Any:
        child = None if named else self._metrics.get(values)  # type: ignore[attr-defined]
        return child if child is not None else \
            super().labels(*values, **named)  # type: ignore[misc]


class _Counter(_Labelled, Counter):
    pass


class _Gauge(_Labelled, Gauge):
    pass


class _Histogram(_Labelled, Histogram):
    pass


_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

JOBS_SUBMITTED = _Counter("api_tasks_jobs_submitted", "Jobs submitted by this process.",
                          ["kind", "upstream", "model", "queue"])
JOBS_ENDED = _Counter("api_tasks_jobs", "Jobs this process ended, by final status.",
                      ["kind", "upstream", "model", "queue", "status"])
QUEUE_TIME = _Histogram("api_tasks_job_queue_seconds",
                        "From submit to the start of the attempt that ended the job.",
                        ["queue"], buckets=_SECONDS)
RUN_TIME = _Histogram("api_tasks_job_run_seconds",
                      "From the start of the attempt that ended the job to its end.",
                      ["kind", "upstream"], buckets=_SECONDS)
FIRST_CHUNK = _Histogram("api_tasks_time_to_first_chunk_seconds",
                         "From submit to a streamed job's first chunk in Redis.",
                         ["upstream"], buckets=_SECONDS)
TOKENS = _Counter("api_tasks_tokens", "Tokens the upstreams reported, in and out.",
                  ["upstream", "model", "direction"])
RESPONSES = _Counter("api_tasks_upstream_responses",
                     "Upstream calls by how they ended: 2xx, 4xx, 5xx, or error (no answer).",
                     ["upstream", "deployment", "class"])
RETRIES = _Counter("api_tasks_retries", "Calls made again after a failed one.", ["upstream"])
RATE_LIMITED = _Counter("api_tasks_rate_limited", "Upstream answers of 429.",
                        ["upstream", "deployment"])
LIMIT_WAIT = _Histogram("api_tasks_limit_wait_seconds",
                        "Time calls waited for a limit, a cool-down or a breaker (in a "
                        "worker, or as planned when the job waits outside one).",
                        ["reason"], buckets=_SECONDS)
LIMIT_USED = _Counter("api_tasks_limit_used",
                      "Requests and tokens admitted under each configured limit scope (tokens "
                      "as reserved when the call was admitted).", ["scope", "unit"])
LIMIT_BUDGET = _Gauge("api_tasks_limit_budget_per_minute",
                      "Each configured limit scope's requests and tokens a minute.",
                      ["scope", "unit"])
CALLS_IN_FLIGHT = _Gauge("api_tasks_calls_in_flight", "Upstream calls under way now.",
                         ["upstream"])
CHUNKS = _Counter("api_tasks_chunks_relayed", "Stream chunks written to Redis.", ["upstream"])
BATCH_LINES = _Counter("api_tasks_batch_lines", "Batch lines recorded, by outcome.", ["outcome"])
WEBHOOKS = _Counter("api_tasks_webhook_deliveries", "Webhook delivery attempts, by outcome.",
                    ["outcome"])


def model_label(settings: Settings, upstream: str | None, model: str | None) -> str:
    """A bounded label for ``model``: its name if the settings name it, else the glob of its
    upstream's that it matched ("" for none)."""
    if not model:
        return ""
    for group in settings.upstreams:
        if upstream is not None and group.name != upstream:
            continue
        names = {*group.models, *group.model_defaults, *group.model_limits}
        if group.default_model:
            names.add(group.default_model)
        if model in names:
            return model
        for pattern in group.models:
            if fnmatch.fnmatchcase(model, pattern):
                return pattern
    return model if model in settings.fallbacks else ""


def status_class(status: int | None) -> str:
    """How a call ended, for ``RESPONSES``: its status class, or error with no answer."""
    return f"{status // 100}xx" if status else "error"


def submitted(settings: Settings, record: Mapping[str, str]) -> None:
    """Count a job this process sent (its record's fields)."""
    upstream = record.get("upstream") or ""
    JOBS_SUBMITTED.labels(record.get("kind") or "", upstream,
                          model_label(settings, upstream, record.get("model")),
                          record.get("queue") or "").inc()


class ClusterCollector(Collector):
    """Gauges only Redis knows, read once per scrape (``read`` returns them by name)."""

    def __init__(self, read: Callable[[], Mapping[str, Any]]) -> None:
        self.read = read

    def describe(self) -> list[GaugeMetricFamily]:
        """Nothing: registering must not read Redis (the registry calls ``collect`` else)."""
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            state = self.read()
        except Exception as err:  # a scrape never fails for Redis: the gauges go missing
            log.warning("metrics: the cluster's state was not read (%s)", err)
            up = GaugeMetricFamily("api_tasks_redis_up", "Whether Redis answered the scrape.")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("api_tasks_redis_up", "Whether Redis answered the scrape.")
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily("api_tasks_queue_depth", "Jobs queued per lane.",
                                  labels=["queue"])
        for lane, count in state["queues"].items():
            depth.add_metric([lane], count)
        yield depth
        for name, doc in (("waiting", "Jobs waiting outside any worker (limits, breakers)."),
                          ("running", "Jobs claimed by a worker now."),
                          ("batches_running", "Detached and API batches still running."),
                          ("workers_alive", "Worker processes that renewed their liveness "
                                            "record lately.")):
            gauge = GaugeMetricFamily(f"api_tasks_{name}", doc)
            gauge.add_metric([], state[name])
            yield gauge
        breaker = GaugeMetricFamily("api_tasks_deployment_breaker_open",
                                    "1 while a deployment's circuit breaker is open.",
                                    labels=["upstream", "deployment"])
        flight = GaugeMetricFamily("api_tasks_deployment_calls_in_flight",
                                   "Calls to a deployment under way across the cluster.",
                                   labels=["upstream", "deployment"])
        for row in state["deployments"]:
            if row["breaker"] is not None:
                breaker.add_metric([row["upstream"], row["deployment"]],
                                   1 if row["breaker"] == "open" else 0)
                flight.add_metric([row["upstream"], row["deployment"]], row["calls_in_flight"])
        yield breaker
        yield flight
        booked = GaugeMetricFamily(
            "api_tasks_limit_booked_seconds",
            "How far ahead each limit scope's budget is booked (0: room now).",
            labels=["scope", "unit"])
        for (scope, unit), seconds in state["limits"].items():
            booked.add_metric([scope, unit], seconds)
        yield booked


_registered: list[ClusterCollector] = []


def register_cluster(read: Callable[[], Mapping[str, Any]]) -> None:
    """Export the cluster's gauges from this process (once)."""
    if not _registered:
        collector = ClusterCollector(read)
        REGISTRY.register(collector)
        _registered.append(collector)


def set_budgets(budgets: Mapping[tuple[str, str], float]) -> None:
    """Export each configured limit scope's budget a minute, by (scope, unit)."""
    for (scope, unit), per_minute in budgets.items():
        LIMIT_BUDGET.labels(scope, unit).set(per_minute)


def serve(host: str, port: int) -> int | None:
    """Serve ``/metrics`` on a thread of this process; the port it got (None: it could not:
    one warning, the process goes on without)."""
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as err:
        log.warning("metrics: cannot listen on %s:%d (%s); this process exports no metrics "
                    "(give each process on a machine its own worker.metrics_port, or 0 for "
                    "any free one)", host, port, err)
        return None
    return int(server.server_port)


def exposition() -> tuple[bytes, str]:
    """This process's metrics in the text format, and its content type (for a web app's
    own ``/metrics`` route; it reads Redis: call it off the event loop)."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class _Off:
    """What a metric is in a process that exports none: every call does nothing."""

    def labels(self, *_: Any) -> _Off:
        return self

    def inc(self, *_: Any) -> None:
        pass

    dec = observe = inc


def turn_off() -> None:
    """This process exports no metrics: counting costs nothing (``worker.metrics_port: off``)."""
    off = _Off()
    for name, value in list(globals().items()):  # every metric this module defines
        if isinstance(value, (Counter, Gauge, Histogram)):
            globals()[name] = off
