"""Fixtures for the gateway tests: one running bastion per module (starting it costs a second)."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher

from bastion.oauth import users

from .support import start


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    # Light Argon2 parameters: each login costs milliseconds (as in tests/oauth).
    saved = users._HASHER
    users._HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    try:
        with start(tmp_path_factory.mktemp("gateway")) as running:
            yield running
    finally:
        users._HASHER = saved
