"""One real `bastion serve` with the studio behind it per test module (starting it costs a
second or two); each test makes its own agents, so tests do not depend on one another."""

from __future__ import annotations

import pytest

from .support import start_studio


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    with start_studio(tmp_path_factory.mktemp("delegation")) as running:
        yield running
