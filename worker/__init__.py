"""The worker: ``celery -A worker worker`` finds the app here.

The app is built on first access from the settings (``config``), so importing
this package never starts anything. A bad setting
stops the worker at start with one line naming the key and the file.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any

# imported here, not in _build: `celery -A worker` puts the current directory
# on sys.path only while it imports this module
from api_tasks.broker import create_app
from config.errors import ConfigError
from config.loader import load_settings
from worker.lifecycle import connect_signals

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["app", "get_app"]

_lock = threading.Lock()
_app: Celery | None = None


def get_app() -> Celery:
    """The worker's Celery app, built once from the settings."""
    global _app
    with _lock:
        if _app is None:
            _app = _build()
    return _app


def _build() -> Celery:
    try:
        settings = load_settings()
        problems = settings.missing_keys()
        if problems:
            raise ConfigError("; ".join(problems))
    except ConfigError as err:
        print(f"api-tasks worker: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    app = create_app(settings)
    connect_signals(settings)
    return app


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        return get_app()
    raise AttributeError(name)
