"""Which tokenizer encodings this machine has on disk: what an upstream's ``tokenizer`` may
name. Nothing is ever downloaded; ``api_tasks.execution.tokens`` loads and uses them."""

from __future__ import annotations

__all__ = ["offline_encodings", "on_disk"]


def offline_encodings() -> frozenset[str]:
    """The tiktoken encodings that load without a download (their ``_offline`` names)."""
    try:
        import tiktoken
    except ImportError:
        return frozenset()
    return frozenset(name for name in tiktoken.list_encoding_names() if name.endswith("_offline"))


def on_disk(name: str) -> str | None:
    """The name ``name`` loads by without touching the network, or None if it can't."""
    known = offline_encodings()
    return name if name in known else f"{name}_offline" if f"{name}_offline" in known else None
