"""``python -m api_tasks gateway``: run the gateway on uvicorn."""

from __future__ import annotations

import logging
import sys

import uvicorn

from api_tasks.exit_codes import ExitCode
from api_tasks.gateway.app import create_app
from api_tasks.gateway.auth import is_loopback
from config.settings import Settings

__all__ = ["serve"]

log = logging.getLogger(__name__)


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> int:
    """Serve until stopped (SIGINT or SIGTERM); the exit code."""
    host = host or settings.gateway.host
    port = settings.gateway.port if port is None else port
    missing = settings.gateway.missing_keys()
    for problem in missing:
        print(f"error: {problem}", file=sys.stderr)
    if missing:
        return ExitCode.USAGE
    if not settings.gateway.keys:
        if not is_loopback(host):
            print(f"error: no gateway.keys configured (or API_TASKS_GATEWAY_KEY): the gateway "
                  f"serves without auth on a loopback address only, not on {host}",
                  file=sys.stderr)
            return ExitCode.USAGE
        print(f"api-tasks gateway: no API keys configured; serving without auth on {host} "
              "(loopback only)", file=sys.stderr)
    print(f"api-tasks gateway on http://{host}:{port} (OpenAI base_url "
          f"http://{host}:{port}/v1)", file=sys.stderr, flush=True)
    uvicorn.run(create_app(settings), host=host, port=port, http="auto", loop="auto",
                lifespan="on", log_level="warning", access_log=False,
                timeout_graceful_shutdown=max(int(settings.worker.shutdown_grace), 1))
    return ExitCode.OK
