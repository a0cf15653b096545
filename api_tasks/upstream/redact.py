"""Secrets out of upstream replies: a streaming byte redactor and a string scrubber.

Pure: used where upstream bytes come in (``http_client``) and where decoded strings
from them are kept (error fields, stream error events).
"""

from __future__ import annotations

import json

__all__ = ["Redactor", "scrub"]


class Redactor:
    """Replaces secrets in a byte stream, even one split between two reads.

    Each secret is matched as written and as JSON writes it (``\\/`` for ``/``...), the
    longest first. Only a tail that could begin a secret is held back until the next read,
    so a stream's events are not delayed unless their last bytes look like a key's start.
    """

    def __init__(self, secrets: tuple[str, ...]) -> None:
        forms = {form.encode() for secret in secrets if secret for form in _spellings(secret)}
        self._secrets = sorted(forms, key=len, reverse=True)
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        """The bytes that are safe to pass on now."""
        if not self._secrets:
            return data
        data = self._held + data
        for secret in self._secrets:
            data = data.replace(secret, b"***")
        keep = max(_partial(data, secret) for secret in self._secrets)
        self._held = data[len(data) - keep:] if keep else b""
        return data[:len(data) - keep]

    def close(self) -> bytes:
        """What was held back, at the end of the body (no secret can complete now)."""
        held, self._held = self._held, b""
        return held


def _partial(data: bytes, secret: bytes) -> int:
    """The length of the longest end of ``data`` that is a proper start of ``secret``."""
    first = secret[:1]
    start = max(len(data) - len(secret) + 1, 0)
    at = data.find(first, start)
    while at != -1:
        if secret.startswith(data[at:]):
            return len(data) - at
        at = data.find(first, at + 1)
    return 0


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """Replace every secret in ``text`` with *** (the longest first)."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return text


def _spellings(secret: str) -> set[str]:
    """The secret as written, and as JSON may escape it."""
    escaped = json.dumps(secret)[1:-1]
    return {secret, escaped, escaped.replace("/", "\\/")}
