"""Fixtures for the authorization server tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from argon2 import PasswordHasher

from bastion.oauth import users

from .support import Bastion, running_bastion


@pytest.fixture(autouse=True)
def light_password_hashing(request, monkeypatch):
    """Argon2id with small parameters, so each login costs milliseconds, not half a second on a
    shared machine. Tests marked ``real_password_hashing`` keep the production parameters."""
    if request.node.get_closest_marker("real_password_hashing") is None:
        monkeypatch.setattr(
            users, "_HASHER", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
        )


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "real_password_hashing: use the production Argon2id parameters"
    )


@pytest.fixture
def bastion(sqlite_url, tmp_path) -> Iterator[Bastion]:
    with running_bastion(sqlite_url, tmp_path) as running:
        yield running
