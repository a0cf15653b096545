"""Settings: layered sources, zero-config, validation naming the key and the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from config.errors import ConfigError
from config.loader import load_settings
from tests.support.services import ROOT


def _write(tmp_path: Path, data: object) -> str:
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_shipped_defaults_and_zero_config() -> None:
    settings = load_settings(env={})
    assert settings.defaults == {"max_tokens": 8096, "temperature": 0.1, "presence_penalty": 0.5,
                                 "frequency_penalty": 0.8, "top_p": 0.75}
    [upstream] = settings.upstreams
    assert upstream.name == "default" and upstream.base_url == "http://127.0.0.1:20009"
    assert upstream.api_key is None and settings.redis.url.startswith("redis://")


def test_zero_config_from_openai_variables() -> None:
    settings = load_settings(env={"OPENAI_BASE_URL": "https://api.example.com/v1/",
                                  "OPENAI_API_KEY": "sk-zero", "REDIS_URL": "redis://r:1/2"})
    [upstream] = settings.upstreams
    assert upstream.base_url == "https://api.example.com"
    assert upstream.api_key is not None and upstream.api_key.get_secret_value() == "sk-zero"
    assert settings.redis.url == "redis://r:1/2"
    assert upstream.endpoints == ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    wider = load_settings(env={"OPENAI_ENDPOINTS": "/v1/responses, /v1/embeddings"})
    assert wider.upstreams[0].endpoints == ["/v1/responses", "/v1/embeddings"]
    with pytest.raises(ConfigError, match="endpoints"):
        load_settings(env={"OPENAI_ENDPOINTS": "/v1/images"})


@pytest.mark.parametrize("url", ["http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/"])
def test_base_url_with_or_without_v1(tmp_path: Path, url: str) -> None:
    path = _write(tmp_path, {"upstreams": [{"name": "u", "base_url": url}]})
    assert load_settings(env={}, path=path).upstreams[0].base_url == "http://h:1"


def test_file_layers_over_defaults_and_env_over_file(tmp_path: Path) -> None:
    path = _write(tmp_path, {"defaults": {"temperature": 0.7, "top_p": None},
                             "jobs": {"result_ttl": 60},
                             "upstreams": [{"name": "a", "base_url": "http://a",
                                            "api_key_env": "A_KEY"}]})
    settings = load_settings(env={"API_TASKS_CONFIG": path, "API_TASKS_RESULT_TTL": "90",
                                  "A_KEY": "sk-a"})
    assert settings.defaults["temperature"] == 0.7 and settings.defaults["max_tokens"] == 8096
    assert settings.defaults["top_p"] is None  # a null layer removes it when merged
    assert settings.jobs.result_ttl == 90
    assert settings.upstreams[0].api_key is not None


def test_bad_value_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, {"upstreams": [{"name": "a", "base_url": "http://a",
                                            "timeouts": {"connect": -1}}]})
    with pytest.raises(ConfigError) as caught:
        load_settings(env={}, path=path)
    message = str(caught.value)
    assert "upstreams[0].timeouts.connect" in message and path in message


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"API_TASKS_CONCURRENCY": "many"})
    assert "worker.concurrency" in str(caught.value)
    assert "API_TASKS_CONCURRENCY" in str(caught.value)


@pytest.mark.parametrize(("data", "needle"), [
    ({"upstreams": [{"name": "a", "base_url": "ftp://a"}]}, "upstreams[0].base_url"),
    ({"upstreams": [{"name": "a", "base_url": "http://a", "colour": 1}]}, "upstreams[0].colour"),
    ({"upstreams": [{"name": "a", "base_url": "http://a"}, {"name": "a", "base_url": "http://b"}]},
     "unique"),
    ({"upstreams": [{"name": "a", "base_url": "http://a",
                     "headers": {"Authorization": "Bearer x"}}]}, "upstreams[0].headers"),
    ({"redis": {"url": "http://x"}}, "redis.url"),
    ({"redis": {"url": "sentinel://s1:26379"}}, "redis.url"),  # no primary's name
    ({"redis": {"url": "sentinel:///jobs"}}, "redis.url"),
    ({"redis": {"url": "sentinel://s1:port/jobs"}}, "redis.url"),
    ({"redis": {"url": "sentinel://s1/jobs/first"}}, "redis.url"),
    ({"redis": {"url": "sentinel://s1/jobs?ssl=1"}}, "unknown option 'ssl'"),
    ({"upstreams": [{"name": "a", "base_url": "http://a", "tokenizer": "o200k_base"}]},
     "upstreams[0].tokenizer"),
    ({"worker": {"pool": "prefork"}}, "worker.pool"),
    ({"upstreams": [{"name": "a", "base_url": "http://a",
                     "job_base_url_hosts": ["10.0.*.*"]}]}, "upstreams[0].job_base_url_hosts"),
    ({"worker": {"visibility_timeout": 100}}, "visibility_timeout"),
    ("upstreams: [unclosed", "not valid YAML"),
])
def test_invalid_settings(tmp_path: Path, data: object, needle: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load_settings(env={}, path=path)
    assert needle in str(caught.value)


def test_a_tokenizer_on_disk_is_accepted_by_its_plain_name(tmp_path: Path) -> None:
    path = _write(tmp_path, {"upstreams": [{"name": "a", "base_url": "http://a",
                                            "tokenizer": "cl100k_base"}]})
    assert load_settings(env={}, path=path).upstreams[0].tokenizer == "cl100k_base"


def test_missing_file_is_a_clear_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"API_TASKS_CONFIG": "/nonexistent/settings.yaml"})
    assert "/nonexistent/settings.yaml" in str(caught.value)


def test_keys_never_serialise(tmp_path: Path) -> None:
    settings = load_settings(env={"OPENAI_API_KEY": "sk-hidden"})
    assert "sk-hidden" not in settings.model_dump_json() and "sk-hidden" not in repr(settings)


def test_key_from_a_secrets_file(tmp_path: Path) -> None:
    secret = tmp_path / "key.txt"
    secret.write_text("sk-file\n")
    path = _write(tmp_path, {"upstreams": [{"name": "a", "base_url": "http://a",
                                            "api_key_file": str(secret)}]})
    key = load_settings(env={}, path=path).upstreams[0].api_key
    assert key is not None and key.get_secret_value() == "sk-file"


def test_worker_with_bad_settings_stops_at_start(tmp_path: Path) -> None:
    path = _write(tmp_path, {"upstreams": [{"name": "a", "base_url": "nope"}]})
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "worker"],
                          cwd=ROOT, env={"API_TASKS_CONFIG": path, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "upstreams[0].base_url" in done.stderr and path in done.stderr
    assert "Traceback" not in done.stderr


def test_worker_stops_when_a_named_key_variable_is_unset(tmp_path: Path) -> None:
    path = _write(tmp_path, {"upstreams": [{"name": "a", "base_url": "http://a",
                                            "api_key_env": "NOT_SET_KEY"}]})
    assert load_settings(env={}, path=path).missing_keys() == [
        "upstreams[0].api_key_env: the environment variable NOT_SET_KEY is not set"]
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "worker"],
                          cwd=ROOT, env={"API_TASKS_CONFIG": path, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "NOT_SET_KEY is not set" in done.stderr


def test_metrics_off_in_a_settings_file_means_off(tmp_path: Path) -> None:
    # YAML reads a bare off as false: it must not pass as port 0 (any free port)
    path = _write(tmp_path, {"worker": {"metrics_port": False},
                             "upstreams": [{"name": "a", "base_url": "http://a"}]})
    assert load_settings(env={}, path=path).worker.metrics_port is None
    text = Path(path).read_text().replace("metrics_port: false", "metrics_port: off")
    Path(path).write_text(text)
    assert load_settings(env={}, path=path).worker.metrics_port is None
    assert load_settings(env={"API_TASKS_METRICS_PORT": "9999"}, path=path
                         ).worker.metrics_port == 9999


def test_a_cluster_url_names_the_state_clusters_nodes_and_its_login() -> None:
    settings = load_settings(env={
        "REDIS_URL": "redis://queue:6379/0", "API_TASKS_REDIS_SHARDS": "12",
        "REDIS_STATE_URL": "rediss+cluster://app:p%40ss@n1,n2:7001,[::1]:7002/0"})
    assert settings.redis.cluster is None  # the broker's
    where = settings.redis.state().cluster
    assert where is not None and where.tls
    assert where.nodes == (("n1", 6379), ("n2", 7001), ("::1", 7002))
    assert (where.username, where.password) == ("app", "p@ss")
    plain = load_settings(env={"REDIS_STATE_URL": "REDIS+CLUSTER://n1", "API_TASKS_REDIS_SHARDS":
                               "3"}).redis.state().cluster
    assert plain is not None and not plain.tls and plain.username is None


@pytest.mark.parametrize(("env", "needle"), [
    ({"REDIS_URL": "redis+cluster://n1"},
     "redis.url (environment variable REDIS_URL): Value error, the Celery broker cannot be a "
     "Redis Cluster"),
    ({"REDIS_STATE_URL": "redis+cluster://n1"},
     "redis.shards (/"),  # one shard: the defaults' value, named with its file
    ({"REDIS_STATE_URL": "redis+cluster://n1/2", "API_TASKS_REDIS_SHARDS": "6"},
     "only database 0"),
    ({"REDIS_STATE_URL": "redis+cluster://n1:99999", "API_TASKS_REDIS_SHARDS": "6"},
     "a cluster node's address has a bad port"),
    ({"REDIS_STATE_URL": "redis+cluster://n1?ssl=1", "API_TASKS_REDIS_SHARDS": "6"},
     "takes no options"),
    ({"REDIS_STATE_URL": "redis+cluster://", "API_TASKS_REDIS_SHARDS": "6"},
     "name at least one node"),
])
def test_a_bad_cluster_url_names_the_setting(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env=env)
    assert needle in str(caught.value)


@pytest.mark.parametrize("variable", ["REDIS_STATE_URL", "REDIS_URL"])
@pytest.mark.parametrize("url", ["redis+cluster://app:s3/cr3t@n1:7000",
                                 "sentinel://app:s3#cr3t@s1/main"])
def test_a_password_that_breaks_its_url_is_never_repeated(variable: str, url: str) -> None:
    """An unencoded '/' or '#' ends the address inside the password: the error must not show
    what it read there."""
    with pytest.raises(ConfigError) as caught:
        load_settings(env={variable: url, "API_TASKS_REDIS_SHARDS": "6"})
    assert "s3" not in str(caught.value) and "cr3t" not in str(caught.value)


def test_a_sentinel_url_names_the_sentinels_the_primary_and_both_logins() -> None:
    settings = load_settings(env={"REDIS_URL": "sentinel://jobs:p%40ss@s1,s2:26380,[::1]:26381"
                                                "/main/3?sentinel_password=s%3Acr+t"})
    where = settings.redis.sentinel
    assert where is not None
    assert where.nodes == (("s1", 26379), ("s2", 26380), ("::1", 26381))
    assert (where.master, where.db, where.username, where.password) == ("main", 3, "jobs", "p@ss")
    assert (where.sentinel_username, where.sentinel_password) == (None, "s:cr+t")
    assert load_settings(env={"REDIS_URL": "redis://r:1/0"}).redis.sentinel is None
    assert load_settings(env={"REDIS_URL": "SENTINEL://s1/jobs"}).redis.sentinel is not None
