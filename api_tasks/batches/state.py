"""A detached batch's statuses: the ``status`` of its hash (``Keys.batch``)."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ENDED", "BatchStatus"]


class BatchStatus(StrEnum):
    """Where a detached batch is (the Batches API's own names)."""

    UPLOADING = "uploading"  # its producer is storing its lines
    VALIDATING = "validating"  # created through the API: a worker checks its input file
    FAILED = "failed"  # its input file was refused; nothing ran
    IN_PROGRESS = "in_progress"
    CANCELLING = "cancelling"
    FINALIZING = "finalizing"  # every line recorded: its output files are being made
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # an API batch past its completion window: what finished is kept


ENDED = frozenset({BatchStatus.COMPLETED, BatchStatus.CANCELLED, BatchStatus.FAILED,
                   BatchStatus.EXPIRED})
