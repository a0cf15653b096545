"""Jobs choose their URL only where the settings allow it: allow-listed hosts, no redirects."""

from __future__ import annotations

import pytest
from celery import Celery

from api_tasks import InvalidJob, JobFailed
from api_tasks.client import Client
from tests.support.fake_upstream import FakeUpstream, HttpError

pytestmark = [pytest.mark.integration, pytest.mark.faults]
USER = [{"role": "user", "content": "Hello"}]


def test_allow_listed_host_is_used(client: Client, fake: FakeUpstream) -> None:
    response = client.submit_chat(USER, model="open-a", base_url=fake.base_url + "/v1")
    assert response.result(timeout=20) is not None
    [request] = fake.requests("open-a")
    assert request.path == "/v1/chat/completions" and "base_url" not in (request.body or {})


@pytest.mark.parametrize(("model", "url", "why"), [
    ("open-b", "http://localhost:1/v1", "not on upstream 'open'"),
    ("open-b", "ftp://127.0.0.1/", "http:// or https://"),
    ("open-b", "http://user:pw@127.0.0.1:1/", "credentials"),
    ("open-b", "http://127.0.0.1:1/", "port 1 is not on upstream 'open'"),
    ("open-b", "http://127.0.0.1\\.internal/v1", "backslash"),
    ("plain-b", "http://127.0.0.1:1/", "does not let jobs choose"),
])
def test_other_urls_are_refused_at_submit(client: Client, model: str, url: str,
                                          why: str) -> None:
    with pytest.raises(InvalidJob) as caught:
        client.submit_chat(USER, model=model, base_url=url)
    assert caught.value.param == "base_url" and why in str(caught.value)


def test_worker_refuses_a_url_a_plain_client_slipped_in(celery_app: Celery, client: Client,
                                                        fake: FakeUpstream) -> None:
    sent = celery_app.send_task("api_tasks.chat", args=[USER],
                                kwargs={"model": "plain-c", "base_url": fake.base_url})
    with pytest.raises(JobFailed) as caught:
        client.job(sent.id).result(timeout=20)
    assert caught.value.error["param"] == "base_url"
    assert fake.requests("plain-c") == []


@pytest.mark.parametrize("url", ["http://127.0.0.1\\.internal/v1",
                                 "http://llm-attacker.example\\.internal/",
                                 "http://2130706433.internal@127.0.0.1/",
                                 "http://0x7f000001/", "http://127.1/"])
def test_worker_refuses_bypass_forms_a_plain_client_slipped_in(celery_app: Celery,
        client: Client, fake: FakeUpstream, model: str, url: str) -> None:
    """Sent straight to the queue, past the submit-time check: the worker checks again."""
    sent = celery_app.send_task("api_tasks.chat", args=[USER],
                                kwargs={"model": "open-" + model, "base_url": url})
    with pytest.raises(JobFailed) as caught:
        client.job(sent.id).result(timeout=20)
    assert caught.value.error["param"] == "base_url"
    assert caught.value.error["code"] == "invalid_job"
    assert fake.requests("open-" + model) == []


def test_a_dns_name_that_resolves_to_loopback_is_refused_at_connect(
        client: Client, fake: FakeUpstream, model: str) -> None:
    """``localhost`` is on the allow-list by name, but its address 127.0.0.1 is not."""
    port = fake.base_url.rsplit(":", 1)[1]
    job = client.submit_chat(USER, model="named-" + model, base_url=f"http://localhost:{port}/v1")
    with pytest.raises(JobFailed) as caught:
        job.result(timeout=20)
    assert caught.value.error["code"] == "base_url_refused"
    assert caught.value.error["param"] == "base_url"
    assert "127.0.0.1" in caught.value.error["message"]
    assert caught.value.error["attempts"] == 1  # not retried: waiting will not change it
    assert fake.requests("named-" + model) == []


def test_redirects_are_not_followed(client: Client, fake: FakeUpstream, model: str) -> None:
    fake.script(model, HttpError(302, body=b"", headers={"Location": "http://example.com/"}))
    with pytest.raises(JobFailed) as caught:
        client.submit_chat(USER, model=model).result(timeout=20)
    assert caught.value.error["code"] == "unexpected_redirect"
    assert len(fake.requests(model)) == 1
