"""Rebuild a whole OpenAI response from streamed chunks.

A streamed job's result has the same shape as a non-streamed one, so a caller
that only wants the answer never reassembles chunks: content, tool calls and
reasoning text are concatenated per choice, ``finish_reason`` and ``usage``
are kept as the upstream sent them. A responses stream needs no assembly: its
last event (``response.completed`` or ``response.incomplete``) carries the
whole response.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from api_tasks.spec import Kind

__all__ = ["Assembler", "ResponseAssembler", "StreamAssembler", "assembler_for"]

_CONCAT = ("content", "reasoning_content", "reasoning", "refusal")
# the events that end a responses stream with its response (response.failed is an error)
RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete"})


@dataclass
class StreamAssembler:
    """Accumulates chunks of one stream; ``response()`` gives the final dict."""

    kind: str  # "chat" or "completion"
    head: dict[str, Any] = field(default_factory=dict)
    choices: dict[int, dict[str, Any]] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    last = False  # a chunk may follow the last finish_reason (usage), then [DONE]
    closes = False  # [DONE] ends it well, finish_reasons or not

    def add(self, chunk: dict[str, Any]) -> None:
        """Fold one parsed chunk in."""
        if not self.head:
            self.head = {k: chunk[k] for k in ("id", "created", "model") if k in chunk}
        if chunk.get("system_fingerprint"):
            self.head["system_fingerprint"] = chunk["system_fingerprint"]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict):  # tolerate junk rather than fail a good stream
                self._add_choice(choice)

    @property
    def finished(self) -> bool:
        """Whether every choice seen so far has a finish_reason."""
        return bool(self.choices) and all(c.get("finish_reason") for c in self.choices.values())

    def finish_reason(self) -> str | None:
        """The first choice's finish_reason (the one callers usually want)."""
        first = self.choices.get(min(self.choices)) if self.choices else None
        return first.get("finish_reason") if first else None

    def response(self) -> dict[str, Any]:
        """The whole response, in the non-streamed shape."""
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        out: dict[str, Any] = {"object": obj, **self.head}
        out["choices"] = [self._final_choice(i) for i in sorted(self.choices)]
        if self.usage is not None:
            out["usage"] = self.usage
        return out

    def _add_choice(self, choice: dict[str, Any]) -> None:
        index = int(choice.get("index", 0))
        state = self.choices.setdefault(index, {"index": index, "finish_reason": None})
        if choice.get("finish_reason"):
            state["finish_reason"] = choice["finish_reason"]
        if choice.get("logprobs") is not None:
            state.setdefault("logprob_parts", []).append(choice["logprobs"])
        delta = choice.get("delta")
        if self.kind == "chat" and isinstance(delta, dict):
            self._add_delta(state, delta)
        elif self.kind != "chat" and isinstance(choice.get("text"), str):
            state.setdefault("text", []).append(choice["text"])

    def _add_delta(self, state: dict[str, Any], delta: dict[str, Any]) -> None:
        # text is kept as pieces and joined once: adding to a string held in a dict copies
        # it each time, which made a long stream's assembly quadratic
        message = state.setdefault("message", {})
        pieces = state.setdefault("pieces", {})
        for key, value in delta.items():
            if value is None:
                continue
            if key in _CONCAT and isinstance(value, str):
                pieces.setdefault(key, []).append(value)
            elif key == "tool_calls" and isinstance(value, list):
                _add_tool_calls(state.setdefault("tool_calls", []), value)
            else:
                message[key] = value

    def _final_choice(self, index: int) -> dict[str, Any]:
        state = self.choices[index]
        choice: dict[str, Any] = {"index": index}
        if self.kind == "chat":
            message = {"role": "assistant", "content": None, **state.get("message", {})}
            message.update((key, "".join(parts)) for key, parts in state.get("pieces", {}).items())
            if "tool_calls" in state:
                message["tool_calls"] = [_final_call(call) for call in state["tool_calls"]]
            choice["message"] = message
        else:
            choice["text"] = "".join(state.get("text", ()))
        choice["finish_reason"] = state["finish_reason"]
        choice["logprobs"] = _merge_logprobs(state.get("logprob_parts"))
        return choice


@dataclass
class ResponseAssembler:
    """A responses stream: its closing event carries the response, nothing follows it."""

    final: dict[str, Any] | None = None
    closes = True  # only its closing event ends it well: [DONE] alone is a truncated stream

    def add(self, event: dict[str, Any]) -> None:
        """Keep the response of a closing event."""
        if event.get("type") in RESPONSE_ENDS and isinstance(event.get("response"), dict):
            self.final = event["response"]

    @property
    def finished(self) -> bool:
        """Whether the closing event arrived."""
        return self.final is not None

    @property
    def last(self) -> bool:
        """Nothing follows the closing event (no ``[DONE]`` in a responses stream)."""
        return self.final is not None

    def response(self) -> dict[str, Any]:
        """The response the closing event carried."""
        return self.final or {}


Assembler = StreamAssembler | ResponseAssembler


def assembler_for(kind: str) -> Assembler:
    """The assembler of a stream of this kind of job."""
    return ResponseAssembler() if kind == Kind.RESPONSE else StreamAssembler(kind)


def _add_tool_calls(calls: list[dict[str, Any]], deltas: list[Any]) -> None:
    for delta in deltas:
        if not isinstance(delta, dict):
            continue
        index = int(delta.get("index", len(calls)))
        while len(calls) <= index:
            calls.append({"id": None, "type": "function", "name": [], "arguments": []})
        call = calls[index]
        if delta.get("id"):
            call["id"] = delta["id"]
        if delta.get("type"):
            call["type"] = delta["type"]
        function = delta.get("function")
        if not isinstance(function, dict):
            function = {}
        call["name"].append(function.get("name") or "")
        call["arguments"].append(function.get("arguments") or "")


def _final_call(call: dict[str, Any]) -> dict[str, Any]:
    return {"id": call["id"], "type": call["type"],
            "function": {"name": "".join(call["name"]), "arguments": "".join(call["arguments"])}}


def _merge_logprobs(parts: list[Any] | None) -> Any:
    if not parts:
        return None
    if all(isinstance(p, dict) and isinstance(p.get("content"), list) for p in parts):
        return {"content": [item for p in parts for item in p["content"]]}
    return parts
