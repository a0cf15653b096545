"""What a ``job_base_url_hosts`` entry is: ``HOST[:PORT]``, parsed and checked at start.

HOST is a glob of DNS names, an IP address or a CIDR network (IPv6 in brackets),
PORT a number or ``*`` (80 and 443 when left out). ``api_tasks.upstream.job_urls`` matches
a job's checked URL, and the addresses its host resolves to, against them.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import re
from dataclasses import dataclass

__all__ = ["DEFAULT_PORTS", "IPV4_LAST_LABEL", "AllowEntry", "IPAddress", "allow_list",
           "parse_allow_entry", "split_port"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_PORTS = frozenset({80, 443})
# a host whose last label is a number is an IPv4 literal to URL parsers (WHATWG), whatever
# its form: 2130706433, 0x7f000001, 0177.0.0.1 and 127.1 all reach 127.0.0.1
IPV4_LAST_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_GLOB = re.compile(r"^[a-z0-9_.*?-]+$")
_ADDRESS_GLOB = re.compile(r"^[0-9*?]+$")


@dataclass(frozen=True)
class AllowEntry:
    """One allow-list entry: a name glob, an address or a network, and its ports."""

    glob: str | None
    network: IPNetwork | None
    ports: frozenset[int] | None  # None: any port

    def matches(self, host: str, ip: IPAddress | None, port: int) -> bool:
        """Whether this entry lets a job call ``host`` (an address if ``ip``) on ``port``."""
        if self.ports is not None and port not in self.ports:
            return False
        if self.network is not None:
            return ip is not None and _same_family(ip, self.network) and ip in self.network
        return ip is None and self.glob is not None and fnmatch.fnmatchcase(host, self.glob)

    def names(self, address: IPAddress, port: int) -> bool:
        """Whether this entry names ``address`` and ``port`` itself (not merely a DNS name
        that resolves there)."""
        return self.network is not None and _same_family(address, self.network) \
            and address in self.network and (self.ports is None or port in self.ports)


def split_port(authority: str, wildcard: bool) -> tuple[str, int | None]:
    """``host[:port]`` (``[v6]`` in brackets) as (host, port or None); ``wildcard`` lets the
    port be ``*`` (None). ``ValueError`` says what is wrong."""
    if authority.startswith("["):
        host, close, after = authority[1:].partition("]")
        if not close or (after and not after.startswith(":")):
            raise ValueError("has a malformed [IPv6] host")
        return "[" + host + "]", _port(after[1:], wildcard) if after else None
    host, colon, port = authority.rpartition(":")
    return (host, _port(port, wildcard)) if colon else (authority, None)


def _port(text: str, wildcard: bool) -> int | None:
    if wildcard and text == "*":
        return None
    if not text.isdigit() or str(int(text)) != text or not 0 < int(text) < 65536:
        raise ValueError(f"port {text!r} must be a number from 1 to 65535")
    return int(text)


def parse_allow_entry(entry: str) -> AllowEntry:
    """One ``job_base_url_hosts`` entry; ``ValueError`` says what is wrong with it."""
    text = entry.strip().lower()
    if not text or any(not 0x20 < ord(c) < 0x7f for c in text) or "\\" in text:
        raise ValueError(f"{entry!r}: an entry is HOST[:PORT] in printable ASCII")
    host, port = split_port(text, wildcard=True)
    ports = frozenset({port}) if port is not None else (
        None if text.endswith(":*") else DEFAULT_PORTS)
    bare = host[1:-1] if host.startswith("[") else host
    try:
        network = ipaddress.ip_network(bare, strict=True)
    except ValueError:
        network = None
    if network is not None:
        if network.prefixlen == 0:
            raise ValueError(f"{entry!r}: a network of every address would let any DNS name "
                             "reach loopback and private addresses; name the networks")
        return AllowEntry(None, network, ports)
    if host in ("*", "?") or set(host) <= {"*", "?", "."}:
        raise ValueError(f"{entry!r}: a glob of every host allows any name; name the domains")
    if host.startswith("[") or "/" in host or not _GLOB.match(host):
        raise ValueError(f"{entry!r}: HOST must be a DNS name glob, an IP address or a CIDR "
                         "network (IPv6 in brackets)")
    if all(_ADDRESS_GLOB.match(label) for label in host.split(".")) or \
            IPV4_LAST_LABEL.match(host.rsplit(".", 1)[-1]):
        raise ValueError(f"{entry!r}: write addresses as an IP address or a CIDR network "
                         "(10.0.0.0/8), not a glob")
    return AllowEntry(host, None, ports)


@functools.lru_cache(maxsize=64)
def allow_list(entries: tuple[str, ...]) -> tuple[AllowEntry, ...]:
    """The parsed entries of an upstream's ``job_base_url_hosts`` (checked at start)."""
    return tuple(parse_allow_entry(entry) for entry in entries)


def _same_family(address: IPAddress, network: IPNetwork) -> bool:
    return address.version == network.version
