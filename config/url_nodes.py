"""The login and the ``host[:port],host[:port]...`` list of a URL naming several servers
(Sentinels, a Redis Cluster's nodes)."""

from __future__ import annotations

from urllib.parse import unquote

__all__ = ["parse_nodes", "split_login"]

# an error never repeats the text: a password holding '/', '#', '?' or '@' unencoded ends
# the URL's address early, and what follows would be part of it
_ENCODE = "percent-encode any / # ? @ in the login"


def parse_nodes(hosts: str, default_port: int, what: str) -> tuple[tuple[str, int], ...]:
    """Each ``host[:port]`` (``[v6]:port`` too) of a comma-separated list; ``what`` names
    them in errors ("a Sentinel")."""
    nodes = []
    for text in (part.strip() for part in hosts.split(",")):
        if not text:
            continue
        if text.startswith("["):  # [::1]:26379
            host, _, rest = text[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = text.partition(":")
        if not host:
            raise ValueError(f"{what}'s address has no host ({_ENCODE})")
        if port and (not port.isdigit() or not 0 < int(port) < 65536):
            raise ValueError(f"{what}'s address has a bad port ({_ENCODE})")
        nodes.append((host, int(port) if port else default_port))
    return tuple(nodes)


def split_login(netloc: str) -> tuple[str | None, str | None, str]:
    """A URL's ``[user[:password]@]hosts`` as the user, the password (each unquoted, None
    when not given) and the hosts."""
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        userinfo, hosts = "", netloc
    username, colon, password = userinfo.partition(":")
    return unquote(username) or None, unquote(password) if colon else None, hosts
