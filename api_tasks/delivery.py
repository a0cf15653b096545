"""One delivery of one job, as the worker runs it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from api_tasks.spec import JobSpec

if TYPE_CHECKING:
    from config.settings import Upstream

__all__ = ["Delivery"]


@dataclass
class Delivery:
    """One delivery of one job: what its claim said, and how far its call got."""

    job_id: str
    spec: JobSpec
    upstream: Upstream | None  # None only for a job refused before routing
    delivery: int
    created_at: float
    token: str = ""  # this attempt's; "" finishes whatever attempt holds the job
    cooldown: float = 0.0  # the upstream's 429 cool-down left when the job was claimed
    queue: str = "interactive"
    turn: float | None = None  # seconds to a turn reserved under its limits, if any
    started_at: float = field(default_factory=time.time)
    attempts: int = 0
    published: int = 0

    @property
    def target(self) -> Upstream:
        """The upstream of a routed job."""
        assert self.upstream is not None, "only a routed job is called"
        return self.upstream
