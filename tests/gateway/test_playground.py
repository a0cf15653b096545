"""The playground page in real headless Chromium: a prompt streams through EventSource, the
network drops mid-stream (a proxy resets the connection), and the text after the browser's
own reconnect equals the job's result."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tests.conftest import GATEWAY_KEY as KEY
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.services import GatewayProcess, wait_until
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration
# as the machine's notes start it: without the background-networking flags Chromium's
# connections to the outside are refused many at a time
_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
          "--disable-quic", "--no-first-run", "--disable-background-networking",
          "--disable-component-update", "--disable-sync")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "install Debian's chromium and chromium-driver (scripts/test " \
                                "does when it runs as root)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    yield chrome
    chrome.quit()


def test_the_page_streams_a_job_and_resumes_it_after_the_network_drops(
        gateway: GatewayProcess, fake: FakeUpstream, browser: webdriver.Chrome,
        model: str) -> None:
    pieces = [f"word{i} " for i in range(80)]
    fake.script(model, Reply(pieces=pieces, chunk_delay=0.05))
    relay = TcpProxy(gateway.port).start()
    try:
        browser.get(relay.http_url + "/")
        assert browser.title == "api-tasks playground"
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.find_element(By.ID, "model").send_keys(model)
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("Tell me a story.")
        browser.find_element(By.ID, "send").click()
        output = browser.find_element(By.ID, "output")
        wait_until(lambda: len(output.text.split()) >= 10, 20, "the first words on the page")
        shown, connections = output.text, relay.accepted
        relay.cut()  # the page's event stream (and any other connection) is reset
        state = browser.find_element(By.ID, "status")
        try:
            wait_until(lambda: state.get_attribute("data-state") in ("done", "error"), 30,
                       "the page to show the job's end")
        except AssertionError:
            raise AssertionError(f"{state.get_attribute('data-state')}: {state.text}; "
                                 f"{relay.accepted} connections") from None
        assert state.get_attribute("data-state") == "done", state.text
        assert relay.accepted > connections  # the browser came back by itself
        assert len(shown.split()) < len(pieces)  # the cut was mid-stream
        job_id = output.get_attribute("data-job")
        job = httpx.get(f"{gateway.url}/v1/jobs/{job_id}",
                        headers={"Authorization": f"Bearer {KEY}"}).json()
        text = job["response"]["choices"][0]["message"]["content"]
        # no gap and no repeat: what the page shows is the job's result, word for word
        assert output.get_attribute("textContent") == text == "".join(pieces)
    finally:
        relay.stop()


def test_the_page_is_served_with_a_policy_that_runs_only_its_own_script(
        gateway: GatewayProcess) -> None:
    page = httpx.get(gateway.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'sha256-" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy.split("script-src", 1)[1].split(";", 1)[0]
