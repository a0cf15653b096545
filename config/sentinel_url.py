"""``sentinel://`` URLs: the Sentinel nodes, the primary's name, and who to log in as."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from config.url_nodes import parse_nodes, split_login

__all__ = ["SENTINEL_PORT", "SentinelURL", "parse_sentinel_url"]

SENTINEL_PORT = 26379
_QUERY = ("sentinel_username", "sentinel_password")


@dataclass(frozen=True)
class SentinelURL:
    """Where the Sentinels are, which primary they watch, and the credentials for each."""

    nodes: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None  # for the data nodes (primary and replicas)
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None  # for the Sentinels themselves, when they ask
    sentinel_password: str | None = field(default=None, repr=False)


def parse_sentinel_url(url: str) -> SentinelURL:
    """``sentinel://[user:password@]host[:port][,host[:port]...]/<master>[/<db>]``, with
    ``?sentinel_password=`` (and ``sentinel_username``) when the Sentinels ask for one."""
    parts = urlsplit(url.strip())
    if parts.scheme != "sentinel":
        raise ValueError("a Sentinel URL starts with sentinel://")
    username, password, hosts = split_login(parts.netloc)
    nodes = parse_nodes(hosts, SENTINEL_PORT, "a Sentinel")
    if not nodes:
        raise ValueError("name at least one Sentinel: sentinel://host:26379,host2:26379/mymaster")
    path = [part for part in parts.path.split("/") if part]
    if not path or len(path) > 2:
        raise ValueError("give the primary's name Sentinel watches, and optionally the "
                         "database: sentinel://host:26379/mymaster/0")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"the database must be a number, not {path[1]!r}")
    query: dict[str, str] = {}
    for pair in filter(None, parts.query.split("&")):
        name, _, value = pair.partition("=")
        if name not in _QUERY:
            raise ValueError(f"unknown option {name!r} (known: {', '.join(_QUERY)})")
        query[name] = unquote(value)  # not parse_qs: a '+' in a password stays a '+'
    if parts.fragment:
        raise ValueError("must not carry a fragment")
    return SentinelURL(
        nodes=nodes, master=unquote(path[0]), db=int(path[1]) if len(path) == 2 else 0,
        username=username, password=password,
        sentinel_username=query.get("sentinel_username") or None,
        sentinel_password=query.get("sentinel_password") or None)
