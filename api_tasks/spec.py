"""What a job is, and the checks that refuse a bad one with the field's name.

The same checks run twice: at submit (so a bad job never reaches the queue)
and in the worker (a job sent by any Celery client, or altered on the way,
fails fast with an error object instead of reaching the upstream).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from api_tasks.errors import InvalidJob

__all__ = ["CONTROL_FIELDS", "ENDPOINTS", "FIELD_RULES", "KINDS", "QUEUES", "Endpoint",
           "JobSpec", "Kind", "build_spec", "kind_of"]


class Kind(StrEnum):
    """What a job asks an upstream for: one kind per OpenAI endpoint."""

    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    RESPONSE = "response"


@dataclass(frozen=True)
class Endpoint:
    """The OpenAI endpoint a kind of job calls, and the shape of its body and answer."""

    path: str
    first: str  # the body field the task takes positionally (the job's input)
    task: str  # the Celery task's name
    generates: bool  # it writes a reply: it may stream, its ceiling counts against limits
    answer: str  # the field a successful, non-streamed answer always holds
    # the fields the default payload layers may give it (None: all); the shipped defaults are
    # chat sampling fields, which OpenAI's embeddings and Responses APIs refuse
    defaults: frozenset[str] | None = None


ENDPOINTS: dict[Kind, Endpoint] = {
    Kind.CHAT: Endpoint("/v1/chat/completions", "messages", "api_tasks.chat", True, "choices"),
    Kind.COMPLETION: Endpoint("/v1/completions", "prompt", "api_tasks.completion", True,
                              "choices"),
    Kind.EMBEDDING: Endpoint("/v1/embeddings", "input", "api_tasks.embedding", False, "data",
                             frozenset({"dimensions", "encoding_format", "user"})),
    Kind.RESPONSE: Endpoint("/v1/responses", "input", "api_tasks.response", True, "output",
                            frozenset({"temperature", "top_p", "max_output_tokens",
                                       "instructions", "reasoning", "text", "truncation",
                                       "store", "service_tier", "parallel_tool_calls",
                                       "tools", "tool_choice", "include", "top_logprobs",
                                       "metadata", "user"})),
}
KINDS: dict[str, Kind] = {endpoint.path: kind for kind, endpoint in ENDPOINTS.items()}


def kind_of(name: str) -> Kind | None:
    """The kind a record, message or caller names (None if it names none)."""
    return Kind(name) if name in ENDPOINTS else None
MAX_TTL = 365 * 86400  # as config.settings.MAX_TTL; Redis refuses absurd expiries
# nesting deep enough to overflow the JSON encoder is refused naming where it passed this
# depth, never raised as a RecursionError
MAX_DEPTH = 64
QUEUES = ("interactive", "bulk")  # in priority order: a worker reads them in this order
# options for this project, removed before the payload goes upstream
CONTROL_FIELDS = frozenset({"upstream", "store_result", "result_ttl", "queue", "base_url",
                            "owner", "notify"})
# a gateway key's name, as config.settings.GatewayKey.name (spec stays free of config)
_OWNER = re.compile(r"[A-Za-z0-9_.-]{1,128}", re.ASCII)
# a job must not carry credentials or choose where it is sent
FORBIDDEN_FIELDS = frozenset({"api_key", "authorization", "api_base", "headers"})


@dataclass(frozen=True)
class JobSpec:
    """A validated job: its kind, the OpenAI body, and the project's options."""

    kind: Kind
    body: dict[str, Any]
    upstream: str | None = None
    store_result: bool = True
    result_ttl: int | None = None
    queue: str | None = None
    base_url: str | None = None  # only where the upstream's job_base_url_hosts allow it
    owner: str | None = None  # the gateway key it was submitted with (its limits apply too)
    notify: bool | None = None  # its end goes to its owner's webhooks (job.succeeded...)

    @property
    def model(self) -> str | None:
        """The requested model, if any."""
        model = self.body.get("model")
        return model if isinstance(model, str) else None

    @property
    def stream(self) -> bool:
        """Whether the job asked for a streamed response."""
        return self.body.get("stream") is True

    @property
    def endpoint(self) -> Endpoint:
        """The OpenAI endpoint this job calls."""
        return ENDPOINTS[self.kind]

    def message(self, queue: str, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The task message that runs this job (to send it again after a wait), with the
        ``headers`` it came with that a new one keeps (its trace's ``traceparent``)."""
        endpoint = self.endpoint
        message = {"task": endpoint.task, "args": [self.body.get(endpoint.first)],
                   "kwargs": self.task_kwargs(), "queue": queue}
        return {**message, "headers": dict(headers)} if headers else message

    def message_json(self, queue: str, headers: Mapping[str, str] | None = None) -> str:
        """``message`` as the JSON the job's record keeps (encoded once per delivery)."""
        return json.dumps(self.message(queue, headers), separators=(",", ":"))

    def task_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the Celery task (the first field goes positionally)."""
        first = self.endpoint.first
        kwargs = {k: v for k, v in self.body.items() if k != first}
        for name in CONTROL_FIELDS:
            value = getattr(self, name)
            if value is not None and not (name == "store_result" and value is True):
                kwargs[name] = value
        return kwargs


def build_spec(kind: Kind, first: Any, params: Mapping[str, Any],
               max_bytes: int) -> JobSpec:
    """Validate a job's fields and return its spec; raise ``InvalidJob`` naming the field."""
    known = kind_of(kind)
    if known is None:
        raise InvalidJob("kind", f"must be one of {', '.join(Kind)}")
    kind, endpoint = known, ENDPOINTS[known]
    _FIRST_CHECKS[kind](first)
    if endpoint.first in params:
        raise InvalidJob(endpoint.first,
                         "is given twice: as the job's own argument and as a parameter")
    body: dict[str, Any] = {endpoint.first: first}
    options = {k: v for k, v in params.items() if k in CONTROL_FIELDS}
    body.update((k, v) for k, v in params.items() if k not in CONTROL_FIELDS)
    _check_fields(body)
    if not endpoint.generates and body.get("stream") is True:
        raise InvalidJob("stream", f"is not accepted: {endpoint.path} never streams")
    if kind is Kind.RESPONSE and body.get("background") is True:
        raise InvalidJob("background", "is not accepted: the queue runs every job in the "
                                       "background already; follow the job instead")
    _check_json(body, endpoint.first, max_bytes)
    return JobSpec(kind, body, **_check_options(options))


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidJob("messages", "must be a non-empty list of {role, content} objects")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidJob(where, "must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidJob(f"{where}.role", "must be a non-empty string")
        content = message.get("content")
        if "content" not in message and not message.get("tool_calls"):
            raise InvalidJob(f"{where}.content", "is required")
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidJob(f"{where}.content", "must be a string or a list of content parts")


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt and all(
        isinstance(p, (str, int)) or (isinstance(p, list) and all(isinstance(t, int) for t in p))
        for p in prompt
    ):
        return
    raise InvalidJob("prompt", "must be a string, a list of strings, or token ids")


def _check_embedding_input(value: Any) -> None:
    if isinstance(value, str) and value:
        return
    if isinstance(value, list) and value and (
            all(isinstance(p, str) and p for p in value)
            or all(isinstance(p, int) and not isinstance(p, bool) for p in value)
            or all(isinstance(p, list) and p and all(
                isinstance(t, int) and not isinstance(t, bool) for t in p) for p in value)):
        return
    raise InvalidJob("input", "must be a non-empty string, a list of non-empty strings, or "
                              "token ids")


def _check_response_input(value: Any) -> None:
    if isinstance(value, str) and value:
        return
    if isinstance(value, list) and value:
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise InvalidJob(f"input[{index}]", "must be an object (a message or an item)")
        return
    raise InvalidJob("input", "must be a non-empty string or a non-empty list of items")


_FIRST_CHECKS: dict[Kind, Callable[[Any], None]] = {
    Kind.CHAT: _check_messages, Kind.COMPLETION: _check_prompt,
    Kind.EMBEDDING: _check_embedding_input, Kind.RESPONSE: _check_response_input}


def _check_fields(body: dict[str, Any]) -> None:
    for name in body:
        if name.lower() in FORBIDDEN_FIELDS:
            raise InvalidJob(name, "is not allowed in a job: credentials and headers come "
                                   "from the worker's settings")
    for name, value in body.items():
        rule = FIELD_RULES.get(name)
        if rule is not None and value is not None and not rule.accepts(value):
            raise InvalidJob(name, f"must be {rule.wants}")


def _number(low: float | None = None, high: float | None = None, *,
            integer: bool = False) -> _Rule:
    what = "an integer" if integer else "a number"
    if low is not None and high is not None:
        wants = f"{what} from {low:g} to {high:g}"
    elif low is not None:
        wants = f"{what} of at least {low:g}"
    else:
        wants = what

    def accepts(value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            return False
        number = float(value)
        return math.isfinite(number) and (low is None or number >= low) \
            and (high is None or number <= high)
    return _Rule(wants, accepts)


def _of(kind: type, wants: str) -> _Rule:
    return _Rule(wants, lambda value: isinstance(value, kind))


def _stop(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and 0 < len(value) <= 4 and all(
        isinstance(item, str) for item in value))


@dataclass(frozen=True)
class _Rule:
    """What a known OpenAI field must hold (``None`` always passes: it removes a default)."""

    wants: str
    accepts: Callable[[Any], bool]


# The OpenAI fields whose types and documented ranges are checked at submit; any other
# field passes through untouched.
FIELD_RULES: dict[str, _Rule] = {
    "model": _of(str, "a string"),
    "stream": _of(bool, "true or false"),
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "n": _number(1, 128, integer=True),
    "best_of": _number(1, 20, integer=True),
    "max_tokens": _number(1, integer=True),
    "max_completion_tokens": _number(1, integer=True),
    "seed": _number(integer=True),
    "top_logprobs": _number(0, 20, integer=True),
    "logprobs": _Rule("true or false (chat) or an integer from 0 to 5 (completions)",
                      lambda v: isinstance(v, bool) or (
                          isinstance(v, int) and 0 <= v <= 5)),
    "echo": _of(bool, "true or false"),
    "parallel_tool_calls": _of(bool, "true or false"),
    "stop": _Rule("a string or a list of up to 4 strings", _stop),
    "user": _of(str, "a string"),
    "suffix": _of(str, "a string"),
    "logit_bias": _of(dict, "an object of token ids to numbers"),
    "response_format": _of(dict, "an object such as {\"type\": \"json_object\"}"),
    "stream_options": _of(dict, "an object such as {\"include_usage\": true}"),
    "tools": _of(list, "a list of tool objects"),
    "tool_choice": _Rule("a string or a tool object",
                         lambda v: isinstance(v, (str, dict))),
    "metadata": _of(dict, "an object of string pairs"),
    "max_output_tokens": _number(1, integer=True),
    "instructions": _of(str, "a string"),
    "previous_response_id": _of(str, "a string"),
    "store": _of(bool, "true or false"),
    "dimensions": _number(1, integer=True),
    "encoding_format": _Rule("\"float\" or \"base64\"", lambda v: v in ("float", "base64")),
}


def _check_json(body: dict[str, Any], first: str, max_bytes: int) -> None:
    try:
        size = len(json.dumps(body, allow_nan=False, ensure_ascii=False,
                              separators=(",", ":")).encode())
    except (TypeError, ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        where, why = _first_problem(body)
        raise InvalidJob(where, f"is not JSON: {why}") from None
    if size > max_bytes:
        raise InvalidJob(first,
                         f"the job is {size} bytes of JSON, over the {max_bytes}-byte limit")


def _first_problem(body: dict[str, Any]) -> tuple[str, str]:
    """Where and why ``body`` is not JSON, found without recursion (it may be deep)."""
    stack: list[tuple[str, Any, int]] = [(name, value, 1) for name, value in
                                         reversed(body.items())]
    while stack:
        where, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return where, f"nested deeper than {MAX_DEPTH} levels"
        if isinstance(value, str):
            if not _is_unicode(value):
                return where, "has a lone surrogate, which is not valid Unicode"
        elif isinstance(value, float):
            if not math.isfinite(value):
                return where, f"{value!r} is not a finite number"
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item, depth + 1)
                         for i, item in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            for key in value:
                if not isinstance(key, str):
                    return where, "object keys must be strings"
                if not _is_unicode(key):
                    return where, "a key has a lone surrogate, which is not valid Unicode"
            stack.extend((f"{where}.{key}", item, depth + 1)
                         for key, item in reversed(list(value.items())))
        elif value is not None and not isinstance(value, (bool, int)):
            return where, f"a {type(value).__name__} cannot be sent as JSON"
    return "params", "it cannot be encoded"


def _is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    upstream = options.get("upstream")
    if upstream is not None and not isinstance(upstream, str):
        raise InvalidJob("upstream", "must be the name of a configured upstream")
    store = options.get("store_result", True)
    if not isinstance(store, bool):
        raise InvalidJob("store_result", "must be true or false")
    ttl = options.get("result_ttl")
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool)
                            or not 1 <= ttl <= MAX_TTL):
        raise InvalidJob("result_ttl", f"must be a number of seconds from 1 to {MAX_TTL}")
    queue = options.get("queue")
    if queue is not None and queue not in QUEUES:
        raise InvalidJob("queue", f"must be one of {', '.join(QUEUES)}")
    base_url = options.get("base_url")
    if base_url is not None and not isinstance(base_url, str):
        raise InvalidJob("base_url", "must be a URL string")
    owner = options.get("owner")
    if owner is not None and not (isinstance(owner, str) and _OWNER.fullmatch(owner)):
        raise InvalidJob("owner", "must be a gateway key's name (letters, digits, _ . -)")
    notify = options.get("notify")
    if notify is not None and not isinstance(notify, bool):
        raise InvalidJob("notify", "must be true or false")
    return {"upstream": upstream, "store_result": store, "result_ttl": ttl, "queue": queue,
            "base_url": base_url, "owner": owner, "notify": notify or None}
