"""One delivery of one job, as the worker runs it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from api_tasks.spec import JobSpec

if TYPE_CHECKING:
    from config.settings import Deployment, Upstream

__all__ = ["Delivery", "Outcome"]


class Outcome(StrEnum):
    """What one delivery of a job came to."""

    SUCCEEDED = "succeeded"  # it ended the job, so (its final status)
    FAILED = "failed"
    CANCELLED = "cancelled"
    WAITING = "waiting"  # it left the worker to wait for a limit
    DEFERRED = "deferred"  # another attempt held the job: looked at again later
    DROPPED = "dropped"  # the job had ended, or is left to the attempt holding it
    LOST = "lost"  # another attempt took the job over; nothing written


@dataclass
class Delivery:
    """One delivery of one job: what its claim said, and how far its call got."""

    job_id: str
    spec: JobSpec
    upstream: Upstream | None  # None only for a job refused before routing; then the model
    # group of the call (another one's when it fell back to another model)
    attempt: int  # this delivery's number (1, 2...), as stream events count attempts
    created_at: float
    token: str = ""  # this attempt's; "" finishes whatever attempt holds the job
    cooldown: float = 0.0  # the upstream's 429 cool-down left when the job was claimed
    queue: str = "interactive"
    turn: float | None = None  # seconds to a turn reserved under its limits, if any
    turn_on: tuple[str, str | None] | None = None  # the deployment and model of that turn
    message: str = ""  # its task message as JSON, kept while it waits outside a worker
    delivery_tag: str = ""  # kombu's, to take its unacked entry out with the finish ("": not)
    started_at: float = field(default_factory=time.time)
    calls: int = 0  # HTTP calls made so far (the result's ``attempts``)
    rate_limited: int = 0  # of those, answered 429 while that cost no attempt
    published: int = 0
    deployment: Deployment | None = None  # of the latest call
    model: str | None = None  # the latest call's model: the job's, or one it fell back to
    first_byte: float | None = None  # seconds the latest call waited for its answer's headers
    tries: list[dict[str, Any]] = field(default_factory=list)  # each call: where, and how

    @property
    def target(self) -> Upstream:
        """The upstream of a routed job."""
        assert self.upstream is not None, "only a routed job is called"
        return self.upstream
