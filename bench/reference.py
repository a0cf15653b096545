"""The bare reference: a plain Celery task doing one ``requests.post``.

Same broker, same pool, same per-thread pooled session, result through
Celery's own Redis result backend. Our figures are reported beside its own.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import requests
from celery import Celery

__all__ = ["app", "post"]

app = Celery("bench_reference", broker=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
             backend=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json",
                task_acks_late=True, worker_prefetch_multiplier=1,
                broker_transport_options={"global_keyprefix": "bench_ref:"},
                result_backend_transport_options={"global_keyprefix": "bench_ref:"})
_local = threading.local()


def _session() -> requests.Session:
    session: requests.Session | None = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    return session


@app.task(name="bench.post")
def post(url: str, payload: dict[str, Any]) -> Any:
    """POST the payload and return the JSON answer."""
    response = _session().post(url, json=payload, timeout=(10, 600))
    response.raise_for_status()
    return response.json()
