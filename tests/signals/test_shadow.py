"""Shadow mode through a real bastion and the official MCP SDK client: a ``would`` rule records
what it would have done in the decision record and in the metrics, never enforces it, and
``bastion signals shadow-report`` shows per rule how often it would have fired and for whom."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from mcp.shared.exceptions import MCPError

from bastion.cli import since_epoch
from tests.gateway.support import ROOT, start

WRITE = "customers:read customers:write"

MONITORED = """
# Monitored, not enforced: what a bulk-delete guard would do at 2 deletes a minute.
bulk_delete(_user: User, "call", _tool: Tool) if
  context.annotations.destructiveHint = true and
  context.behavior.user.destructive.minute.count >= 2;
would(user: User, "call", tool: Tool, "deny", "bulk_delete") if bulk_delete(user, "call", tool);
would(user: User, "call", tool: Tool, "approval", "bulk_delete") if
  bulk_delete(user, "call", tool);
"""


@pytest.fixture(scope="module")
def shadowed(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shadow")
    with start(directory, policy_extra=MONITORED) as running:
        yield running, directory / "bastion.db"


async def attempt(client, seen, tool, arguments):
    try:
        result = await client.call_tool(tool, arguments)
        seen.setdefault("calls", []).append(("ok", result.content[0].text))
    except MCPError as e:
        seen.setdefault("calls", []).append(("error", e.error.data.get("reason")))


def report(database, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "bastion.cli",
            "signals",
            "shadow-report",
            "--database",
            str(database),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def deleted(shadowed):
    bastion, _ = shadowed

    async def script(client, seen):
        for n in range(4):
            await attempt(client, seen, "delete_customer", {"customer_id": f"s-{n}"})

    seen = bastion.sdk("avery", "deskhttp", "legacy", script, WRITE)
    bastion.flush()
    return seen


def test_a_shadow_rule_is_not_enforced(shadowed, deleted):
    assert deleted["calls"] == [("ok", f"deleted s-{n}") for n in range(4)]


def test_what_it_would_have_done_is_in_the_decision_record(shadowed, deleted):
    bastion, _ = shadowed
    allowed = [
        r
        for _, r in bastion.records.after(0, 100000)
        if r.target == 'Tool{"deskhttp/delete_customer"}' and r.result == "allow"
    ]
    assert len(allowed) == 4
    assert [bool(r.obligations.get("shadow")) for r in allowed] == [False, False, True, True]
    assert allowed[2].obligations["shadow"] == [
        {"rule": "bulk_delete", "effect": "approval", "principal": 'User{"avery"}'},
        {"rule": "bulk_delete", "effect": "deny", "principal": 'User{"avery"}'},
    ]
    # The figure the rule read is kept with the record.
    assert allowed[2].context["behavior"]["user"]["destructive"]["minute"]["count"] == 2


def test_what_it_would_have_done_is_counted_in_the_metrics(shadowed, deleted):
    bastion, _ = shadowed
    text = bastion.http.get(f"{bastion.url}/metrics").text
    assert 'bastion_shadow_would_total{effect="deny",rule="bulk_delete"} 2.0' in text
    assert 'bastion_shadow_would_total{effect="approval",rule="bulk_delete"} 2.0' in text


def test_the_report_shows_per_rule_how_often_and_for_whom(shadowed, deleted):
    _, database = shadowed
    done = report(database, "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [(r["rule"], r["effect"], r["fired"]) for r in rows] == [
        ("bulk_delete", "approval", 2),
        ("bulk_delete", "deny", 2),
    ]
    assert rows[0]["principals"] == {'User{"avery"}': 2}
    assert rows[0]["results"] == {"allow": 2}
    text = report(database).stdout
    assert "bulk_delete: would have deny 2 time(s) (decided: allow 2)" in text
    assert '  User{"avery"}: 2' in text


def test_the_report_covers_only_the_period_asked(shadowed, deleted):
    _, database = shadowed
    future = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    done = report(database, "--since", future)
    assert done.returncode == 0
    assert done.stdout.strip() == "no shadow rule would have fired in this period"


@pytest.mark.parametrize("since", ["yesterday", "10x", "5 minutes", ""])
def test_a_bad_since_is_refused_with_what_to_give(shadowed, since):
    _, database = shadowed
    done = report(database, "--since", since)
    assert done.returncode == 2
    assert "give a duration (90s, 30m, 24h, 7d) or an ISO 8601 time" in done.stderr


def test_since_reads_durations_and_times():
    assert since_epoch("30m", 10_000.0) == 10_000.0 - 1800
    assert since_epoch("7d", 1_000_000.0) == 1_000_000.0 - 7 * 86400
    assert since_epoch("1970-01-01T00:01:00Z", 0) == 60.0
