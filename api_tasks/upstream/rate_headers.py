"""What an upstream says of its rate limits in its answers' ``x-ratelimit-*`` headers.

OpenAI-format servers (OpenAI, Azure, LiteLLM, vLLM behind a gateway...) send the limit,
what is left and when it is whole again, for requests and for tokens, on every answer. A
header that is missing says nothing; one that does not parse is ignored with one warning
per upstream and header, never a crash.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from api_tasks.upstream.retry import parse_duration

__all__ = ["Reported", "reported", "warn_once"]

log = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


@dataclass(frozen=True)
class Reported:
    """One answer's view of the upstream's limits (None: not said)."""

    limit_requests: float | None = None
    limit_tokens: float | None = None
    remaining_requests: float | None = None
    remaining_tokens: float | None = None
    reset_requests: float | None = None  # seconds until the requests budget is whole
    reset_tokens: float | None = None

    @property
    def said(self) -> bool:
        """Whether the answer said anything of its limits."""
        return any(value is not None for value in (
            self.limit_requests, self.limit_tokens, self.remaining_requests,
            self.remaining_tokens, self.reset_requests, self.reset_tokens))


def reported(headers: Mapping[str, str], upstream: str) -> Reported:
    """The limits an answer's headers report (nothing, when it sends none)."""
    lowered = {name.lower(): value for name, value in headers.items()
               if name.lower().startswith("x-ratelimit-")}
    if not lowered:
        return Reported()
    values: dict[str, float | None] = {}
    for what in ("limit", "remaining", "reset"):
        for unit in ("requests", "tokens"):
            name = f"x-ratelimit-{what}-{unit}"
            text = lowered.get(name)
            value = None if text is None else _count(text) if what != "reset" else (
                parse_duration(text) if parse_duration(text) is not None else _count(text))
            if text is not None and value is None:
                warn_once((upstream, name), "upstream %s sent %s: %r, which is not a number "
                          "or duration; ignored", upstream, name, text[:80])
            values[f"{what}_{unit}"] = value
    return Reported(**values)


def _count(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if value >= 0 and value == value and value != float("inf") else None


def warn_once(about: tuple[str, str], message: str, *args: object) -> None:
    """Log a warning about what an upstream's headers said, once per process for ``about``
    (answers repeat it on every call)."""
    with _warned_lock:
        if about in _warned:
            return
        _warned.add(about)
    log.warning(message, *args)
