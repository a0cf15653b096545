"""A detached batch's statuses: the ``status`` of its hash (``Keys.batch``)."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ENDED", "BatchStatus"]


class BatchStatus(StrEnum):
    """Where a detached batch is."""

    UPLOADING = "uploading"
    IN_PROGRESS = "in_progress"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


ENDED = frozenset({BatchStatus.COMPLETED, BatchStatus.CANCELLED})
