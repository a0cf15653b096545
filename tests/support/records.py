"""What the tests look up in the project's job records."""

from __future__ import annotations

from api_tasks.client import Client

__all__ = ["jobs_of_model"]


def jobs_of_model(client: Client, model: str) -> list[str]:
    """The ids of the jobs under ``client``'s prefix whose record names ``model`` (a job a
    gateway took from a client that left before it heard the id)."""
    return [key.decode().rsplit(":", 1)[1]
            for key in client.redis.scan_iter(f"{client.keys.prefix}:job:*")
            if client.redis.hget(key, "model") == model.encode()]
