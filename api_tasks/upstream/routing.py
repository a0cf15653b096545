"""Which upstream a job goes to, and the exact request it sends there."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from api_tasks.errors import InvalidJob, UnknownModel
from api_tasks.spec import JobSpec, Kind
from api_tasks.upstream.http_client import CallRequest
from api_tasks.upstream.job_urls import AddressGuard, check_job_url
from api_tasks.upstream.merge import merge_payload

if TYPE_CHECKING:
    from config.settings import Deployment, Settings, Upstream

__all__ = ["build_call", "build_payload", "resolve_upstream"]

# only these streams take stream_options.include_usage (a responses stream ends with its usage)
_USAGE_OPTION = frozenset({Kind.CHAT, Kind.COMPLETION})


def resolve_upstream(settings: Settings, spec: JobSpec) -> Upstream:
    """The job's upstream (by name, else by model), its ``base_url`` checked against it."""
    upstream = _pick_upstream(settings, spec)
    if spec.base_url is not None:
        check_job_url(tuple(upstream.job_base_url_hosts), upstream.name, spec.base_url)
    return upstream


def _pick_upstream(settings: Settings, spec: JobSpec) -> Upstream:
    path = spec.endpoint.path
    if spec.upstream is not None:
        upstream = settings.upstream(spec.upstream)
        if upstream is None:
            names = ", ".join(u.name for u in settings.upstreams)
            raise InvalidJob("upstream", f"unknown upstream {spec.upstream!r} "
                                         f"(configured: {names})")
        if path not in upstream.endpoints:
            raise InvalidJob("upstream", f"upstream {upstream.name!r} does not serve {path} "
                                         "(its endpoints setting)")
        return upstream
    upstream = settings.upstream_for_model(spec.model, path)
    if upstream is None:
        if settings.upstream_for_model(spec.model) is not None:
            raise InvalidJob("model", f"no configured upstream serves {path} for model "
                                      f"{spec.model!r} (upstreams' endpoints setting)")
        raise UnknownModel(str(spec.model))
    return upstream


def build_payload(settings: Settings, upstream: Upstream, spec: JobSpec) -> dict[str, Any]:
    """Global < upstream < model defaults < the job's own fields (``merge_payload``); the
    global and upstream layers give embeddings and responses jobs only fields they take."""
    body = spec.body
    if "model" not in body and upstream.default_model:
        body = {**body, "model": upstream.default_model}
    model = body.get("model")
    general, own = settings.defaults, upstream.defaults
    taken = spec.endpoint.defaults
    if taken is not None:  # the general layers give only the fields its endpoint takes
        general = {k: v for k, v in general.items() if k in taken}
        own = {k: v for k, v in own.items() if k in taken}
    payload = merge_payload(general, own,
                            upstream.model_layer(model if isinstance(model, str) else None),
                            body)
    if spec.stream and spec.kind in _USAGE_OPTION and upstream.stream_include_usage \
            and "stream_options" not in spec.body:
        # usage arrives only if asked for; rate limits and results need it
        payload["stream_options"] = {"include_usage": True}
    return payload


def build_call(settings: Settings, upstream: Upstream, spec: JobSpec,
               payload: dict[str, Any] | None = None,
               deployment: Deployment | None = None) -> CallRequest:
    """The HTTP request for this job to ``deployment`` of its upstream (its first, if not
    named), with the key from the worker's settings."""
    server = deployment or upstream.targets()[0]
    headers = {"Content-Type": "application/json", "Accept":
               "text/event-stream" if spec.stream else "application/json", **upstream.headers,
               **server.headers}
    secrets: tuple[str, ...] = ()
    if server.api_key is not None:
        key = server.api_key.get_secret_value()
        headers["Authorization"] = f"Bearer {key}"
        secrets = (key,)
    if payload is None:
        payload = build_payload(settings, upstream, spec)
    body = json.dumps(payload, separators=(",", ":"))
    base, guard = server.base_url, None
    if spec.base_url is not None:  # the URL rebuilt from its checked parts, never the raw one
        entries = tuple(upstream.job_base_url_hosts)
        base = check_job_url(entries, upstream.name, spec.base_url).url
        guard = AddressGuard(entries)
    return CallRequest(
        url=base + spec.endpoint.path,
        headers=headers,
        body=body.encode(),
        connect_timeout=upstream.timeouts.connect,
        read_timeout=upstream.timeouts.read,
        max_response_bytes=upstream.max_response_bytes,
        secrets=secrets,
        guard=guard,
    )
