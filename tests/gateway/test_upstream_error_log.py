"""An upstream's error on a request no decision names (a list) is relayed and logged, not audited
(docs/gateway.md, "Decision records and `bastion audit tail`"). An agent can make every list fail
upstream (a cursor the upstream did not issue) as often as it asks: the log lines are aggregated
per window and per server, method, user, agent and code, so such a flood writes a bounded number
of lines, the first at once and one more with the count when the window closes."""

from __future__ import annotations

import base64
import json
import logging
import re
import time

import pytest
from mcp.shared.exceptions import MCPError

from .support import start

# Errors the lab upstream answers to a list at these cursors (tests/gateway/lab_server.py).
STALE, UNSERVED = "lab-stale", "lab-unserved"
FLOOD = 30


def _agent(seen: dict) -> str:
    payload = seen["tokens"].access_token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["client_id"]


def _failing_lists(bastion, tools: int, prompts: int = 0, between=None) -> str:
    """As sam, through the SDK: ``tools`` tools/list and ``prompts`` prompts/list the lab
    upstream refuses; ``between()`` runs before the last tools/list. Returns the agent."""

    async def run(client, seen):
        for i in range(tools):
            if between is not None and i == tools - 1:
                between()
            with pytest.raises(MCPError):
                await client.list_tools(cursor=STALE)
        for _ in range(prompts):
            with pytest.raises(MCPError):
                await client.list_prompts(cursor=UNSERVED)

    return _agent(bastion.sdk("sam", "labhttp", "legacy", run))


def _logged(caplog, agent: str) -> list[str]:
    """The gateway's log lines of upstream errors relayed to ``agent``."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "bastion.gateway"
        and f"agent {agent})" in r.getMessage()
        and "upstream error" in r.getMessage()
    ]


def _requests(lines: list[str]) -> int:
    """How many relayed errors the lines account for: one for a window's first line, the
    count of a window's closing line."""
    return sum(
        int(m.group(1)) if (m := re.search(r"relayed (\d+) more times", line)) else 1
        for line in lines
    )


def test_a_flood_of_failing_lists_logs_one_line_per_key_then_the_count_at_shutdown(
    tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="bastion.gateway")
    with start(tmp_path) as bastion:
        agent = _failing_lists(bastion, FLOOD, FLOOD)
        during = _logged(caplog, agent)
    assert len(during) == 2, during  # within the window (60 s): the first of each key only
    assert any("tools/list" in line and "upstream error -32602" in line for line in during)
    assert any("prompts/list" in line and "upstream error -32601" in line for line in during)
    closing = _logged(caplog, agent)[2:]  # the windows still open, closed at shutdown
    assert len(closing) == 2, closing
    assert all(f"relayed {FLOOD - 1} more times" in line for line in closing), closing
    assert {line.split(" to upstream labhttp ")[0] for line in closing} == {
        "tools/list",
        "prompts/list",
    }
    assert _requests(_logged(caplog, agent)) == 2 * FLOOD


def test_a_window_that_closed_is_logged_with_its_count_while_bastion_runs(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bastion.gateway")
    with start(tmp_path, gateway={"upstream_error_log_seconds": 1}) as bastion:
        agent = _failing_lists(bastion, FLOOD + 1, between=lambda: time.sleep(1.5))
        lines = _logged(caplog, agent)
    assert any("more times" in line for line in lines), lines
    assert _requests(lines) == FLOOD + 1, lines


def test_past_max_keys_an_upstreams_further_errors_are_counted_together(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bastion.gateway")
    with start(tmp_path, gateway={"upstream_error_log_max_keys": 1}) as bastion:
        agent = _failing_lists(bastion, FLOOD, FLOOD)  # two keys: the prompts/list one is past
    ours = _logged(caplog, agent)
    assert len(ours) == 2 and all("tools/list" in line for line in ours), ours
    together = [
        r.getMessage()
        for r in caplog.records
        if r.name == "bastion.gateway"
        and "upstream labhttp" in r.getMessage()
        and agent not in r.getMessage()
    ]
    assert len(together) == 2, together
    assert "upstream_error_log_max_keys (1)" in together[0], together
    assert "(user *, agent *): upstream error * relayed 29 more times" in together[1], together
