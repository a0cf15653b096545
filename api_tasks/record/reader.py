"""``Job`` and ``AsyncJob``: handles on a submitted job, usable from any process.

``get_job`` checks that a job exists; a handle itself waits for its events
even before a worker has seen it (a job sent by a plain Celery client has no
record until a worker claims it).

Waiting reads the job's event stream with ``XREAD BLOCK``: nothing polls, a
reader that comes late still sees every event from the first, and the final
event (done, error or cancelled) tells it where to stop. What to read and what
an event means is decided once, below (``ChunkFilter``, ``outcome``...); the two
handles only run it, one on a sync client and one on asyncio.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, ParamSpec, Protocol, TypeVar

from api_tasks.connections import BLOCK_SLICE, broker_errors
from api_tasks.errors import (
    ApiTasksError,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobTimeout,
    StreamRestarted,
)
from api_tasks.json_codec import loads
from api_tasks.record.events import FINAL_TYPES, EventType, entry_id
from api_tasks.record.job_record import ATTEMPT_FIELDS, TERMINAL, JobStatus, job_view
from api_tasks.record.store import READ_COUNT, AsyncJobStore, Cancel, JobStore

__all__ = [
    "BATCH_END",
    "IDLE",
    "AsyncJob",
    "ChunkFilter",
    "EventsGone",
    "Job",
    "Reader",
    "outcome",
    "raise_for",
    "text_of",
    "text_pieces",
]

P = ParamSpec("P")
T = TypeVar("T")
_MAX_SEQ = 2**64 - 1


IDLE: dict[str, Any] = {"type": "idle"}  # what ``AsyncJob.events`` yields on a quiet stream
BATCH_END: dict[str, Any] = {"type": "batch_end"}  # after the events one read brought, if asked


class EventsGone(ApiTasksError):
    """The job's record says it ended, but no final event can be read (its stream expired,
    or it was never written): the stored result tells how it ended."""


class Reader(Protocol):
    """What a ``Job`` reads and writes through (a ``Client`` is one)."""

    store: JobStore  # with a client of a longer timeout for its blocking reads


# what the events and the stored result mean, for both handles

def _missing(job_id: str) -> JobNotFound:
    return JobNotFound(f"no job {job_id!r} (never submitted, or expired)")


def follow_on(after: str, heard: list[bytes]) -> tuple[list[dict[str, Any]], bool]:
    """The heard events that follow on from stream entry ``after``, with their entry ids
    (an event's id is ``<attempt>-<seq + 1>`` when it follows on), and whether the stream
    must be read for the rest: a gap or a new attempt stops the run."""
    attempt, _, seq_text = after.partition("-")
    current, seq = int(attempt), int(seq_text)  # the next event of ``after``'s attempt is seq
    fresh = after == "0-0"  # nothing read yet: any attempt's first event comes first
    events: list[dict[str, Any]] = []
    for raw in heard:
        event = loads(raw)
        kind = event.get("type")
        if fresh and kind != EventType.RESET and event.get("seq") == 0:
            current, fresh = event.get("attempt", 0), False
        if kind == EventType.RESET or event.get("attempt") != current:
            return events, True
        if event["seq"] < seq:  # read already
            continue
        if event["seq"] > seq:
            return events, True
        event["id"] = entry_id(current, seq)
        events.append(event)
        if kind in FINAL_TYPES:
            return events, False
        seq += 1
    return events, False


def attempt_start(tail: list[dict[str, Any]]) -> str:
    """The stream id just before the newest attempt's first entry (``tail``: the last one)."""
    attempt = int(tail[0]["id"].split("-")[0]) if tail else 0
    return f"{attempt - 1}-{_MAX_SEQ}" if attempt > 0 else "0-0"


def raise_for(job_id: str, event: dict[str, Any]) -> None:
    """Raise what a final error or cancelled event means."""
    kind = event["type"]
    if kind == EventType.ERROR:
        raise JobFailed(job_id, event.get("error") or {})
    if kind == EventType.CANCELLED:
        raise JobCancelled(job_id, event.get("error") or {"code": "cancelled"})


def outcome(job_id: str, stored: dict[str, Any] | None) -> dict[str, Any] | None:
    """The response in a stored result envelope, or its error as an exception."""
    if stored is None or stored.get("status") == JobStatus.SUCCEEDED:
        return None if stored is None else stored.get("response")
    error = stored.get("error") or {}
    if stored.get("status") == JobStatus.CANCELLED:
        raise JobCancelled(job_id, error)
    raise JobFailed(job_id, error)


class ChunkFilter:
    """Turns a job's events into the upstream's chunks of the attempt being shown."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.shown: int | None = None  # the attempt whose chunks were shown

    def chunk(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """The chunk this event carries (None for another kind); raises at a failed end,
        and ``StreamRestarted`` when a new attempt begins after chunks were shown."""
        kind = event["type"]
        if kind == EventType.CHUNK:
            self.shown = event["attempt"]
            data: dict[str, Any] = event["data"]
            return data
        if kind == EventType.RESET:
            if self.shown is not None and self.shown < event["attempt"]:
                raise StreamRestarted(self.job_id, event["attempt"])
        else:
            raise_for(self.job_id, event)
        return None


def text_pieces(chunk: dict[str, Any]) -> Iterator[str]:
    """The first choice's new text in a chunk (none for usage or role-only chunks); in a
    responses stream, its output text's deltas."""
    if chunk.get("type") == "response.output_text.delta":
        if isinstance(chunk.get("delta"), str):
            yield chunk["delta"]
        return
    for choice in chunk.get("choices") or ():
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            piece = (choice.get("delta") or {}).get("content") or choice.get("text")
            if isinstance(piece, str) and piece:
                yield piece


def text_of(response: dict[str, Any] | None) -> str:
    """The first choice's text of an OpenAI response (chat or completion), a response's
    output text, "" if none."""
    if isinstance((response or {}).get("output"), list):
        return _output_text(response or {})
    choices = (response or {}).get("choices") or [{}]
    first = choices[0] if isinstance(choices[0], dict) else {}
    if isinstance(first.get("message"), dict):
        return str(first["message"].get("content") or "")
    return str(first.get("text") or "")


def _output_text(response: dict[str, Any]) -> str:
    """A response's text: its messages' ``output_text`` parts, joined (as the SDK's
    ``output_text``)."""
    return "".join(part["text"] for item in response["output"] if isinstance(item, dict)
                   and item.get("type") == "message" for part in item.get("content") or ()
                   if isinstance(part, dict) and part.get("type") == "output_text"
                   and isinstance(part.get("text"), str))


def _public(info: dict[str, str]) -> dict[str, Any]:
    return {name: value for name, value in info.items() if name not in ATTEMPT_FIELDS}


class _Clock:
    """A caller's deadline, as the next slice to block for."""

    def __init__(self, timeout: float | None) -> None:
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    def block_ms(self, job_id: str) -> int:
        """Milliseconds to block next; raises ``JobTimeout`` once the deadline passed."""
        left = self.left()
        wait = BLOCK_SLICE if left is None else min(BLOCK_SLICE, left)
        if wait <= 0:
            raise JobTimeout(f"job {job_id} did not finish in time")
        return max(int(wait * 1000), 1)


# the handles: the same steps, sync and async

class Job:
    """A submitted job, identified by ``id``."""

    def __init__(self, client: Reader, job_id: str, *, short: bool = False) -> None:
        self.id = job_id
        self._store = client.store
        # submitted by this handle without streaming: its stream holds a few events at most,
        # so waiting reads it from the start (``_short_result``)
        self.short = short

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> JobStatus:
        """The job's current status."""
        value = _guard(self._store.status, self.id)
        if value is None:
            raise _missing(self.id)
        return JobStatus(value)

    def info(self) -> dict[str, Any]:
        """The job's record: status, kind, upstream, model, timestamps, attempts."""
        return _public(self._record())

    def describe(self) -> dict[str, Any]:
        """The job's state as typed JSON: status, attempt, calls, timestamps, error..."""
        return job_view(self.id, self._record())

    def _record(self) -> dict[str, str]:
        info = _guard(self._store.info, self.id)
        if not info:
            raise _missing(self.id)
        return info

    def result(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Wait for the end; return the OpenAI-format response (None if not stored).

        Raises ``JobFailed`` (``.error`` is the error object), ``JobCancelled``,
        or ``JobTimeout`` when ``timeout`` seconds pass first.
        """
        if self.short:
            return self._short_result(timeout)
        try:
            tail = _guard(self._store.tail, self.id)
            if tail and tail[0]["type"] in FINAL_TYPES:
                raise_for(self.id, tail[0])
            else:  # start from the newest entry: a long stream's chunks need not be read again
                for event in self.events(timeout, after=tail[0]["id"] if tail else "0-0"):
                    if event["type"] in FINAL_TYPES:
                        raise_for(self.id, event)
        except EventsGone:
            pass  # the stored result tells how it ended
        return outcome(self.id, _guard(self._store.result, self.id))

    def _short_result(self, timeout: float | None) -> dict[str, Any] | None:
        """``result`` of a short stream: read from its start, with no look for its newest
        entry first, and the stored result read in the same round trip as each wait."""
        clock = _Clock(timeout)
        after = "0-0"
        while True:
            events, stored = _guard(self._store.read_result, self.id, after,
                                    clock.block_ms(self.id))
            final = next((event for event in events if event["type"] in FINAL_TYPES), None)
            if final is not None:
                raise_for(self.id, final)
                return outcome(self.id, stored)
            if events:
                after = events[-1]["id"]
            elif stored is not None or _guard(self._store.status, self.id) in TERMINAL:
                return outcome(self.id, stored)  # ended, but its final event is gone

    def stream(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield the upstream's chunks in order from the first, then stop at the end.

        Works wherever the job is: queued, running or finished; a finished job
        that ran twice shows its last attempt only. Raises like ``result()`` when
        the job fails, is cancelled or ``timeout`` passes, and ``StreamRestarted``
        if a new attempt begins after this reader showed chunks of an earlier one.
        """
        chunks = ChunkFilter(self.id)
        after = attempt_start(_guard(self._store.tail, self.id))
        try:
            for event in self.events(timeout=timeout, after=after):
                chunk = chunks.chunk(event)
                if chunk is not None:
                    yield chunk
        except EventsGone:
            outcome(self.id, _guard(self._store.result, self.id))

    def text_stream(self, timeout: float | None = None) -> Iterator[str]:
        """Yield the generated text as it arrives: the first choice's content, nothing else.

        Usage chunks (``choices: []``) and role-only deltas are skipped; a job submitted
        without ``stream=True`` yields its whole text once it is done. Raises like ``stream()``.
        """
        clock = _Clock(timeout)
        streamed = False
        for chunk in self.stream(timeout):
            streamed = True
            yield from text_pieces(chunk)
        if not streamed and (text := text_of(self.result(clock.left()))):
            yield text

    def events(self, timeout: float | None = None, after: str = "0-0") -> Iterator[dict[str, Any]]:
        """Yield every event envelope after stream id ``after``, up to the final one."""
        clock = _Clock(timeout)
        while True:
            events = _guard(self._store.read, self.id, after, clock.block_ms(self.id))
            if not events and _guard(self._store.status, self.id) in TERMINAL:
                raise EventsGone  # ended, but its final event is gone (expired or never written)
            for event in events:
                after = event["id"]
                yield event
                if event["type"] in FINAL_TYPES:
                    return

    def cancel(self) -> bool:
        """Ask the job to stop; False if it had already ended."""
        verdict = _guard(self._store.cancel, self.id)
        if verdict is Cancel.MISSING:
            raise _missing(self.id)
        return verdict.stops


class AsyncJob:
    """``Job`` for asyncio callers (the HTTP gateway): the same methods, awaited."""

    def __init__(self, store: AsyncJobStore, job_id: str, *, submitted: bool = False) -> None:
        self.id = job_id
        self._store = store
        # just submitted by this caller: its stream has not expired, nor had time to grow
        self.submitted = submitted

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r})"

    async def _tail(self) -> list[dict[str, Any]]:
        with broker_errors():
            return [] if self.submitted else await self._store.tail(self.id)

    async def attempt_start(self) -> str:
        """The stream id just before the newest attempt's first event (``attempt_start``)."""
        return attempt_start(await self._tail())

    async def status(self) -> JobStatus:
        """The job's current status."""
        with broker_errors():
            value = await self._store.status(self.id)
        if value is None:
            raise _missing(self.id)
        return JobStatus(value)

    async def describe(self) -> dict[str, Any]:
        """The job's state as typed JSON (as ``Job.describe``)."""
        with broker_errors():
            info = await self._store.info(self.id)
        if not info:
            raise _missing(self.id)
        return job_view(self.id, info)

    async def result(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Wait for the end; return the response or raise (as ``Job.result``)."""
        try:
            tail = await self._tail()
            if tail and tail[0]["type"] in FINAL_TYPES:
                raise_for(self.id, tail[0])
            else:
                async for event in self.events(timeout, after=tail[0]["id"] if tail else "0-0"):
                    if event["type"] in FINAL_TYPES:
                        raise_for(self.id, event)
        except EventsGone:
            pass
        with broker_errors():
            stored = await self._store.result(self.id)
        return outcome(self.id, stored)

    async def stream(self, timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Yield the upstream's chunks of the newest attempt in order (as ``Job.stream``)."""
        chunks = ChunkFilter(self.id)
        after = await self.attempt_start()
        try:
            async for event in self.events(timeout=timeout, after=after):
                chunk = chunks.chunk(event)
                if chunk is not None:
                    yield chunk
        except EventsGone:
            with broker_errors():
                outcome(self.id, await self._store.result(self.id))

    async def events(self, timeout: float | None = None, after: str = "0-0",
                     idle: float | None = None,
                     batched: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Yield every event envelope after stream id ``after``, up to the final one; with
        ``idle``, also ``IDLE`` whenever that many seconds pass with no event (keep-alives);
        with ``batched``, ``BATCH_END`` after the events of each read (to write them as one)."""
        clock = _Clock(timeout)
        channel = self._store.keys.channel(self.id)
        read = True  # read the stream next, rather than take what was heard
        while True:  # once more each time the hub's connection breaks
            with broker_errors():
                async with self._store.hub.follow(channel) as heard:
                    while not heard.closed:
                        wait = clock.block_ms(self.id) / 1000  # JobTimeout once past it
                        if read or heard.lost:
                            heard.reset()  # what is heard from here on comes after this read
                            events = await self._store.read(self.id, after)
                            # an empty stream of an ended job: it expired (not one just sent)
                            if not events and not self.submitted and \
                                    await self._store.status(self.id) in TERMINAL:
                                events = await self._store.read(self.id, after)  # just ended?
                                if not events:
                                    raise EventsGone
                            read = len(events) >= READ_COUNT
                        else:
                            events, read = follow_on(after, heard.take())
                        if not events:
                            if read:
                                continue
                            if not await self._store.hub.wait(
                                    heard, wait if idle is None else min(wait, idle)):
                                if idle is not None:
                                    yield IDLE
                                read = True  # now and then the stream itself
                            continue
                        for event in events:
                            after = event["id"]
                            yield event
                            if event["type"] in FINAL_TYPES:
                                return
                        if batched:
                            yield BATCH_END
            read = True  # followed again: the stream has what was missed

    async def cancel(self) -> bool:
        """Ask the job to stop; False if it had already ended."""
        with broker_errors():
            verdict = await self._store.cancel(self.id)
        if verdict is Cancel.MISSING:
            raise _missing(self.id)
        return verdict.stops


def _guard(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call Redis; a connection failure becomes ``BrokerUnavailable`` with the reason."""
    with broker_errors():
        return fn(*args, **kwargs)
