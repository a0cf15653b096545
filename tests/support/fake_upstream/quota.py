"""Rate limits the fake upstream enforces on itself, as OpenAI does: 429 past the budget."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from .payloads import Json, prompt_tokens


@dataclass
class Quota:
    """Token buckets for requests and tokens per minute, each holding ``burst`` seconds."""

    rpm: float | None = None
    tpm: float | None = None
    burst: float = 1.0
    report: bool = True  # send OpenAI's x-ratelimit-* headers with every answer
    rejected: int = 0
    # what it accepted, as it counted it: (time.monotonic(), tokens, model)
    taken: list[tuple[float, int, str]] = field(default_factory=list, init=False)
    _requests: float = field(default=0.0, init=False)
    _tokens: float = field(default=0.0, init=False)
    _at: float = field(default_factory=time.monotonic, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self._requests = (self.rpm or 0) / 60 * self.burst
        self._tokens = (self.tpm or 0) / 60 * self.burst

    def take(self, cost: int, model: str = "") -> str | None:
        """Spend one request and ``cost`` tokens; the exhausted limit's name if refused."""
        with self._lock:
            self._refill()
            if self.rpm and self._requests < 1:
                self.rejected += 1
                return "requests"
            if self.tpm and self._tokens < cost:
                self.rejected += 1
                return "tokens"
            self._requests -= 1
            self._tokens -= cost
            self.taken.append((self._at, cost, model))
            return None

    def headers(self) -> list[tuple[str, str]]:
        """OpenAI's x-ratelimit-* headers for this quota as it stands now: each limit, what
        is left, and how long until the bucket is full again."""
        with self._lock:
            self._refill()
            out: list[tuple[str, str]] = []
            for unit, limit, level in (("requests", self.rpm, self._requests),
                                       ("tokens", self.tpm, self._tokens)):
                if limit:
                    full = limit / 60 * self.burst
                    out += [(f"x-ratelimit-limit-{unit}", f"{limit:.0f}"),
                            (f"x-ratelimit-remaining-{unit}", str(max(int(level), 0))),
                            (f"x-ratelimit-reset-{unit}",
                             f"{max(full - level, 0) / (limit / 60):.3f}s")]
            return out

    def _refill(self) -> None:
        now = time.monotonic()
        elapsed, self._at = now - self._at, now
        if self.rpm:
            full = self.rpm / 60 * self.burst
            self._requests = min(self._requests + self.rpm / 60 * elapsed, full)
        if self.tpm:
            full = self.tpm / 60 * self.burst
            self._tokens = min(self._tokens + self.tpm / 60 * elapsed, full)


def request_cost(body: Json) -> int:
    """Tokens a request counts against the budget when it arrives, as OpenAI counts them:
    its prompt (as usage will report it) plus max_tokens for each of its n choices."""
    ceiling = body.get("max_completion_tokens") or body.get("max_tokens") or \
        body.get("max_output_tokens") or 16
    n = body.get("n")
    return prompt_tokens(body) + int(ceiling) * (n if isinstance(n, int) and n > 0 else 1)
