"""``python -m api_tasks top`` in a pseudo-terminal: it refreshes, shows the cluster, quits on
Ctrl-C with status 0."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
import uuid

import pytest

from api_tasks import JobFailed
from api_tasks.client import Client
from config.loader import load_settings
from tests.support.fake_upstream import FakeUpstream, HttpError
from tests.support.services import ROOT, Spawn, free_port
from tests.support.top_view import top_rows

pytestmark = pytest.mark.integration
USER = [{"role": "user", "content": "Hello"}]


def _read(fd: int, seconds: float, child: subprocess.Popen[bytes] | None = None) -> bytes:
    """What the terminal shows for ``seconds`` (or until ``child`` exits)."""
    out, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline and (child is None or child.poll() is None):
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                out += os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
    return out


def test_top_shows_the_cluster_and_quits_on_ctrl_c(worker_env: dict[str, str], spawn: Spawn,
                                                   fake: FakeUpstream, model: str) -> None:
    env = {**worker_env, "API_TASKS_PREFIX": f"top{uuid.uuid4().hex[:6]}"}
    worker = spawn(env, "topped")
    probe = {k: v for k, v in env.items() if k != "FAKE_UPSTREAM_KEY"}
    client = Client(load_settings(env=probe))
    fake.script(model, HttpError(400, error={"message": "bad", "code": "odd_field"}))
    with pytest.raises(JobFailed):
        client.submit_chat(USER, model=model).result(timeout=30)
    controller, terminal = pty.openpty()
    child = subprocess.Popen([sys.executable, "-m", "api_tasks", "top", "--interval", "0.3"],
                             cwd=ROOT, env={**probe, "COLUMNS": "160", "LINES": "60",
                                            "TERM": "xterm"},
                             stdin=terminal, stdout=terminal, stderr=terminal,
                             start_new_session=True)
    os.close(terminal)
    try:
        shown = _read(controller, 4.0).decode(errors="replace")
        child.send_signal(signal.SIGINT)
        # the terminal is still read: a child whose last frame fills it would block on it
        _read(controller, 10.0, child)
        assert child.wait(1) == 0
    finally:
        if child.poll() is None:
            child.kill()
        os.close(controller)
    assert "interactive" in shown and "cluster:" in shown
    assert f".{worker.pid}." in shown  # its worker, by id
    assert "odd_field" in shown  # the failure it just had
    assert shown.count("api-tasks top") >= 3  # it refreshed
    assert "Traceback" not in shown


def test_top_refuses_a_bad_interval(worker_env: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, "-m", "api_tasks", "top", "--interval", "0"],
                          cwd=ROOT, env=worker_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--interval" in done.stderr


def test_top_once_with_redis_down_exits_4(worker_env: dict[str, str]) -> None:
    down = {**worker_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    done = subprocess.run([sys.executable, "-m", "api_tasks", "top", "--once"], cwd=ROOT,
                          env=down, capture_output=True, text=True, timeout=60)
    assert done.returncode == 4 and "Redis unavailable" in done.stdout
    assert "Traceback" not in done.stderr


def test_top_shows_cool_downs_and_running_batches_with_their_progress() -> None:
    state = {"queues": {"interactive": 0, "bulk": 3}, "waiting": 1, "running": 2,
             "limits": {}, "limits_used": {}, "lines": {}, "deployments": [
                 {"upstream": "pair", "deployment": "pair-a", "breaker": "open",
                  "open_for": 4.2, "calls_in_flight": 0, "cooldown": 2.5},
                 {"upstream": "solo", "deployment": "solo", "breaker": None,
                  "open_for": None, "calls_in_flight": None, "cooldown": 0.0}]}
    now = {"at": time.time(), "state": state, "workers": [], "budgets": {},
           "batches": [("batch_abc", {"status": "in_progress", "completed": "7",
                                      "failed": "1", "total": "20"})], "batches_total": 1}
    rows = {cells[0]: cells[1:] for cells in top_rows(now, None) if cells}
    assert rows["pair/pair-a"] == ["open 4s", "0", "2.5s"]  # breaker, in flight, cool-down
    assert rows["solo/solo"] == ["-", "-", "-"]
    assert rows["batch_abc"] == ["in_progress", "7", "1", "20"]
    assert rows["bulk"] == ["3"] and rows["waiting (limits)"] == ["1"]
