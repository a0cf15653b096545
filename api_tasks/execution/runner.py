"""Run one job: claim it, call the upstream with retries, publish, finish once.

Plain code, testable without Celery: the task only decodes its arguments and
calls ``JobRunner.run``. Every way a job can end goes through ``_finish``,
which writes the status, the result envelope and the final event together.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import redis
import requests

from api_tasks import metrics, tracing
from api_tasks.connections import UNAVAILABLE, reason
from api_tasks.errors import (
    APIStatusError,
    CallCancelled,
    InvalidJob,
    InvalidResponseError,
    StreamError,
    UpstreamError,
    WorkerStopping,
    error_object,
)
from api_tasks.execution.delivery import Delivery, Outcome
from api_tasks.execution.gate import Gate, Park
from api_tasks.execution.limits import Cooldowns, Limiter
from api_tasks.execution.router import Pick, Router
from api_tasks.execution.tally import Tally
from api_tasks.execution.tokens import estimate_cost, reply_ceiling
from api_tasks.execution.watchdog import Watchdog
from api_tasks.job_logs import job_context, note_job
from api_tasks.record.acks import EARLY_ACKS
from api_tasks.record.calls import packed
from api_tasks.record.cluster import limit_scopes
from api_tasks.record.events import EVENT_FIELD, entry_id, final_event, reset_event
from api_tasks.record.job_record import (
    Field,
    JobStatus,
    envelope,
    finish_fields,
    submit_fields,
)
from api_tasks.record.leases import Claim, LeaseStore, Verdict
from api_tasks.record.store import JobStore
from api_tasks.record.webhooks import NO_WEBHOOKS, event_args, job_event_id
from api_tasks.record.writer import EventWriter
from api_tasks.spec import JobSpec, Kind, build_spec, kind_of
from api_tasks.stream.relay import StreamRelay
from api_tasks.upstream.call_handle import CallHandle, Stop
from api_tasks.upstream.http_client import CallRequest, HttpClient
from api_tasks.upstream.rate_headers import reported
from api_tasks.upstream.retry import (
    Health,
    RetryPolicy,
    backoff_delay,
    health,
    key_refused,
    retry_delay,
)
from api_tasks.upstream.routing import build_call, build_payload, resolve_upstream

if TYPE_CHECKING:
    from config.settings import Deployment, Limits, Settings, Upstream

__all__ = ["JobRunner"]

log = logging.getLogger(__name__)
_WRITE_TIMEOUT = 300.0  # the writer retries a down Redis for 120 s; never wait forever
_MIN_COOLDOWN = 0.1  # seconds: 429s that cost no attempt must never become a hot loop
_TRIES_KEPT = 32  # calls a job's record lists (a job rate limited for an hour makes many)
_CLAIM_AGAIN = 0.25  # seconds between claims while Redis is out of reach


class JobRunner:
    """Executes jobs in this process; shared by all worker threads."""

    def __init__(self, settings: Settings, store: JobStore, leases: LeaseStore,
                 writer: EventWriter, watchdog: Watchdog, http: HttpClient,
                 worker_id: str, limiter: Limiter) -> None:
        self.settings = settings
        self.store = store
        self.leases = leases
        self.cooldowns = Cooldowns(leases.redis, store.keys)
        self.gate = Gate(limiter, self.cooldowns, leases, settings.worker.reserve_ahead,
                         frozenset(limit_scopes(settings)))
        self.writer = writer
        self.watchdog = watchdog
        self.http = http
        self.worker_id = worker_id
        self.limiter = limiter
        self.router = Router(leases.redis, store.keys, leases.lease_ms)
        self.stopping = threading.Event()  # set when the shutdown grace is over
        self.tally = Tally()
        self.policies = {u.name: RetryPolicy(**u.retry.model_dump()) for u in settings.upstreams}
        # kombu's unacked entries live beside the jobs' state: a finish takes its own out
        self._acks_with_finish = not settings.redis.split

    def run(self, job_id: str, kind: Kind, first: Any, params: dict[str, Any],
            traceparent: str | None = None, delivery_tag: str = "") -> Outcome:
        """Run a job to its end; return its final status (or why this delivery was dropped).
        ``traceparent``: its submit's trace, from the message's headers; ``delivery_tag``:
        kombu's, whose unacked entry the finish takes out when the broker is the state's
        Redis (``record.acks``)."""
        with job_context(job_id), tracing.job_span(job_id, kind, traceparent):
            return self._run(job_id, kind, first, params, traceparent,
                             delivery_tag if self._acks_with_finish else "")

    def _claim(self, job_id: str, token: str, fields: dict[str, str], upstream: str,
               message: str) -> Claim:
        """Claim the job, again while Redis is out of reach for less than a lease (a
        failover): this worker holds its message, whose rejection would fail too, leaving it
        to the reaper (two leases); a claim retried with its token finds its own."""
        deadline = time.monotonic() + self.leases.lease_ms / 1000
        said = False
        while True:
            try:
                return self.leases.claim(job_id, token, fields, time.time(), upstream, message)
            except UNAVAILABLE as err:
                if time.monotonic() >= deadline:
                    raise
                if not said:
                    log.warning("job %s: Redis unavailable at its claim (%s); trying again "
                                "for up to a lease", job_id, reason(err))
                    said = True
                if self.stopping.wait(_CLAIM_AGAIN):  # the grace is over: requeue it
                    raise WorkerStopping(job_id) from err

    def _run(self, job_id: str, kind: Kind, first: Any, params: dict[str, Any],
             traceparent: str | None, delivery_tag: str) -> Outcome:
        try:
            spec = build_spec(kind, first, params, self.settings.jobs.max_request_bytes)
            upstream = resolve_upstream(self.settings, spec)
        except InvalidJob as err:
            return self._reject(job_id, kind, err)
        queue = spec.queue or self.settings.jobs.default_queue
        note_job(queue=queue, upstream=upstream.name, model=spec.model)
        token = f"{self.worker_id}/{uuid.uuid4().hex[:12]}"
        # kept to send the job again after a wait: still in its submit's trace
        message = spec.message_json(queue, tracing.carried(traceparent))
        fields = submit_fields(spec, upstream.name, queue)
        claim = self._claim(job_id, token, fields, upstream.name, message)
        # held by another attempt: this message waits for that lease, never just dropped (the
        # holder may have given its own back but not its lease: a failed give-back)
        if claim.verdict is Verdict.DEFERRED:
            log.info("job %s is held by another attempt: looked at again when its lease "
                     "lapses", job_id)
            return Outcome.DEFERRED
        if not claim.verdict.owned:
            if claim.uncounted:  # cancelled before any worker took it: its end counts here
                self._count_end(kind.value, upstream.name, spec.model, queue,
                                JobStatus.CANCELLED)
            log.info("job %s is %s: delivery dropped", job_id, claim.ended or claim.verdict)
            return Outcome.DROPPED
        note_job(attempt=claim.attempt)
        tracing.queued(time.time() - claim.created_at, queue)
        run = Delivery(job_id, spec, upstream, claim.attempt, claim.created_at, token,
                       cooldown=claim.cooldown, queue=queue, turn=claim.turn,
                       turn_on=claim.turn_on, message=message, delivery_tag=delivery_tag)
        handle = CallHandle(job_id, token)
        try:
            with self.watchdog.watching(handle):  # the lease is renewed from here on
                if run.attempt > 1 and claim.has_events:
                    self._announce_reset(run)
                return self._start(run, handle, claim.verdict)
        except redis.RedisError:
            # the job will be delivered again: let that delivery claim it at once
            with contextlib.suppress(redis.RedisError):
                self.leases.release(job_id, token)
            raise

    def _start(self, run: Delivery, handle: CallHandle, verdict: Verdict) -> Outcome:
        if verdict is Verdict.CANCEL:
            return self._finish(run, JobStatus.CANCELLED, error=CallCancelled(
                "the job was cancelled before it started").to_error())
        if verdict is Verdict.POISON:
            return self._finish(run, JobStatus.FAILED, error=error_object(
                "job_error", "poison_job", f"the job's worker died "
                f"{self.settings.jobs.max_crashes} times while running it (jobs.max_crashes); "
                "it is not run again", None, attempts=0))
        return self._execute(run, handle)

    def _execute(self, run: Delivery, handle: CallHandle) -> Outcome:
        try:
            response = self._call_with_retries(run, handle)
        except Park as park:
            parked = self.gate.park(run, park)
            if parked is not None:
                return parked
            return self._finish(run, JobStatus.CANCELLED, error=CallCancelled(
                "the job was cancelled while it waited").to_error(
                attempts=run.calls, upstream=run.target.name))
        except UpstreamError as err:
            if handle.reason is Stop.SHUTDOWN:
                self.leases.release(run.job_id, run.token)
                raise WorkerStopping(run.job_id) from err
            if handle.reason is Stop.LOST:
                return Outcome.LOST
            status = JobStatus.CANCELLED if isinstance(err, CallCancelled) else JobStatus.FAILED
            return self._finish(run, status, error=err.to_error(
                attempts=run.calls, upstream=run.target.name))
        except Exception as err:  # a bug must end the job, never leave it running
            log.exception("job %s: unexpected error", run.job_id)
            return self._finish(run, JobStatus.FAILED, error=_internal(err, run.calls))
        return self._finish(run, JobStatus.SUCCEEDED, response=response)

    def _call_with_retries(self, run: Delivery, handle: CallHandle) -> dict[str, Any]:
        home = run.target
        # a job's own base_url names one server: it never moves to another model
        chain = [run.spec.model] if run.spec.base_url else \
            self.settings.fallback_chain(run.spec.model)
        route = _Route(chain, {0: self._leg(home, run.spec)})
        keyed = self.settings.gateway.key_limits(run.spec.owner)
        again = False  # the next call sent is a retry
        while True:
            leg, pick = self._next_call(run, handle, route)
            server = pick.deployment
            assert server is not None
            run.calls += 1
            run.upstream, run.deployment, run.model = leg.group, server, leg.model
            note_job(upstream=leg.group.name, deployment=server.name, model=leg.model)
            scopes = [*leg.group.call_scopes(server, leg.model), *keyed]
            verdict, sent, run.first_byte = Health.UNKNOWN, False, None
            try:
                self.gate.cooldown(run, handle, server.name, run.cooldown
                                   if run.calls == 1 and server.name == home.name else None)
                self.gate.admit(run, handle, scopes, leg.cost)
                handle.flights += self.router.calls(leg.group, server)
                handle.start_attempt(leg.group.timeouts.total)
                sent = True
                if again:
                    metrics.RETRIES.labels(leg.group.name).inc()
                    again = False
                flying = metrics.CALLS_IN_FLIGHT.labels(leg.group.name)
                with tracing.call_span(run.spec.kind, leg.group.name,
                                       run.spec.base_url or server.base_url,
                                       leg.payload) as span:
                    flying.inc()
                    try:
                        response = self._limited_attempt(run, handle, leg, server, scopes)
                    except UpstreamError as err:
                        tracing.finish_call(span, None, err.code)
                        raise
                    finally:
                        flying.dec()
                    tracing.finish_call(span, response, None)
                verdict = Health.OK
                _record_try(run, server, leg.model, None)
                metrics.RESPONSES.labels(leg.group.name, server.name, "2xx").inc()
                return response
            except UpstreamError as err:
                if sent:
                    verdict = health(err)
                    _record_try(run, server, leg.model, err)
                    if handle.reason is None:  # a call stopped here is not the upstream's
                        metrics.RESPONSES.labels(leg.group.name, server.name,
                                                 metrics.status_class(err.status)).inc()
                    if err.status == 429:
                        metrics.RATE_LIMITED.labels(leg.group.name, server.name).inc()
                stopped = handle.reason in (Stop.CANCELLED, Stop.SHUTDOWN)
                policy = self.policies[leg.group.name]
                if err.status == 429 and err.retryable:  # the whole deployment backs off
                    asked = err.retry_after if err.retry_after is not None else \
                        backoff_delay(policy, run.rate_limited + 1, random.random())
                    self.cooldowns.start(server.name, max(
                        min(asked or policy.initial_delay, policy.max_retry_after),
                        _MIN_COOLDOWN))
                    if not stopped and not run.published and \
                            time.time() - run.created_at < policy.rate_limited_for:
                        # no attempt spent: the gate holds it through the cool-down, in this
                        # worker if short, else outside it (or it goes to another deployment)
                        run.rate_limited += 1
                        log.info("job %s rate limited by %s (429); waiting, no attempt spent",
                                 run.job_id, server.name)
                        handle.pause()  # the wait is not the call's: its deadline stops
                        continue
                spent = run.calls - run.rate_limited
                if leg.group.deployments is not None and key_refused(err) and not stopped \
                        and spent < policy.max_attempts:
                    # that deployment's own key was refused: another deployment's may not be
                    log.info("job %s: %s refused its key (%s); trying another deployment",
                             run.job_id, server.name, err.code)
                    route.tried.add(server.name)
                    route.final, again = err, True
                    continue
                delay = retry_delay(policy, err, spent, random.random(), run.published)
                if delay is None or stopped:
                    raise
                # another deployment (or fallback model) is called at once; the delay is
                # waited only before the job's own model is called again
                log.info("job %s attempt %d failed (%s: %s) at %s; retrying",
                         run.job_id, run.calls, err.code, err.message, server.name)
                route.tried.add(server.name)
                route.owed, route.error, route.final = delay, err, None
                again = True
                handle.pause()
            finally:
                self.router.done(run.job_id, run.calls, leg.group, server, verdict,
                                 run.first_byte, pick.probe)

    def _leg(self, group: Upstream, spec: JobSpec) -> _Leg:
        """The call to ``group`` for ``spec`` (the job's, or its copy for a fallback model):
        its payload and its token cost."""
        model = spec.model
        payload = build_payload(self.settings, group, spec)
        scopes = [*group.limit_scopes(model), *self.settings.gateway.key_limits(spec.owner)]
        counted = any(limits.counts_tokens for _, limits in scopes) or any(
            d.limits.counts_tokens for d in group.deployments or ())
        cost = estimate_cost(payload, group.tokenizer, model,
                             reply=spec.endpoint.generates) if counted else 0
        ceiling = reply_ceiling(payload, reply=spec.endpoint.generates) if counted else 0
        # deployments whose own limit is below the call go unasked, unless all are (then the
        # gate refuses it: request_too_large)
        small = frozenset(d.name for d in group.deployments or ()
                          if d.limits.tokens_per_minute and cost > d.limits.tokens_per_minute)
        return _Leg(model, group, payload, cost, ceiling,
                    small if len(small) < len(group.deployments or ()) else frozenset())

    def _leg_at(self, run: Delivery, route: _Route, at: int) -> _Leg | None:
        """The leg for the ``at``-th model of the chain (None: nothing serves it here)."""
        if at not in route.legs:
            model = route.chain[at]
            spec = replace(run.spec, body={**run.spec.body, "model": model}, upstream=None)
            try:
                route.legs[at] = self._leg(resolve_upstream(self.settings, spec), spec)
            except InvalidJob:  # e.g. its upstream does not serve this endpoint
                route.legs[at] = None
        return route.legs[at]

    def _next_call(self, run: Delivery, handle: CallHandle, route: _Route
                   ) -> tuple[_Leg, Pick]:
        """Where the next call goes: the deployment with most room of the first model in the
        chain that has one the job has not tried; all tried: its own model again, after the
        backoff (or the error, if the last one was a refused key); every deployment's breaker
        open: wait for the soonest probe."""
        if run.turn_on is not None and run.calls == 0:
            found = self._reserved(run, route)
            if found is not None:
                return found
            run.turn = None  # its deployment is gone: it asks its limits again
        while True:
            waits = []
            for at in range(route.at, len(route.chain)):
                leg = self._leg_at(run, route, at)
                if leg is None:
                    continue
                pick = self.router.pick(run.job_id, leg.group, route.tried | leg.too_small,
                                        leg.cost, leg.model)
                if pick.deployment is not None:
                    route.at = at
                    return leg, pick
                if pick.wait >= 0:
                    waits.append(pick.wait)
            route.at = 0
            if route.final is not None:  # no other deployment: its refusal stands
                raise route.final
            if route.tried:  # each one tried once: over again, after the backoff
                route.tried.clear()
                if route.owed and handle.wait(route.owed):
                    raise handle.error() or route.error or CallCancelled("the job was stopped")
                route.owed = 0.0
            else:
                self.gate.breakers(run, handle, min(waits, default=0.0))

    def _reserved(self, run: Delivery, route: _Route) -> tuple[_Leg, Pick] | None:
        """The deployment of the turn a job reserved before it waited outside its worker."""
        assert run.turn_on is not None
        name, model = run.turn_on
        if model not in route.chain:
            return None
        route.at = route.chain.index(model)
        leg = self._leg_at(run, route, route.at)
        if leg is None:
            return None
        others = {d.name for d in leg.group.targets() if d.name != name}
        pick = self.router.pick(run.job_id, leg.group, others, leg.cost, leg.model)
        return None if pick.deployment is None else (leg, pick)

    def _limited_attempt(self, run: Delivery, handle: CallHandle, leg: _Leg,
                         server: Deployment, scopes: list[tuple[str, Limits]]
                         ) -> dict[str, Any]:
        """One attempt, its reserved tokens settled with what the upstream reports."""
        cost = leg.cost
        call = leg.calls.get(server.name)
        if call is None:
            call = leg.calls[server.name] = build_call(self.settings, leg.group, run.spec,
                                                       leg.payload, server)
        unused, answered, counted = cost, False, None
        try:
            response = self._attempt(run, handle, call, leg, server)
            answered = True
            usage = response.get("usage") or {}
            unused = cost - int(usage.get("total_tokens") or cost)
            prompt = usage.get("prompt_tokens") or usage.get("input_tokens")
            if cost and isinstance(prompt, int):  # what an upstream counting on arrival took
                counted = prompt + leg.ceiling - cost
            return response
        except UpstreamError:
            if run.published:
                unused, answered = 0, True  # it generated tokens we cannot count: kept
            raise
        finally:
            self.limiter.settle(run.job_id, scopes, unused, answered, counted)
            handle.flights = []

    def _attempt(self, run: Delivery, handle: CallHandle, call: CallRequest, leg: _Leg,
                 server: Deployment) -> dict[str, Any]:
        sent = time.monotonic()
        try:
            response = self.http.send(handle, call)
        except APIStatusError as err:
            run.first_byte = time.monotonic() - sent
            self._observe(run, leg, server, err.headers, taken=False)
            raise
        run.first_byte = time.monotonic() - sent
        self._observe(run, leg, server, response.headers, taken=True)
        content_type = response.headers.get("content-type", "")
        if run.spec.stream and content_type.startswith("text/event-stream"):
            return self._stream(run, handle, response, call)
        data = self.http.read_json(handle, response, call)
        answer = run.spec.endpoint.answer
        if not isinstance(data.get(answer), list):
            raise InvalidResponseError(f"upstream response has no {answer!r} list",
                                       code="invalid_response", status=response.status_code)
        return data

    def _observe(self, run: Delivery, leg: _Leg, server: Deployment,
                 headers: Mapping[str, str], taken: bool) -> None:
        """Follow what the deployment says it has left (its x-ratelimit-* headers; ``taken``:
        it took the call, which counts against its limits)."""
        if not leg.group.follow_rate_headers:
            return
        said = reported(headers, server.name)
        if said.said:
            try:
                self.limiter.observe(leg.group.reported_scopes(server, leg.model), said,
                                     leg.model or "", leg.cost if taken else None)
            except redis.RedisError as err:  # advice only: never lose the call's answer
                log.warning("job %s: the upstream's rate-limit headers were not recorded "
                            "(%s)", run.job_id, err)

    def _stream(self, run: Delivery, handle: CallHandle, response: requests.Response,
                call: CallRequest) -> dict[str, Any]:
        jobs = self.settings.jobs
        relay = StreamRelay(run.job_id, run.attempt, run.spec.kind, self.store.keys,
                            self.writer, self._ttl(run.spec), run.target.max_line_bytes,
                            jobs.max_stream_events, jobs.max_stream_bytes, call.secrets)
        try:
            self._relay_body(relay, handle, response, call)
        finally:
            run.published = relay.published
            if relay.first_at is not None:
                metrics.FIRST_CHUNK.labels(run.target.name).observe(
                    relay.first_at - run.created_at)
        if not relay.complete():
            raise StreamError(f"the upstream closed the stream after {relay.published} chunks "
                              "without a finish_reason or [DONE]", code="stream_truncated",
                              status=response.status_code)
        return relay.response()

    def _relay_body(self, relay: StreamRelay, handle: CallHandle,
                    response: requests.Response, call: CallRequest) -> None:
        try:
            with response:
                body = self.http.reads(handle, response, call, call.max_response_bytes)
                for data in body:
                    if relay.feed(data):
                        self.http.drain(response, body)  # keeps the connection for a next call
                        return
                relay.close()
        except UpstreamError as err:
            # before any chunk the call may be retried; after one, a cut connection is
            # a truncated stream, never restarted (past the last finish_reason it lost nothing)
            if relay.published == 0 or not err.retryable or handle.reason is not None:
                raise
            if not relay.complete():
                raise StreamError(f"the stream broke after {relay.published} chunks: "
                                  f"{err.message}", code="stream_truncated",
                                  status=response.status_code) from err

    def _announce_reset(self, run: Delivery) -> None:
        """A new attempt of a job delivered before: readers must drop what they had."""
        events, event = self.store.keys.events(run.job_id), reset_event(run.attempt)
        self.writer.submit([("XADD", events, entry_id(run.attempt, -1), EVENT_FIELD, event),
                            ("EXPIRE", events, self._ttl(run.spec)),
                            ("PUBLISH", self.store.keys.channel(run.job_id), event)])

    def _reject(self, job_id: str, kind: str, err: InvalidJob) -> Outcome:
        log.warning("job %s refused: %s", job_id, err)
        token = f"{self.worker_id}/{uuid.uuid4().hex[:12]}"
        claim = self.leases.claim(job_id, token, {Field.KIND: kind, Field.STORE_RESULT: "1"},
                                  time.time())
        if not claim.verdict.owned:
            if claim.uncounted:
                self._count_end(kind, "", None, "", JobStatus.CANCELLED)
            return Outcome.DROPPED
        # a job refused for a kind it does not name is kept as a chat job
        run = Delivery(job_id, JobSpec(kind_of(kind) or Kind.CHAT, body={}), None, claim.attempt,
                       claim.created_at, token)
        return self._finish(run, JobStatus.FAILED, error={**err.to_error(), "attempts": 0})

    def _count_end(self, kind: str, upstream: str, model: str | None, queue: str,
                   status: JobStatus) -> str:
        """Count a job's end in ``api_tasks_jobs_total``; the model's label."""
        label = metrics.model_label(self.settings, upstream or None, model)
        metrics.JOBS_ENDED.labels(kind, upstream, label, queue, status.value).inc()
        return label

    def fail(self, job_id: str, kind: str, err: BaseException) -> Outcome:
        """Last resort for a bug outside a call: the job ends failed, never hangs."""
        with job_context(job_id):
            return self._fail(job_id, kind, err)

    def _fail(self, job_id: str, kind: str, err: BaseException) -> Outcome:
        if self.leases.held(job_id):
            log.error("job %s: left to the attempt that holds its lease", job_id)
            return Outcome.DROPPED
        run = Delivery(job_id, JobSpec(kind_of(kind) or Kind.CHAT, body={}), None, 0,
                       time.time())
        return self._finish(run, JobStatus.FAILED, error=_internal(err, 0))

    def _finish(self, run: Delivery, status: JobStatus, *, response: dict[str, Any] | None = None,
                error: dict[str, Any] | None = None) -> Outcome:
        finished = time.time()
        served, tries = run.deployment.name if run.deployment else None, run.tries
        meta: dict[str, Any] = {
            "kind": run.spec.kind, "upstream": run.upstream.name if run.upstream else None,
            "deployment": served, "model": run.spec.model, "attempts": run.calls,
            "tries": tries, "created_at": run.created_at, "started_at": run.started_at,
            "finished_at": finished}
        result = envelope(run.job_id, status, meta, response=response, error=error) \
            if run.spec.store_result else None
        event = final_event(status, run.published, run.attempt, error=error,
                            **_summary(run.spec.kind, response))
        fields = finish_fields(status, finished, run.calls, error, served, tries)
        webhooks = event_args(self.store.keys, self.settings, run.spec.owner,
                              f"job.{status.value}", run.job_id,
                              job_event_id(run.job_id)) \
            if run.spec.notify and run.spec.owner else NO_WEBHOOKS
        # kombu's ack in the same script (its unacked entry goes whenever the finish ran)
        [outcome] = self.writer.write([self.leases.finish_command(
            run.job_id, run.token, self._ttl(run.spec), event,
            entry_id(run.attempt, run.published), result, fields, webhooks,
            run.delivery_tag)], timeout=_WRITE_TIMEOUT)
        if run.delivery_tag and outcome in (b"ok", b"ended", b"lost"):
            EARLY_ACKS.removed(run.delivery_tag)
        if outcome != b"lost" and webhooks.after:  # its deliveries' index and the sender's
            # wake-up (other slots on a Redis Cluster; lost, they cost a listing or a delay),
            # also after an "ended": the finish may have run before a lost reply; each on its
            # own, so that one whose node is out of reach holds none of the others back
            for call in webhooks.after:
                self.writer.submit([packed(call)])
        if outcome != b"ok":
            log.warning("job %s: this attempt's outcome was not recorded (%s)", run.job_id,
                        outcome.decode() if isinstance(outcome, bytes) else outcome)
            return Outcome.LOST
        self._count(run, status, finished, response, error)
        log.info("job %s %s (upstream=%s deployment=%s attempts=%d chunks=%d %.3fs)",
                 run.job_id, status.value, meta["upstream"], served, run.calls, run.published,
                 finished - run.started_at)
        return Outcome(status.value)

    def _count(self, run: Delivery, status: JobStatus, finished: float,
               response: dict[str, Any] | None, error: dict[str, Any] | None) -> None:
        """The job's end in this process's metrics and tally (its liveness record)."""
        upstream = run.upstream.name if run.upstream else ""
        self.tally.ended(run.job_id, status, finished, upstream, error)
        model = self._count_end(run.spec.kind.value, upstream, run.spec.model, run.queue,
                                status)
        served = model if run.model in (None, run.spec.model) else \
            metrics.model_label(self.settings, upstream or None, run.model)
        metrics.QUEUE_TIME.labels(run.queue).observe(max(run.started_at - run.created_at, 0))
        metrics.RUN_TIME.labels(run.spec.kind.value, upstream).observe(
            max(finished - run.started_at, 0))
        if run.published:
            metrics.CHUNKS.labels(upstream).inc(run.published)
        usage = (response or {}).get("usage") or {}
        for direction, names in (("in", ("prompt_tokens", "input_tokens")),
                                 ("out", ("completion_tokens", "output_tokens"))):
            count = next((usage[n] for n in names if isinstance(usage.get(n), int)), 0)
            if count:
                metrics.TOKENS.labels(upstream, served, direction).inc(count)

    def _ttl(self, spec: JobSpec) -> int:
        return spec.result_ttl or self.settings.jobs.result_ttl


@dataclass
class _Leg:
    """The job's call for one model of its fallback chain: its model group, body and cost."""

    model: str | None
    group: Upstream
    payload: dict[str, Any]
    cost: int
    ceiling: int  # of its cost, the reply's (the rest: the prompt, as estimated)
    too_small: frozenset[str] = frozenset()  # deployments whose own limit is below its cost
    calls: dict[str, CallRequest] = field(default_factory=dict)  # built, by deployment


@dataclass
class _Route:
    """Where a job's calls go: the model chain, how far along it is, what it tried."""

    chain: list[str | None]
    legs: dict[int, _Leg | None]
    at: int = 0
    tried: set[str] = field(default_factory=set)  # deployments that failed it, this round
    owed: float = 0.0  # the backoff to wait before its own model is called again
    error: UpstreamError | None = None  # the latest failure
    final: UpstreamError | None = None  # a deployment refused its key: final if none is left


def _record_try(run: Delivery, server: Deployment, model: str | None,
                err: UpstreamError | None) -> None:
    """Note one call: the deployment, the model (a fallback's, if it moved), how it failed."""
    run.tries.append({"deployment": server.name, "model": model, "error": None if err is None
                      else {"code": err.code, "status": err.status, "message": err.message}})
    del run.tries[:-_TRIES_KEPT]


def _internal(err: BaseException, attempts: int) -> dict[str, Any]:
    return error_object("internal_error", "internal_error",
                        f"the worker hit an unexpected {type(err).__name__}; see its log",
                        None, attempts=attempts)


def _summary(kind: Kind, response: dict[str, Any] | None) -> dict[str, Any]:
    """The final event's finish reason (a response's status) and usage."""
    if not response:
        return {}
    if kind is Kind.RESPONSE:
        return {"finish_reason": response.get("status"), "usage": response.get("usage")}
    choices = response.get("choices") or [{}]
    first = choices[0] if isinstance(choices[0], dict) else {}
    return {"finish_reason": first.get("finish_reason"), "usage": response.get("usage")}
