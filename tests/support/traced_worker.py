"""``celery -A tests.support.traced_worker worker``: the worker's app in a process whose
application set up the OpenTelemetry SDK itself, with the SDK's in-memory exporter; the spans
it holds are written to ``$TRACED_SPANS`` (JSON lines) when the worker shuts down."""

from __future__ import annotations

import json
import os
from typing import Any

from celery.signals import worker_shutdown
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from worker import get_app

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
app = get_app()


@worker_shutdown.connect
def _dump(**_: Any) -> None:
    with open(os.environ["TRACED_SPANS"], "w") as out:
        for span in exporter.get_finished_spans():
            out.write(json.dumps(json.loads(span.to_json())) + "\n")
