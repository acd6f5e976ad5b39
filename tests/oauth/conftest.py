"""Fixtures for the authorization server tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .support import Bastion, running_bastion


@pytest.fixture
def bastion(sqlite_url, tmp_path) -> Iterator[Bastion]:
    with running_bastion(sqlite_url, tmp_path) as running:
        yield running
