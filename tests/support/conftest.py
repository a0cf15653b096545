"""The fake upstream's own tests get a fresh server each."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fake_upstream import FakeUpstream


@pytest.fixture
def up() -> Iterator[FakeUpstream]:
    """A started server, stopped after the test."""
    with FakeUpstream() as server:
        yield server
