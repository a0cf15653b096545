"""Failures end as OpenAI-style error objects; only the retryable ones are retried."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import pytest
from celery import Celery

from api_tasks import JobFailed
from api_tasks.client import Client
from tests.support.fake_upstream import (
    BigBody,
    BigLine,
    Close,
    Drip,
    FakeUpstream,
    Hang,
    Html,
    HttpError,
    Reply,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]
USER = [{"role": "user", "content": "Hello"}]


def _fail(client: Client, model: str, **params: Any) -> dict[str, Any]:
    job = client.submit_chat(USER, model=model, **params)
    with pytest.raises(JobFailed) as caught:
        job.result(timeout=30)
    error = caught.value.error
    assert {"type", "code", "message", "status", "attempts"} <= set(error)
    return error


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_never_retried(client: Client, fake: FakeUpstream, model: str,
                                         status: int) -> None:
    fake.script(model, HttpError(status, error={"message": f"nope {status}", "type": "x_error",
                                                "code": f"c{status}", "param": "model"}))
    error = _fail(client, model)
    assert error["status"] == status and error["code"] == f"c{status}"
    assert error["message"] == f"nope {status}" and error["param"] == "model"
    assert error["type"] == "x_error" and error["attempts"] == 1
    assert len(fake.requests(model)) == 1


@pytest.mark.parametrize("status", [408, 409, 500, 502, 503, 504])
def test_retryable_statuses_then_success(client: Client, fake: FakeUpstream, model: str,
                                         status: int) -> None:
    fake.script(model, HttpError(status), HttpError(status), Reply(content="finally"))
    job = client.submit_chat(USER, model=model)
    response = job.result(timeout=30)
    assert response is not None
    assert response["choices"][0]["message"]["content"] == "finally"
    assert len(fake.requests(model)) == 3
    assert job.info()["attempts"] == "3"


def test_retries_are_capped(client: Client, fake: FakeUpstream, model: str) -> None:
    fake.script(model, HttpError(503))
    error = _fail(client, model)
    assert error["status"] == 503 and error["attempts"] == 3 and error["upstream"] == "fake"
    assert len(fake.requests(model)) == 3


@pytest.mark.parametrize("header", ["seconds", "ms", "date"])
def test_429_honours_retry_after(client: Client, fake: FakeUpstream, model: str,
                                 header: str) -> None:
    headers = {"seconds": {"Retry-After": "1"}, "ms": {"retry-after-ms": "1000"},
               "date": {"Retry-After": email.utils.formatdate(time.time() + 2, usegmt=True)}}
    fake.script(model, HttpError(429, headers=headers[header]), Reply(content="ok"))
    assert client.submit_chat(USER, model=model).result(timeout=30) is not None
    first, second = fake.requests(model)
    assert second.at - first.at >= 0.9  # the backoff alone would be 0.05 s


def test_html_error_page_is_a_clear_error(client: Client, fake: FakeUpstream, model: str) -> None:
    fake.script(model, Html(502, "502 Bad Gateway"))
    error = _fail(client, model)
    assert error["status"] == 502 and error["code"] == "http_502"
    assert "HTML page" in error["message"] and "502 Bad Gateway" in error["message"]


def test_html_page_with_200_is_invalid_json(client: Client, fake: FakeUpstream, model: str) -> None:
    fake.script(model, Html(200, "Welcome to nginx!"))
    error = _fail(client, model)
    assert error["code"] == "invalid_json" and error["type"] == "invalid_response_error"
    assert "Welcome to nginx!" in error["message"] and "JSONDecodeError" not in error["message"]
    assert len(fake.requests(model)) == 1


def test_connection_refused(client: Client) -> None:
    error = _fail(client, "closed-model")
    assert error["code"] == "connection_refused" and error["type"] == "api_connection_error"
    assert error["attempts"] == 2 and error["upstream"] == "closed"


def test_connection_closed_without_response_is_retried(client: Client, fake: FakeUpstream,
                                                       model: str) -> None:
    fake.script(model, Close(), Reply(content="second time"))
    response = client.submit_chat(USER, model=model).result(timeout=30)
    assert response is not None and len(fake.requests(model)) == 2


def test_silent_peer_fails_at_read_timeout(client: Client, fake: FakeUpstream) -> None:
    model = "tight-hang"
    fake.script(model, Hang(max_seconds=20))
    started = time.monotonic()
    error = _fail(client, model)
    assert error["code"] == "read_timeout" and error["type"] == "timeout_error"
    assert time.monotonic() - started < 8


def test_dripping_peer_fails_at_total_deadline(client: Client, fake: FakeUpstream) -> None:
    model = "tight-drip"
    fake.script(model, Drip(interval=0.3, total=30))
    started = time.monotonic()
    error = _fail(client, model, stream=True)
    assert error["code"] == "deadline_exceeded"
    assert 2.4 <= time.monotonic() - started < 8
    fake.wait_for_disconnect(model, timeout=5)


def test_oversized_body_is_cut_at_the_cap(client: Client, fake: FakeUpstream) -> None:
    fake.script("tight-big", BigBody(3 * 1024 * 1024))
    error = _fail(client, "tight-big")
    assert error["code"] == "response_too_large"


def test_oversized_sse_line_is_cut_at_the_cap(client: Client, fake: FakeUpstream) -> None:
    fake.script("tight-line", BigLine(1024 * 1024))
    error = _fail(client, "tight-line", stream=True)
    assert error["code"] == "line_too_long"


def test_job_sent_by_a_plain_celery_client_with_bad_fields(
        celery_app: Celery, client: Client, fake: FakeUpstream, model: str) -> None:
    bad = celery_app.send_task("api_tasks.chat", args=[[{"role": "user", "content": 3}]],
                               kwargs={"model": model}, queue="interactive")
    with pytest.raises(JobFailed) as caught:
        client.job(bad.id).result(timeout=20)
    error = caught.value.error
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_job"
    assert error["param"] == "messages[0].content" and error["status"] == 400
    assert fake.requests(model) == []


def test_job_sent_by_a_plain_celery_client_runs(celery_app: Celery, client: Client,
                                                model: str) -> None:
    sent = celery_app.send_task("api_tasks.completion", args=["hi"], kwargs={"model": model})
    response = client.job(sent.id).result(timeout=20)
    assert response is not None and response["choices"][0]["text"] == "echo: hi"


def test_gzip_compressed_answer_is_decoded(client: Client, fake: FakeUpstream, model: str) -> None:
    fake.script(model, Reply(content="squeezed", gzip=True))
    response = client.submit_chat(USER, model=model).result(timeout=20)
    assert response is not None
    assert response["choices"][0]["message"]["content"] == "squeezed"


def test_a_missed_deadline_is_retried(client: Client, fake: FakeUpstream) -> None:
    model = "tight-deadline-then-ok"
    fake.script(model, Drip(interval=0.3, total=30), Reply(content="on time"))
    job = client.submit_chat(USER, model=model, upstream="tight-retry")
    response = job.result(timeout=30)
    assert response is not None
    assert response["choices"][0]["message"]["content"] == "on time"
    assert len(fake.requests(model)) == 2


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"model": "m-\ud800"}, "model"),
    ({"model": "m-x", "user": "lone \udfff"}, "user"),
])
def test_a_plain_celery_client_job_with_lone_surrogates_fails_naming_the_field(celery_app: Celery,
        client: Client, fake: FakeUpstream, kwargs: dict[str, str], field: str) -> None:
    sent = celery_app.send_task("api_tasks.chat", args=[[{"role": "user", "content": "x"}]],
                                kwargs=kwargs)
    with pytest.raises(JobFailed) as caught:
        client.job(sent.id).result(timeout=20)
    assert caught.value.error["code"] == "invalid_job"
    assert caught.value.error["param"] == field
    assert fake.requests("m-x") == []
