"""The typed settings object: built once at start-up, then passed down.

Sources, each laid over the one before: the shipped ``config/defaults.yaml``,
the file named by ``API_TASKS_CONFIG`` (if any), then a few environment
variables (see ``ENV_OVERRIDES``). With no upstream configured anywhere,
``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` define one (zero-config).
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from config.allow_list import allow_list
from config.cluster_url import CLUSTER_SCHEMES, ClusterURL, parse_cluster_url
from config.sentinel_url import SentinelURL, parse_sentinel_url

__all__ = [
    "Breaker",
    "Deployment",
    "GatewayKey",
    "GatewaySettings",
    "JobSettings",
    "Limits",
    "RedisSettings",
    "RetrySettings",
    "Settings",
    "Timeouts",
    "Upstream",
    "WorkerSettings",
]

MAX_TTL = 365 * 86400  # Redis refuses absurd expiries, halfway through a script
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
Payload = dict[str, Any]
Queue = Literal["interactive", "bulk"]
QUEUES: tuple[Queue, ...] = ("interactive", "bulk")
# the OpenAI endpoints jobs call (api_tasks.spec.ENDPOINTS; config stays free of api_tasks)
EndpointPath = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                       "/v1/responses"]
# the Responses API is newer than the rest: many OpenAI-format servers lack it
DEFAULT_ENDPOINTS: tuple[EndpointPath, ...] = ("/v1/chat/completions", "/v1/completions",
                                               "/v1/embeddings")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Model):
    """Seconds allowed to connect, between two reads, and for a whole call."""

    connect: float = Field(10.0, gt=0)
    read: float = Field(600.0, gt=0)
    total: float = Field(1800.0, gt=0)

    @model_validator(mode="after")
    def _total_covers_parts(self) -> Timeouts:
        if self.total < self.connect:
            raise ValueError("total must be at least connect")
        return self


class RetrySettings(_Model):
    """How often and how patiently a failed call is tried again."""

    max_attempts: int = Field(3, ge=1, le=20)
    initial_delay: float = Field(0.5, ge=0)
    max_delay: float = Field(8.0, ge=0)
    jitter: float = Field(0.25, ge=0, le=1)
    max_retry_after: float = Field(60.0, ge=0)
    # a 429 (rate limited, not out of quota) costs no attempt for this long after the job was
    # submitted: it waits for the upstream (outside the worker when long) instead of failing
    rate_limited_for: float = Field(3600.0, ge=0)


class Limits(_Model):
    """Cluster-wide limits on calls to one upstream (or to the models matching a glob)."""

    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    max_in_flight: int | None = Field(None, ge=1)
    # 0.98 x (10 s + 0.2 s) < 10 s: any 10 seconds stay within the limit, even after a lull
    burst_seconds: float = Field(0.2, gt=0, le=60)
    utilization: float = Field(0.98, gt=0, le=1)
    # how a call counts against tokens_per_minute: "arrival" as OpenAI and Azure count (its
    # prompt plus its max_tokens ceiling when it arrives, nothing given back, an overrun still
    # charged), or "usage" (settled down to the usage reported: for limits you set yourself)
    accounting: Literal["arrival", "usage"] = "arrival"
    # ``limits: auto``: requests and tokens per minute learnt, per model, from the limits the
    # upstream reports in its x-ratelimit-limit-* headers instead of set here
    auto: bool = False

    @model_validator(mode="before")
    @classmethod
    def _auto_shorthand(cls, value: Any) -> Any:
        return {"auto": True} if value == "auto" else value

    @model_validator(mode="after")
    def _auto_sets_no_rates(self) -> Limits:
        if self.auto and (self.requests_per_minute or self.tokens_per_minute):
            raise ValueError("auto learns requests_per_minute and tokens_per_minute from the "
                             "upstream's headers: leave them out")
        return self

    @property
    def active(self) -> bool:
        """Whether any limit is set."""
        return bool(self.requests_per_minute or self.tokens_per_minute or self.max_in_flight
                    or self.auto)

    @property
    def counts_tokens(self) -> bool:
        """Whether calls under it reserve their tokens (a tokens limit, set or learnt)."""
        return bool(self.tokens_per_minute or self.auto)

    def scope(self, name: str, model: str | None) -> str:
        """The scope these limits keep their state under: learnt limits are per model, as
        providers count them."""
        return f"{name}/{model}" if self.auto and model else name


def _base_url(value: str) -> str:
    # Users write the base both ways (".../v1" as the OpenAI SDK does, or
    # the bare host); the client always appends "/v1/...", so strip it.
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query or fragment")
    if parts.username or parts.password:  # shown by status and logs: keys have their place
        raise ValueError("must not carry credentials: use api_key_env or api_key_file")
    url = value.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _headers(value: dict[str, str]) -> dict[str, str]:
    banned = {"authorization", "api-key", "x-api-key"}
    if banned & {name.lower() for name in value}:
        raise ValueError("keys go in api_key_env or api_key_file, not in headers")
    return value


def _check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError("use letters, digits, '.', '_' or '-' (at most 64)")
    return value


Name = Annotated[str, AfterValidator(_check_name)]
BaseUrl = Annotated[str, AfterValidator(_base_url)]
Headers = Annotated[dict[str, str], AfterValidator(_headers)]


class Breaker(_Model):
    """When a deployment is skipped: ``failures`` failed calls (no answer, a timeout, a 5xx)
    within ``window`` seconds open it for ``cooldown`` seconds; then one call probes it."""

    failures: int = Field(5, ge=1, le=1000)
    window: float = Field(30.0, gt=0, le=3600)
    cooldown: float = Field(30.0, gt=0, le=3600)


class Deployment(_Model):
    """One server of a model group: its own address, key, limits and share of the calls."""

    name: Name
    base_url: BaseUrl
    api_key_env: str | None = None
    api_key_file: Path | None = None
    api_key: SecretStr | None = Field(None, exclude=True)
    headers: Headers = Field(default_factory=dict)
    weight: float = Field(1.0, gt=0)
    limits: Limits = Limits()  # this deployment's own, on top of its group's


class Upstream(_Model):
    """A model group: one OpenAI-format server or several deployments, and what it serves."""

    name: Name
    base_url: BaseUrl | None = None  # one server; or deployments, several
    deployments: list[Deployment] | None = None
    breaker: Breaker = Breaker()
    api_key_env: str | None = None
    api_key_file: Path | None = None
    api_key: SecretStr | None = Field(None, exclude=True)
    models: list[str] = Field(default_factory=lambda: ["*"])
    default_model: str | None = None
    endpoints: list[EndpointPath] = Field(default_factory=lambda: list(DEFAULT_ENDPOINTS),
                                          min_length=1)
    timeouts: Timeouts = Timeouts()
    retry: RetrySettings = RetrySettings()
    defaults: Payload = Field(default_factory=dict)
    model_defaults: dict[str, Payload] = Field(default_factory=dict)
    headers: Headers = Field(default_factory=dict)  # sent to each deployment, under its own
    stream_include_usage: bool = True
    # follow the x-ratelimit-remaining-* headers: pace no faster than the upstream has left
    follow_rate_headers: bool = True
    tokenizer: str = Field("auto", min_length=1)  # auto, estimate, or a tiktoken encoding
    job_base_url_hosts: list[str] = Field(default_factory=list)
    limits: Limits = Limits()
    model_limits: dict[str, Limits] = Field(default_factory=dict)
    max_response_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_line_bytes: int = Field(4 * 1024 * 1024, ge=1024)

    @field_validator("tokenizer")
    @classmethod
    def _check_tokenizer(cls, value: str) -> str:
        if value in ("auto", "estimate"):
            return value
        from config.tokenizers import offline_encodings, on_disk  # tiktoken: only when named

        if on_disk(value) is None:
            have = ", ".join(sorted(offline_encodings())) or \
                "none (pip install 'api-tasks[tokenizer]')"
            raise ValueError(f"{value!r} is not an encoding on disk; use auto, estimate or one "
                             f"of: {have}")
        return value

    @field_validator("job_base_url_hosts")
    @classmethod
    def _check_job_hosts(cls, value: list[str]) -> list[str]:
        if value:
            allow_list(tuple(value))
        return value

    @model_validator(mode="after")
    def _one_server_or_several(self) -> Upstream:
        if (self.base_url is None) == (self.deployments is None):
            raise ValueError("give base_url (one server) or deployments (several), one of the "
                             "two")
        if self.deployments is not None:
            if not self.deployments:
                raise ValueError("deployments: list at least one deployment")
            names = [d.name for d in self.deployments]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"deployments: names must be unique: {', '.join(twice)}")
            if self.job_base_url_hosts:
                raise ValueError("job_base_url_hosts: not with deployments (a job's base_url "
                                 "names one server)")
            if self.api_key_env or self.api_key_file:
                raise ValueError("api_key_env/api_key_file: with deployments, each deployment "
                                 "names its own key")
        return self

    def serves(self, model: str) -> bool:
        """Whether a model name matches one of this upstream's globs."""
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def model_layer(self, model: str | None) -> Payload:
        """The model_defaults layers whose glob matches, in file order, merged."""
        if model is None:
            return {}
        layer: Payload = {}
        for pattern, values in self.model_defaults.items():
            if fnmatch.fnmatchcase(model, pattern):
                layer.update(values)
        return layer

    def targets(self) -> list[Deployment]:
        """The servers calls go to: its deployments, or itself as its one deployment."""
        if self.deployments is not None:
            return self.deployments
        assert self.base_url is not None  # one of the two, checked at load
        return [Deployment.model_construct(
            name=self.name, base_url=self.base_url, api_key_env=self.api_key_env,
            api_key_file=self.api_key_file, api_key=self.api_key, headers={}, weight=1.0,
            limits=Limits())]

    def call_scopes(self, deployment: Deployment, model: str | None
                    ) -> list[tuple[str, Limits]]:
        """The limit scopes a call to ``deployment`` counts against: the group's, its own."""
        limits = deployment.limits
        own = [(limits.scope(deployment.name, model), limits)] if limits.active else []
        return [*self.limit_scopes(model), *own]

    def reported_scopes(self, deployment: Deployment, model: str | None
                        ) -> list[tuple[str, Limits]]:
        """The scopes a deployment's rate-limit headers speak for (its key's)."""
        if deployment.name == self.name:  # the upstream is its one deployment
            return self.limit_scopes(model)
        limits = deployment.limits
        return [(limits.scope(deployment.name, model), limits)] if limits.active else []

    def limit_scopes(self, model: str | None) -> list[tuple[str, Limits]]:
        """(scope name, limits) that apply to a call for ``model``, upstream first."""
        scopes = [(self.limits.scope(self.name, model), self.limits)] if self.limits.active \
            else []
        for pattern, limits in self.model_limits.items():
            if model is not None and limits.active and fnmatch.fnmatchcase(model, pattern):
                scopes.append((f"{self.name}/{pattern}", limits))
        return scopes

    def named_scopes(self) -> list[tuple[str, Limits]]:
        """Every limit scope these settings name, with its limits (not the per-model ones
        ``auto`` learns)."""
        scopes = [(self.name, self.limits)] if self.limits.active and not self.limits.auto \
            else []
        scopes += [(f"{self.name}/{pattern}", limits)
                   for pattern, limits in self.model_limits.items() if limits.active]
        return scopes + [(d.name, d.limits) for d in self.deployments or ()
                         if d.limits.active and not d.limits.auto]

    def longest_call(self) -> float:
        """An upper bound on one job's time here: every attempt and every wait."""
        retry = self.retry
        waits = (retry.max_attempts - 1) * max(retry.max_delay, retry.max_retry_after)
        return retry.max_attempts * self.timeouts.total + waits


class RedisSettings(_Model):
    """Where Redis is and how our keys are named."""

    url: str = "redis://127.0.0.1:6379/0"
    # the project's state (records, results, streams, leases, limits, batches) on a Redis of
    # its own; the Celery broker (queues, unacked messages) stays on ``url``
    state_url: str | None = None
    prefix: str = "api_tasks"
    # job shards: a job's keys (and its batch's) carry the hash tag of one, so that on a Redis
    # Cluster each job's scripts run on one slot while the shards spread over the nodes; set
    # it once (a few per primary), as changing it strands the jobs in flight
    shards: int = Field(1, ge=1, le=1024)
    socket_connect_timeout: float = Field(5.0, gt=0)
    health_check_interval: int = Field(15, ge=0)

    @field_validator("url", "state_url")
    @classmethod
    def _check_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        scheme = urlsplit(value).scheme
        if scheme == "sentinel":
            parse_sentinel_url(value)
        elif scheme in CLUSTER_SCHEMES:
            if info.field_name == "url":  # kombu's Redis transport has no cluster client
                raise ValueError("the Celery broker cannot be a Redis Cluster: give the "
                                 "cluster as state_url and a plain Redis as url")
            parse_cluster_url(value)
        elif scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss://, unix:// or sentinel:// "
                             "(state_url also redis+cluster:// or rediss+cluster://)")
        return value

    @property
    def sentinel(self) -> SentinelURL | None:
        """The Sentinels to ask for the primary, when the URL names them."""
        return parse_sentinel_url(self.url) if urlsplit(self.url).scheme == "sentinel" else None

    @field_validator("shards")
    @classmethod
    def _check_shards(cls, value: int, info: ValidationInfo) -> int:
        state = info.data.get("state_url")  # checked before: a field above this one
        if value < 2 and state and urlsplit(state).scheme in CLUSTER_SCHEMES:
            raise ValueError("a Redis Cluster (state_url) holds the state over job shards: "
                             "set a few per primary")
        return value

    @property
    def cluster(self) -> ClusterURL | None:
        """The Redis Cluster's nodes, when the URL names one (only the state's may)."""
        return parse_cluster_url(self.url) if urlsplit(self.url).scheme in CLUSTER_SCHEMES \
            else None

    @property
    def split(self) -> bool:
        """Whether the state lives on another Redis than the broker."""
        return self.state_url is not None and self.state_url != self.url

    def state(self) -> RedisSettings:
        """These settings for the Redis that holds the project's state."""
        return self.model_copy(update={"url": self.state_url, "state_url": None}) \
            if self.split else self

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use letters, digits, '.', '_' or '-'")
        return value


class JobSettings(_Model):
    """Lifetimes and size limits of jobs."""

    result_ttl: int = Field(86400, ge=1, le=MAX_TTL)
    queued_ttl: int = Field(7 * 86400, ge=60, le=MAX_TTL)
    default_queue: Literal["interactive", "bulk"] = "interactive"
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_crashes: int = Field(3, ge=1, le=100)
    # a detached batch's job still queued this long is sent again, then after twice as long...:
    # a message lost by a worker killed mid-fetch is run once, a duplicate is dropped
    batch_resend_after: float = Field(120.0, ge=1.0)
    # what one job's event stream may hold in Redis; past either the job fails
    # (stream_too_large): a runaway upstream cannot fill Redis
    max_stream_events: int = Field(100_000, ge=10)
    max_stream_bytes: int = Field(32 * 1024 * 1024, ge=65536)


class WorkerSettings(_Model):
    """How a worker process runs its jobs."""

    pool: Literal["threads", "gevent"] = "threads"
    concurrency: int = Field(200, ge=1, le=10000)
    shutdown_grace: float = Field(30.0, ge=0)
    watchdog_interval: float = Field(0.2, gt=0, le=5)
    visibility_timeout: int | None = Field(None, ge=1)
    lease_ttl: float = Field(15.0, ge=1)
    reserve_ahead: float = Field(1.0, ge=0, le=30)
    reap_interval: float = Field(5.0, gt=0)
    # None: celery's own -l/--loglevel decides (INFO by default); set, it wins and says so
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] | None = None
    # json: one JSON object a line, each line about a job with its id, attempt, upstream,
    # deployment, model and queue (for log collectors); plain: for a terminal
    log_format: Literal["plain", "json"] = "plain"
    # Prometheus /metrics of this worker process (0: any free port, said in its liveness
    # record; None: off); several processes on one machine each need their own port
    metrics_port: int | None = Field(9464, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _metrics_off(cls, value: Any) -> Any:
        # YAML reads a bare off as False, which would otherwise pass as port 0
        return None if value is False or value in ("off", "none", "") else value

    @model_validator(mode="after")
    def _renewals_fit_in_a_lease(self) -> WorkerSettings:
        if self.watchdog_interval * 3 > self.lease_ttl:
            raise ValueError("watchdog_interval must be at most a third of lease_ttl, or "
                             "leases lapse between renewals and live jobs run twice")
        return self


WebhookEvent = Literal["batch.completed", "batch.failed", "batch.expired", "batch.cancelled",
                       "job.succeeded", "job.failed", "job.cancelled"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = ("batch.completed", "batch.failed", "batch.expired",
                                            "batch.cancelled", "job.succeeded", "job.failed",
                                            "job.cancelled")


class WebhookEndpoint(_Model):
    """Where a gateway key's events are sent, signed with a secret of its own."""

    url: str
    secret_env: str  # the environment variable holding the secret ("whsec_..." or raw)
    events: list[WebhookEvent] = Field(default_factory=lambda: list(WEBHOOK_EVENTS))
    secret: SecretStr | None = Field(None, exclude=True)  # read from secret_env at load

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username or parts.password or parts.fragment:
            raise ValueError("must not carry credentials or a fragment")
        return value.strip()


class WebhookSettings(_Model):
    """How the workers deliver webhooks (every one at least once)."""

    retry_for: int = Field(86400, ge=1, le=7 * 86400)  # seconds a failing delivery is retried
    initial_delay: float = Field(5.0, gt=0, le=3600)  # before the first retry, then doubling
    max_delay: float = Field(3600.0, gt=0, le=86400)  # between two retries at most
    timeout: float = Field(10.0, gt=0, le=60)  # to connect, and for each read of the answer
    # receivers on non-public addresses (loopback, private networks), as job_base_url_hosts;
    # any other address is refused, whatever a receiver's DNS name resolves to
    private_hosts: list[str] = Field(default_factory=list)

    @field_validator("private_hosts")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        if value:
            allow_list(tuple(value))
        return value


class GatewayKey(_Model):
    """One API key of the HTTP gateway: whose it is and what it may use."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    key_env: str | None = None  # the key itself, from this environment variable
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")  # or its SHA-256, hex
    key: SecretStr | None = Field(None, exclude=True)  # read from key_env at load
    models: list[str] = Field(default_factory=lambda: ["*"])  # globs of models it may use
    queues: list[Queue] = Field(default_factory=lambda: list(QUEUES))
    # its own cluster-wide limits, on top of the upstream's (scope ``key:<name>``)
    limits: Limits = Limits()
    webhooks: list[WebhookEndpoint] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_source(self) -> GatewayKey:
        if (self.key_env is None) == (self.key_sha256 is None):
            raise ValueError("give the key as key_env or as key_sha256, one of the two")
        return self

    def sha256(self) -> str | None:
        """The key's SHA-256 (hex), what a presented key is compared against."""
        if self.key_sha256 is not None:
            return self.key_sha256
        return None if self.key is None else hashlib.sha256(
            self.key.get_secret_value().encode()).hexdigest()

    def may_use(self, model: str | None, queue: str) -> str | None:
        """Why this key may not submit that job (the field at fault), or None."""
        if model is not None and not any(fnmatch.fnmatchcase(model, g) for g in self.models):
            return "model"
        return None if queue in self.queues else "queue"


class GatewaySettings(_Model):
    """The HTTP gateway (``python -m api_tasks gateway``)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    keys: list[GatewayKey] = Field(default_factory=list)  # none: loopback only, no auth
    cancel_on_disconnect: bool = True  # a client gone from a synchronous call cancels its job
    idempotency_ttl: int = Field(86400, ge=60, le=MAX_TTL)
    stream_token_ttl: int = Field(3600, ge=10, le=86400)
    keepalive: float = Field(15.0, gt=0, le=300)  # seconds between comments on an idle stream
    # seconds a streamed call's answer waits for its first chunk (an error before it is then
    # the status); past it, 200 and keep-alives, so no proxy idle timeout cuts a queued call
    stream_hold: float = Field(30.0, ge=0, le=3600)
    batch_window: int = Field(200, ge=1, le=1000)  # jobs of one API batch queued or running
    # seconds before an API batch expires (OpenAI's "24h"; shorter only for tests)
    batch_lifetime: int = Field(86400, ge=1, le=86400)
    # signs stream tokens; from API_TASKS_GATEWAY_TOKEN_SECRET, else one shared through Redis
    token_secret: SecretStr | None = Field(None, exclude=True)

    @field_validator("keys")
    @classmethod
    def _unique_key_names(cls, value: list[GatewayKey]) -> list[GatewayKey]:
        names = [key.name for key in value]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"gateway key names must be unique: {', '.join(duplicates)}")
        return value

    def missing_keys(self) -> list[str]:
        """What stops a gateway from starting: keys whose environment variable is unset."""
        return [f"gateway.keys[{index}].key_env: the environment variable {key.key_env} "
                "is not set" for index, key in enumerate(self.keys)
                if key.key_env is not None and key.key is None]

    def key_limits(self, name: str | None) -> list[tuple[str, Limits]]:
        """The limit scope of the gateway key ``name``, if it has limits."""
        return [(scope, key.limits) for scope, key in self._key_scopes() if key.name == name]

    def named_scopes(self) -> list[tuple[str, Limits]]:
        """The limit scopes of the keys that have limits, with their limits."""
        return [(scope, key.limits) for scope, key in self._key_scopes()]

    def _key_scopes(self) -> list[tuple[str, GatewayKey]]:
        return [(f"key:{key.name}", key) for key in self.keys if key.limits.active]


def _loop(fallbacks: dict[str, list[str]], model: str, path: list[str]) -> list[str]:
    """A path of fallbacks from ``model`` back to a model already on ``path`` ([] if none)."""
    if model in path:
        return [*path, model]
    for other in fallbacks.get(model, ()):
        found = _loop(fallbacks, other, [*path, model])
        if found:
            return found
    return []


FILE_TTL_RANGE = (3600, 30 * 86400)  # OpenAI's bounds on a file's expires_after.seconds


class FileSettings(_Model):
    """Files uploaded through the gateway's Files API (bytes kept in Redis)."""

    max_bytes: int = Field(200 * 1024 * 1024, ge=1, le=2**31)  # OpenAI's batch input cap
    max_lines: int = Field(50_000, ge=1, le=1_000_000)  # requests in one batch input file
    # how long a file lives when its upload names no expires_after (OpenAI: 30 days)
    default_ttl: int = Field(FILE_TTL_RANGE[1], ge=FILE_TTL_RANGE[0], le=FILE_TTL_RANGE[1])


class Settings(_Model):
    """Everything the producer, the worker and the gateway need, validated."""

    defaults: Payload = Field(default_factory=dict)
    redis: RedisSettings = RedisSettings()
    jobs: JobSettings = JobSettings()
    worker: WorkerSettings = WorkerSettings()
    gateway: GatewaySettings = GatewaySettings()
    files: FileSettings = FileSettings()
    webhooks: WebhookSettings = WebhookSettings()
    upstreams: list[Upstream] = Field(min_length=1)
    # opt-in: a model whose deployments all failed a call moves it to these models, in order
    fallbacks: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("upstreams")
    @classmethod
    def _unique_names(cls, value: list[Upstream]) -> list[Upstream]:
        names = [upstream.name for upstream in value]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"upstream names must be unique: {', '.join(duplicates)}")
        groups = set(names)
        for i, upstream in enumerate(value):  # limits, cool-downs, breakers are kept by name
            for j, deployment in enumerate(upstream.deployments or ()):
                if deployment.name in groups:
                    raise ValueError(f"upstreams[{i}].deployments[{j}].name: {deployment.name!r}"
                                     " is also an upstream's name")
                if deployment.name in names:
                    raise ValueError(f"upstreams[{i}].deployments[{j}].name: {deployment.name!r}"
                                     " is already the name of another deployment")
                names.append(deployment.name)
        return value

    @model_validator(mode="after")
    def _fallbacks_reach_models(self) -> Settings:
        for model, others in self.fallbacks.items():
            for other in others:
                if self.upstream_for_model(other) is None:
                    raise ValueError(f"fallbacks.{model}: no upstream serves {other!r}")
            path = _loop(self.fallbacks, model, [])
            if path:
                raise ValueError(f"fallbacks.{model}: falls back in a loop "
                                 f"({' -> '.join(path)})")
        return self

    @model_validator(mode="after")
    def _visibility_covers_jobs(self) -> Settings:
        timeout = self.worker.visibility_timeout
        if timeout is not None and timeout <= self.longest_job():
            raise ValueError(
                f"worker.visibility_timeout ({timeout}s) must exceed the longest job "
                f"({self.longest_job():.0f}s), or jobs run twice"
            )
        return self

    def upstream(self, name: str) -> Upstream | None:
        """The upstream of that name, if configured."""
        return next((u for u in self.upstreams if u.name == name), None)

    def upstream_for_model(self, model: str | None, endpoint: str | None = None
                           ) -> Upstream | None:
        """The first upstream, in file order, that serves this model (at this endpoint)."""
        return next((u for u in self.upstreams if (model is None or u.serves(model))
                     and (endpoint is None or endpoint in u.endpoints)), None)

    def fallback_chain(self, model: str | None) -> list[str | None]:
        """The job's model, then the models it may fall back to, in order (``fallbacks``,
        followed through: loops are refused at load)."""
        chain: list[str | None] = [model]
        for name in chain:
            for other in self.fallbacks.get(name or "", ()):
                if other not in chain:
                    chain.append(other)
        return chain

    def missing_keys(self) -> list[str]:
        """Problems with upstream keys a worker needs: a named variable that is unset."""
        return [f"upstreams[{i}].api_key_env: the environment variable {u.api_key_env} is not set"
                for i, u in enumerate(self.upstreams) if u.api_key_env and u.api_key is None] + [
            f"upstreams[{i}].deployments[{j}].api_key_env: the environment variable "
            f"{d.api_key_env} is not set"
            for i, u in enumerate(self.upstreams) for j, d in enumerate(u.deployments or ())
            if d.api_key_env and d.api_key is None] + [
            f"gateway.keys[{k}].webhooks[{w}].secret_env: the environment variable "
            f"{hook.secret_env} is not set"
            for k, key in enumerate(self.gateway.keys)
            for w, hook in enumerate(key.webhooks) if hook.secret is None]

    def webhooks_for(self, owner: str, event: str) -> list[int]:
        """The indexes of gateway key ``owner``'s webhook endpoints that take ``event``."""
        for key in self.gateway.keys:
            if key.name == owner:
                return [i for i, hook in enumerate(key.webhooks) if event in hook.events]
        return []

    def webhook(self, owner: str, index: int) -> WebhookEndpoint | None:
        """Gateway key ``owner``'s webhook endpoint ``index``, if it is still configured."""
        for key in self.gateway.keys:
            if key.name == owner and 0 <= index < len(key.webhooks):
                return key.webhooks[index]
        return None

    def longest_job(self) -> float:
        """Seconds the slowest configured job may take, all attempts included."""
        return max(upstream.longest_call() for upstream in self.upstreams)

    def max_message_bytes(self) -> int:
        """The largest task message a worker decodes: room for any job that passes submit.

        A job of ``max_request_bytes`` of UTF-8 JSON grows up to 3x as the message's
        ASCII-only JSON (an emoji's 4 bytes become a 12-byte surrogate pair escape), then
        4/3 as base64; 64 KiB more covers the headers.
        """
        return 4 * self.jobs.max_request_bytes + 65536

    def visibility_timeout(self) -> int:
        """The broker's visibility timeout: above the longest job, at least an hour."""
        if self.worker.visibility_timeout is not None:
            return self.worker.visibility_timeout
        return int(max(3600.0, self.longest_job() * 1.25 + 60))
