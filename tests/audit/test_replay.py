"""``bastion audit replay``: before a policy push, which of the real decisions the gateway
recorded would a candidate policy decide differently? Each record is decided again with the
candidate, on the facts stored now, as the question it asked (its principals, action, target,
scopes and context, its recorded time as the time); what the policy alone did not decide is
counted as not replayable, never guessed. A difference the policy of the record's time decides
so today too is the facts' (changed since), not the candidate's, and does not fail the push.
Records are written by a real gateway (on a real SQLite file and a real PostgreSQL schema) from
real MCP calls."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import time
import uuid
from datetime import UTC, datetime

import psycopg
import pytest
from mcp.shared.exceptions import MCPError

from bastion.audit.decisions import DecisionRecord, DecisionRecords, new_decision_id
from bastion.cli import main
from bastion.db import Database, DatabaseSettingError
from bastion.facts.model import Entity
from bastion.policy.parser import parse_fact
from bastion.signals.suspensions import resume, suspend, suspension
from tests.conftest import POSTGRES_URL, require_service
from tests.gateway import support

# The quickstart's rule that lets a user of a server read its resources (support.test_policy).
READ_RULE = '"read" if "user" on "server";'
# What sam's prompt was got on: its relation to the server (deleted by tests below, as if ended
# since the call, then put back).
PROMPT_FACT = 'has_relation(Prompt{"desk/apology"}, "server", McpServer{"desk"})'
# How far back the calls of the time-window test are made (the gateway's clock set back).
DAYS_BACK = 4


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gateway(request, tmp_path_factory):
    """A gateway on each kind of database, with the calls of every test below recorded."""
    database = None
    schema = None
    if request.param == "postgresql":
        require_service("PostgreSQL", "127.0.0.1", 5432)
        schema = f"t_replay_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        database = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    try:
        with support.start(tmp_path_factory.mktemp("replay"), database=database) as running:
            _make_calls(running)
            running.flush()
            yield running
    finally:
        if schema is not None:
            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _make_calls(gw) -> None:
    async def sam(client, seen):
        await client.read_resource("customers://plans")
        await client.read_resource("customers://directory")
        await client.get_prompt("apology", {"customer_name": "Ada"})
        # Read-only, allowed; the policy's deny rule for it reads its arguments (not recorded).
        await client.call_tool("search_customers", {"query": "a"})
        with contextlib.suppress(MCPError):  # sam is no admin: refused by the policy
            await client.call_tool("delete_customer", {"customer_id": "c-100"})
        # Five emails a minute for an agent: the sixth is rate limited.
        for n in range(6):
            with contextlib.suppress(MCPError):
                await client.call_tool("send_email", {"to": "a@b", "subject": str(n), "body": "b"})
        # Internal notes: the result is held for an admin's review.
        with contextlib.suppress(MCPError):
            await client.read_resource("customers://audit-notes")

    gw.sdk("sam", "desk", "legacy", sam)

    # A suspended user is refused before any policy is asked (suspended once signed in).
    held = suspension("user", "avery")

    async def avery(client, seen):
        suspend(gw.store, held, actor="test")
        _wait_for_replica(gw)
        with contextlib.suppress(MCPError):
            await client.read_resource("customers://plans")

    try:
        gw.sdk("avery", "desk", "legacy", avery)
    finally:
        resume(gw.store, held, actor="test")
        _wait_for_replica(gw)

    # Calls made days ago, as far as the gateway can tell: its clock set back.
    enforcer = gw.app.state.gateway.enforcer
    saved = enforcer.clock
    enforcer.clock = lambda: time.time() - DAYS_BACK * 86400
    try:

        async def earlier(client, seen):
            await client.read_resource("customers://plans")

        gw.sdk("sam", "desk", "legacy", earlier)
    finally:
        enforcer.clock = saved


def _wait_for_replica(gw) -> None:
    seq = gw.store.head()
    deadline = time.monotonic() + 10
    while gw.app.state.replica.applied < seq:
        assert time.monotonic() < deadline, "the replica did not catch up"
        time.sleep(0.01)


def replay(capsys, *argv: str) -> tuple[int, str, str]:
    """``bastion audit replay ...`` -> (exit status, stdout, stderr)."""
    try:
        code = main(["audit", "replay", *argv])
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _database(gw) -> str:
    return gw.app.state.config.database


def _records(gw) -> list[DecisionRecord]:
    db = Database(_database(gw))
    try:
        return [r for _, r in DecisionRecords(db).after(0, limit=100_000)]
    finally:
        db.close()


def _policy(tmp_path, text: str, name: str = "candidate.polar"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_candidate_without_an_allow_rule_reports_exactly_the_calls_it_allowed_as_now_denied(
    gateway, tmp_path, capsys
):
    policy = support.test_policy()
    assert policy.count(READ_RULE) == 1
    candidate = _policy(tmp_path, policy.replace(READ_RULE, ""))
    # The resources sam read, and the prompt he got: allowed by the rule, through a user's role.
    reads = [
        r
        for r in _records(gateway)
        if r.method == "resources/read"
        and r.result == "allow"
        and r.principals[0] == 'User{"sam"}'
        and r.at > time.time() - 86400
    ]
    assert len(reads) == 2

    code, out, err = replay(
        capsys, "--policy", candidate, "--database", _database(gateway), "--json"
    )

    assert code == 1, err
    report = json.loads(out)
    changed = {c["id"]: c for c in report["changed"]}
    assert set(changed) == {r.id for r in reads}
    for record in reads:
        change = changed[record.id]
        assert (change["old"]["result"], change["new"]["result"]) == ("allow", "deny")
        assert change["target"] == record.target and change["action"] == "read"
        assert change["principals"] == list(record.principals)
        assert change["at"] == record.at
        assert change["new"]["reason"] == "not_permitted"
    assert report["replayed"] == report["same"] + len(reads)


def test_the_policy_in_force_changes_nothing_and_exits_0(gateway, tmp_path, capsys):
    database = _database(gateway)
    code, out, err = replay(
        capsys, "--policy", _policy(tmp_path, support.test_policy()), "--database", database
    )
    assert code == 0, err
    assert "0 decided differently" in out
    # The same, named by its stored version.
    version = gateway.store.policy().version
    code, out, err = replay(capsys, "--version", str(version), "--database", database, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["changed"] == [] and report["replayed"] > 0
    assert report["replayed"] == report["same"]


def test_a_time_window_rule_is_decided_at_the_recorded_time_of_each_call(gateway, tmp_path, capsys):
    earlier = [
        r
        for r in _records(gateway)
        if r.method == "resources/read" and r.at < time.time() - (DAYS_BACK - 1) * 86400
    ]
    assert len(earlier) == 1
    day = datetime.fromtimestamp(earlier[0].at, UTC).strftime("%a")
    # Reads on the weekday of the earlier call are refused: today is another weekday.
    candidate = _policy(
        tmp_path,
        support.test_policy() + f'\ndeny(_u: User, "read", _r: McpResource) if\n'
        f'  in_time_window(context.time, "{day}", "00:00", "23:59", "UTC");\n',
    )
    code, out, err = replay(
        capsys,
        "--policy",
        candidate,
        "--since",
        f"{DAYS_BACK + 1}d",
        "--database",
        _database(gateway),
        "--json",
    )
    assert code == 1, err
    report = json.loads(out)
    assert [c["id"] for c in report["changed"]] == [earlier[0].id]
    change = report["changed"][0]
    assert (change["old"]["result"], change["new"]["result"]) == ("allow", "deny")
    assert any("in_time_window" in rule for rule in change["new"]["rules"])


def test_what_the_policy_alone_did_not_decide_is_counted_not_replayable_by_reason(
    gateway, tmp_path, capsys
):
    database = _database(gateway)
    # Written by the gateway's own writer: a record of a process that died before it was
    # (recovered from its journal), and one of a later bastion with a field this one lacks.
    writer = DecisionRecords(Database(database))
    base = {
        "at": time.time(),
        "server": "desk",
        "method": "resources/read",
        "target": 'McpResource{"desk/customers://plans"}',
        "principals": ('User{"sam"}', 'Agent{"x"}'),
        "result": "allow",
    }
    writer.add(DecisionRecord(id=new_decision_id(), recovered=True, **base))
    later = {**base, "principals": list(base["principals"]), "context": {"time": "x"}}
    writer.add(DecisionRecord.from_dict({"id": new_decision_id(), **later, "verdict_v9": 1}))
    writer.flush()
    writer.db.close()

    code, out, err = replay(
        capsys,
        "--policy",
        _policy(tmp_path, support.test_policy()),
        "--database",
        database,
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    skipped = report["not_replayable"]
    assert skipped["rate_limit"] == 1  # the sixth email
    assert skipped["approval"] >= 1  # the notes held for review
    assert skipped["arguments_not_recorded"] == 1  # search_customers: its deny rule reads them
    assert skipped["refused_before_decision"] >= 1  # avery, suspended
    assert skipped["recovered"] == 1
    assert skipped["later_format"] == 1
    assert report["changed"] == []
    assert report["replayed"] == report["same"] > 0


def test_the_gateway_records_the_action_each_decision_asked(gateway):
    written = [r for r in _records(gateway) if not r.recovered and not r.later_fields()]
    asked = {(r.method, r.target.split("{")[0], r.action) for r in written}
    assert ("resources/read", "McpResource", "read") in asked
    assert ("tools/call", "Tool", "call") in asked
    assert ("prompts/get", "Prompt", "get") in asked
    assert ("initialize", "McpServer", "connect") in asked
    assert all(action for _, _, action in asked)


def test_a_policy_file_that_does_not_load_is_refused_with_its_line_and_exit_2(
    gateway, tmp_path, capsys
):
    broken = _policy(tmp_path, 'allow(actor, "read", resource) if\n  has_role(actor "x");\n')
    before = len(_records(gateway))
    code, out, err = replay(capsys, "--policy", broken, "--database", _database(gateway))
    assert code == 2
    assert out == ""
    assert f"{broken}:2:" in err
    assert len(_records(gateway)) == before
    # A version the database does not hold, a window that is no time: refused the same way.
    code, _, err = replay(capsys, "--version", "999", "--database", _database(gateway))
    assert code == 2 and "no policy version 999" in err
    code, _, err = replay(
        capsys, "--version", "1", "--since", "yesterday", "--database", _database(gateway)
    )
    assert code == 2 and "--since 'yesterday'" in err


def test_the_json_report_names_each_change_and_counts_the_rest(gateway, tmp_path, capsys):
    candidate = _policy(tmp_path, support.test_policy().replace(READ_RULE, ""))
    code, out, _ = replay(
        capsys,
        "--policy",
        candidate,
        "--database",
        _database(gateway),
        "--json",
        "--server",
        "desk",
    )
    assert code == 1
    report = json.loads(out)
    assert set(report) == {
        "since",
        "until",
        "policy",
        "replayed",
        "same",
        "different",
        "over_budget",
        "not_replayable",
        "changed",
        "different_by_cause",
    }
    assert report["different"] == len(report["changed"]) > 0
    assert report["policy"] == {"files": [candidate]}
    change = report["changed"][0]
    assert set(change) == {
        "id",
        "at",
        "server",
        "method",
        "action",
        "target",
        "principals",
        "old",
        "new",
        "cause",
        "policy_of_the_time",
    }
    assert set(change["old"]) == {"result", "reason", "rules", "policy_version"}
    assert set(change["new"]) == {"result", "reason", "rules"}
    # Why: the candidate's (the policy of the time, today, still decides it as recorded).
    assert change["cause"] == "policy"
    assert set(change["policy_of_the_time"]) == {"result", "reason", "unknown"}
    assert report["different_by_cause"] == {"policy": report["different"], "facts": 0, "unknown": 0}
    assert change["new"]["rules"] == [] or all(isinstance(r, str) for r in change["new"]["rules"])
    # Another server's records are not read.
    code, out, _ = replay(
        capsys, "--policy", candidate, "--database", _database(gateway), "--json", "--server", "lab"
    )
    assert code == 0 and json.loads(out)["replayed"] == 0
    # --limit: the first N records of the window, no more.
    code, out, _ = replay(
        capsys, "--policy", candidate, "--database", _database(gateway), "--json", "--limit", "1"
    )
    limited = json.loads(out)
    assert limited["replayed"] + sum(limited["not_replayable"].values()) == 1


def test_replay_writes_nothing_to_the_database(gateway, tmp_path, capsys):
    database = _database(gateway)
    db = Database(database)
    try:
        head = db.execute("SELECT COALESCE(MAX(seq), 0) FROM audit_decisions")[0][0]
        changes = db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes")[0][0]
    finally:
        db.close()
    candidate = _policy(tmp_path, support.test_policy().replace(READ_RULE, ""))
    assert replay(capsys, "--policy", candidate, "--database", database)[0] == 1
    db = Database(database)
    try:
        assert db.execute("SELECT COALESCE(MAX(seq), 0) FROM audit_decisions")[0][0] == head
        assert db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes")[0][0] == changes
    finally:
        db.close()
    assert Entity.parse('User{"sam"}').id == "sam"


def test_a_decision_over_the_evaluation_budget_is_reported_as_refused_not_a_crash(
    gateway, tmp_path, capsys, monkeypatch
):
    # The deployment's budget (as the server reads it), too small for any decision.
    monkeypatch.setenv("BASTION_EVALUATION_MAX_STEPS", "1")
    code, out, err = replay(
        capsys,
        "--policy",
        _policy(tmp_path, support.test_policy()),
        "--database",
        _database(gateway),
        "--json",
    )
    assert code == 1, err
    report = json.loads(out)
    assert report["over_budget"] > 0
    refused = [c for c in report["changed"] if c["new"]["reason"] == "evaluation_limit"]
    assert refused and all(c["new"]["result"] == "deny" for c in refused)
    assert all(c["new"]["rules"] == [] for c in refused)


def test_a_read_only_database_refuses_writes_and_changes_no_schema(database_url, tmp_path):
    DecisionRecords(Database(database_url)).db.close()  # its tables, as bastion serve makes them
    reader = Database(database_url, read_only=True)
    try:
        DecisionRecords(reader)  # the schema is this version's: checked, not migrated
        with pytest.raises((psycopg.Error, sqlite3.Error)):
            reader.execute("DELETE FROM audit_decisions")
        with pytest.raises(DatabaseSettingError, match="start bastion serve on it once"):
            reader.migrate("not_yet", ["CREATE TABLE not_yet (x INTEGER)"])
    finally:
        reader.close()
    missing = tmp_path / "missing.db"
    with pytest.raises(sqlite3.Error):
        Database(str(missing), read_only=True)
    assert not missing.exists()


@contextlib.contextmanager
def _deleted(gw, fact: str):
    """``fact`` deleted from the store while the block runs (as if ended since the calls)."""
    gw.apply(deletes=[parse_fact(fact)])
    try:
        yield
    finally:
        gw.apply(inserts=[parse_fact(fact)])


def _got_prompt(gw) -> DecisionRecord:
    """sam's prompt, allowed today through the relation `PROMPT_FACT`."""
    (got,) = (
        r
        for r in _records(gw)
        if r.method == "prompts/get" and r.result == "allow" and r.at > time.time() - 86400
    )
    return got


def test_a_decision_changed_by_a_fact_deleted_since_is_the_facts_and_exits_0(
    gateway, tmp_path, capsys
):
    got = _got_prompt(gateway)
    assert got.policy_version == gateway.store.policy().version
    # Another text than the version in force, which decides every recorded call as it does.
    candidate = _policy(
        tmp_path, support.test_policy() + '\ndeny(_u: User, "call", Tool{"desk/nothing"});\n'
    )
    with _deleted(gateway, PROMPT_FACT):
        code, out, err = replay(
            capsys, "--policy", candidate, "--database", _database(gateway), "--json"
        )
        assert code == 0, out + err
        report = json.loads(out)
        assert [(c["id"], c["cause"]) for c in report["changed"]] == [(got.id, "facts")]
        change = report["changed"][0]
        assert (change["old"]["result"], change["new"]["result"]) == ("allow", "deny")
        assert change["policy_of_the_time"] == {
            "result": "deny",
            "reason": "not_permitted",
            "unknown": None,
        }
        assert report["different"] == 1
        assert report["different_by_cause"] == {"policy": 0, "facts": 1, "unknown": 0}

        code, out, err = replay(capsys, "--policy", candidate, "--database", _database(gateway))
    assert code == 0, out + err
    facts_part = out.split("the facts changed since:")[1]
    assert f"id={got.id}" in facts_part
    assert "1 decided differently: 0 by the candidate, 0 of unknown cause, 1 by the facts" in out


def test_replaying_the_policy_in_force_finds_every_difference_the_facts(gateway, capsys):
    got = _got_prompt(gateway)
    version = gateway.store.policy().version
    with _deleted(gateway, PROMPT_FACT):
        code, out, err = replay(
            capsys, "--version", str(version), "--database", _database(gateway), "--json"
        )
    assert code == 0, out + err
    report = json.loads(out)
    assert [(c["id"], c["cause"]) for c in report["changed"]] == [(got.id, "facts")]
    assert report["different_by_cause"] == {"policy": 0, "facts": 1, "unknown": 0}


def test_a_candidate_that_changes_a_decision_is_the_cause_and_exits_1(gateway, tmp_path, capsys):
    candidate = _policy(tmp_path, support.test_policy().replace(READ_RULE, ""))
    code, out, err = replay(
        capsys, "--policy", candidate, "--database", _database(gateway), "--json"
    )
    assert code == 1, err
    report = json.loads(out)
    assert report["changed"]
    for change in report["changed"]:
        assert change["method"] == "resources/read"
        assert change["cause"] == "policy"
        # The policy of the time, on today's facts, still decides it as it was decided.
        assert change["policy_of_the_time"]["result"] == change["old"]["result"] == "allow"
    assert report["different_by_cause"] == {
        "policy": len(report["changed"]),
        "facts": 0,
        "unknown": 0,
    }


def test_a_window_with_both_causes_lists_each_with_its_own_and_exits_1(gateway, tmp_path, capsys):
    got = _got_prompt(gateway)
    candidate = _policy(tmp_path, support.test_policy().replace(READ_RULE, ""))
    with _deleted(gateway, PROMPT_FACT):
        code, out, err = replay(
            capsys, "--policy", candidate, "--database", _database(gateway), "--json"
        )
        assert code == 1, err
        report = json.loads(out)
        causes = {c["id"]: c["cause"] for c in report["changed"]}
        assert causes.pop(got.id) == "facts"
        assert causes and set(causes.values()) == {"policy"}
        assert report["different_by_cause"] == {"policy": len(causes), "facts": 1, "unknown": 0}

        code, out, err = replay(capsys, "--policy", candidate, "--database", _database(gateway))
    assert code == 1, err
    candidates_part, facts_part = out.split("the facts changed since:")
    assert f"id={got.id}" in facts_part and f"id={got.id}" not in candidates_part
    assert all(f"id={i}" in candidates_part for i in causes)
    assert (
        f"{len(causes) + 1} decided differently: {len(causes)} by the candidate,"
        " 0 of unknown cause, 1 by the facts"
    ) in out


def test_a_version_of_the_time_that_does_not_load_now_is_of_unknown_cause_and_said_once(
    gateway, tmp_path, capsys, monkeypatch
):
    version = gateway.store.policy().version
    # A candidate that allows nothing the gateway was asked, under a size limit (as the server
    # reads it) that the policy in force then is over.
    candidate = _policy(tmp_path, 'allow(_u: User, "read", McpResource{"nowhere"});\n')
    monkeypatch.setenv("BASTION_POLICY_MAX_BYTES", str(len(support.test_policy().encode()) - 1))
    code, out, err = replay(
        capsys, "--policy", candidate, "--database", _database(gateway), "--json"
    )
    assert code == 1, err
    report = json.loads(out)
    assert report["changed"]
    for change in report["changed"]:
        assert change["cause"] == "unknown"
        assert change["policy_of_the_time"]["unknown"] == "version_not_loaded"
    assert report["different_by_cause"] == {"policy": 0, "facts": 0, "unknown": report["different"]}
    assert err.count("does not load here") == 1
    assert f"policy version {version} does not load here" in err


# Last: the records it writes stay in the database of the tests after it.
def test_a_record_whose_policy_version_is_not_held_is_of_unknown_cause_and_exits_1(
    gateway, tmp_path, capsys
):
    got = _got_prompt(gateway)
    database = _database(gateway)
    writer = DecisionRecords(Database(database))
    gone = dataclasses.replace(got, id=new_decision_id(), policy_version=10**6)
    unnamed = dataclasses.replace(got, id=new_decision_id(), policy_version=None)
    writer.add(gone)
    writer.add(unnamed)
    writer.flush()
    writer.db.close()
    version = gateway.store.policy().version
    # The policy in force, on facts that refuse the prompt now: only the record of a version
    # held is the facts'; the others cannot be told, and count as the candidate's.
    with _deleted(gateway, PROMPT_FACT):
        code, out, err = replay(capsys, "--version", str(version), "--database", database, "--json")
        assert code == 1, out + err
        report = json.loads(out)
        causes = {c["id"]: (c["cause"], c["policy_of_the_time"]) for c in report["changed"]}
        assert causes == {
            got.id: ("facts", {"result": "deny", "reason": "not_permitted", "unknown": None}),
            gone.id: ("unknown", {"result": None, "reason": None, "unknown": "version_not_held"}),
            unnamed.id: ("unknown", {"result": None, "reason": None, "unknown": "no_version"}),
        }
        assert report["different_by_cause"] == {"policy": 0, "facts": 1, "unknown": 2}

        code, out, err = replay(capsys, "--version", str(version), "--database", database)
    assert code == 1, err
    assert f"policy version {10**6} is not held any more" in out
    assert "the record names no policy version" in out
    assert "2 of unknown cause" in out
