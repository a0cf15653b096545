"""Who is calling: gateway API keys (compared by SHA-256, never kept in clear) and the
short-lived stream tokens a browser's ``EventSource`` passes as ``?token=``."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import time
from dataclasses import dataclass

from api_tasks.gateway.errors import GatewayError
from config.settings import GatewayKey, GatewaySettings

__all__ = ["ANONYMOUS", "Keyring", "StreamTokens", "is_loopback"]

ANONYMOUS = GatewayKey(name="anonymous", key_sha256="0" * 64)  # no keys configured
_TOKEN = re.compile(r"(?P<expires>[0-9]{1,12})\.(?P<signature>[A-Za-z0-9_-]{43})", re.ASCII)
_LOOPBACK_HOST = re.compile(r"(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?", re.ASCII)


def is_loopback(host: str) -> bool:
    """Whether the gateway would listen on a loopback address only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Keyring:
    """The configured keys, by the SHA-256 of the key."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._by_hash = {key.sha256(): key for key in settings.keys}
        self.open = not settings.keys  # no keys: loopback only, every caller is anonymous

    def key_for(self, authorization: str | None, host: str | None = None) -> GatewayKey:
        """The key of an ``Authorization: Bearer`` header; 401 if it is missing or wrong.

        Without keys, only a request naming a loopback host passes: a web page the user
        opens cannot reach the gateway through a DNS name that rebinds to 127.0.0.1.
        """
        if self.open:
            if host is None or _LOOPBACK_HOST.fullmatch(host) is None:
                raise GatewayError(403, "without API keys the gateway answers requests for "
                                        "localhost only", code="host_not_allowed")
            return ANONYMOUS
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise GatewayError(401, "missing API key: send Authorization: Bearer <key>",
                               code="missing_api_key")
        digest = hashlib.sha256(presented.strip().encode()).hexdigest()
        key = self._by_hash.get(digest)
        if key is None:
            raise GatewayError(401, "incorrect API key", code="invalid_api_key")
        return key


@dataclass(frozen=True)
class StreamTokens:
    """Signed tokens that let whoever holds one read one job's events until they expire."""

    secret: bytes
    ttl: int

    def issue(self, job_id: str, owner: str, now: float | None = None) -> str:
        """A token for ``job_id`` of ``owner``."""
        expires = int((time.time() if now is None else now) + self.ttl)
        return f"{expires}.{self._sign(job_id, owner, expires)}"

    def check(self, token: str, job_id: str, owner: str) -> bool:
        """Whether ``token`` was issued for this job and owner and has not expired."""
        match = _TOKEN.fullmatch(token)
        if match is None or int(match["expires"]) < time.time():
            return False
        return hmac.compare_digest(match["signature"],
                                   self._sign(job_id, owner, int(match["expires"])))

    def _sign(self, job_id: str, owner: str, expires: int) -> str:
        mac = hmac.new(self.secret, f"{job_id}\0{owner}\0{expires}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")
