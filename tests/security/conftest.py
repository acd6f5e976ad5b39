"""What the security tests share: `bastion serve` with a configuration of the test's."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

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


def logged_since(log: Path, seen: int) -> str:
    """What the server wrote to its log ``log`` past its first ``seen`` bytes: one draw's own
    lines, read as text whatever bytes they hold."""
    with open(log, "rb") as f:
        f.seek(seen)
        return f.read().decode(errors="replace")
