"""Webhooks of the Batches API: signed so the openai SDK's ``webhooks.unwrap`` verifies them,
retried past failures and redirects, never sent to an address no setting allows, and never
holding up the batch that caused them."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import openai
import pytest
import redis
from redis.crc import key_slot

from api_tasks.client import Client
from api_tasks.execution.webhooks import retry_delay, sign
from tests.conftest import GATEWAY_HOOKED_KEY, GATEWAY_KEY, WEBHOOK_SECRET
from tests.support.fake_upstream import FakeUpstream, HttpError, Reply
from tests.support.scrape import workers_value
from tests.support.services import GatewayProcess, wait_until
from tests.support.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.integration


def _sdk(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=GATEWAY_HOOKED_KEY,
                         max_retries=0, timeout=60, webhook_secret=WEBHOOK_SECRET)


def _batch(sdk: openai.OpenAI, lines: list[str]) -> Any:
    data = "".join(line + "\n" for line in lines).encode()
    source = sdk.files.create(file=("in.jsonl", data), purpose="batch")
    return sdk.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                              completion_window="24h")


def _line(custom_id: str, model: str) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": model,
                                "messages": [{"role": "user", "content": custom_id}]}})


def _event(sdk: openai.OpenAI, receiver: WebhookReceiver, subject_id: str) -> tuple[str, str]:
    """The one event the receiver heard about ``subject_id`` (its signature checked): its
    type and subject."""
    [received] = receiver.wait_for(subject_id.encode(), 1)
    event = sdk.webhooks.unwrap(received.body, received.headers)
    return event.type, event.data.id


def _delivery(gateway: GatewayProcess, batch_id: str, endpoint: int) -> dict[str, Any]:
    """A delivery of the event about ``batch_id`` to the key's ``endpoint``-th webhook, as
    ``GET /v1/webhooks/deliveries`` shows it to its key ({} before it is queued)."""
    listed = httpx.get(gateway.url + "/v1/webhooks/deliveries", params={"limit": 100},
                       headers={"Authorization": f"Bearer {GATEWAY_HOOKED_KEY}"}, timeout=10)
    assert listed.status_code == 200, listed.text
    wanted = f"evt_{batch_id[6:]}-{endpoint}"
    return next((d for d in listed.json()["data"] if d["id"] == wanted), {})


def test_signing_matches_openais_test_vector() -> None:
    payload = (b'{"id": "evt_685c059ae3a481909bdc86819b066fb6", "object": "event", '
               b'"created_at": 1750861210, "type": "response.completed", '
               b'"data": {"id": "resp_123"}}')
    assert sign(WEBHOOK_SECRET, "wh_685c059ae39c8190af8c71ed1022a24d", 1750861210,
                payload) == "v1,gUAg4R2hWouRZqRQG4uJypNS8YK885G838+EHb4nKBY="


def test_retry_delays_double_up_to_the_cap() -> None:
    assert [retry_delay(n, 5, 60, 0.5) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]
    assert 4.5 <= retry_delay(1, 5, 60, 0.0) < retry_delay(1, 5, 60, 0.999) <= 5.5


def test_a_completed_batch_is_announced_signed_retried_and_never_to_a_forbidden_address(
        gateway: GatewayProcess, client: Client, webhook_receiver: WebhookReceiver,
        webhook_trap: WebhookReceiver, model: str) -> None:
    sdk = _sdk(gateway)
    counted = {outcome: workers_value(client, "api_tasks_webhook_deliveries_total",
                                      outcome=outcome) for outcome in ("delivered", "retrying")}
    webhook_receiver.answer(500, 302)  # then 200: three attempts, the redirect not followed
    batch = _batch(sdk, [_line(f"w{i}", model) for i in range(3)])
    needle = batch.id.encode()
    first, second, third = webhook_receiver.wait_for(needle, 3)
    ended = sdk.batches.retrieve(batch.id)
    assert ended.status == "completed"
    for attempt in (first, second, third):
        event = sdk.webhooks.unwrap(attempt.body, attempt.headers)  # checks the signature
        assert (event.type, event.data.id) == ("batch.completed", batch.id)
    assert first.headers["webhook-id"] == third.headers["webhook-id"]  # receivers dedupe
    assert {r.path for r in webhook_receiver.received} == {"/hook"}  # no redirect followed
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.unwrap(third.body + b" ", third.headers)
    wait_until(lambda: _delivery(gateway, batch.id, 0).get("status") == "delivered", 10,
               "the delivery to be recorded")
    delivered = _delivery(gateway, batch.id, 0)
    assert (delivered["attempts"], delivered["last_status"], delivered["last_error"]) == (
        3, 200, None)
    assert (delivered["event_type"], delivered["subject_id"]) == ("batch.completed", batch.id)
    assert delivered["url"] == webhook_receiver.url
    assert delivered["created_at"] <= delivered["last_attempt_at"] == delivered["delivered_at"]
    # the workers counted the attempts: that one delivered after two tries (and the down
    # endpoint's tries, below, are retries too)
    grown = {outcome: workers_value(client, "api_tasks_webhook_deliveries_total",
                                    outcome=outcome) - before
             for outcome, before in counted.items()}
    assert grown["delivered"] >= 1 and grown["retrying"] >= 2, grown
    # the second endpoint is down: retried, the batch long done; the third is refused
    wait_until(lambda: _delivery(gateway, batch.id, 1).get("attempts", 0) >= 2, 15,
               "the down endpoint to be tried twice")
    down = _delivery(gateway, batch.id, 1)
    assert down["status"] == "retrying" and "Connection" in down["last_error"]
    assert down["last_status"] is None and down["next_attempt_at"] > down["last_attempt_at"]
    wait_until(lambda: _delivery(gateway, batch.id, 2).get("attempts"), 10,
               "the forbidden endpoint's attempt")
    refused = _delivery(gateway, batch.id, 2)
    assert "127.0.0.2" in refused["last_error"] and "not a public address" in \
        refused["last_error"]
    assert webhook_trap.received == []
    assert WEBHOOK_SECRET not in json.dumps([down, refused, delivered])
    # another key sees none of them
    other = httpx.get(gateway.url + "/v1/webhooks/deliveries", timeout=10,
                      headers={"Authorization": f"Bearer {GATEWAY_KEY}"}).json()
    assert not [d for d in other["data"] if d["subject_id"] == batch.id]


def test_a_failed_batch_is_announced(gateway: GatewayProcess,
                                     webhook_receiver: WebhookReceiver, model: str) -> None:
    sdk = _sdk(gateway)
    batch = _batch(sdk, ["{broken"])
    assert _event(sdk, webhook_receiver, batch.id) == ("batch.failed", batch.id)
    assert sdk.batches.retrieve(batch.id).status == "failed"


def test_a_cancelled_batch_is_announced_as_cancelled(
        gateway: GatewayProcess, webhook_receiver: WebhookReceiver, fake: FakeUpstream,
        model: str) -> None:
    fake.script(model, Reply(content="slow", delay=0.3))
    sdk = _sdk(gateway)
    batch = _batch(sdk, [_line(f"c{i}", model) for i in range(20)])
    wait_until(lambda: sdk.batches.retrieve(batch.id).status == "in_progress", 30, "a start")
    sdk.batches.cancel(batch.id)
    assert _event(sdk, webhook_receiver, batch.id) == ("batch.cancelled", batch.id)
    assert sdk.batches.retrieve(batch.id).status == "cancelled"


def test_jobs_that_ask_are_announced_when_they_end(
        gateway: GatewayProcess, webhook_receiver: WebhookReceiver, fake: FakeUpstream,
        model: str) -> None:
    sdk = _sdk(gateway)
    bad, slow = model + "-bad", model + "-slow"
    fake.script(bad, HttpError(400, error={"message": "no", "code": "bad"}))
    fake.script(slow, Reply(content="slow", delay=3))
    made = {}
    for name, which in (("ok", model), ("bad", bad), ("slow", slow), ("quiet", model)):
        made[name] = sdk.post("/jobs", cast_to=object, body={
            "url": "/v1/chat/completions", "notify": name != "quiet",
            "body": {"model": which, "messages": [{"role": "user", "content": name}]}})["id"]
    fake.wait_for_requests(slow, 1)
    sdk.post(f"/jobs/{made['slow']}/cancel", cast_to=object)  # running: its worker ends it
    events = {name: _event(sdk, webhook_receiver, made[name]) for name in ("ok", "bad", "slow")}
    assert events == {"ok": ("job.succeeded", made["ok"]), "bad": ("job.failed", made["bad"]),
                      "slow": ("job.cancelled", made["slow"])}
    assert webhook_receiver.requests(made["quiet"].encode()) == []
    with pytest.raises(openai.BadRequestError):
        sdk.post("/jobs", cast_to=object, body={"url": "/v1/chat/completions", "notify": "yes",
                                                "body": {"model": model, "messages": []}})


def test_a_queued_job_cancelled_before_any_worker_saw_it_is_announced(
        settings: Any, redis_client: redis.Redis) -> None:
    """On a prefix no worker reads, the job stays queued: its cancel ends it, and queues the
    event in the same script."""
    from api_tasks.client import Client

    own = Client(settings.model_copy(update={"redis": settings.redis.model_copy(
        update={"prefix": f"nw{uuid.uuid4().hex[:6]}"})}))
    job = own.submit_chat([{"role": "user", "content": "x"}], model="m-queued",
                          owner="hooked", notify=True)
    assert job.cancel() is True
    delivery = f"evt_{job.id.replace('-', '')}-0"
    payload = json.loads(redis_client.hget(own.keys.webhook(delivery), "payload") or b"{}")
    assert (payload.get("type"), payload.get("data")) == ("job.cancelled", {"id": job.id})
    assert redis_client.zscore(own.keys.webhooks(own.keys.shard(job.id)), delivery)
    # on its job's slot (with shards: tagged), so that the job's script reaches it on a cluster
    assert own.keys.shards == 1 or \
        key_slot(own.keys.webhook(delivery).encode()) == key_slot(own.keys.job(job.id).encode())
