"""Build the one ``Settings`` object from files and environment variables.

This is the only place that reads ``os.environ``; everything else gets the
settings object passed down. A bad value raises ``ConfigError`` naming the key
and the file (or variable) it came from.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr, ValidationError

from config.errors import ConfigError
from config.settings import Settings

__all__ = ["DEFAULTS_FILE", "ENV_OVERRIDES", "load_settings"]

DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")
ZERO_CONFIG_BASE_URL = "http://127.0.0.1:20009"

Origins = dict[tuple[str | int, ...], str]


# variable -> (key path, converter); the converters stay loose because the
# typed model validates the result and names the variable on failure.
ENV_OVERRIDES: dict[str, tuple[tuple[str, ...], Callable[[str], Any]]] = {
    "REDIS_URL": (("redis", "url"), str),
    "REDIS_STATE_URL": (("redis", "state_url"), str),
    "API_TASKS_PREFIX": (("redis", "prefix"), str),
    "API_TASKS_REDIS_SHARDS": (("redis", "shards"), str),
    "API_TASKS_RESULT_TTL": (("jobs", "result_ttl"), str),
    "API_TASKS_POOL": (("worker", "pool"), str),
    "API_TASKS_CONCURRENCY": (("worker", "concurrency"), str),
    "API_TASKS_SHUTDOWN_GRACE": (("worker", "shutdown_grace"), str),
    "API_TASKS_LOG_LEVEL": (("worker", "log_level"), str.upper),
    "API_TASKS_LOG_FORMAT": (("worker", "log_format"), str.lower),
    "API_TASKS_METRICS_PORT": (("worker", "metrics_port"), lambda v: None if v.lower() in (
        "", "off", "none") else v),
    "API_TASKS_GATEWAY_HOST": (("gateway", "host"), str),
    "API_TASKS_GATEWAY_PORT": (("gateway", "port"), str),
}
ENDPOINTS_ENV = "OPENAI_ENDPOINTS"  # the zero-config upstream's endpoints, comma-separated
GATEWAY_KEY_ENV = "API_TASKS_GATEWAY_KEY"  # alone, it defines one gateway key named default
GATEWAY_SECRET_ENV = "API_TASKS_GATEWAY_TOKEN_SECRET"  # signs the gateway's stream tokens


def load_settings(
    env: Mapping[str, str] | None = None, path: str | Path | None = None
) -> Settings:
    """Read, merge and validate every settings source, once."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    origins: Origins = {}
    _lay(data, _read_yaml(DEFAULTS_FILE), str(DEFAULTS_FILE), origins, ())
    chosen = path or env.get("API_TASKS_CONFIG")
    if chosen:
        _lay(data, _read_yaml(Path(chosen)), str(chosen), origins, ())
    _lay_env(data, env, origins)
    if env.get(GATEWAY_KEY_ENV) and not (data.get("gateway") or {}).get("keys"):
        data.setdefault("gateway", {})["keys"] = [{"name": "default", "key_env": GATEWAY_KEY_ENV}]
        origins[("gateway", "keys")] = f"environment variable {GATEWAY_KEY_ENV}"
    if not data.get("upstreams"):
        data["upstreams"] = [_zero_config_upstream(env)]
        origins[("upstreams",)] = "OPENAI_BASE_URL"
    return _validate(data, origins, env)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read settings file {path}: {err.strerror}") from err
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return loaded


def _lay(target: dict[str, Any], layer: dict[str, Any], origin: str, origins: Origins,
         prefix: tuple[str | int, ...]) -> None:
    """Merge ``layer`` into ``target`` (mappings recursively, anything else replaced)."""
    for key, value in layer.items():
        path = (*prefix, key)
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _lay(target[key], value, origin, origins, path)
        else:
            target[key] = value
            origins[path] = origin


def _lay_env(data: dict[str, Any], env: Mapping[str, str], origins: Origins) -> None:
    for name, (path, convert) in ENV_OVERRIDES.items():
        if name in env:
            node = data
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = convert(env[name])
            origins[path] = f"environment variable {name}"


def _zero_config_upstream(env: Mapping[str, str]) -> dict[str, Any]:
    upstream: dict[str, Any] = {
        "name": "default",
        "base_url": env.get("OPENAI_BASE_URL") or ZERO_CONFIG_BASE_URL,
        "models": ["*"],
    }
    if env.get("OPENAI_API_KEY"):
        upstream["api_key_env"] = "OPENAI_API_KEY"
    if env.get(ENDPOINTS_ENV):  # e.g. to add /v1/responses, which the default leaves out
        upstream["endpoints"] = [p.strip() for p in env[ENDPOINTS_ENV].split(",") if p.strip()]
    return upstream


def _validate(data: dict[str, Any], origins: Origins, env: Mapping[str, str]) -> Settings:
    try:
        settings = Settings.model_validate(data)
    except ValidationError as err:  # not chained: its input values may hold a password
        raise ConfigError(_describe(err, origins)) from None
    keyed = [_with_key(upstream, index, env, origins)
             for index, upstream in enumerate(settings.upstreams)]
    gateway_keys = []
    for key in settings.gateway.keys:
        if key.key_env is not None:
            # a worker reads the keys for their limits only: a missing key stops a gateway
            # (GatewaySettings.missing_keys), not every process sharing the settings file
            value = env.get(key.key_env)
            if value:
                key = key.model_copy(update={"key": SecretStr(value)})
        if key.webhooks:  # the workers sign with these (Settings.missing_keys)
            key = key.model_copy(update={"webhooks": [
                hook.model_copy(update={"secret": SecretStr(env[hook.secret_env])})
                if env.get(hook.secret_env) else hook for hook in key.webhooks]})
        gateway_keys.append(key)
    secret = env.get(GATEWAY_SECRET_ENV)
    gateway = settings.gateway.model_copy(update={
        "keys": gateway_keys,
        "token_secret": SecretStr(secret) if secret else settings.gateway.token_secret})
    return settings.model_copy(update={"upstreams": keyed, "gateway": gateway})


def _with_key(upstream: Any, index: int, env: Mapping[str, str], origins: Origins) -> Any:
    """Attach the API keys read from the environment or a secrets file (never from a job)."""
    update: dict[str, Any] = {"api_key": _key(upstream, ("upstreams", index), env, origins)}
    if upstream.deployments is not None:
        update["deployments"] = [
            deployment.model_copy(update={"api_key": _key(
                deployment, ("upstreams", index, "deployments", at), env, origins)})
            for at, deployment in enumerate(upstream.deployments)]
    return upstream.model_copy(update=update)


def _key(server: Any, loc: tuple[str | int, ...], env: Mapping[str, str],
         origins: Origins) -> SecretStr | None:
    key: str | None = None
    if server.api_key_file is not None:
        try:
            key = server.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as err:
            where = _origin(origins, (*loc, "api_key_file"))
            raise ConfigError(
                f"{_dotted((*loc, 'api_key_file'))} ({where}): cannot read "
                f"{server.api_key_file}: {err.strerror}"
            ) from err
    elif server.api_key_env:
        key = env.get(server.api_key_env) or None
    return SecretStr(key) if key else None


def _describe(err: ValidationError, origins: Origins) -> str:
    lines = []
    for problem in err.errors():
        loc = tuple(problem["loc"])
        lines.append(f"{_dotted(loc)} ({_origin(origins, loc)}): {problem['msg']}")
    return "invalid settings: " + "; ".join(lines)


def _dotted(loc: tuple[str | int, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "settings"


def _origin(origins: Origins, loc: tuple[str | int, ...]) -> str:
    for end in range(len(loc), 0, -1):
        if loc[:end] in origins:
            return origins[loc[:end]]
    return "defaults"
