"""Fixtures for the authorization server tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from argon2 import PasswordHasher

from bastion.oauth import users

from .support import Bastion, running_bastion


@pytest.fixture(autouse=True)
def real_password_hashing(request, monkeypatch):
    """Tests marked ``real_password_hashing`` hash with the production Argon2id parameters (the
    others with the small ones of `tests.conftest.light_password_hashing`)."""
    if request.node.get_closest_marker("real_password_hashing") is not None:
        monkeypatch.setattr(users, "_HASHER", PasswordHasher())  # as bastion.oauth.users has it


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "real_password_hashing: use the production Argon2id parameters"
    )


@pytest.fixture
def bastion(sqlite_url, tmp_path) -> Iterator[Bastion]:
    with running_bastion(sqlite_url, tmp_path) as running:
        yield running
