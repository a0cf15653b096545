"""Detached batches: the file goes to Redis, the workers run it, anyone reads it back.

``upload_batch`` checks the whole file (every bad line, by number, before
anything is stored), uploads its lines to a Redis list a chunk at a time (the
producer's memory stays bounded) and returns a ``Batch``. From then on the
workers move it forward (``api_tasks.batches.pump``): at most ``window`` of its
jobs are queued or running at once, each line's outcome lands once in the
batch's output or error list, counts and summed usage live in the batch hash.
The producer may exit, and any worker may die: the next one goes on.

``Batch.cancel`` stops new sends at once, cancels the batch's queued jobs and
lets running calls finish; what finished is kept. The Redis side is Lua, so
it holds across any number of processes and machines.

The whole input lives in Redis until the batch ends (as an uploaded file does
with OpenAI's Batch API): size Redis for it, with ``noeviction``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from api_tasks.batches.api_batches import BatchRecords
from api_tasks.batches.lines import check_file, read_batch
from api_tasks.batches.state import ENDED, BatchStatus
from api_tasks.connections import broker_errors, text, text_map
from api_tasks.errors import BatchNotFound, InvalidBatch, JobTimeout
from api_tasks.record.scripts import script
from api_tasks.spec import QUEUES

if TYPE_CHECKING:
    from api_tasks.enqueue import Enqueuer

__all__ = ["MAX_WINDOW", "Batch", "BatchStatus", "upload_batch"]

_UPLOAD_LINES, _UPLOAD_BYTES = 500, 8 * 1024 * 1024  # per RPUSH: far below Redis's limits
_UPLOAD_TTL = 3600  # an upload whose producer died is gone after this long
_READ_CHUNK = 1000
MAX_WINDOW = 1000



_START = script("batch_start")


def upload_batch(client: Enqueuer, source: Path, *, window: int = 200,
                 queue: str = "bulk") -> Batch:
    """Check ``source``, upload it and hand it to the workers (``InvalidBatch`` if bad)."""
    if not 1 <= window <= MAX_WINDOW:
        raise InvalidBatch(str(source), [f"window: must be 1 to {MAX_WINDOW}"])
    if queue not in QUEUES:
        raise InvalidBatch(str(source), [f"queue: must be one of {', '.join(QUEUES)}"])
    problems = check_file(source, client.settings.jobs.max_request_bytes).problems
    if problems:
        raise InvalidBatch(str(source), problems)
    batch = Batch(client, f"batch_{uuid.uuid4().hex}")
    batch.upload(source, window, queue)
    return batch


class Batch:
    """A detached batch, identified by ``id``."""

    def __init__(self, client: Enqueuer, batch_id: str) -> None:
        self.id = batch_id
        self._client = client
        self._keys = client.keys
        self._redis = client.redis
        self._scripts = {"start": self._redis.register_script(_START)}

    def __repr__(self) -> str:
        return f"Batch({self.id!r})"

    def upload(self, source: Path, window: int, queue: str) -> None:
        """Store the lines of an already checked file, then hand the batch to the workers."""
        with broker_errors():
            self._upload(source, window, queue)

    def _upload(self, source: Path, window: int, queue: str) -> None:
        key, lines = self._keys.batch(self.id), self._keys.batch_input(self.id)
        self._redis.hset(key, mapping={
            "status": BatchStatus.UPLOADING.value, "input_file": source.name,
            "window": window, "queue": queue, "created_at": repr(time.time()),
            "total": 0, "sent": 0, "completed": 0, "failed": 0, "cancelled": 0})
        self._redis.expire(key, _UPLOAD_TTL)
        total, chunk, size = 0, [], 0
        for line in read_batch(source, self._client.settings.jobs.max_request_bytes):
            chunk.append(line.stored())
            size += len(chunk[-1])
            if len(chunk) >= _UPLOAD_LINES or size >= _UPLOAD_BYTES:
                total, size = total + self._push(key, lines, chunk), 0
        total += self._push(key, lines, chunk)
        jobs = self._client.settings.jobs
        started = self._scripts["start"](
            keys=[key, lines, self._keys.batches(self._keys.shard(self.id))],
            args=[self.id, total, jobs.queued_ttl, jobs.result_ttl])
        if text(started) == "missing":
            raise BatchNotFound(f"batch {self.id} expired while its file was uploading")
        if text(started) == "in_progress":  # the pump waits for a batch to start: lost,
            # the wake-up delays its first step to the pump's next look
            self._client.store.shell.follow([BatchRecords(self._keys).wake()])

    def _push(self, key: str, lines: str, chunk: list[str]) -> int:
        count = len(chunk)
        if chunk:
            pipe = self._redis.pipeline(transaction=False)
            pipe.rpush(lines, *chunk)
            for name in (key, lines):
                pipe.expire(name, _UPLOAD_TTL)
            pipe.execute()
            chunk.clear()
        return count

    def status(self) -> dict[str, Any]:
        """State, counts (total, sent, completed, failed, cancelled) and summed usage."""
        with broker_errors():
            raw = self._redis.hgetall(self._keys.batch(self.id))
        if not raw:
            raise BatchNotFound(f"no batch {self.id!r} (never submitted, or expired)")
        state = text_map(raw)
        usage = {k.removeprefix("usage."): int(v) for k, v in state.items()
                 if k.startswith("usage.")}
        counts = {k: int(state.get(k, 0)) for k in
                  ("total", "sent", "completed", "failed", "cancelled", "window")}
        times = {k: float(state[k]) if state.get(k) else None
                 for k in ("created_at", "cancelled_at", "finished_at")}
        return {"id": self.id, "status": state.get("status"), **counts, "usage": usage,
                "queue": state.get("queue"), "input_file": state.get("input_file"), **times}

    def cancel(self) -> str:
        """Stop new sends at once; the workers cancel its queued jobs within a step (running
        ones finish). Returns the batch's status after the call."""
        with broker_errors():
            first, *after = BatchRecords(self._keys).cancel(self.id)
            verdict = self._client.store.shell.run_then(first, after)
        if verdict == "missing":
            raise BatchNotFound(f"no batch {self.id!r} (never submitted, or expired)")
        return str(verdict)

    def wait(self, timeout: float | None = None, poll: float = 0.5) -> dict[str, Any]:
        """The status once the batch has ended (``JobTimeout`` if ``timeout`` passes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (state := self.status())["status"] not in ENDED:
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(f"batch {self.id} did not end in time ({state['status']})")
            time.sleep(poll)
        return state

    def records(self, errors: bool = False) -> Iterator[dict[str, Any]]:
        """The output lines so far (or the error-file lines), oldest first."""
        key = (self._keys.batch_errors if errors else self._keys.batch_output)(self.id)
        start = 0
        while True:
            with broker_errors():
                chunk = self._redis.lrange(key, start, start + _READ_CHUNK - 1)
            if not chunk:
                return
            yield from (json.loads(raw) for raw in chunk)
            start += len(chunk)

    def write_results(self, output: TextIO, errors: TextIO) -> tuple[int, int]:
        """Write the output and error lines so far as JSONL; how many of each."""
        counts = []
        for stream, failed in ((output, False), (errors, True)):
            count = 0
            for record in self.records(errors=failed):
                stream.write(json.dumps(record) + "\n")
                count += 1
            counts.append(count)
        return counts[0], counts[1]
