"""What the signals tests share: a running bastion with the tests' policy and extra rules, and
the SDK client's calls kept as outcomes."""

from __future__ import annotations

from mcp.shared.exceptions import MCPError

from bastion.facts.model import Entity
from tests.gateway.support import start

ERAS = ["legacy", "auto"]  # 2025-11-25, 2026-07-28


def running(tmp_path_factory, name: str, rules: str, **options):
    """A bastion for one test module."""
    with start(tmp_path_factory.mktemp(name), policy_extra=rules, **options) as bastion:
        yield bastion


async def attempt(client, seen: dict, key: str, tool: str, arguments: dict) -> None:
    """Call a tool; keep ("ok", text) or ("error", code, data) under ``seen[key]``."""
    try:
        result = await client.call_tool(tool, arguments)
        seen.setdefault(key, []).append(("ok", result.content[0].text))
    except MCPError as e:
        seen.setdefault(key, []).append(("error", e.error.code, e.error.data))


def latest_agent(bastion) -> str:
    """The OAuth client id of the agent in the newest decision record."""
    bastion.flush()
    records = bastion.records.after(bastion.records.last_seq(1), 1)
    assert records, "no decision recorded yet"
    agent = records[-1][1].principals[1]
    return Entity.parse(agent).id
