"""What a call may cost in tokens, reserved against a tokens-per-minute limit before it runs.

The prompt is estimated (about four characters a token, plus a few tokens of
framing per chat message); the completion is counted at its ceiling,
``max_tokens`` (or ``max_completion_tokens``) times ``n``. The reservation is
reconciled with the usage the upstream reports once the call ends, so an
estimate only has to be an upper bound in spirit, not exact.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["estimate_cost", "prompt_tokens"]

_CHARS_PER_TOKEN = 4
_PER_MESSAGE = 4  # role and separators, as OpenAI's own counting recipe adds
_DEFAULT_COMPLETION = 256  # a payload with no max_tokens at all


def prompt_tokens(payload: dict[str, Any]) -> int:
    """An estimate of the prompt's tokens."""
    if "messages" in payload:
        messages = payload.get("messages") or []
        text = sum(len(_text(m.get("content"))) for m in messages if isinstance(m, dict))
        return text // _CHARS_PER_TOKEN + _PER_MESSAGE * len(messages) + 3
    prompt = payload.get("prompt", "")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    return len(_text(prompt)) // _CHARS_PER_TOKEN + 1


def estimate_cost(payload: dict[str, Any]) -> int:
    """Tokens to reserve: the prompt's estimate plus the completion's ceiling."""
    ceiling = payload.get("max_completion_tokens") or payload.get("max_tokens")
    completion = int(ceiling) if isinstance(ceiling, (int, float)) else _DEFAULT_COMPLETION
    completion = max(completion, 0)  # a nonsense negative ceiling must not hand out budget
    n = payload.get("n")
    choices = n if isinstance(n, int) and n > 0 else 1
    return max(prompt_tokens(payload) + completion * choices, 1)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_text(part.get("text") if isinstance(part, dict) else part)
                       for part in content)
    return "" if content is None else json.dumps(content)
