"""The settings' one error. The config package sits below api_tasks and imports nothing of
it, so this is not an ``ApiTasksError``; ``api_tasks`` re-exports it."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """The settings are invalid; the message names the key and the file."""
