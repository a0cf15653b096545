"""Submitting from the event loop: the producer's submissions (``enqueue.Submissions``), sent
by ``AsyncEnqueuer`` in one round trip, with the gateway's own checks around them."""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

import anyio
import redis
import redis.asyncio
from anyio.to_thread import run_sync

from api_tasks.connections import UNAVAILABLE, reason, text
from api_tasks.enqueue import AsyncEnqueuer, Submission
from api_tasks.errors import BrokerUnavailable, InvalidJob, UnknownModel
from api_tasks.gateway.errors import GatewayError
from api_tasks.json_codec import dumps
from api_tasks.record.calls import AsyncShell
from api_tasks.record.job_record import Field
from api_tasks.record.store import AsyncJobStore
from api_tasks.spec import CONTROL_FIELDS, ENDPOINTS, Kind
from config.settings import QUEUES, GatewayKey, Settings

__all__ = ["Submitted", "Submitter", "unavailable"]

_INLINE_BYTES = 64 * 1024  # a larger job is checked on a thread, off the event loop


def unavailable(err: BaseException) -> GatewayError:
    """Redis is down: 503, try again shortly."""
    return GatewayError(503, f"the queue is unavailable: {reason(err)}", code="queue_unavailable",
                        headers={"Retry-After": "1"})


Submitted = tuple[str, dict[str, str] | None]  # the job id, and its record if this request made it


class Submitter:
    """Checks a request against its key and enqueues it as a job."""

    def __init__(self, settings: Settings, store: AsyncJobStore,
                 broker: AsyncShell | None = None) -> None:
        self.settings = settings
        self.enqueuer = AsyncEnqueuer(settings, store, broker)
        self.keys = store.keys
        self._redis = store.redis

    async def submit(self, key: GatewayKey, kind: Kind, body: dict[str, Any], queue: str | None,
                     *, metadata: dict[str, Any] | None = None,
                     idempotency_key: str | None = None, size: int = 0,
                     notify: bool = False) -> Submitted:
        """Enqueue ``body`` (``size`` bytes of JSON) as a job of ``key``: its id and record
        (a repeated idempotency key: the first request's job, nothing enqueued, no record)."""
        lane = queue or body.get("queue") or self.settings.jobs.default_queue
        if lane not in QUEUES:
            raise GatewayError(400, f"unknown queue {lane!r}: use one of {', '.join(QUEUES)}",
                               param="queue", code="invalid_queue")
        ours = sorted(CONTROL_FIELDS & body.keys())
        if ours:  # the queue comes from the header; the rest is the operator's to decide
            raise GatewayError(400, f"{ours[0]} is not accepted through the gateway",
                               param=ours[0], code="field_not_allowed")
        model = body.get("model")
        if not isinstance(model, str) and key.models != ["*"]:
            raise GatewayError(403, "this API key must name its model", param="model",
                               code="model_not_allowed")
        refused = key.may_use(model if isinstance(model, str) else None, lane)
        if refused is not None:
            what = f"model {model!r}" if refused == "model" else f"queue {lane!r}"
            raise GatewayError(403, f"this API key may not use {what}", param=refused,
                               code=f"{refused}_not_allowed")
        first = ENDPOINTS[kind].first
        params: dict[str, Any] = {k: v for k, v in body.items() if k != first}
        params.update(queue=lane, store_result=True, owner=key.name)
        if notify:  # its end goes to the key's webhooks
            params["notify"] = True
        fields = {}
        if metadata is not None:
            fields[Field.METADATA.value] = json.dumps(metadata, separators=(",", ":"))
        try:
            if size > _INLINE_BYTES:
                submission = await run_sync(self._build, kind, body.get(first), params, fields)
            else:
                submission = self._build(kind, body.get(first), params, fields)
        except InvalidJob as err:
            raise _refused(err) from None
        if idempotency_key is not None:
            request = {"kind": kind, "body": body, "queue": lane, "metadata": metadata}
            earlier = await self._claim_idempotency(key, idempotency_key, request,
                                                    submission.job_id)
            if earlier is not None:
                return earlier, None
        try:
            await self.enqueuer.send(submission)
        except BaseException as err:
            if idempotency_key is not None:  # nothing was enqueued: the key may be used again
                with anyio.CancelScope(shield=True), contextlib.suppress(redis.RedisError):
                    await self._redis.delete(self._idempotency_key(key, idempotency_key))
            if isinstance(err, BrokerUnavailable):
                raise unavailable(err) from None
            raise
        return submission.job_id, submission.record

    def _build(self, kind: Kind, first: Any, params: dict[str, Any],
               fields: dict[str, str]) -> Submission:
        return self.enqueuer.submissions.build(kind, first, params, fields=fields)

    def _idempotency_key(self, key: GatewayKey, idempotency_key: str) -> str:
        return self.keys.idempotency(key.name, hashlib.sha256(idempotency_key.encode()).hexdigest())

    async def _claim_idempotency(self, key: GatewayKey, idempotency_key: str,
                                 request: dict[str, Any], job_id: str) -> str | None:
        """Map the key to ``job_id``; the job an earlier request with it got, if any (409 if
        that request differs). A mapping whose job is gone is taken over."""
        if not idempotency_key or len(idempotency_key) > 255:
            raise GatewayError(400, "Idempotency-Key must be 1 to 255 characters",
                               param="Idempotency-Key", code="invalid_idempotency_key")
        digest = hashlib.sha256(dumps(request, sort_keys=True)).hexdigest()
        name = self._idempotency_key(key, idempotency_key)
        found = None
        try:
            for _ in range(2):  # a second try if the earlier mapping expired between the two
                if await self._redis.set(name, f"{job_id} {digest}", nx=True,
                                          ex=self.settings.gateway.idempotency_ttl):
                    return None
                if (found := await self._redis.get(name)) is not None:
                    break
        except UNAVAILABLE as err:
            raise unavailable(err) from None
        earlier, _, earlier_digest = text(found or "").partition(" ")
        try:
            exists = bool(earlier) and bool(await self._redis.exists(self.keys.job(earlier)))
            if not exists:  # its request failed, or its record expired: this one runs
                await self._redis.set(name, f"{job_id} {digest}",
                                      ex=self.settings.gateway.idempotency_ttl)
                return None
        except UNAVAILABLE as err:
            raise unavailable(err) from None
        if earlier_digest != digest:
            raise GatewayError(409, "this Idempotency-Key was used with a different request",
                               param="Idempotency-Key", code="idempotency_key_reused",
                               headers={"x-should-retry": "false"})
        return earlier


def _refused(err: InvalidJob) -> GatewayError:
    if isinstance(err, UnknownModel):
        return GatewayError(404, err.message, param="model", code="model_not_found")
    return GatewayError(400, err.message, param=err.param, code="invalid_job")
