"""Fixtures for the gateway tests: one running bastion per module (starting it costs a second)."""

from __future__ import annotations

import pytest

from .support import start


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    with start(tmp_path_factory.mktemp("gateway")) as running:
        yield running
