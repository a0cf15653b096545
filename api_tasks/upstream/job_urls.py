"""Where a job may send its call: a strict parse of its ``base_url`` and the allow-list.

A job's URL is parsed here, refusing anything two parsers could read two ways
(backslashes, userinfo, percent-encoded hosts, control characters, IP
literals in decimal, octal, hex or short forms), and the call goes to a URL
rebuilt from the checked parts, then matched against the upstream's entries
(``config.allow_list``: what an entry is belongs to the settings). At connect time
the name is resolved and the call goes to a checked address: a loopback,
private, link-local or otherwise non-public address only if an entry names
it (as an address or network), so a DNS name cannot point a job inside.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from urllib3.util import parse_url

from api_tasks.errors import InvalidJob
from config.allow_list import IPV4_LAST_LABEL, IPAddress, allow_list, split_port

__all__ = ["AddressGuard", "AddressRefused", "JobUrl", "check_job_url", "parse_job_url"]

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_SCHEMES = {"http": 80, "https": 443}


class AddressRefused(OSError):
    """The job's host resolved to an address the allow-list does not name."""


@dataclass(frozen=True)
class JobUrl:
    """A job's URL, checked part by part; ``url`` is rebuilt from the parts."""

    scheme: str
    host: str  # lower-case DNS name, or an IP address in its canonical form
    port: int
    path: str
    ip: IPAddress | None = None

    @property
    def url(self) -> str:
        """The URL the call goes to (no credentials, query or fragment)."""
        host = f"[{self.host}]" if isinstance(self.ip, ipaddress.IPv6Address) else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def _refuse(why: str) -> InvalidJob:
    return InvalidJob("base_url", why)


def parse_job_url(url: object) -> JobUrl:
    """Parse a job's ``base_url`` strictly; ``InvalidJob`` names what is wrong."""
    if not isinstance(url, str):
        raise _refuse("must be a URL string")
    if any(not 0x20 < ord(c) < 0x7f for c in url):
        raise _refuse("must be printable ASCII, with no spaces or control characters")
    if "\\" in url:
        raise _refuse("must not contain a backslash")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _SCHEMES:
        raise _refuse("must be an http:// or https:// URL with a host")
    if "?" in rest or "#" in rest:
        raise _refuse("must not carry a query or a fragment")
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        raise _refuse("must not carry credentials (user@host)")
    if "%" in authority:
        raise _refuse("must not percent-encode its host")
    try:
        host, port = split_port(authority, wildcard=False)
    except ValueError as err:
        raise _refuse(str(err)) from None
    name, ip = _host(host)
    parsed = JobUrl(scheme, name, port if port is not None else _SCHEMES[scheme],
                    (slash + tail).rstrip("/").removesuffix("/v1"), ip)
    _agrees_with_urllib3(parsed)
    return parsed


def _host(host: str) -> tuple[str, IPAddress | None]:
    if host.startswith("["):
        try:
            ip6 = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise _refuse(f"{host} is not an IPv6 address") from None
        return ip6.compressed, ip6
    host = host.lower()
    if not host:
        raise _refuse("must be an http:// or https:// URL with a host")
    if IPV4_LAST_LABEL.match(host.rsplit(".", 1)[-1]):
        try:
            ip4 = ipaddress.IPv4Address(host)
        except ValueError:
            raise _refuse(f"host {host!r} reads as an IP address in an unusual form; "
                          "write addresses as four decimal numbers") from None
        if str(ip4) != host:
            raise _refuse(f"host {host!r} is not in the canonical a.b.c.d form")
        return host, ip4
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise _refuse(f"host {host!r} is not a valid DNS name (letters, digits, '-', '_'; "
                      "no trailing dot)")
    return host, None


def _agrees_with_urllib3(url: JobUrl) -> None:
    """The HTTP library must read the rebuilt URL as the same host and port."""
    seen = parse_url(url.url)
    host = (seen.host or "").strip("[]").lower()
    if host != url.host or (seen.port or _SCHEMES[url.scheme]) != url.port:
        raise _refuse("is read differently by the HTTP client")


def check_job_url(entries: tuple[str, ...], upstream: str, url: object) -> JobUrl:
    """The job's URL if the upstream's allow-list lets it through; else ``InvalidJob``."""
    if not entries:
        raise _refuse(f"upstream {upstream!r} does not let jobs choose their URL "
                      "(settings: job_base_url_hosts)")
    parsed = parse_job_url(url)
    if not any(entry.matches(parsed.host, parsed.ip, parsed.port)
               for entry in allow_list(entries)):
        raise _refuse(f"host {parsed.host!r} port {parsed.port} is not on upstream "
                      f"{upstream!r}'s job_base_url_hosts")
    return parsed


# prefixes whose last 32 bits are an IPv4 address: NAT64 (well-known and local-use), SIIT,
# and the deprecated IPv4-compatible ::a.b.c.d
_CARRIERS = tuple(ipaddress.IPv6Network(net) for net in
                  ("64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0:0/96", "::/96"))


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo, NAT64, SIIT...)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if any(address in net for net in _CARRIERS):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _public(address: IPAddress) -> bool:
    """A global unicast address, and so is any IPv4 address it carries."""
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return _public(embedded)
    return True


@dataclass(frozen=True)
class AddressGuard:
    """Resolves a job's host at connect time and picks an address the allow-list permits."""

    entries: tuple[str, ...]

    def resolve(self, host: str, port: int) -> str:
        """An address to connect to; ``AddressRefused`` if every one is off limits."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        seen = []
        for *_, sockaddr in infos:
            address = str(sockaddr[0]).split("%", 1)[0]
            if self.permits(address, port):
                return address
            seen.append(address)
        raise AddressRefused(f"{host} resolves to {', '.join(seen) or 'nothing'}: not a "
                             f"public address, and job_base_url_hosts does not name it with "
                             f"port {port}")

    def permits(self, address: str, port: int) -> bool:
        """Whether a call may go to ``address``:``port`` (for a connection opened earlier
        and reused, too)."""
        ip = ipaddress.ip_address(address)
        return _public(ip) or any(entry.names(ip, port) for entry in allow_list(self.entries))
