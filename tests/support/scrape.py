"""Prometheus text from a worker's or a gateway's ``/metrics``, read into samples."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from api_tasks.client import Client
from api_tasks.record.workers import alive, records

__all__ = ["Samples", "metrics_ports", "scrape", "value", "workers_value"]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample at ``url``, by name and labels."""
    text = httpx.get(url, timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def metrics_ports(client: Client) -> list[int]:
    """The ``/metrics`` ports of the live workers of ``client``'s prefix, from their records."""
    found = client.store.shell.run(records(client.keys, client.store.shell.run(
        alive(client.keys))))
    return [int(record["metrics_port"]) for record in found if record.get("metrics_port")]


def workers_value(client: Client, name: str, **labels: str) -> float:
    """``value`` summed over the live workers of ``client``'s prefix (one stopped a moment
    ago, its record not yet lapsed, has nothing to say)."""
    total = 0.0
    for port in metrics_ports(client):
        try:
            samples = scrape(f"http://127.0.0.1:{port}/metrics")
        except httpx.ConnectError:
            continue
        total += value(samples, name, **labels)
    return total
