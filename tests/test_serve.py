"""The README's first command, as a new user runs it: install, embedded Redis, worker, a job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import redis

from tests.support.services import ROOT, default_sigint, wait_until


def _env_file(path: Path) -> dict[str, str]:
    pairs = [line.removeprefix("export ").split("=", 1)
             for line in path.read_text().splitlines() if line.startswith("export ")]
    return dict(pairs)


def _running(marker: str) -> list[str]:
    """Command lines of the processes still running whose command line mentions ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmd:
                found.append(cmd)
    return found


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One venv for the module: the first run installs into it, the next reuse it."""
    return tmp_path_factory.mktemp("serve") / "venv"


# a terminal's Ctrl-C (the whole group), or a signal to the script's PID alone, as
# `kill -INT`, `timeout -s INT` or a process supervisor send it
@pytest.mark.timeout(400)
@pytest.mark.parametrize("stop", ["ctrl-c", "sigint-to-pid", "sigterm-to-pid"])
def test_serve_demo_installs_runs_a_job_and_stops(tmp_path: Path, venv: Path,
                                                  stop: str) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPENAI_", "API_TASKS_", "REDIS_", "VIRTUAL_ENV"))}
    env.update({"API_TASKS_VENV": str(venv), "API_TASKS_RUN_DIR": str(tmp_path),
                "PYTHON": sys.executable})
    log = tmp_path / "serve.log"
    job_env: dict[str, str] = {}
    with open(log, "wb") as out:
        serve = subprocess.Popen(["bash", "scripts/serve", "--demo"], cwd=ROOT, env=env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                 preexec_fn=default_sigint)
    try:
        wait_until(lambda: serve.poll() is not None or " ready." in log.read_text(), 300,
                   "the worker to be ready", interval=0.5)
        assert serve.poll() is None, log.read_text()
        text = log.read_text()
        assert "source " in text and "api_tasks chat" in text  # it says how to submit a job
        job_env.update({**env, **_env_file(tmp_path / "env")})
        done = subprocess.run([str(venv / "bin/python"), "-m", "api_tasks", "chat",
                               "Hello", "--stream"], cwd=tmp_path, env=job_env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "echo: Hello\n"
        # the demo's fake serves the Responses API too, and the demo says so
        responded = subprocess.run([str(venv / "bin/python"), "-m", "api_tasks", "respond",
                                    "Hi"], cwd=tmp_path, env=job_env, capture_output=True,
                                   text=True, timeout=120)
        assert (responded.returncode, responded.stdout) == (0, "echo: Hi\n"), responded.stderr
        # the gateway it started answers at the URL it printed
        gateway = job_env["API_TASKS_GATEWAY_URL"]
        assert f"gateway: {gateway}" in log.read_text()
        wait_until(lambda: _answers(gateway + "/healthz"), 30, "the gateway to answer")
    finally:
        if stop == "ctrl-c":
            os.killpg(serve.pid, signal.SIGINT)
        else:
            serve.send_signal(signal.SIGINT if stop == "sigint-to-pid" else signal.SIGTERM)
        serve.wait(60)  # the grace is 30 s; nothing runs here, so it stops at once
    # the script stops the worker, then Redis and the demo upstream, before it returns
    client = redis.Redis.from_url(job_env["REDIS_URL"], socket_connect_timeout=1)
    with pytest.raises(redis.ConnectionError):
        client.ping()
    assert _running(str(tmp_path)) == [] and _running(str(venv / "bin/celery")) == []
    assert _running(f"{venv / 'bin/python'} -m api_tasks gateway") == []
    assert "Warm shutdown" in log.read_text() and "Cold shutdown" not in log.read_text()
