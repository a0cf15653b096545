"""Every Python example in the README runs, as written, against the test services."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import GATEWAY_KEY
from tests.support.services import ROOT, GatewayProcess, WorkerProcess

pytestmark = pytest.mark.integration
_GATEWAY = "http://127.0.0.1:8000"  # where the README's gateway examples point
_BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.M | re.S)
# what a reader does next with what an example builds, where the example only builds it
_DRIVERS = {
    "Flask(": """
client = app.test_client()
answer = client.post("/ask", json={"messages": [{"role": "user", "content": "hi"}]})
assert answer.status_code == 202, answer.status_code
body = client.get(f"/ask/{answer.get_json()['job_id']}/events").get_data(as_text=True)
assert body.startswith("data: {") and body.endswith("data: [DONE]\\n\\n"), body
""",
    "send_task(": """
from api_tasks import default_client
assert default_client().job(sent.id).result(timeout=30)["choices"]
""",
}
_BATCH_LINES = "\n".join(
    f'{{"custom_id": "r{i}", "method": "POST", "url": "/v1/chat/completions", '
    f'"body": {{"model": "m-readme", "messages": [{{"role": "user", "content": "{i}"}}]}}}}'
    for i in range(3)) + "\n"


def _examples() -> list[tuple[int, str]]:
    text = (ROOT / "README.md").read_text()
    return [(text.count("\n", 0, match.start()) + 1, textwrap.dedent(match.group(2)))
            for match in _BLOCK.finditer(text)]


def test_the_readme_has_python_examples() -> None:
    assert len(_examples()) >= 4


@pytest.mark.parametrize(("line", "code"), _examples(), ids=[f"line{n}" for n, _ in _examples()])
def test_readme_example_runs(line: int, code: str, worker: WorkerProcess,
                             worker_env: dict[str, str], tmp_path: Path,
                             request: pytest.FixtureRequest) -> None:
    (tmp_path / "requests.jsonl").write_text(_BATCH_LINES)
    script = code + "".join(driver for needle, driver in _DRIVERS.items() if needle in code)
    env = {k: v for k, v in worker_env.items() if k != "FAKE_UPSTREAM_KEY"}
    if _GATEWAY in script:  # the gateway's examples talk to the test gateway
        gateway: GatewayProcess = request.getfixturevalue("gateway")
        script = script.replace(_GATEWAY, gateway.url)
        env["API_TASKS_GATEWAY_KEY"] = GATEWAY_KEY
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, f"README line {line}:\n{done.stdout}\n{done.stderr}"


_BASH = re.compile(r"^```bash\n(.*?)^```", re.M | re.S)


def test_the_readme_gateway_curl_examples_run(gateway: GatewayProcess, tmp_path: Path) -> None:
    blocks = [m.group(1) for m in _BASH.finditer((ROOT / "README.md").read_text())
              if "localhost:8000" in m.group(1)]
    assert len(blocks) >= 2
    script = "set -euo pipefail\n" + "\n".join(blocks).replace(
        "localhost:8000", gateway.url.removeprefix("http://"))
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=90, env={"PATH": os.environ["PATH"],
                                           "API_TASKS_GATEWAY_KEY": GATEWAY_KEY})
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    out = done.stdout
    assert '"object":"list"' in out and "data: [DONE]" in out and '"object":"job"' in out
    assert "id: 1-1" in out and '"type":"done"' in out  # the events, to the final one


_YAML = re.compile(r"^```yaml\n(.*?)^```", re.M | re.S)


def test_the_readme_gateway_settings_are_valid_settings() -> None:
    """The gateway's settings blocks (keys, webhooks) load as they are written."""
    import yaml

    from config.settings import Settings

    blocks = [yaml.safe_load(m.group(1)) for m in _YAML.finditer(
        (ROOT / "README.md").read_text())]
    ours = [b for b in blocks if isinstance(b, dict) and set(b) <= {"gateway", "webhooks",
                                                                     "files"}]
    assert ours, "no gateway settings block in the README"
    upstream = {"name": "any", "base_url": "https://api.openai.com/v1", "models": ["*"]}
    for block in ours:  # beside an upstream, as any settings file has
        settings = Settings.model_validate({**block, "upstreams": [upstream]})
        assert settings.gateway.keys or settings.webhooks


def test_the_readme_deployments_settings_are_valid_settings() -> None:
    """The deployments block loads as written, beside an upstream serving its fallback."""
    import yaml

    from config.settings import Settings

    [block] = [yaml.safe_load(m.group(1)) for m in _YAML.finditer(
        (ROOT / "README.md").read_text()) if "deployments:" in m.group(1)]
    openai = {"name": "openai", "base_url": "https://api.openai.com/v1", "models": ["gpt-*"]}
    settings = Settings.model_validate({**block, "upstreams": [*block["upstreams"], openai]})
    [group, _] = settings.upstreams
    assert [d.name for d in group.targets()] == ["llama-a", "llama-b", "llama-hosted"]
    assert settings.fallback_chain("llama-3.1-70b-instruct") == ["llama-3.1-70b-instruct",
                                                                 "gpt-4o-mini"]
