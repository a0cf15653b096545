"""The per-process worker runtime: one Redis pool, writer, watchdog, reaper, HTTP client.

Built once from the settings when the worker starts (``install``) and found
by the tasks with ``current()``; nothing here assumes it is the only process.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from typing import TYPE_CHECKING, Any

from api_tasks import metrics
from api_tasks.batches.pump import BatchPump
from api_tasks.broker import task_message
from api_tasks.connections import connect, pool_size
from api_tasks.enqueue import Enqueuer
from api_tasks.execution import tokens
from api_tasks.execution.heartbeat import Heartbeat
from api_tasks.execution.limits import Limiter
from api_tasks.execution.reaper import Reaper
from api_tasks.execution.runner import JobRunner
from api_tasks.execution.scheduler import Scheduler
from api_tasks.execution.sweeper import SweeperRole
from api_tasks.execution.watchdog import Watchdog
from api_tasks.execution.webhooks import WebhookSender
from api_tasks.record.cluster import cluster_reader, limit_budgets
from api_tasks.record.keys import Keys
from api_tasks.record.leases import LeaseStore
from api_tasks.record.store import JobStore
from api_tasks.record.webhooks import job_notifier
from api_tasks.record.writer import EventWriter
from api_tasks.upstream.call_handle import Stop
from api_tasks.upstream.http_client import HttpClient

if TYPE_CHECKING:
    from config.settings import Settings

__all__ = ["Runtime", "current", "install"]

log = logging.getLogger(__name__)
_lock = threading.Lock()
_runtime: Runtime | None = None


class Runtime:
    """Everything a worker process shares between its job threads."""

    def __init__(self, settings: Settings, app: Any = None) -> None:
        self.settings = settings
        self.app = app
        jobs, worker = settings.jobs, settings.worker
        self.worker_id = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        # one connection per job thread, or a shutdown's give-backs fail all at once
        self.redis = connect(settings.redis.state(), max_connections=pool_size(worker.concurrency))
        # the broker's Redis, for task messages sent again and given back (the state's own,
        # unless apart: redis.state_url)
        self.broker = connect(settings.redis, max_connections=pool_size(worker.concurrency)) \
            if settings.redis.split else self.redis
        self.keys = Keys.of(settings)
        self.store = JobStore(self.redis, self.keys, jobs.result_ttl, jobs.queued_ttl,
                              notifier=job_notifier(self.keys, settings))
        self.leases = LeaseStore(self.redis, self.keys, jobs.queued_ttl,
                                 int(worker.lease_ttl * 1000), jobs.max_crashes)
        self.writer = EventWriter(self.redis)
        # its own connection, failing fast: leases must be renewed whatever else hangs
        quick = connect(settings.redis.state(), socket_timeout=max(worker.lease_ttl / 6, 0.5),
                        quick=True)
        self.watchdog = Watchdog(quick, self.keys, worker.watchdog_interval, self.leases)
        # one worker of the cluster at a time gives back dead workers' jobs, sends waiting
        # jobs again, steps batches and sends webhooks: the one holding the sweeper role
        # (only workers, which have the app)
        role = SweeperRole(quick, self.keys, self.worker_id) if app is not None else None
        self.role = role
        sweeping = (lambda: role.held) if role is not None else (lambda: False)
        self.reaper = Reaper(self.broker, self.keys, self.leases, worker.reap_interval, sweeping)
        self.scheduler = Scheduler(self.redis, self.keys, self.leases, self._send,
                                   sweeping) if app is not None else None
        # only a worker (it has the app) says it is alive: probes count workers, not producers
        self.heartbeat = Heartbeat(quick, self.keys, self.worker_id, worker.concurrency,
                                   lambda: self.runner.tally.snapshot(self.watchdog.count())
                                   ) if app is not None else None
        # only a worker (it has the app) moves detached batches forward
        self.batches = BatchPump(Enqueuer(settings), self.redis,
                                 sweeping) if app is not None else None
        self.limiter = Limiter(self.redis, self.keys, worker.reserve_ahead,
                               int(worker.lease_ttl * 1000))
        self.http = HttpClient(worker.concurrency)  # a connection for every job thread
        # only a worker sends webhooks (it has the endpoints' secrets)
        self.webhooks = WebhookSender(self.redis, self.keys, settings, self.http,
                                      sweeping) if app is not None else None
        if any(limits.tokens_per_minute for upstream in settings.upstreams
               for limits in [upstream.limits, *upstream.model_limits.values()]):
            tokens.preload()  # the first job counted must not pay for loading an encoding
        self.runner = JobRunner(settings, self.store, self.leases, self.writer, self.watchdog,
                                self.http, self.worker_id, self.limiter)
        self._started = False

    def start(self) -> None:
        """Start the background threads (idempotent)."""
        if not self._started:
            self._started = True
            if self.app is not None:  # a worker: its metrics, or none at all
                self._serve_metrics()
            self.writer.start()
            self.watchdog.start()
            self.reaper.start()
            if self.role is not None:
                self.role.start()
            if self.scheduler is not None:
                self.scheduler.start()
            if self.heartbeat is not None:
                self.heartbeat.start()
            if self.batches is not None:
                self.batches.start()
            if self.webhooks is not None:
                self.webhooks.start()

    def _serve_metrics(self) -> None:
        worker = self.settings.worker
        if worker.metrics_port is None:
            metrics.turn_off()
            return
        metrics.register_cluster(cluster_reader(self.settings, self.keys))
        metrics.set_budgets(limit_budgets(self.settings))
        port = metrics.serve(worker.metrics_host, worker.metrics_port)
        if port is not None and self.heartbeat is not None:
            self.heartbeat.note(metrics_port=port)
            log.info("metrics on http://%s:%d/metrics", worker.metrics_host, port)

    def _send(self, job_id: str, message: dict[str, Any]) -> None:
        """Send a waiting job's task message again (for the scheduler)."""
        self.broker.lpush(self.keys.queue(message["queue"]), task_message(
            message["task"], message["args"], message["kwargs"], job_id, message["queue"],
            message.get("headers")))

    def stop_calls(self) -> int:
        """Abort every call in flight so its job is requeued; returns how many."""
        self.runner.stopping.set()
        count = self.watchdog.abort_all(Stop.SHUTDOWN)
        if count:
            log.warning("shutdown grace over: requeueing %d job(s) still in flight", count)
        return count

    def close(self) -> None:
        """Flush pending writes and stop the threads."""
        # the sweeping first, then the role handed back at once: due jobs wait on it
        for loop in (self.scheduler, self.batches, self.webhooks, self.role):
            if loop is not None:
                loop.stop()
        self.reaper.stop()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.watchdog.stop()
        self.writer.close()


def install(settings: Settings, app: Any = None) -> Runtime:
    """Create and start this process's runtime (the Celery app sends waiting jobs again)."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = Runtime(settings, app)
            _runtime.start()
        return _runtime


def current() -> Runtime:
    """This process's runtime, built from the environment's settings if not installed."""
    if _runtime is None:
        from config.loader import load_settings

        install(load_settings())
    assert _runtime is not None
    return _runtime
