"""The fake upstream's embeddings and Responses API, read by the official openai SDK as it
reads OpenAI's: the base64 vectors the SDK asks for, typed stream events, errors in band."""

from __future__ import annotations

import openai
import pytest

from tests.support.fake_upstream import FakeUpstream, Reply, StreamError


def _sdk(up: FakeUpstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=up.base_url + "/v1", api_key="sk-x", max_retries=0,
                         timeout=10)


def test_embeddings_in_both_encodings_are_the_same_vectors(up: FakeUpstream) -> None:
    sdk = _sdk(up)
    packed = sdk.embeddings.create(model="e", input=["one text", "another"])  # base64
    assert up.requests("e")[0].body["encoding_format"] == "base64"
    plain = sdk.embeddings.create(model="e", input=["one text", "another"],
                                  encoding_format="float", dimensions=4)
    assert [d.index for d in packed.data] == [0, 1] and len(packed.data[0].embedding) == 8
    assert len(plain.data[1].embedding) == 4
    again = sdk.embeddings.create(model="e", input="one text", encoding_format="float")
    assert again.data[0].embedding == pytest.approx(packed.data[0].embedding, abs=1e-6)
    assert packed.data[0].embedding != packed.data[1].embedding
    assert packed.usage.prompt_tokens == packed.usage.total_tokens == 3


def test_a_response_whole_and_streamed(up: FakeUpstream) -> None:
    sdk = _sdk(up)
    up.script("r", Reply(content="Hi there"), Reply(pieces=["Hel", "lo"]))
    whole = sdk.responses.create(model="r", input="Say hi", instructions="be brief")
    assert whole.output_text == "Hi there" and whole.status == "completed"
    assert whole.usage is not None and whole.usage.output_tokens == 2
    events = list(sdk.responses.create(model="r", input=[{"role": "user", "content": "x"}],
                                       stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == "Hello"


def test_a_response_cut_short_and_one_that_fails_in_band(up: FakeUpstream) -> None:
    sdk = _sdk(up)
    up.script("r", Reply(content="a b c", finish_reason="length"),
              StreamError(after=2, error={"code": "server_error", "message": "boom"}))
    short = sdk.responses.create(model="r", input="x", max_output_tokens=3)
    assert short.status == "incomplete" and short.incomplete_details is not None
    events = list(sdk.responses.create(model="r", input="x", stream=True))
    assert events[-1].type == "error" and events[-1].message == "boom"
    assert sum(e.type == "response.output_text.delta" for e in events) == 2
