"""OpenTelemetry traces across the producer (this process, in-memory exporter) and a worker
(console exporter, configured only by OTEL_* variables): one trace, linked right."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from api_tasks.client import Client
from config.loader import load_settings
from tests.support.fake_upstream import FakeUpstream, HttpError, Reply
from tests.support.services import ROOT, Spawn, WorkerProcess, wait_until

pytestmark = pytest.mark.integration
USER = [{"role": "user", "content": "Hello"}]
sdk = pytest.importorskip("opentelemetry.sdk.trace")


def _spans(log: str) -> list[dict[str, Any]]:
    """The spans a worker's console exporter printed (JSON objects among its log lines)."""
    decoder, spans, at = json.JSONDecoder(), [], 0
    while (at := log.find("{\n", at)) >= 0:
        try:
            found, end = decoder.raw_decode(log, at)
        except ValueError:
            at += 1
            continue
        if isinstance(found, dict) and "context" in found:
            spans.append(found)
        at = end
    return spans


@pytest.fixture(scope="module")
def memory() -> Any:
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # this process's application sets up its SDK
    return exporter


def _traced(worker_env: dict[str, str], spawn: Spawn, name: str,
            **otel: str) -> tuple[WorkerProcess, Client]:
    """A worker printing its spans (console exporter, set by OTEL_* variables only) on a
    prefix of its own, and a producer on that prefix."""
    env = {**worker_env, "API_TASKS_PREFIX": f"tr{uuid.uuid4().hex[:6]}",
           "OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "100", **otel}
    return spawn(env, name), Client(load_settings(env={k: v for k, v in env.items()
                                                       if k != "FAKE_UPSTREAM_KEY"}))


def _submit_span(memory: Any, job_id: str) -> Any:
    """This process's PRODUCER span for the submit of ``job_id``."""
    [submit] = [s for s in memory.get_finished_spans()
                if s.attributes.get("messaging.message.id") == job_id]
    return submit


@contextlib.contextmanager
def _under(trace_id: int, sampled: bool) -> Iterator[None]:
    """Run inside a remote parent span of ``trace_id``, sampled or not (an application's)."""
    from opentelemetry import context, trace

    parent = trace.NonRecordingSpan(trace.SpanContext(
        trace_id=trace_id, span_id=0x1, is_remote=True, trace_flags=trace.TraceFlags(sampled)))
    token = context.attach(trace.set_span_in_context(parent))
    try:
        yield
    finally:
        context.detach(token)


def test_one_trace_from_submit_to_each_upstream_call(memory: Any, worker_env: dict[str, str],
                                                     spawn: Spawn, fake: FakeUpstream,
                                                     model: str) -> None:
    worker, client = _traced(worker_env, spawn, "traced",
                             OTEL_SERVICE_NAME="api-tasks-worker")
    fake.script(model, HttpError(503), Reply(content="traced answer"))
    job = client.submit_chat(USER, model=model, max_tokens=50, temperature=0.3, top_p=0.9)
    assert job.result(timeout=30) is not None
    submit = _submit_span(memory, job.id)
    trace_id = f"0x{submit.context.trace_id:032x}"

    def ours() -> list[dict[str, Any]]:
        return [s for s in _spans(worker.log()) if s["context"]["trace_id"] == trace_id]
    spans = wait_until(lambda: len(ours()) >= 3 and ours(), 20, "the worker's spans")
    by_name: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        by_name.setdefault(span["name"], []).append(span)
    [consumer] = by_name["api_tasks job chat"]
    assert consumer["kind"] == "SpanKind.CONSUMER"
    assert consumer["parent_id"] == f"0x{submit.context.span_id:016x}"  # the submit's child
    assert 0 < consumer["attributes"]["api_tasks.queue_seconds"] < 30  # its time in queue
    assert consumer["attributes"]["messaging.destination.name"] == "interactive"
    calls = by_name[f"chat {model}"]
    assert len(calls) == 2  # the 503, then the answer
    for span in calls:
        assert span["parent_id"] == consumer["context"]["span_id"]
    failed, answered = sorted(calls, key=lambda s: s["start_time"])
    for span in calls:
        attributes = span["attributes"]
        assert span["kind"] == "SpanKind.CLIENT"
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.request.model"] == model
        assert attributes["gen_ai.request.max_tokens"] == 50
        assert attributes["gen_ai.request.temperature"] == 0.3
        assert attributes["gen_ai.request.top_p"] == 0.9
        assert attributes["gen_ai.provider.name"] == "fake"
        assert attributes["server.address"] == "127.0.0.1"
    assert failed["attributes"]["error.type"] == "overloaded"  # the upstream's code for its 503
    done = answered["attributes"]
    assert done["gen_ai.response.model"] == model and done["gen_ai.response.id"]
    assert done["gen_ai.response.finish_reasons"] == ["stop"]
    assert done["gen_ai.usage.input_tokens"] > 0 and done["gen_ai.usage.output_tokens"] > 0
    # prompts and outputs are never recorded
    assert "Hello" not in json.dumps(spans) and "traced answer" not in json.dumps(spans)


def test_a_worker_whose_application_set_up_the_sdk_records_the_trace_in_memory(
        memory: Any, worker_env: dict[str, str], workdir: Path, fake: FakeUpstream,
        model: str) -> None:
    # no OTEL_* variable: the worker's own application made the SDK's provider, with the
    # in-memory exporter, and the project's spans go there
    dump = workdir / f"spans-{uuid.uuid4().hex[:6]}.jsonl"
    env = {**worker_env, "API_TASKS_PREFIX": f"tm{uuid.uuid4().hex[:6]}",
           "TRACED_SPANS": str(dump)}
    worker = WorkerProcess(env, workdir / f"{dump.stem}.log", concurrency=4, name="in-memory",
                           app="tests.support.traced_worker").start()
    try:
        client = Client(load_settings(env={k: v for k, v in env.items()
                                           if k != "FAKE_UPSTREAM_KEY"}))
        fake.script(model, Reply(content="kept in memory"))
        job = client.submit_chat(USER, model=model, max_tokens=20)
        assert job.result(timeout=30) is not None
        worker.signal(signal.SIGTERM)  # a warm shutdown: the application writes its spans
        assert worker.wait(30) == 0
    finally:
        worker.stop()
    submit = _submit_span(memory, job.id)
    spans = [json.loads(line) for line in dump.read_text().splitlines()]
    [consumer] = [s for s in spans if s["name"] == "api_tasks job chat"]
    [call] = [s for s in spans if s["name"] == f"chat {model}"]
    assert consumer["context"]["trace_id"] == f"0x{submit.context.trace_id:032x}"
    assert consumer["parent_id"] == f"0x{submit.context.span_id:016x}"
    assert call["parent_id"] == consumer["context"]["span_id"]
    assert call["kind"] == "SpanKind.CLIENT"
    assert call["attributes"]["gen_ai.request.max_tokens"] == 20
    assert call["attributes"]["gen_ai.usage.output_tokens"] > 0
    assert "Hello" not in dump.read_text() and "kept in memory" not in dump.read_text()


def test_a_wait_for_a_limit_in_the_worker_is_a_span_of_the_job(
        memory: Any, worker_env: dict[str, str], spawn: Spawn, fake: FakeUpstream,
        workdir: Path, model: str) -> None:
    config = workdir / f"traced-limits-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(yaml.safe_dump({
        "worker": {"reserve_ahead": 5},
        "upstreams": [{"name": "paced", "base_url": fake.base_url, "limits": {
            "requests_per_minute": 120, "burst_seconds": 0.01, "utilization": 1.0}}]}))
    worker, client = _traced({**worker_env, "API_TASKS_CONFIG": str(config)}, spawn, "paced")
    fake.script(model, Reply(content="paced"))
    # a call every half second, no burst: the later ones wait their turn in the worker
    jobs = [client.submit_chat(USER, model=model) for _ in range(3)]
    for job in jobs:
        assert job.result(timeout=30) is not None
    ids = {f"0x{_submit_span(memory, job.id).context.trace_id:032x}" for job in jobs}

    def waits() -> list[dict[str, Any]]:
        return [s for s in _spans(worker.log()) if s["context"]["trace_id"] in ids
                and s["name"] == "api_tasks wait requests"]
    def consumers() -> dict[str, dict[str, Any]]:
        return {s["context"]["span_id"]: s for s in _spans(worker.log())
                if s["name"] == "api_tasks job chat" and s["context"]["trace_id"] in ids}
    spans = wait_until(lambda: len(waits()) >= 2 and waits(), 20, "the waits' spans")
    # a job's own span ends (and is exported) after its result is stored: wait for all three
    delivered = wait_until(lambda: len(consumers()) == 3 and consumers(), 20, "the jobs' spans")
    for span in spans:  # each under its job's delivery, with what it planned to wait
        assert span["parent_id"] in delivered
        assert 0 < span["attributes"]["api_tasks.wait.planned_s"] <= 1.5


def test_a_job_whose_submit_was_not_sampled_records_nothing(
        memory: Any, worker_env: dict[str, str], spawn: Spawn, fake: FakeUpstream,
        model: str) -> None:
    worker, client = _traced(worker_env, spawn, "unsampled")
    fake.script(model, HttpError(503), Reply(content="answer"))
    with _under(0x5A4D, sampled=False):  # the application's trace is not sampled: nor the job
        quiet = client.submit_chat(USER, model=model)
    assert quiet.result(timeout=30) is not None
    traced = client.submit_chat(USER, model=model)  # then one that is, as a barrier
    assert traced.result(timeout=30) is not None
    submit = _submit_span(memory, traced.id)
    wanted = f"0x{submit.context.trace_id:032x}"
    wait_until(lambda: any(s["context"]["trace_id"] == wanted for s in _spans(worker.log())),
               20, "the sampled job's spans")
    assert [s for s in _spans(worker.log()) if s["context"]["trace_id"] == f"0x{0x5A4D:032x}"
            or s["attributes"].get("messaging.message.id") == quiet.id] == []


def test_a_worker_whose_sampler_ignores_its_parent_still_records_an_unsampled_submit(
        memory: Any, worker_env: dict[str, str], spawn: Spawn, fake: FakeUpstream,
        model: str) -> None:
    # the worker skips the SDK for a delivery whose submit was not sampled only when its own
    # sampler, asked, would record nothing: always_on records it all the same
    worker, client = _traced(worker_env, spawn, "always", OTEL_TRACES_SAMPLER="always_on")
    fake.script(model, Reply(content="answer"))
    with _under(0x5A4E, sampled=False):
        job = client.submit_chat(USER, model=model)
    assert job.result(timeout=30) is not None

    def ours() -> list[dict[str, Any]]:
        return [s for s in _spans(worker.log()) if s["context"]["trace_id"] == f"0x{0x5A4E:032x}"]
    spans = wait_until(lambda: len(ours()) >= 2 and ours(), 20, "the job's spans")
    assert {s["name"] for s in spans} == {"api_tasks job chat", f"chat {model}"}


def test_a_jobs_own_base_url_is_the_server_its_call_span_names(
        memory: Any, worker_env: dict[str, str], spawn: Spawn, fake: FakeUpstream,
        model: str) -> None:
    worker, client = _traced(worker_env, spawn, "own-url")
    host, port = fake.base_url.removeprefix("http://").split(":")
    open_model = "open-" + model  # upstream "open" names another port; the job, the fake's
    fake.script(open_model, Reply(content="there"))
    job = client.submit_chat(USER, model=open_model, base_url=fake.base_url + "/v1")
    assert job.result(timeout=30) is not None
    trace_id = f"0x{_submit_span(memory, job.id).context.trace_id:032x}"

    def call() -> list[dict[str, Any]]:
        return [s for s in _spans(worker.log()) if s["context"]["trace_id"] == trace_id
                and s["name"] == f"chat {open_model}"]
    [span] = wait_until(call, 20, "the call's span")
    assert (span["attributes"]["server.address"], span["attributes"]["server.port"]) == (
        host, int(port))
    assert span["attributes"]["gen_ai.provider.name"] == "open"


def test_an_unsampled_delivery_keeps_its_trace_without_a_span_of_its_own(memory: Any) -> None:
    from opentelemetry import trace

    from api_tasks import tracing

    parent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-00"
    with tracing.job_span("j", "chat", parent) as span:
        current = trace.get_current_span().get_span_context()
    # no span object: the parent itself is current (the SDK would make a child that records
    # nothing), so spans others start under it stay in the submit's trace, unsampled
    assert span is None and not current.trace_flags.sampled
    assert (current.trace_id, current.span_id) == (int("ab" * 16, 16), int("cd" * 8, 16))
    with tracing.job_span("j", "chat", parent[:-2] + "01") as span:  # sampled: the SDK's span
        assert span is not None and span.get_span_context().span_id != int("cd" * 8, 16)


def test_only_samplers_that_drop_under_an_unsampled_parent_skip_the_sdk() -> None:
    from opentelemetry.sdk.trace import sampling

    from api_tasks import tracing

    class Picky(sampling.ParentBased):  # decides for itself: asked through the SDK
        def should_sample(self, *args: Any, **kwargs: Any) -> sampling.SamplingResult:
            return sampling.SamplingResult(sampling.Decision.RECORD_AND_SAMPLE)

    for sampler, skips in (
            (sampling.ParentBasedTraceIdRatio(0.1), True), (sampling.DEFAULT_ON, True),
            (sampling.DEFAULT_OFF, True), (sampling.ALWAYS_ON, False),
            (sampling.TraceIdRatioBased(0.1), False),
            (sampling.AlwaysRecordSampler(sampling.DEFAULT_ON), False),
            (sampling.ParentBased(sampling.ALWAYS_ON,
                                  remote_parent_not_sampled=sampling.ALWAYS_ON), False),
            (Picky(sampling.ALWAYS_ON), False), (None, False)):
        assert tracing.drops_unsampled(sampler) is skips, sampler


def test_no_span_is_made_under_an_unsampled_one(memory: Any) -> None:
    from opentelemetry import trace

    from api_tasks import tracing

    def spans_made() -> tuple[Any, bool]:
        with tracing.call_span("chat", "fake", "http://x", {"model": "m"}) as call:
            outer = trace.get_current_span()
            with tracing.wait_span("requests", 0.0):
                waited = trace.get_current_span() is not outer  # a wait span of its own
        return call, waited
    for sampled, made in ((False, False), (True, True)):
        with _under(0x77, sampled=sampled), tracing.job_span(
                "j", "chat", None if sampled else "00-" + "0" * 30 + "77-" + "0" * 15 + "1-00"):
            call, waited = spans_made()
        assert (call is not None, waited) == (made, made)
    assert tracing.carried("00-" + "a" * 32 + "-" + "b" * 16 + "-01") is not None
    assert tracing.carried("00-xyz\r\nX-Evil: 1") is None and tracing.carried(None) is None


def test_a_job_sent_again_after_a_wait_stays_in_its_submits_trace(
        memory: Any, worker_env: dict[str, str], spawn: Spawn, fake: FakeUpstream,
        model: str) -> None:
    worker, client = _traced(worker_env, spawn, "resent")
    # a 429 cools the upstream for 2 s, longer than a worker waits: the job parks, and its
    # message is sent again when the cool-down ends
    fake.script(model, HttpError(429, headers={"Retry-After": "2"}), Reply(content="later"))
    job = client.submit_chat(USER, model=model)
    assert job.result(timeout=30) is not None
    assert job.info()["deliveries"] == "2"
    submit = _submit_span(memory, job.id)
    trace_id = f"0x{submit.context.trace_id:032x}"

    def deliveries() -> list[dict[str, Any]]:
        return [s for s in _spans(worker.log()) if s["name"] == "api_tasks job chat"
                and s["attributes"].get("messaging.message.id") == job.id]
    spans = wait_until(lambda: len(deliveries()) == 2 and deliveries(), 20, "both deliveries")
    for span in spans:  # the second as much as the first: the submit's children
        assert span["context"]["trace_id"] == trace_id
        assert span["parent_id"] == f"0x{submit.context.span_id:016x}"
    # the first says why the job left and for how long: the wait itself is in no worker
    [outside] = [e for span in spans for e in span["events"]
                 if e["name"] == "api_tasks wait outside the worker"]
    assert outside["attributes"]["api_tasks.wait.reason"] == "cooldown"
    assert 1.5 <= outside["attributes"]["api_tasks.wait.planned_s"] <= 2.0


def test_without_otel_settings_nothing_of_opentelemetry_is_loaded() -> None:
    code = ("import sys; from api_tasks import tracing; "
            "print(tracing.submit_headers('j', 'chat', 'm', 'bulk'), "
            "any(m.startswith('opentelemetry') for m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert done.stdout.split() == ["{}", "False"], done.stderr


def test_otel_settings_without_the_sdk_installed_change_nothing() -> None:
    # the variables reach a process without the SDK (set for a whole cluster): a finder that
    # refuses every opentelemetry module stands for it not being installed
    code = (
        "import sys\n"
        "class Absent:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'opentelemetry':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Absent())\n"
        "from api_tasks import tracing\n"
        "with tracing.job_span('j', 'chat', '00-' + 'a' * 32 + '-' + 'b' * 16 + '-01') as s:\n"
        "    print(s, tracing.submit_headers('j', 'chat', 'm', 'bulk'))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin",
                                                      "OTEL_TRACES_EXPORTER": "otlp"})
    assert done.returncode == 0 and done.stdout.split() == ["None", "{}"], done.stderr
    assert done.stderr.count("OpenTelemetry SDK is not installed") == 1  # said once


def test_a_call_names_the_provider_and_the_server_it_went_to(memory: Any) -> None:
    from api_tasks import tracing

    for base_url, provider, host in (
            ("https://api.openai.com/v1", "openai", "api.openai.com"),
            ("https://acme.openai.azure.com/openai/v1", "azure.ai.openai",
             "acme.openai.azure.com"),
            ("http://user:pw@llm-a.internal:8000/v1", "local", "llm-a.internal")):
        memory.clear()
        with _under(0x99, sampled=True), tracing.job_span("j", "chat", None), \
                tracing.call_span("chat", "local", base_url, {"model": "m"}):
            pass
        [call] = [s for s in memory.get_finished_spans() if s.name == "chat m"]
        assert call.attributes["gen_ai.provider.name"] == provider
        assert call.attributes["server.address"] == host  # never the URL's credentials


def test_a_responses_call_has_finish_reasons_too(memory: Any) -> None:
    from api_tasks import tracing

    for response, reasons in (
            ({"object": "response", "status": "completed"}, ("stop",)),
            ({"object": "response", "status": "incomplete",
              "incomplete_details": {"reason": "max_output_tokens"}}, ("length",)),
            ({"choices": [{"finish_reason": "tool_calls"}]}, ("tool_calls",))):
        memory.clear()
        with tracing.job_span("j", "response", None), tracing.call_span(
                "response", "local", "http://llm:8000/v1", {"model": "m"}) as span:
            tracing.finish_call(span, response, None)
        [call] = [s for s in memory.get_finished_spans() if s.name == "chat m"]
        assert call.attributes["gen_ai.response.finish_reasons"] == reasons
