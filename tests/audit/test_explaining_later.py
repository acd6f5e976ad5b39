"""An auditor, months later, given the decision id an agent was refused with (the MCP error's
``data.decision_id``) or a log line: ``bastion audit show`` finds the gateway's record in the
database and puts beside it the policy version it was decided under (its text, not today's) and
the events of the approval or review it went through."""

from __future__ import annotations

import json
import time

import pytest
from mcp.shared.exceptions import MCPError

from bastion.audit.decisions import DecisionRecord, DecisionRecords, new_decision_id
from bastion.audit.log import AuditLog
from bastion.cli import main
from bastion.db import Database
from bastion.facts.store import FactStore
from tests.gateway import support


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    with support.start(tmp_path_factory.mktemp("explaining")) as running:
        yield running


def show(capsys, *argv: str) -> tuple[int, str, str]:
    """``bastion audit show ...`` -> (exit status, stdout, stderr)."""
    try:
        code = main(["audit", "show", *argv])
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_refused_agents_decision_id_finds_its_record_and_the_policy_it_was_decided_under(
    gateway, capsys
):
    async def script(client, seen):
        try:
            await client.call_tool("delete_customer", {"customer_id": "c-100"})
        except MCPError as e:
            seen["error"] = e

    seen = gateway.sdk("sam", "desk", "legacy", script)
    decision_id = seen["error"].error.data["decision_id"]
    gateway.flush()
    in_force = gateway.store.policy()
    # The policy changes after the decision: the auditor must read the one it was decided under.
    gateway.store.put_policy(support.test_policy() + "\n# a later version\n", actor="test")
    database = gateway.app.state.config.database

    code, out, _ = show(capsys, decision_id, "--database", database)

    assert code == 0
    shown = json.loads(out)
    record = shown["record"]
    assert record["id"] == decision_id and record["result"] == "deny"
    assert record["reason"] == "not_permitted"
    assert record["target"] == 'Tool{"desk/delete_customer"}'
    assert record["principals"][0] == 'User{"sam"}' and record["principals"][1].startswith("Agent")
    assert record["arguments_digest"].startswith("hmac-sha256:")
    assert record["policy_version"] == in_force.version and record["sequence"] is not None
    assert record["grant_id"]
    policy = shown["policy"]
    assert policy["version"] == in_force.version
    assert policy["text"] == in_force.text and "a later version" not in policy["text"]
    assert policy["created_by"] == in_force.created_by


def test_an_id_no_record_holds_is_said_so_with_why_and_exits_2(gateway, capsys):
    database = gateway.app.state.config.database
    code, out, err = show(capsys, new_decision_id(), "--database", database)
    assert code == 2 and out == ""
    assert "no decision record" in err and "audit_retention_days" in err
    # A /v1 decision's id (prefix-count) is kept by the replica that made it, not here.
    code, out, err = show(capsys, "a7ce0d22-1", "--database", database)
    assert code == 2 and out == ""
    assert "GET /v1/decisions/a7ce0d22-1" in err


def _stored(database: str, **fields) -> DecisionRecord:
    """A record written by the gateway's writer into ``database``."""
    record = DecisionRecord(
        id=new_decision_id(),
        at=time.time(),
        server="crm",
        method="tools/call",
        target='Tool{"crm/send"}',
        principals=('User{"sam"}', 'Agent{"bot"}'),
        **fields,
    )
    records = DecisionRecords(Database(database))
    records.add(record)
    records.flush()
    records.db.close()
    return record


def test_a_call_let_through_by_an_approval_shows_who_approved_it(database_url, capsys):
    store = FactStore(Database(database_url))
    version, _ = store.put_policy('allow(_u: User, "call", _t: Tool);', actor="cli:ops")
    log = AuditLog(store.db)
    log.record("approval.requested", subject="sam", request_id="req-1", approvers=["avery"])
    log.record("approval.answer", subject="sam", request_id="req-1", approver="avery")
    log.record("approval.requested", subject="sam", request_id="req-2")  # another call's
    store.close()
    record = _stored(
        database_url,
        result="allow",
        policy_version=version,
        sequence=1,
        obligations={"approval": {"id": "req-1", "kind": "approval"}},
    )
    code, out, _ = show(capsys, record.id, "--database", database_url)
    assert code == 0
    shown = json.loads(out)
    assert shown["record"]["obligations"]["approval"]["id"] == "req-1"
    assert shown["policy"]["version"] == version and shown["policy"]["created_by"] == "cli:ops"
    assert [(e["kind"], e["detail"].get("approver")) for e in shown["events"]] == [
        ("approval.requested", None),
        ("approval.answer", "avery"),
    ]


def test_a_record_naming_a_policy_version_the_database_lacks_says_so(database_url, capsys):
    record = _stored(database_url, result="deny", policy_version=7, sequence=3)
    code, out, err = show(capsys, record.id, "--database", database_url)
    assert code == 0
    assert json.loads(out)["policy"] is None
    assert "no policy version 7" in err


def _rewrite(database: str, record_id: str, change) -> None:
    """Rewrite a stored record's JSON with ``change(dict)``: what another version of bastion
    would have written."""
    db = Database(database)
    (text,) = db.execute("SELECT record FROM audit_decisions WHERE id = ?", (record_id,))[0]
    data = json.loads(text)
    change(data)
    db.execute("UPDATE audit_decisions SET record = ? WHERE id = ?", (json.dumps(data), record_id))
    db.close()


def test_a_record_a_later_bastion_wrote_is_read_after_a_downgrade_with_every_field_kept(
    database_url, capsys
):
    record = _stored(database_url, result="allow", policy_version=2, sequence=9)
    later = {"verdict": {"by": "a later field"}, "to_dict": "a later field named as a method"}
    _rewrite(database_url, record.id, lambda data: data.update(later))

    assert main(["audit", "tail", "-n", "1", "--database", database_url]) == 0
    assert f"id={record.id}" in capsys.readouterr().out
    assert main(["audit", "tail", "-n", "1", "--json", "--database", database_url]) == 0
    tailed = json.loads(capsys.readouterr().out)
    assert tailed["id"] == record.id and tailed["verdict"] == {"by": "a later field"}
    code, out, _ = show(capsys, record.id, "--database", database_url)
    assert code == 0
    shown = json.loads(out)["record"]
    assert shown["policy_version"] == 2 and shown["verdict"] == {"by": "a later field"}


def test_a_record_written_before_the_policy_version_was_kept_reads_with_it_null(
    database_url, capsys
):
    record = _stored(database_url, result="deny", reason="not_permitted")
    old_fields = ("policy_version", "sequence", "grant_id", "task", "session", "unexplained")
    _rewrite(database_url, record.id, lambda data: [data.pop(name) for name in old_fields])

    code, out, _ = show(capsys, record.id, "--database", database_url)
    assert code == 0
    shown = json.loads(out)
    assert shown["record"]["policy_version"] is None and shown["record"]["grant_id"] == ""
    assert shown["policy"] is None and shown["record"]["reason"] == "not_permitted"
