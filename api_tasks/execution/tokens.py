"""What a call may cost in tokens, reserved against a tokens-per-minute limit before it runs.

The prompt is counted with tiktoken where its encoding fits the model and is
on disk (the ``tokenizer`` extra bundles ``cl100k_base``, the GPT-4 and
GPT-3.5 encoding, so nothing is downloaded), with OpenAI's recipe for chat
framing; otherwise it is estimated (about four characters a token, plus the
same framing). The completion is counted at its ceiling, ``max_tokens`` (or
``max_completion_tokens``, or a response's ``max_output_tokens``) times ``n``;
an embedding writes no reply, so only its input counts. The reservation is reconciled with the
usage the upstream reports once the call ends, so an estimate need not be exact.

An upstream's ``tokenizer`` setting: ``auto`` (tiktoken when it fits, the
default), ``estimate``, or a tiktoken encoding name to use for every model.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

from config.tokenizers import offline_encodings, on_disk

__all__ = ["count_prompt", "estimate_cost", "offline_encodings", "on_disk", "preload",
           "prompt_tokens", "reply_ceiling"]

log = logging.getLogger(__name__)
Count = Callable[[str], int]

_CHARS_PER_TOKEN = 4
_PER_MESSAGE = 3  # OpenAI's recipe: every message adds 3 tokens of framing...
_PER_NAME = 1  # ...one more when it has a name...
_REPLY_PRIMING = 3  # ...and every reply is primed with 3
_DEFAULT_COMPLETION = 256  # a payload with no max_tokens at all
_CEILINGS = ("max_completion_tokens", "max_tokens", "max_output_tokens")  # the first one set


def _estimate(text: str) -> int:
    return -(-len(text) // _CHARS_PER_TOKEN)  # rounded up


def prompt_tokens(payload: dict[str, Any], count: Count = _estimate) -> int:
    """The prompt's tokens, each text counted by ``count``."""
    messages = payload.get("messages")
    if messages is None and isinstance(payload.get("input"), list) and \
            all(isinstance(item, dict) for item in payload["input"]):
        messages = payload["input"]  # a response's input items: messages, mostly
    if messages is not None:
        total = _REPLY_PRIMING
        if isinstance(payload.get("instructions"), str):
            total += _PER_MESSAGE + count(payload["instructions"])
        for message in messages if isinstance(messages, list) else ():
            if isinstance(message, dict):
                total += _PER_MESSAGE + count(_text(message.get("role")))
                total += count(_text(message.get("content")))
                total += _PER_NAME + count(_text(message["name"])) if "name" in message else 0
        return total
    prompt = payload.get("prompt", payload.get("input", ""))
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return len(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        return sum(len(p) for p in prompt)  # several inputs as token ids
    if isinstance(prompt, list):  # several inputs: each is counted
        return sum(count(_text(p)) + 1 for p in prompt)
    total = count(_text(prompt)) + 1
    if isinstance(payload.get("instructions"), str):
        total += _PER_MESSAGE + count(payload["instructions"])
    return total


def estimate_cost(payload: dict[str, Any], tokenizer: str = "auto",
                  model: str | None = None, *, reply: bool = True) -> int:
    """Tokens to reserve: the prompt's count plus the reply's ceiling (none for an
    embedding: ``reply`` False)."""
    count = count_prompt(tokenizer, model or payload.get("model"))
    return max(prompt_tokens(payload, count) + reply_ceiling(payload, reply=reply), 1)


def reply_ceiling(payload: dict[str, Any], *, reply: bool = True) -> int:
    """The most the reply may take: its ``max_tokens`` (or the like) times ``n``."""
    ceiling = next((payload[name] for name in _CEILINGS if payload.get(name) is not None), None)
    completion = int(ceiling) if isinstance(ceiling, (int, float)) else _DEFAULT_COMPLETION
    completion = max(completion, 0) if reply else 0  # a negative ceiling hands out nothing
    n = payload.get("n")
    return completion * (n if isinstance(n, int) and n > 0 else 1)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def count_prompt(tokenizer: str, model: Any) -> Count:
    """The text counter for this setting and model: a tiktoken encoding or the estimate."""
    if tokenizer == "estimate":
        return _estimate
    name = on_disk(tokenizer) if tokenizer != "auto" else _encoding_for(str(model))
    encoding = _load(name) if name else None
    if encoding is None:
        return _estimate
    return lambda text: len(encoding.encode(text, disallowed_special=()))


@functools.lru_cache(maxsize=512)
def _encoding_for(model: Any) -> str | None:
    """The encoding tiktoken names for an OpenAI model, if it is on disk."""
    try:
        import tiktoken
    except ImportError:
        return None
    try:
        name = tiktoken.encoding_name_for_model(str(model))
    except KeyError:  # not an OpenAI model: its tokenizer is not tiktoken's
        return None
    return on_disk(name)


@functools.cache
def preload() -> None:
    """Load the encodings on disk now, so the first call counted doesn't pay for it."""
    for name in offline_encodings():
        _load(name)


@functools.cache
def _load(name: str) -> Any:
    """The encoding, loaded once per process; None (and one warning) if it can't be."""
    try:
        import tiktoken

        return tiktoken.get_encoding(name)
    except Exception as err:  # missing package, unknown name, no file and no network
        log.warning("tokenizer %s unavailable (%s): prompts are estimated", name, err)
        return None


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_text(part.get("text") if isinstance(part, dict) else part)
                       for part in content)
    return "" if content is None else json.dumps(content)
