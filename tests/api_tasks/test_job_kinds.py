"""Embeddings and responses jobs from Python and the CLI, through a real worker: the right
endpoint and upstream, streamed responses replayable like any stream, bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api_tasks.client import Client
from api_tasks.errors import InvalidJob, JobFailed
from api_tasks.spec import ENDPOINTS, KINDS, Kind, build_spec
from api_tasks.upstream.routing import build_payload
from config.settings import EndpointPath, Settings
from tests.api_tasks.test_cli import cli
from tests.support.fake_upstream import FakeUpstream, Reply, StreamError
from tests.support.services import WorkerProcess

pytestmark = pytest.mark.integration


def test_the_settings_know_every_endpoint_a_job_can_call() -> None:
    assert set(EndpointPath.__args__) == set(KINDS) == {e.path for e in ENDPOINTS.values()}


def test_embeddings_job(client: Client, fake: FakeUpstream, model: str) -> None:
    job = client.submit_embeddings(["first text", "second"], model=model, dimensions=4)
    result = job.result(timeout=10)
    assert [d["index"] for d in result["data"]] == [0, 1]
    assert all(len(d["embedding"]) == 4 for d in result["data"])
    assert result["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    [call] = fake.requests(model)
    assert call.path == "/v1/embeddings" and call.body is not None
    # the shipped defaults are chat sampling fields: none reaches the embeddings endpoint
    assert call.body == {"model": model, "input": ["first text", "second"], "dimensions": 4}
    described = job.describe()
    assert (described["kind"], described["upstream"]) == ("embedding", "fake")
    assert client.dry_run(Kind.EMBEDDING, "x", {"model": model}).url.endswith("/v1/embeddings")


@pytest.mark.parametrize(("kind", "first", "params", "param"), [
    (Kind.EMBEDDING, "text", {"stream": True}, "stream"),
    (Kind.EMBEDDING, "", {}, "input"),
    (Kind.EMBEDDING, ["ok", 3], {}, "input"),
    (Kind.RESPONSE, [], {}, "input"),
    (Kind.RESPONSE, ["not an item"], {}, "input[0]"),
    (Kind.RESPONSE, "hi", {"background": True}, "background"),
    (Kind.RESPONSE, "hi", {"max_output_tokens": 0}, "max_output_tokens"),
    (Kind.RESPONSE, "hi", {"upstream": "fake"}, "upstream"),
    (Kind.RESPONSE, "hi", {"input": "twice"}, "input"),
])
def test_bad_jobs_are_refused_naming_the_field(client: Client, kind: Kind, first: object,
                                               params: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidJob) as refused:
        client.submit(kind, first, params)
    assert refused.value.param == param


def test_a_response_goes_only_to_an_upstream_serving_it(client: Client, fake: FakeUpstream,
                                                       model: str) -> None:
    fake.script(model, Reply(content="Hi there"))
    job = client.submit_response("Say hi", model=model, instructions="be brief")
    result = job.result(timeout=10)
    assert result["object"] == "response" and result["status"] == "completed"
    assert result["output"][0]["content"][0]["text"] == "Hi there"
    [call] = fake.requests(model)
    assert call.path == "/v1/responses" and call.body is not None
    assert call.body["instructions"] == "be brief"
    # of the shipped defaults, only what the Responses API takes: no max_tokens, no penalties
    assert {k: call.body[k] for k in ("temperature", "top_p")} == {"temperature": 0.1,
                                                                    "top_p": 0.75}
    assert not {"max_tokens", "presence_penalty", "frequency_penalty"} & call.body.keys()
    assert job.describe()["upstream"] == "responder"
    # the catch-all upstream serves the model too, but not this endpoint
    with pytest.raises(InvalidJob, match="does not serve /v1/responses"):
        client.submit_response("x", model=model, upstream="fake")


def test_a_streamed_response_is_replayed_and_assembled(client: Client, fake: FakeUpstream,
                                                      model: str) -> None:
    fake.script(model, Reply(pieces=["Hel", "lo ", "there"], chunk_delay=0.01))
    job = client.submit_response([{"role": "user", "content": "hi"}], model=model, stream=True)
    assert "".join(job.text_stream(timeout=10)) == "Hello there"
    events = list(job.stream(timeout=5))  # a late reader replays every event
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    result = job.result(timeout=5)
    assert result == events[-1]["response"]
    body = fake.requests(model)[0].body
    assert body is not None and "stream_options" not in body  # chat's option, not this API's
    final = list(job.events(timeout=5))[-1]
    assert final["finish_reason"] == "completed" and final["usage"]["output_tokens"] == 2


def test_a_response_that_fails_in_its_stream_fails_the_job(client: Client, fake: FakeUpstream,
                                                          model: str) -> None:
    fake.script(model, StreamError(after=2, error={"code": "server_error",
                                                   "message": "the model broke"}))
    job = client.submit_response("hi", model=model, stream=True)
    with pytest.raises(JobFailed) as failed:
        job.result(timeout=10)
    assert failed.value.error["code"] == "server_error"
    assert failed.value.error["message"] == "the model broke"
    assert failed.value.error["type"] == "server_error"
    fake.script(model, Reply(pieces=["a", "b", "c"], truncate_after=2))
    cut = client.submit_response("hi", model=model, stream=True)
    with pytest.raises(JobFailed) as truncated:
        cut.result(timeout=10)
    assert truncated.value.error["code"] == "stream_truncated"


def test_an_incomplete_response_is_a_result(client: Client, fake: FakeUpstream,
                                            model: str) -> None:
    fake.script(model, Reply(content="one two three", finish_reason="length"))
    result = client.submit_response("hi", model=model, max_output_tokens=3,
                                    background=False).result(timeout=10)
    assert result["status"] == "incomplete"
    assert fake.requests(model)[0].body["background"] is False  # type: ignore[index]


def test_the_general_default_layers_give_the_newer_endpoints_only_what_they_take(
        settings: Settings) -> None:
    upstream = settings.upstream("fake")
    assert upstream is not None
    embedding = build_payload(settings, upstream, build_spec(Kind.EMBEDDING, "x", {
        "model": "layered-e"}, 1 << 20))
    # the model's own layer is deliberate: it applies whole (top_p), the global one does not
    assert embedding == {"model": "layered-e", "input": "x", "top_p": 0.5}
    response = build_payload(settings, upstream, build_spec(Kind.RESPONSE, "x", {
        "model": "m"}, 1 << 20))
    assert response == {"model": "m", "input": "x", "temperature": 0.2, "top_p": 0.75}


def test_cli_embed_and_respond(worker_env: dict[str, str], worker: WorkerProcess,
                               fake: FakeUpstream, model: str) -> None:
    env = {k: v for k, v in worker_env.items() if k != "FAKE_UPSTREAM_KEY"}
    embedded = cli(env, "embed", "some text", "--model", model, "-p", "dimensions=3")
    assert embedded.returncode == 0, embedded.stderr
    assert len(json.loads(embedded.stdout)) == 3
    fake.script(model, Reply(pieces=["one ", "two"]))
    streamed = cli(env, "respond", "Hi", "--model", model, "--system", "be brief", "--stream")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == "one two\n"
    assert fake.requests(model)[-1].body["instructions"] == "be brief"  # type: ignore[index]
    refused = cli(env, "embed", "x", "--model", model, "--stream")
    assert refused.returncode == 2 and "stream" in refused.stderr


def test_a_batch_file_with_every_kind(client: Client, model: str, tmp_path: Path) -> None:
    lines = [{"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]}},
             {"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": model, "input": "hi"}},
             {"custom_id": "r", "method": "POST", "url": "/v1/responses",
              "body": {"model": model, "input": "hi"}}]
    source = tmp_path / "kinds.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    batch = client.submit_batch(source, window=3)
    assert batch.wait(timeout=30)["completed"] == 3
    bodies = {r["custom_id"]: r["response"]["body"] for r in batch.records()}
    assert bodies["c"]["object"] == "chat.completion"
    assert bodies["e"]["object"] == "list" and bodies["r"]["object"] == "response"
