"""docker-compose.yml: valid against the Compose schema, and set up as documented."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support.services import ROOT

SCHEMA = ROOT.parent / "shared" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_matches_the_compose_schema(compose: dict[str, Any]) -> None:
    if not SCHEMA.exists():
        pytest.skip(f"{SCHEMA} is not on this machine")
    schema = json.loads(SCHEMA.read_text())
    # the spec names draft 7 by a URL jsonschema does not recognise; say so explicitly
    jsonschema.Draft7Validator(schema).validate(compose)


def test_redis_7_with_healthcheck_and_noeviction(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    assert "noeviction" in redis["command"] and "--appendonly" in redis["command"]
    assert "--requirepass" in redis["command"] and "REDISCLI_AUTH" in redis["environment"]
    assert "redis-cli" in redis["healthcheck"]["test"]
    assert all(port.startswith("127.0.0.1:") for port in redis["ports"])


def test_worker_and_flower(compose: dict[str, Any]) -> None:
    services = compose["services"]
    worker, flower = services["worker"], services["flower"]
    assert worker["command"][:4] == ["celery", "-A", "worker", "worker"]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["environment"]["REDIS_URL"].startswith("redis://:${REDIS_PASSWORD")
    assert worker["environment"]["REDIS_URL"].endswith("@redis:6379/0")
    assert any(arg.startswith("--basic-auth=") for arg in flower["command"])
    assert all(port.startswith("127.0.0.1:") for port in flower["ports"])
    assert (ROOT / "Dockerfile").exists()


def test_the_schema_check_catches_a_broken_file(compose: dict[str, Any]) -> None:
    if not SCHEMA.exists():
        pytest.skip(f"{SCHEMA} is not on this machine")
    broken = {**compose, "services": {"redis": {**compose["services"]["redis"], "ports": 6379}}}
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    assert not validator.is_valid(broken)


def test_gateway_needs_a_key_and_listens_on_localhost(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    assert gateway["command"][:4] == ["python", "-m", "api_tasks", "gateway"]
    assert gateway["environment"]["API_TASKS_GATEWAY_KEY"].startswith(
        "${API_TASKS_GATEWAY_KEY:?")
    assert all(port.startswith("127.0.0.1:") for port in gateway["ports"])
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"


def test_prometheus_scrapes_the_workers_and_grafana_shows_them(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    scrape = yaml.safe_load((ROOT / "config/prometheus.yml").read_text())["scrape_configs"]
    jobs = {job["job_name"]: job for job in scrape}
    # every worker replica, by the service's DNS name, on the workers' default metrics port
    assert jobs["api-tasks-worker"]["dns_sd_configs"][0]["names"] == ["worker"]
    assert jobs["api-tasks-worker"]["dns_sd_configs"][0]["port"] == 9464
    assert jobs["api-tasks-gateway"]["static_configs"][0]["targets"] == ["gateway:8000"]
    for service in (prometheus, grafana):
        assert all(port.startswith("127.0.0.1:") for port in service["ports"])
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            assert not source.startswith("./") or (ROOT / source).exists(), source
    assert "GRAFANA_PASSWORD:?" in grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    dashboard = json.loads((ROOT / "config/grafana/dashboards/api-tasks.json").read_text())
    assert dashboard["panels"] and all(p["targets"] for p in dashboard["panels"])
