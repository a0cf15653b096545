"""``redis+cluster://`` URLs: some nodes of a Redis Cluster (a client learns the rest from
them) and who to log in as."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from config.url_nodes import parse_nodes, split_login

__all__ = ["CLUSTER_SCHEMES", "ClusterURL", "parse_cluster_url"]

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")  # the second over TLS
_PORT = 6379


@dataclass(frozen=True)
class ClusterURL:
    """Where to start looking for the cluster's nodes, and the credentials for each."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False


def parse_cluster_url(url: str) -> ClusterURL:
    """``redis+cluster://[user:password@]host[:port][,host[:port]...]`` (``rediss+cluster``
    for TLS); a cluster has one database, so the path is empty or ``/0``."""
    parts = urlsplit(url.strip())
    if parts.scheme not in CLUSTER_SCHEMES:
        raise ValueError("a Redis Cluster URL starts with redis+cluster:// or rediss+cluster://")
    username, password, hosts = split_login(parts.netloc)
    nodes = parse_nodes(hosts, _PORT, "a cluster node")
    if not nodes:
        raise ValueError("name at least one node: redis+cluster://node-1:6379,node-2:6379")
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0")
    if parts.query or parts.fragment:
        raise ValueError("a Redis Cluster URL takes no options (?...) or fragment (#...)")
    return ClusterURL(nodes=nodes, username=username, password=password,
                      tls=parts.scheme == "rediss+cluster")
