"""Settings: the typed model (``settings``) and how it is built (``loader``)."""

from config.loader import load_settings
from config.settings import (
    JobSettings,
    RedisSettings,
    RetrySettings,
    Settings,
    Timeouts,
    Upstream,
    WorkerSettings,
)

__all__ = [
    "JobSettings",
    "RedisSettings",
    "RetrySettings",
    "Settings",
    "Timeouts",
    "Upstream",
    "WorkerSettings",
    "load_settings",
]
