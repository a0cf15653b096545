"""Worker start and stop: build the runtime once, and bound a graceful shutdown.

On SIGTERM Celery starts a warm shutdown, which on the threads pool waits for
running tasks with no limit. We give in-flight jobs ``worker.shutdown_grace``
seconds to finish; then every call still running is aborted and its job is
rejected with requeue, so another worker runs it and this one exits.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import TYPE_CHECKING, Any

from celery.signals import after_setup_logger, worker_init, worker_shutdown, worker_shutting_down

from api_tasks import runtime
from api_tasks.connections import wait_for_cluster, wait_for_redis
from api_tasks.job_logs import JobFields, JsonFormatter

if TYPE_CHECKING:
    from config.settings import Settings

__all__ = ["connect_signals"]

log = logging.getLogger(__name__)
_EXIT_MARGIN = 1.0  # seconds kept, within the grace, to requeue and exit


def _gives_level(argv: list[str]) -> bool:
    """Whether the worker's command line sets a level (``-l``/``--loglevel``)."""
    return any(arg in ("-l", "--loglevel") or arg.startswith("--loglevel=")
               or (arg.startswith("-l") and not arg.startswith("--")) for arg in argv)


def _level_name(level: Any) -> str:
    """Celery's parsed level (a number or a name) as a standard level name."""
    if isinstance(level, int):
        return logging.getLevelName(level)
    name = str(level).upper()
    number = logging.getLevelName(name)
    return logging.getLevelName(number) if isinstance(number, int) else name


def connect_signals(settings: Settings) -> None:
    """Hook the runtime into this worker process's life."""

    def on_init(sender: Any = None, **_: Any) -> None:
        wait_for_cluster(settings.redis.state())  # a cluster client needs one to build
        installed = runtime.install(settings, getattr(sender, "app", None))
        wait_for_redis(installed.redis)
        if installed.broker is not installed.redis:
            wait_for_redis(installed.broker)

    def on_logging(logger: logging.Logger, loglevel: Any = None, **_: Any) -> None:
        for handler in logger.handlers:  # every line says which job it is about
            handler.addFilter(JobFields())
            if settings.worker.log_format == "json":
                handler.setFormatter(JsonFormatter())
        chosen = settings.worker.log_level
        given = _level_name(loglevel) if _gives_level(sys.argv) else None
        if chosen is None:  # -l if given, else INFO (celery's own default is WARNING)
            logger.setLevel(given or "INFO")
            return
        logger.setLevel(chosen)
        if given is not None and given != chosen:
            logger.warning("log level %s from worker.log_level (settings file or "
                           "API_TASKS_LOG_LEVEL) overrides the command line's -l %s",
                           chosen, given)

    def on_shutting_down(**_: Any) -> None:
        grace = settings.worker.shutdown_grace
        log.info("shutting down: in-flight jobs have %.0fs to finish", grace)
        # stop calls a little before the grace ends: requeueing and exiting take a moment
        timer = threading.Timer(max(grace - _EXIT_MARGIN, grace / 2), runtime.current().stop_calls)
        timer.daemon = True
        timer.start()

    def on_shutdown(**_: Any) -> None:
        runtime.current().close()

    worker_init.connect(on_init, weak=False)
    after_setup_logger.connect(on_logging, weak=False)
    worker_shutting_down.connect(on_shutting_down, weak=False)
    worker_shutdown.connect(on_shutdown, weak=False)
