"""The official openai SDK, sync and async, pointed at the gateway works unchanged: chat and
completions, streamed and not, errors as the SDK's own classes, the job id in x-request-id."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from api_tasks.client import Client
from tests.conftest import GATEWAY_KEY as KEY
from tests.conftest import GATEWAY_OTHER_KEY as OTHER_KEY
from tests.conftest import start_gateway
from tests.support.fake_upstream import FakeUpstream, HttpError, Reply, StreamError
from tests.support.records import jobs_of_model
from tests.support.services import GatewayProcess, WorkerProcess, wait_until

pytestmark = pytest.mark.integration
USER = [{"role": "user", "content": "Hello"}]


def _sdk(gateway: GatewayProcess, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_chat_and_completion_not_streamed(gateway: GatewayProcess, fake: FakeUpstream,
                                          client: Client, model: str) -> None:
    fake.script(model, Reply(content="Hi there"), Reply(content="once upon"))
    sdk = _sdk(gateway)
    raw = sdk.chat.completions.with_raw_response.create(model=model, messages=USER)
    chat = raw.parse()
    assert chat.choices[0].message.content == "Hi there"
    job_id = raw.headers["x-request-id"]
    assert client.job(job_id).result(timeout=5)["choices"][0]["message"]["content"] == "Hi there"
    text = sdk.completions.create(model=model, prompt="tell me").choices[0].text
    assert text == "once upon"


def test_chat_streamed_ends_with_done_and_the_usage_chunk(gateway: GatewayProcess,
                                                          fake: FakeUpstream, model: str) -> None:
    pieces = ["Hel", "lo", ", wor", "ld"]
    fake.script(model, Reply(pieces=pieces))
    stream = _sdk(gateway).chat.completions.create(model=model, messages=USER, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "".join(pieces)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


def test_async_sdk_streams_too(gateway: GatewayProcess, fake: FakeUpstream, model: str) -> None:
    fake.script(model, Reply(pieces=["a", "b", "c"]))

    async def main() -> str:
        sdk = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
        stream = await sdk.chat.completions.create(model=model, messages=USER, stream=True)
        out = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await sdk.close()
        return out

    assert asyncio.run(main()) == "abc"


@pytest.mark.parametrize(("status", "cls"), [
    (400, openai.BadRequestError), (401, openai.AuthenticationError),
    (404, openai.NotFoundError), (500, openai.InternalServerError)])
def test_an_upstream_error_is_the_sdks_own_class(gateway: GatewayProcess, fake: FakeUpstream,
                                                model: str, status: int, cls: type) -> None:
    # one attempt at most for 4xx; the 500 is retried by the worker, so script it thrice
    fake.script(model, *[HttpError(status, error={"message": "nope", "code": "bad_thing"})] * 3)
    for stream in (False, True):
        fake.script(model, *[HttpError(status, error={"message": "nope", "code": "bad_thing"})]
                    * 3)
        with pytest.raises(cls) as raised:
            result = _sdk(gateway).chat.completions.create(model=model, messages=USER,
                                                           stream=stream)
            if stream:
                list(result)  # type: ignore[arg-type]
        assert raised.value.status_code == status
        assert raised.value.code == "bad_thing"


def test_bad_requests_are_refused_with_the_field_named(gateway: GatewayProcess,
                                                       model: str) -> None:
    sdk = _sdk(gateway)
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model=model, messages=USER, temperature=9)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.AuthenticationError):
        _sdk(gateway, key="sk-wrong").chat.completions.create(model=model, messages=USER)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        _sdk(gateway, key=OTHER_KEY).chat.completions.create(model=model, messages=USER)
    assert denied.value.param == "model"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    not_json = httpx.post(gateway.url + "/v1/chat/completions", content=b"{not json",
                          headers=headers)
    assert not_json.status_code == 400
    assert not_json.json()["error"]["code"] == "invalid_json"
    too_big = httpx.post(gateway.url + "/v1/chat/completions", headers=headers,
                         content=b'{"model": "m", "messages": "' + b"x" * (5 << 20) + b'"}')
    assert too_big.status_code == 413
    assert set(too_big.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as unknown:
        sdk.chat.completions.create(model=model, messages=USER, extra_body={"upstream": "nope"})
    assert unknown.value.param == "upstream"


def test_an_idempotency_key_maps_a_retry_to_the_same_job(gateway: GatewayProcess,
                                                         fake: FakeUpstream, model: str) -> None:
    fake.script(model, Reply(content="only once"))
    sdk = _sdk(gateway)
    key = f"order-{model}"
    first = sdk.chat.completions.with_raw_response.create(
        model=model, messages=USER, extra_headers={"Idempotency-Key": key})
    again = sdk.chat.completions.with_raw_response.create(
        model=model, messages=USER, extra_headers={"Idempotency-Key": key})
    assert first.headers["x-request-id"] == again.headers["x-request-id"]
    assert again.parse().choices[0].message.content == "only once"
    assert len(fake.requests(model)) == 1  # paid once
    with pytest.raises(openai.ConflictError) as reused:  # same key, another request
        sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                    extra_headers={"Idempotency-Key": key})
    assert reused.value.code == "idempotency_key_reused"
    other = _sdk(gateway, OTHER_KEY)  # keys are per API key: another one is a new request
    with pytest.raises(openai.PermissionDeniedError):
        other.chat.completions.create(model=model, messages=USER,
                                      extra_headers={"Idempotency-Key": key})


def test_numbers_reach_the_upstream_as_written(gateway: GatewayProcess, fake: FakeUpstream,
                                              model: str) -> None:
    """An integer past 64 bits stays that integer (orjson alone would send 1e+20), with an
    Idempotency-Key too (its digest is of the body as written)."""
    fake.script(model, Reply(content="exact"))
    body = (f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], '
            f'"seed": 100000000000000000000, "temperature": 0.25}}').encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
               "Idempotency-Key": f"big-{model}"}
    for _ in range(2):  # the retry maps to the same job
        answered = httpx.post(gateway.url + "/v1/chat/completions", content=body,
                              headers=headers, timeout=30)
        assert answered.status_code == 200, answered.text
    [sent] = fake.requests(model)
    assert sent.body["seed"] == 10**20 and isinstance(sent.body["seed"], int)
    assert sent.body["temperature"] == 0.25


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_goes_away_cancels_its_job(gateway: GatewayProcess, client: Client,
                                                 fake: FakeUpstream, model: str,
                                                 stream: bool) -> None:
    fake.script(model, Reply(delay=3, pieces=["late"]) if stream else Reply(delay=3))
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        sdk.chat.completions.create(model=model, messages=USER, stream=stream)
    fake.wait_for_requests(model, 1)
    # the gateway's jobs live where this producer's do: find the one of this model
    ids = jobs_of_model(client, model)
    assert len(ids) == 1
    wait_until(lambda: client.job(ids[0]).status().value == "cancelled", 10,
               "the abandoned job to be cancelled")


def test_a_retry_with_its_idempotency_key_gets_the_job_its_timeout_left(
        gateway: GatewayProcess, fake: FakeUpstream, model: str) -> None:
    fake.script(model, Reply(delay=1.5, content="worth the wait"))
    key = {"Idempotency-Key": f"retry-{model}"}
    impatient = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0,
                              timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model=model, messages=USER, extra_headers=key)
    again = _sdk(gateway).chat.completions.create(model=model, messages=USER,
                                                  extra_headers=key)
    assert again.choices[0].message.content == "worth the wait"
    assert len(fake.requests(model)) == 1


def test_embeddings_through_the_sdk(gateway: GatewayProcess, fake: FakeUpstream,
                                    client: Client, model: str) -> None:
    sdk = _sdk(gateway)
    raw = sdk.embeddings.with_raw_response.create(model=model, input=["one", "two words"])
    made = raw.parse()  # the SDK asked for base64 and decoded it
    assert [len(d.embedding) for d in made.data] == [8, 8]
    assert made.usage.prompt_tokens == 3
    stored = client.job(raw.headers["x-request-id"]).result(timeout=5)
    # kept as the upstream sent it, in the encoding the SDK asked for
    assert fake.requests(model)[0].body["encoding_format"] == "base64"  # type: ignore[index]
    assert isinstance(stored["data"][0]["embedding"], str)
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.embeddings.create(model=model, input="x", extra_body={"stream": True})
    assert refused.value.body["param"] == "stream"  # type: ignore[index]


def test_responses_through_the_sdk_whole_and_streamed(gateway: GatewayProcess,
                                                      fake: FakeUpstream, model: str) -> None:
    fake.script(model, Reply(content="Hi there"), Reply(pieces=["Hel", "lo"]))
    sdk = _sdk(gateway)
    whole = sdk.responses.create(model=model, input="Say hi")
    assert whole.output_text == "Hi there" and whole.status == "completed"
    with sdk.responses.stream(model=model, input="Say hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == ["Hel", "lo"] and final.output_text == "Hello"


def test_a_responses_stream_failing_after_its_first_event(gateway: GatewayProcess,
                                                          fake: FakeUpstream, model: str) -> None:
    fake.script(model, StreamError(after=1, error={"code": "server_error", "message": "boom"}))
    events = list(_sdk(gateway).responses.create(model=model, input="x", stream=True))
    assert events[0].type == "response.created"
    assert events[-1].type == "error" and events[-1].message == "boom"
    assert events[-1].sequence_number == events[-2].sequence_number + 1


@pytest.fixture(scope="module")
def holding_gateway(worker_env: dict[str, str], workdir: Path,
                    worker: WorkerProcess) -> Iterator[GatewayProcess]:
    """A gateway that holds a streamed call's status for its first chunk 0.5 s only."""
    def hold(config: dict[str, Any]) -> None:
        config.setdefault("gateway", {}).update(stream_hold=0.5, keepalive=0.3)
    process = start_gateway(worker_env, workdir, "holding-gateway", hold)
    yield process
    process.stop()


def test_a_stream_held_past_its_hold_answers_200_and_keeps_the_line_alive(
        holding_gateway: GatewayProcess, fake: FakeUpstream, model: str) -> None:
    """A job queued long (here: an upstream slow to answer) gets its 200 once the hold is
    over, then keep-alive comments, which no proxy's idle timeout cuts; the SDK reads on."""
    fake.script(model, Reply(delay=2.0, pieces=["slow ", "but ", "whole"]))
    body = {"model": model, "messages": USER, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", holding_gateway.url + "/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {KEY}"}) as answer:
        assert answer.status_code == 200
        lines = [line for line in answer.iter_lines() if line]
    first = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert lines[:first] and all(line == ": keep-alive" for line in lines[:first])
    assert lines[-1] == "data: [DONE]"
    fake.script(model, Reply(delay=2.0, pieces=["slow ", "but ", "whole"]))
    sdk = openai.OpenAI(base_url=holding_gateway.url + "/v1", api_key=KEY, max_retries=0,
                        timeout=30)
    chunks = list(sdk.chat.completions.create(model=model, messages=USER, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "slow but whole"


def test_an_error_after_the_hold_is_an_error_event_the_sdk_raises(
        holding_gateway: GatewayProcess, fake: FakeUpstream, model: str) -> None:
    fake.script(model, HttpError(400, error={"message": "too late to be a status",
                                             "code": "bad_thing"}, delay=2.0))
    sdk = openai.OpenAI(base_url=holding_gateway.url + "/v1", api_key=KEY, max_retries=0,
                        timeout=30)
    stream = sdk.chat.completions.create(model=model, messages=USER, stream=True)
    with pytest.raises(openai.APIError) as raised:
        list(stream)
    assert not isinstance(raised.value, openai.APIStatusError)  # an event after the 200
    assert "too late to be a status" in str(raised.value)


def test_a_client_gone_after_the_hold_still_cancels_its_job(
        holding_gateway: GatewayProcess, client: Client, fake: FakeUpstream,
        model: str) -> None:
    fake.script(model, Reply(delay=5.0, pieces=["never read"]))
    body = {"model": model, "messages": USER, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", holding_gateway.url + "/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {KEY}"}) as answer:
        assert answer.status_code == 200
        job_id = answer.headers["x-request-id"]
        assert next(answer.iter_lines()) == ": keep-alive"  # then the client hangs up
    wait_until(lambda: client.job(job_id).status().value == "cancelled", 10,
               "the abandoned job to be cancelled")


def test_completions_streamed_and_the_async_sdk_whole(gateway: GatewayProcess,
                                                      fake: FakeUpstream, model: str) -> None:
    fake.script(model, Reply(pieces=["once ", "upon"]), Reply(content="async chat"),
                Reply(content="async text"), Reply(pieces=["a", "sync"]))
    stream = _sdk(gateway).completions.create(model=model, prompt="tell me", stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == "once upon"

    async def main() -> tuple[str | None, str, str]:
        sdk = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
        chat = await sdk.chat.completions.create(model=model, messages=USER)
        text = await sdk.completions.create(model=model, prompt="tell me")
        streamed = await sdk.completions.create(model=model, prompt="tell me", stream=True)
        pieces = "".join([c.choices[0].text async for c in streamed if c.choices])
        await sdk.close()
        return chat.choices[0].message.content, text.choices[0].text, pieces

    assert asyncio.run(main()) == ("async chat", "async text", "async")


def test_a_stream_is_data_lines_then_done_then_the_end(gateway: GatewayProcess,
                                                       fake: FakeUpstream, model: str) -> None:
    """No ``id:``, ``retry:`` or ``event:`` field (some openai-python versions fail on them)."""
    fake.script(model, Reply(pieces=["x", "y", "z"], chunk_delay=0.05))
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": model, "messages": USER, "stream": True}) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in answer.iter_lines() if line]  # ends: the server closed
    data = [line for line in lines if not line.startswith(":")]  # comments are allowed
    assert data and all(line.startswith("data: ") for line in data), lines
    assert data[-1] == "data: [DONE]" and data.count("data: [DONE]") == 1
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in
                   (json.loads(line[6:]) for line in data[:-1]) if c["choices"]) == "xyz"


def test_a_chat_stream_failing_after_its_first_chunk(gateway: GatewayProcess,
                                                     fake: FakeUpstream, model: str) -> None:
    """The status was sent with the first chunk: the error is a ``data:`` event, then the
    end, with no ``[DONE]``; the SDK raises it as an error that is not a status."""
    error = {"code": "server_error", "message": "the model fell over"}
    fake.script(model, StreamError(after=1, error=error), StreamError(after=1, error=error))
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": model, "messages": USER, "stream": True}) as answer:
        assert answer.status_code == 200
        data = [line for line in answer.iter_lines() if line.startswith("data: ")]
    assert len(data) >= 2 and "data: [DONE]" not in data
    assert all(json.loads(line[6:])["object"] == "chat.completion.chunk" for line in data[:-1])
    failed = json.loads(data[-1][6:])["error"]
    assert failed["message"] == "the model fell over" and failed["code"] == "server_error"
    stream = _sdk(gateway).chat.completions.create(model=model, messages=USER, stream=True)
    with pytest.raises(openai.APIError) as raised:
        list(stream)
    assert not isinstance(raised.value, openai.APIStatusError)
    assert "the model fell over" in str(raised.value)


def test_an_account_out_of_credit_is_the_sdks_rate_limit_error(
        gateway: GatewayProcess, fake: FakeUpstream, model: str) -> None:
    """A 429 that waiting cannot cure fails the job at once: the SDK's RateLimitError."""
    out = HttpError(429, error={"message": "You exceeded your current quota",
                                "type": "insufficient_quota", "code": "insufficient_quota"})
    fake.script(model, out, out)
    for stream in (False, True):
        with pytest.raises(openai.RateLimitError) as raised:
            result = _sdk(gateway).chat.completions.create(model=model, messages=USER,
                                                           stream=stream)
            if stream:
                list(result)  # type: ignore[arg-type]
        assert raised.value.status_code == 429 and raised.value.code == "insufficient_quota"
    assert len(fake.requests(model)) == 2  # one call each: nothing waited out or retried


def test_the_lane_comes_from_a_header_and_a_key_keeps_to_its_own(
        gateway: GatewayProcess, client: Client, fake: FakeUpstream, model: str) -> None:
    allowed = "allowed-" + model  # the other key may use these models, in the bulk lane only
    fake.script(allowed, *[Reply(content="done")] * 4)
    sdk, other = _sdk(gateway), _sdk(gateway, OTHER_KEY)
    lanes = {}
    for header in (None, "bulk"):
        extra = {"x-api-tasks-queue": header} if header else {}
        raw = sdk.chat.completions.with_raw_response.create(model=allowed, messages=USER,
                                                            extra_headers=extra)
        lanes[header] = client.redis.hget(client.keys.job(raw.headers["x-request-id"]),
                                          "queue")
    assert lanes == {None: b"interactive", "bulk": b"bulk"}
    with pytest.raises(openai.PermissionDeniedError) as denied:  # its default lane
        other.chat.completions.create(model=allowed, messages=USER)
    assert denied.value.param == "queue" and denied.value.code == "queue_not_allowed"
    with pytest.raises(openai.BadRequestError) as unknown:
        sdk.chat.completions.create(model=allowed, messages=USER,
                                    extra_headers={"x-api-tasks-queue": "fast"})
    assert unknown.value.param == "queue"
    # an Idempotency-Key is the key's own: the same one from another key is another job
    key = {"Idempotency-Key": f"shared-{model}"}
    mine = sdk.chat.completions.with_raw_response.create(model=allowed, messages=USER,
                                                         extra_headers=key)
    theirs = other.chat.completions.with_raw_response.create(
        model=allowed, messages=USER, extra_headers={**key, "x-api-tasks-queue": "bulk"})
    assert mine.headers["x-request-id"] != theirs.headers["x-request-id"]
    assert len(fake.requests(allowed)) == 4


@pytest.fixture(scope="module")
def named_gateway(worker_env: dict[str, str], workdir: Path,
                  worker: WorkerProcess) -> Iterator[GatewayProcess]:
    """A gateway whose catch-all upstreams name their models: ``gpt-known``, ``known-*``."""
    def name(config: dict[str, Any]) -> None:
        for upstream in config["upstreams"]:
            if "*" in upstream["models"]:
                upstream["models"] = ["gpt-known", "known-*"]
    process = start_gateway(worker_env, workdir, "named-gateway", name)
    yield process
    process.stop()


def test_an_unknown_model_is_404_and_models_lists_the_configured_ones(
        named_gateway: GatewayProcess, client: Client, fake: FakeUpstream) -> None:
    sdk = _sdk(named_gateway)
    unknown = f"unknown-{uuid.uuid4().hex[:8]}"
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as raised:
            sdk.chat.completions.create(model=unknown, messages=USER, stream=stream)
        assert raised.value.code == "model_not_found" and raised.value.param == "model"
    with httpx.Client(base_url=named_gateway.url, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as http:
        refused = http.post("/v1/jobs", json={"url": "/v1/chat/completions",
                                              "body": {"model": unknown, "messages": USER}})
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    assert jobs_of_model(client, unknown) == []  # nothing enqueued
    listed = sdk.models.list()
    ids = [m.id for m in listed.data]
    assert "gpt-known" in ids and not any("*" in i for i in ids)
    assert all(m.object == "model" for m in listed.data)
    fake.script("known-x", Reply(content="known"))
    answer = sdk.chat.completions.create(model="known-x", messages=USER)
    assert answer.choices[0].message.content == "known"
