"""What the security tests share: `bastion serve` with a configuration of the test's."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.server.conftest import POLICY, ServerProcess


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """``served(database, config="", **env)``: `bastion serve` on ``database`` with ``config`` as
    bastion.toml (``{url}`` is its URL); every server started is stopped after the test."""
    started: list[ServerProcess] = []
    policy = tmp_path / "policy.polar"

    def start(database: str, config: str = "", **env: str) -> ServerProcess:
        if not policy.exists():
            policy.write_text(POLICY)
        server = ServerProcess(database, tmp_path, str(policy), env)
        path = tmp_path / f"bastion-{server.port}.toml"
        path.write_text(config.replace("{url}", server.url))
        server.env["BASTION_CONFIG"] = str(path)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


OAUTH = """
[oauth]
issuer = "{url}"
key_dir = "%s"

[[oauth.resources]]
uri = "{url}/mcp/desk"
scopes = ["customers:read", "customers:write"]
"""


GATEWAY = (
    OAUTH
    + """
[gateway]

[[gateway.upstreams]]
name = "desk"
command = "%s"
args = ["%s"]
scopes = ["customers:read"]
"""
)


def fuzzed(examples: int) -> settings:
    """The settings of the fuzz tests against a real server: ``examples`` draws, the same on
    every run (derandomized: CI fails on a draw anyone can run again, not on luck), no time
    limit per draw (a request to a process), no example database, no health check (the
    strategies are slow and filtered on purpose)."""
    return settings(
        derandomize=True,
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
