"""The command line's exit codes, shared by every ``python -m api_tasks`` command."""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ExitCode"]


class ExitCode(IntEnum):
    """What a command's exit status means (the README lists them too)."""

    OK = 0
    FAILED = 1  # the job failed or was cancelled; a batch had failed lines
    USAGE = 2  # bad input or settings
    TIMEOUT = 3  # timed out waiting
    UNAVAILABLE = 4  # Redis unavailable, or no such job
    INTERRUPTED = 130  # Ctrl-C during ``batch run`` (128 + SIGINT, as shells report it)
