"""Streamed chunks rebuild the non-streamed response shape."""

from api_tasks.stream.assemble import StreamAssembler


def _chat(delta: dict, finish: str | None = None, index: int = 0) -> dict:
    return {"id": "c1", "created": 1, "model": "m",
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}


def test_chat_content_finish_and_usage() -> None:
    asm = StreamAssembler("chat")
    for chunk in [_chat({"role": "assistant", "content": ""}), _chat({"content": "Hel"}),
                  _chat({"content": "lo"}), _chat({}, "stop"),
                  {"id": "c1", "choices": [], "usage": {"total_tokens": 3}}]:
        asm.add(chunk)
    response = asm.response()
    assert response["object"] == "chat.completion" and response["id"] == "c1"
    assert response["choices"] == [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                    "message": {"role": "assistant", "content": "Hello"}}]
    assert response["usage"] == {"total_tokens": 3} and asm.finished


def test_tool_call_arguments_are_concatenated() -> None:
    asm = StreamAssembler("chat")
    asm.add(_chat({"tool_calls": [{"index": 0, "id": "t1", "type": "function",
                                   "function": {"name": "f", "arguments": ""}}]}))
    asm.add(_chat({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}))
    asm.add(_chat({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}, "tool_calls"))
    call = asm.response()["choices"][0]["message"]["tool_calls"][0]
    function = {"name": "f", "arguments": '{"a":1}'}
    assert call == {"id": "t1", "type": "function", "function": function}


def test_completion_text_and_unfinished_choices() -> None:
    asm = StreamAssembler("completion")
    asm.add({"choices": [{"index": 0, "text": "a"}, {"index": 1, "text": "x"}]})
    asm.add({"choices": [{"index": 0, "text": "b", "finish_reason": "length"}]})
    assert not asm.finished
    choices = asm.response()["choices"]
    assert [c["text"] for c in choices] == ["ab", "x"] and choices[0]["finish_reason"] == "length"


def test_reasoning_content_is_kept() -> None:
    asm = StreamAssembler("chat")
    asm.add(_chat({"reasoning_content": "think "}))
    asm.add(_chat({"reasoning_content": "more", "content": "answer"}, "stop"))
    message = asm.response()["choices"][0]["message"]
    assert message["reasoning_content"] == "think more" and message["content"] == "answer"


def test_a_long_stream_assembles_in_linear_time() -> None:
    """32 MB of content and of tool-call arguments in 8 KB pieces: adding each piece to the
    text so far copied it every time (minutes here; the suite's timeout stops it); kept as
    pieces and joined once it takes well under a second."""
    piece = "x" * 8000
    asm = StreamAssembler("chat")
    for i in range(4000):
        asm.add(_chat({"content": piece, "tool_calls": [
            {"index": 0, "id": "t" if i == 0 else None, "function": {"arguments": piece}}]}))
    message = asm.response()["choices"][0]["message"]
    assert len(message["content"]) == len(message["tool_calls"][0]["function"]["arguments"]) \
        == 4000 * len(piece)
    text = StreamAssembler("completion")
    for _ in range(4000):
        text.add({"choices": [{"index": 0, "text": piece}]})
    assert len(text.response()["choices"][0]["text"]) == 4000 * len(piece)
