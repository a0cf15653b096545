"""OpenAI-shaped request reading and response bodies (chat, legacy completions, embeddings
and responses)."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import secrets
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .wire import Wire

Json = dict[str, Any]

DEFAULT_MODEL = "fake-model"  # answered when the request names no model
_ID_PREFIX = secrets.token_hex(4)  # distinct ids across servers without a uuid per request
_ids = itertools.count(1)  # next() on itertools.count is atomic under the GIL
_PIECE = re.compile(r"\S+\s*|\s+")

# status -> (type, code, message), modelled on what OpenAI returns
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Bad request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "permission_denied", "You are not allowed to do that."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    408: ("timeout", "timeout", "Request timed out."),
    413: ("invalid_request_error", "request_too_large", "Request too large."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", "bad_gateway", "Bad gateway."),
    503: ("server_error", "overloaded", "The engine is currently overloaded."),
    504: ("server_error", "timeout", "Gateway timeout."),
}


class BadRequest(Exception):
    """A request OpenAI would refuse with 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        """Keeps the offending parameter name for the error body."""
        super().__init__(message)
        self.param = param


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> Json:
    """The standard {"error": {...}} envelope."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def default_error(status: int) -> Json:
    """A plausible OpenAI error body for `status`."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    kind, code, message = _ERRORS.get(status, (kind, None, f"Error {status}."))
    return error_body(message, kind, None, code)


def wrap_error(error: Mapping[str, Any] | None, status: int = 500) -> Json:
    """Uses a full envelope as-is, wraps a bare error object, or picks a default."""
    if error is None:
        return default_error(status)
    return dict(error) if "error" in error else {"error": dict(error)}


def parse_body(raw: bytes) -> Json | None:
    """The JSON object in the body, or None when it is not one."""
    try:
        obj = json.loads(raw)
    except ValueError:  # includes UnicodeDecodeError
        return None
    return obj if isinstance(obj, dict) else None


def _text_of(content: Any) -> str:
    """Plain text of a message content: a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def prompt_text(kind: str, body: Json) -> str:
    """The text to echo: the last message (chat, or a response's input items), the first
    prompt (completion), or the first input (embedding, response)."""
    if kind in ("embedding", "response"):
        value = body.get("input")
        if value is None or value == "" or value == []:
            raise BadRequest("'input' is a required property", "input")
        if isinstance(value, list):
            value = value[-1] if kind == "response" else value[0]
        if isinstance(value, dict):  # a response's input item: a message
            return _text_of(value.get("content"))
        return value if isinstance(value, str) else json.dumps(value)
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' is a required property", "messages")
        last = messages[-1]
        return _text_of(last.get("content") if isinstance(last, dict) else None)
    prompt = body.get("prompt")
    if prompt is None:
        raise BadRequest("'prompt' is a required property", "prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    return prompt if isinstance(prompt, str) else json.dumps(prompt)  # token ids: echo as JSON


def pieces_of(text: str) -> list[str]:
    """Word-sized pieces, spaces kept, whose concatenation is `text`."""
    return _PIECE.findall(text)


def words(text: str) -> int:
    """The fake tokenizer: whitespace-separated words."""
    return len(text.split())


def prompt_tokens(body: Json) -> int:
    """The prompt's tokens, as usage reports them: words of every message, or the prompt."""
    messages = body.get("messages")
    if messages is None and isinstance(body.get("input"), list) and \
            all(isinstance(m, dict) for m in body["input"]):
        messages = body["input"]
    if isinstance(messages, list):
        return sum(words(_text_of(m.get("content"))) for m in messages if isinstance(m, dict))
    inputs = body.get("input")
    if isinstance(inputs, list) and inputs and all(isinstance(p, str) for p in inputs):
        return sum(words(p) for p in inputs)  # embeddings count every input
    prompt = body.get("prompt", inputs)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)  # token ids
    if isinstance(prompt, list):  # several prompts: the fake answers the first only
        prompt = prompt[0] if prompt else ""
    return words(prompt) if isinstance(prompt, str) else 0


@dataclass
class Exchange:
    """One request being answered, with what every response piece needs."""

    kind: str  # "chat" or "completion"
    body: Json
    wire: Wire
    prompt: str
    model: str
    stream: bool
    include_usage: bool
    id: str
    created: int

    @classmethod
    def build(cls, kind: str, body: Json, wire: Wire) -> Exchange:
        """Validates the body and derives the response identity."""
        prompt = prompt_text(kind, body)
        model = body.get("model")
        options = body.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        prefix = {"chat": "chatcmpl-", "response": "resp_"}.get(kind, "cmpl-")
        return cls(
            kind,
            body,
            wire,
            prompt,
            model if isinstance(model, str) else DEFAULT_MODEL,
            body.get("stream") is True,
            usage,
            f"{prefix}{_ID_PREFIX}{next(_ids):012d}",
            int(time.time()),
        )

    def _base(self, obj: str) -> Json:
        """The fields every body and chunk starts with."""
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, text: str, n: int = 1) -> Json:
        """Word-count usage for a reply of `text` in `n` choices."""
        prompt = prompt_tokens(self.body)
        completion = words(text) * n
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def chunk(self, index: int, piece: str | Json, finish: str | None = None) -> Json:
        """A streaming chunk; `piece` is the chat delta dict or the completion text."""
        if self.kind == "chat":
            delta = piece if isinstance(piece, dict) else {"content": piece}
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {
                **self._base("chat.completion.chunk"),
                "system_fingerprint": "fp_fake",
                "choices": [choice],
            }
        text = piece if isinstance(piece, str) else ""
        choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
        return {**self._base("text_completion"), "choices": [choice]}

    def finish_chunk(self, index: int, reason: str) -> Json:
        """The chunk that carries only the finish reason."""
        return self.chunk(index, {} if self.kind == "chat" else "", reason)

    def usage_chunk(self, usage: Json) -> Json:
        """The trailing include_usage chunk: no choices, just usage."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._base(obj), "choices": [], "usage": usage}

    def full(self, text: str, finish: str | None, usage: bool, n: int, tools: bool) -> Json:
        """The non-streaming response body."""
        if self.kind == "embedding":
            return self.embeddings()
        if self.kind == "response":
            return self.response(text, "incomplete" if finish == "length" else "completed")
        if self.kind != "chat":
            choices = [
                {"index": i, "text": text, "finish_reason": finish, "logprobs": None}
                for i in range(n)
            ]
            body = {**self._base("text_completion"), "choices": choices}
        else:
            body = {
                **self._base("chat.completion"),
                "choices": [
                    {
                        "index": i,
                        "message": self._message(text, tools),
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                    for i in range(n)
                ],
                "system_fingerprint": "fp_fake",
            }
        if usage:
            body["usage"] = self.usage(text, n)
        return body

    def _message(self, text: str, tools: bool) -> Json:
        """The assistant message of a non-streaming chat reply."""
        if not tools:
            return {"role": "assistant", "content": text}
        name, args = self.tool_call(text)
        call = {
            "id": self.call_id(),
            "type": "function",
            "function": {"name": name, "arguments": args},
        }
        return {"role": "assistant", "content": None, "tool_calls": [call]}

    def call_id(self) -> str:
        """A stable tool-call id for this exchange."""
        return "call_" + self.id.rsplit("-", 1)[-1]

    def tool_call(self, text: str) -> tuple[str, str]:
        """The called function (the request's first tool, if any) and its JSON arguments."""
        name = "get_weather"
        tools = self.body.get("tools")
        if isinstance(tools, list) and tools and isinstance(tools[0], dict):
            fn = tools[0].get("function")
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                name = fn["name"]
        return name, json.dumps({"query": text}, ensure_ascii=False)

    def tool_deltas(self, text: str) -> list[Json]:
        """Chat deltas: id/type/name first, then the arguments in several slices."""
        name, args = self.tool_call(text)
        first = {
            "index": 0,
            "id": self.call_id(),
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        step = max(1, len(args) // 4)
        slices = [args[i : i + step] for i in range(0, len(args), step)]
        rest = [{"index": 0, "function": {"arguments": s}} for s in slices]
        return [{"tool_calls": [d]} for d in (first, *rest)]

    def embeddings(self) -> Json:
        """An embeddings list: one vector per input, derived from its text, in the asked
        encoding (the OpenAI SDK asks for base64 unless told otherwise)."""
        inputs = self.body.get("input")
        items = inputs if isinstance(inputs, list) and not all(
            isinstance(t, int) for t in inputs) else [inputs]
        size = self.body.get("dimensions")
        size = size if isinstance(size, int) and 0 < size <= 4096 else 8
        data = []
        for index, item in enumerate(items):
            vector = vector_of(json.dumps(item), size)
            encoded: Any = vector
            if self.body.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack(f"<{size}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = prompt_tokens(self.body)
        return {"object": "list", "data": data, "model": self.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def response(self, text: str, status: str) -> Json:
        """A Responses API object: one assistant message holding ``text``."""
        created = {"id": self.id, "object": "response", "created_at": self.created,
                   "status": status, "model": self.model, "error": None,
                   "incomplete_details": {"reason": "max_output_tokens"}
                   if status == "incomplete" else None,
                   "instructions": self.body.get("instructions"),
                   "max_output_tokens": self.body.get("max_output_tokens"),
                   "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                   "temperature": 1.0, "top_p": 1.0, "text": {"format": {"type": "text"}},
                   "truncation": "disabled", "metadata": {}, "output": [], "usage": None}
        if status == "in_progress":
            return created
        prompt, written = prompt_tokens(self.body), words(text)
        return {**created, "output": [self.output_message(text, "completed")],
                "usage": {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens": written,
                          "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": prompt + written}}

    def output_message(self, text: str, status: str) -> Json:
        """The response's one output item, an assistant message."""
        return {"type": "message", "id": "msg_" + self.id.removeprefix("resp_"),
                "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}


def vector_of(text: str, size: int) -> list[float]:
    """A unit vector derived from ``text``: the same text always gets the same vector."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    raw = [(digest[i % len(digest)] - 127.5) / 127.5 for i in range(size)]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [round(x / norm, 6) for x in raw]
