"""OpenTelemetry traces, opt-in: nothing is imported unless they are on.

On in a process where the OpenTelemetry SDK is installed and either the
standard ``OTEL_*`` variables name an exporter (``OTEL_TRACES_EXPORTER``, or an
OTLP endpoint; the provider is then built here from them) or the application set
an SDK tracer provider itself. A submit makes a PRODUCER span whose W3C
``traceparent`` travels in the task message's headers; the worker continues the
trace: a CONSUMER span for the job (with its time in queue), each wait for a limit,
and a CLIENT span per upstream call with the GenAI semantic conventions' attributes.
Prompts and outputs are never recorded.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

__all__ = ["call_span", "carried", "finish_call", "job_span", "parked", "queued",
           "submit_headers", "wait_span", "warm"]

log = logging.getLogger(__name__)
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
# the GenAI conventions' operation for each kind of job
OPERATIONS = {"chat": "chat", "completion": "text_completion", "embedding": "embeddings",
              "response": "chat"}
_lock = threading.Lock()
_state: dict[str, Any] = {}


@functools.cache
def _env_wants() -> bool | None:
    """Whether the ``OTEL_*`` variables ask for traces (None: they turn the SDK off); read
    once, as the SDK reads them once (a job asks several times, and ``os.environ`` is slow)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "")
    return exporter not in ("", "none") or (exporter == "" and any(
        os.environ.get(name) for name in _ENDPOINTS))


def _tracer() -> Any:
    """The tracer, or None when traces are off (then nothing of OpenTelemetry is loaded)."""
    if "tracer" in _state:  # settled: every job asks several times
        return _state["tracer"]
    wants = _env_wants()
    if wants is None:
        return None
    if not wants:
        sdk = sys.modules.get("opentelemetry.sdk.trace")
        if sdk is None or not isinstance(sys.modules["opentelemetry.trace"].get_tracer_provider(),
                                         sdk.TracerProvider):
            return None  # nobody asked, and the application set up no SDK (yet): cheaply
    elif not _installed():  # for good: said once, and never looked for again
        with _lock:
            if "tracer" not in _state:
                log.warning("traces are off: the OTEL_* variables ask for them, but the "
                            "OpenTelemetry SDK is not installed (pip install "
                            "'api-tasks[tracing]')")
                _state["tracer"] = None
        return None
    with _lock:
        if "tracer" not in _state:
            tracer, settled = _setup()
            if not settled:  # the application may still set its provider up: ask again
                return None
            _state["tracer"] = tracer
    return _state["tracer"]


@functools.cache
def _installed() -> bool:
    """Whether the OpenTelemetry SDK can be imported (``OTEL_*`` variables set for a whole
    cluster reach processes without it too); looked up once a process."""
    try:
        return importlib.util.find_spec("opentelemetry.sdk") is not None
    except ImportError:  # its parent package is missing: find_spec imports it first
        return False


def _setup() -> tuple[Any, bool]:
    """(the tracer or None, whether that is for good)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        if not _env_wants():
            return None, False
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        exporter = _exporter()
        if exporter is None:  # spans that go nowhere would only cost every job
            log.warning("traces are off: OTEL_TRACES_EXPORTER=%s needs an exporter that is "
                        "not installed (pip install 'api-tasks[tracing]' for otlp)",
                        os.environ.get("OTEL_TRACES_EXPORTER", "otlp"))
            return None, True
        provider = TracerProvider(resource=Resource.create())  # OTEL_SERVICE_NAME and co.
        provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
    return trace.get_tracer("api_tasks"), True


def _exporter() -> Any:
    name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip()
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter,
            )
        except ImportError:
            return None  # opentelemetry-exporter-otlp-proto-http is not installed
        return OTLPSpanExporter()
    return None


_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def carried(traceparent: str | None) -> dict[str, str] | None:
    """The headers a job's message copy keeps of its trace: a W3C ``traceparent``, if the
    delivery came with a well-formed one (it comes from the message, unchecked)."""
    if traceparent and _TRACEPARENT.fullmatch(traceparent):
        return {"traceparent": traceparent}
    return None


def warm() -> None:
    """Load the SDK now if traces are on (a gateway does it off its event loop at start)."""
    _tracer()


def submit_headers(job_id: str, kind: str, model: str | None, queue: str) -> dict[str, str]:
    """A PRODUCER span for a submit; the headers that carry its context with the message."""
    tracer = _tracer()
    if tracer is None:
        return {}
    from opentelemetry import propagate, trace

    with tracer.start_as_current_span(f"api_tasks submit {kind}", kind=trace.SpanKind.PRODUCER,
                                      attributes={"messaging.system": "celery",
                                                  "messaging.message.id": job_id,
                                                  "messaging.destination.name": queue,
                                                  "gen_ai.request.model": model or ""}):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return carrier


@contextlib.contextmanager
def job_span(job_id: str, kind: str, traceparent: str | None) -> Iterator[Any]:
    """The CONSUMER span of one delivery of a job, continuing its submit's trace."""
    tracer = _tracer()
    if tracer is None:
        yield None
        return
    from opentelemetry import context, propagate, trace

    name = f"api_tasks job {kind}"
    attributes = {"messaging.system": "celery", "messaging.message.id": job_id}
    parent = _unsampled(traceparent)
    if parent is not None:  # the SDK would make a span that records nothing: not its cost
        token = context.attach(trace.set_span_in_context(parent))
        try:
            yield None
        finally:
            context.detach(token)
        return
    parent = propagate.extract({"traceparent": traceparent} if traceparent else {})
    with tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.CONSUMER,
                                      record_exception=False, attributes=attributes) as span:
        yield span


def _unsampled(traceparent: str | None) -> Any:
    """The remote parent of a delivery whose submit's trace was not sampled, when the
    worker's sampler records nothing under such a parent; else None (the SDK decides)."""
    if not traceparent or not _TRACEPARENT.fullmatch(traceparent) or \
            int(traceparent[-2:], 16) & 1 or traceparent.startswith("ff") or \
            traceparent[3:35] == "0" * 32 or traceparent[36:52] == "0" * 16:
        return None  # sampled, or not a valid parent
    from opentelemetry import trace

    if "drops" not in _state:  # the provider and its sampler are set for good
        _state["drops"] = drops_unsampled(getattr(trace.get_tracer_provider(), "sampler",
                                                  None))
    if not _state["drops"]:
        return None
    return trace.NonRecordingSpan(trace.SpanContext(
        int(traceparent[3:35], 16), int(traceparent[36:52], 16), is_remote=True,
        trace_flags=trace.TraceFlags(0)))


def drops_unsampled(sampler: Any) -> bool:
    """Whether ``sampler`` is one of the SDK's ``parentbased_*`` samplers (not a subclass
    that decides otherwise) set to record nothing under an unsampled remote parent."""
    if sampler is None:
        return False
    from opentelemetry.sdk.trace.sampling import ParentBased

    return isinstance(sampler, ParentBased) and \
        type(sampler).should_sample is ParentBased.should_sample and \
        "remoteParentNotSampled:AlwaysOffSampler," in \
        sampler.get_description()  # type: ignore[no-untyped-call]


def _recording() -> Any:
    """The current span when traces are on and it records (its trace was sampled), else
    None: a span under an unsampled one is never recorded, so it is not made at all."""
    if _tracer() is None:
        return None
    from opentelemetry import trace

    span = trace.get_current_span()
    return span if span.is_recording() else None


def queued(seconds: float, queue: str) -> None:
    """The job's time in queue, on its delivery's span (an attribute: a span of its own
    would cost a job as much again)."""
    span = _recording()
    if span is None:
        return
    span.set_attributes({"api_tasks.queue_seconds": round(seconds, 6),
                         "messaging.destination.name": queue})


@contextlib.contextmanager
def wait_span(reason: str, seconds: float) -> Iterator[None]:
    """A span around a wait in the worker for a limit, a cool-down or a breaker."""
    if _recording() is None:
        yield
        return
    with _tracer().start_as_current_span(f"api_tasks wait {reason}", attributes={
            "api_tasks.wait.reason": reason, "api_tasks.wait.planned_s": seconds}):
        yield


def parked(reason: str, seconds: float) -> None:
    """A wait outside the worker, as an event on the delivery's span (the next delivery is
    a span of its own)."""
    span = _recording()
    if span is not None:
        span.add_event("api_tasks wait outside the worker", {
            "api_tasks.wait.reason": reason, "api_tasks.wait.planned_s": seconds})


@contextlib.contextmanager
def call_span(kind: str, provider: str, base_url: str, payload: Mapping[str, Any]
              ) -> Iterator[Any]:
    """The CLIENT span of one call to ``base_url`` of upstream ``provider``, with the GenAI
    request attributes."""
    if _recording() is None:
        yield None
        return
    tracer = _tracer()
    from opentelemetry import trace

    operation = OPERATIONS.get(kind, kind)
    model = payload.get("model")
    host, port = _server(base_url)
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation, "gen_ai.provider.name": _provider(host, provider),
        "server.address": host, "server.port": port}
    if isinstance(model, str):
        attributes["gen_ai.request.model"] = model
    for field, name in (("max_tokens", "gen_ai.request.max_tokens"),
                        ("max_completion_tokens", "gen_ai.request.max_tokens"),
                        ("max_output_tokens", "gen_ai.request.max_tokens"),
                        ("temperature", "gen_ai.request.temperature"),
                        ("top_p", "gen_ai.request.top_p")):
        value = payload.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            attributes[name] = value
    with tracer.start_as_current_span(f"{operation} {model or ''}".strip(),
                                      kind=trace.SpanKind.CLIENT, attributes=attributes,
                                      record_exception=False,
                                      set_status_on_exception=False) as span:
        yield span


def _provider(host: str, upstream: str) -> str:
    """The conventions' name of the provider at ``host``, else the upstream's (vLLM...)."""
    if host == "api.openai.com":
        return "openai"
    if host.endswith(".openai.azure.com"):
        return "azure.ai.openai"
    return upstream


@functools.lru_cache(maxsize=256)
def _server(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def finish_call(span: Any, response: Mapping[str, Any] | None, error_code: str | None) -> None:
    """The response attributes of a call's span (id, model, finish reasons, usage), or its
    error's type."""
    if span is None:
        return
    if error_code is not None:
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("error.type", error_code)
        span.set_status(Status(StatusCode.ERROR))
        return
    response = response or {}
    attributes: dict[str, Any] = {}
    for field, name in (("id", "gen_ai.response.id"), ("model", "gen_ai.response.model")):
        if isinstance(response.get(field), str):
            attributes[name] = response[field]
    reasons: list[str] = [c["finish_reason"] for c in response.get("choices") or []
                          if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)]
    if not reasons and response.get("object") == "response":
        reasons = _response_reasons(response)
    if reasons:
        attributes["gen_ai.response.finish_reasons"] = reasons
    usage = response.get("usage") or {}
    for fields, name in ((("prompt_tokens", "input_tokens"), "gen_ai.usage.input_tokens"),
                         (("completion_tokens", "output_tokens"),
                          "gen_ai.usage.output_tokens")):
        count = next((usage[f] for f in fields if isinstance(usage.get(f), int)), None)
        if count is not None:
            attributes[name] = count
    span.set_attributes(attributes)  # one lock and one check, not one per attribute


# what an incomplete Responses API response's reason is as a chat finish_reason
_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}


def _response_reasons(response: Mapping[str, Any]) -> list[str]:
    """A Responses API response's end as the conventions' finish reasons (it has none)."""
    if response.get("status") == "completed":
        return ["stop"]
    details = response.get("incomplete_details")
    reason = details.get("reason") if isinstance(details, dict) else None
    return [_INCOMPLETE.get(reason, reason)] if isinstance(reason, str) else []
