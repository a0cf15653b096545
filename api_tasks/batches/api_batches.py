"""Batches made through OpenAI's Batches API: created from an uploaded file, shown as OpenAI's
batch object, finalized into output files.

Such a batch is a detached batch (``detached``, ``pump``) with the API's fields in its hash:
its ``owner`` (a gateway key), ``input_file_id``, ``endpoint``, ``metadata`` and the times
OpenAI reports. It starts ``validating`` (a worker checks the file: ``validation``), runs as
any detached batch on the ``bulk`` lane, and when every line is recorded goes ``finalizing``
while a worker makes its output and error files (records that read the batch's own lists),
then ends ``completed`` or ``cancelled``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from api_tasks.batches.files import INDEX_TTL
from api_tasks.batches.state import BatchStatus
from api_tasks.connections import text, text_map
from api_tasks.record.calls import Call, Writes, command, lua
from api_tasks.record.keys import Keys
from api_tasks.record.webhooks import NO_WEBHOOKS, Webhooks, event_args

if TYPE_CHECKING:
    from config.settings import Settings

__all__ = ["COMPLETION_WINDOW", "BatchRecords", "batch_event", "batch_object",
           "output_file_ids"]

COMPLETION_WINDOW = "24h"  # the only window OpenAI offers
_WAKE_TTL = 3600  # seconds a token on the batch pump's wake list outlives any wait there
_TIMES = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
          "failed_at", "expired_at", "cancelling_at", "cancelled_at")


def output_file_ids(batch_id: str) -> tuple[str, str]:
    """The ids of a batch's output and error files (fixed, so finalizing twice is harmless)."""
    stem = batch_id.removeprefix("batch_")
    return f"file-{stem}-output", f"file-{stem}-errors"


class BatchRecords:
    """The calls that create, read and list API batches (no I/O: a shell runs them)."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys

    def create(self, owner: str, input_file_id: str, filename: str, endpoint: str,
               metadata: dict[str, str] | None, output_ttl: int, window: int, lifetime: int,
               queued_ttl: int) -> tuple[str, dict[str, str], Writes]:
        """A new batch, ``validating``: its id, its hash, and the writes that hand it to the
        workers. It expires ``lifetime`` seconds after creation."""
        batch_id = f"batch_{uuid.uuid4().hex}"
        now = time.time()
        state = {"status": BatchStatus.VALIDATING.value, "owner": owner,
                 "input_file_id": input_file_id, "input_file": filename, "endpoint": endpoint,
                 "completion_window": COMPLETION_WINDOW, "output_ttl": str(output_ttl),
                 "metadata": json.dumps(metadata) if metadata is not None else "",
                 "created_at": repr(now), "expires_at": repr(now + lifetime),
                 "window": str(window), "queue": "bulk", "total": "0", "sent": "0",
                 "completed": "0", "failed": "0", "cancelled": "0"}
        key, active = self.keys.batch(batch_id), self.keys.batches(self.keys.shard(batch_id))
        flat = [item for pair in state.items() for item in pair]
        return batch_id, state, Writes(
            [command("HSET", key, *flat), command("EXPIRE", key, lifetime + queued_ttl),
             command("SADD", active, batch_id), command("EXPIRE", active, queued_ttl)],
            [lua("owner_index", [self.keys.owned_batches(owner)], [batch_id, INDEX_TTL]),
             self.wake()])  # the pump validates it

    def state(self, batch_id: str) -> Call[dict[str, str]]:
        """A batch's hash (empty if there is none)."""
        return command("HGETALL", self.keys.batch(batch_id), parse=text_map)

    def cancel(self, batch_id: str, webhooks: Webhooks = NO_WEBHOOKS) -> list[Call[Any]]:
        """Stop a batch (``batch_cancel``, queueing ``webhooks`` if it ends at once), then
        wake the pump: the first call's reply is its status after, or ``missing``."""
        return [lua("batch_cancel", [self.keys.batch(batch_id), *webhooks.keys],
                    [repr(time.time()), *webhooks.args], text), self.wake(), *webhooks.after]

    def wake(self) -> Call[Any]:
        """Wake the sweeping batch pump (a batch to validate or to stop): apart from the
        batch's script, as the wake list lives on another slot on a Redis Cluster."""
        return lua("wake", [self.keys.batches_wake()], [_WAKE_TTL])


def batch_event(keys: Keys, settings: Settings, owner: str, event: str,
                batch_id: str) -> Webhooks:
    """What queues webhook ``event`` of a batch (``record.webhooks.event_args``)."""
    return event_args(keys, settings, owner, event, batch_id,
                      f"evt_{batch_id.removeprefix('batch_')}")


def _time(state: dict[str, str], name: str) -> int | None:
    return int(float(state[name])) if state.get(name) else None


def _usage(state: dict[str, str]) -> dict[str, Any] | None:
    counts = {k.removeprefix("usage."): int(v) for k, v in state.items()
              if k.startswith("usage.")}
    if not counts:
        return None
    given = counts.get("prompt_tokens", counts.get("input_tokens", 0))
    made = counts.get("completion_tokens", counts.get("output_tokens", 0))
    return {"input_tokens": given, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": made, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": counts.get("total_tokens", given + made)}


def batch_object(batch_id: str, state: dict[str, str]) -> dict[str, Any]:
    """A batch as OpenAI shows it (every field of OpenAI's, null where it does not apply)."""
    errors = json.loads(state["errors"]) if state.get("errors") else None
    return {
        "id": batch_id, "object": "batch", "endpoint": state.get("endpoint"),
        "model": state.get("model") or None,
        "errors": {"object": "list", "data": errors} if errors is not None else None,
        "input_file_id": state.get("input_file_id"),
        "completion_window": state.get("completion_window", COMPLETION_WINDOW),
        "status": state.get("status"),
        "output_file_id": state.get("output_file_id") or None,
        "error_file_id": state.get("error_file_id") or None,
        **{name: _time(state, name) for name in _TIMES},
        "request_counts": {
            "total": int(state.get("total") or 0),
            "completed": int(state.get("completed") or 0),
            # a line cancelled before it ran is in the error file, as a failed one is
            "failed": int(state.get("failed") or 0) + int(state.get("cancelled") or 0)},
        "usage": _usage(state),
        "metadata": json.loads(state["metadata"]) if state.get("metadata") else None,
    }
