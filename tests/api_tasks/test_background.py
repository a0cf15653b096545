"""The background-thread base: ticks, survives a bad round, warns sparingly, stops and joins."""

from __future__ import annotations

import logging

import pytest
import redis

from api_tasks.background import Loop, Throttled
from tests.support.services import wait_until


class _Flaky(Loop):
    def __init__(self) -> None:
        super().__init__("test-loop", 0.01, logging.getLogger("test.loop"))
        self.rounds = 0

    def tick(self) -> None:
        self.rounds += 1
        if self.rounds % 2:
            raise redis.ConnectionError("Redis is away") if self.rounds % 4 == 1 \
                else RuntimeError("a bug")


def test_a_loop_outlives_failing_rounds_and_warns_at_most_every_10_s(
        caplog: pytest.LogCaptureFixture) -> None:
    loop = _Flaky()
    with caplog.at_level(logging.WARNING, logger="test.loop"):
        loop.start()
        wait_until(lambda: loop.rounds >= 20, 5, "twenty rounds")
        loop.stop()
    assert not loop._thread.is_alive()  # stop() joined the thread: no round after it
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["test-loop: Redis unavailable (Redis is away)"]  # ten failed, one line


def test_throttled_drops_repeats_within_its_window(caplog: pytest.LogCaptureFixture) -> None:
    throttled = Throttled(logging.getLogger("test.throttle"), every=3600)
    with caplog.at_level(logging.WARNING, logger="test.throttle"):
        for i in range(5):
            throttled.warn("trouble %d", i)
    assert [r.getMessage() for r in caplog.records] == ["trouble 0"]
