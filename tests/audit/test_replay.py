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
from bastion.facts.store import FactStore
from bastion.policy.parser import parse_fact
from bastion.signals.suspensions import resume, suspend, suspension
from tests.conftest import POSTGRES_URL, require_service
from tests.gateway import support
from tests.waits import eventually

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
    caught_up = eventually(lambda: gw.app.state.replica.applied >= seq, every=0.01)
    assert caught_up, "the replica did not catch up"


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
    # The resources sam read (the internal notes held for review among them: the policy held
    # them), allowed by the rule, through a user's role.
    reads = _sams_reads(gateway)
    assert sorted(r.result for r in reads) == ["allow", "allow", "held"]

    code, out, err = replay(
        capsys, "--policy", candidate, "--database", _database(gateway), "--json"
    )

    assert code == 1, err
    report = json.loads(out)
    changed = {c["id"]: c for c in report["changed"]}
    assert set(changed) == {r.id for r in reads}
    for record in reads:
        change = changed[record.id]
        assert (change["old"]["result"], change["new"]["result"]) == (record.result, "deny")
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
    # The notes held for review: the policy's hold, replayed (nobody answered it).
    assert "approval" not in skipped
    assert skipped["arguments_not_recorded"] == 1  # search_customers: its deny rule reads them
    assert skipped["suspended"] >= 1  # avery, refused by the kill switch
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
        "in_force_version",
        "replayed",
        "same",
        "different",
        "over_budget",
        "not_replayable",
        "changed",
        "different_by_cause",
        "changed_by_push",
        "push_effect_unknown",
    }
    assert report["in_force_version"] == gateway.store.policy().version
    assert report["different"] == report["changed_by_push"] == len(report["changed"]) > 0
    assert report["policy"] == {"files": [candidate]}
    change = report["changed"][0]
    assert set(change) == {
        "id",
        "source",
        "at",
        "server",
        "method",
        "action",
        "target",
        "principals",
        "old",
        "new",
        "in_force",
        "changed_by_push",
        "cause",
        "policy_of_the_time",
    }
    assert set(change["old"]) == {"result", "reason", "rules", "policy_version"}
    assert set(change["new"]) == {"result", "reason", "rules"}
    assert set(change["in_force"]) == {"result", "reason", "unknown"}
    # Why: the push's (the policy in force decides it otherwise); the policy of the time is not
    # asked.
    assert change["cause"] == "policy" and change["changed_by_push"] is True
    assert change["source"] == "gateway"
    assert change["policy_of_the_time"] is None
    assert report["different_by_cause"] == {
        "policy": report["different"],
        "earlier_push": 0,
        "facts": 0,
        "unknown": 0,
    }
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
    # The policy in force is over it alike: the gateway refuses them before the push and after.
    assert code == 0, err
    report = json.loads(out)
    assert report["over_budget"] > 0
    refused = [c for c in report["changed"] if c["new"]["reason"] == "evaluation_limit"]
    assert refused and all(c["new"]["result"] == "deny" for c in refused)
    assert all(c["new"]["rules"] == [] for c in refused)
    assert all(c["in_force"]["reason"] == "evaluation_limit" for c in refused)
    assert all(c["changed_by_push"] is False for c in refused)
    assert {c["policy_of_the_time"]["unknown"] for c in refused} == {"over_budget"}


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
        assert change["in_force"] == change["policy_of_the_time"]
        assert change["changed_by_push"] is False
        assert report["different"] == 1 and report["changed_by_push"] == 0
        assert report["different_by_cause"] == {
            "policy": 0,
            "earlier_push": 0,
            "facts": 1,
            "unknown": 0,
        }

        code, out, err = replay(capsys, "--policy", candidate, "--database", _database(gateway))
    assert code == 0, out + err
    facts_part = out.split("not the push's:")[1]
    assert f"id={got.id}" in facts_part
    assert "cause: the facts changed since (policy version" in facts_part
    assert (
        "1 decided differently; the push changes 0; not the push's: 1 by the facts changed"
        " since, 0 by an earlier push, 0 of unknown cause"
    ) in out


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
    assert report["different_by_cause"] == {
        "policy": 0,
        "earlier_push": 0,
        "facts": 1,
        "unknown": 0,
    }


def test_a_call_the_facts_no_longer_allow_that_the_candidate_allows_again_is_the_pushs_and_exits_1(
    gateway, tmp_path, capsys
):
    got = _got_prompt(gateway)
    # The policy in force, and a rule that lets anyone get the prompt, related to the server or
    # not: the relation ended since the call, and the push would let the call through again.
    candidate = _policy(
        tmp_path, support.test_policy() + '\nallow(_actor, "get", Prompt{"desk/apology"});\n'
    )
    with _deleted(gateway, PROMPT_FACT):
        code, out, err = replay(
            capsys, "--policy", candidate, "--database", _database(gateway), "--json"
        )
        assert code == 1, out + err
        report = json.loads(out)
        assert [c["id"] for c in report["changed"]] == [got.id]
        change = report["changed"][0]
        # Decided as recorded, but not as the policy in force decides it today.
        assert (change["old"]["result"], change["new"]["result"]) == ("allow", "allow")
        assert change["in_force"] == {"result": "deny", "reason": "not_permitted", "unknown": None}
        assert change["changed_by_push"] is True and change["cause"] == "policy"
        assert any('Prompt{"desk/apology"}' in rule for rule in change["new"]["rules"])
        assert report["different"] == 0 and report["same"] == report["replayed"]
        assert report["changed_by_push"] == 1 and report["push_effect_unknown"] == 0

        code, out, err = replay(capsys, "--policy", candidate, "--database", _database(gateway))
    assert code == 1, out + err
    assert "allow -> allow  " in out and f"id={got.id}" in out
    assert "cause: the push (policy version" in out
    assert "the push changes 1 (1 of them decided as recorded)" in out


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
        assert change["cause"] == "policy" and change["changed_by_push"] is True
        # The policy in force, on today's facts, still decides it as it was decided.
        assert change["in_force"]["result"] == change["old"]["result"] in ("allow", "held")
    assert report["different_by_cause"] == {
        "policy": len(report["changed"]),
        "earlier_push": 0,
        "facts": 0,
        "unknown": 0,
    }
    assert report["changed_by_push"] == len(report["changed"])


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
        assert report["different_by_cause"] == {
            "policy": len(causes),
            "earlier_push": 0,
            "facts": 1,
            "unknown": 0,
        }
        assert report["changed_by_push"] == len(causes)

        code, out, err = replay(capsys, "--policy", candidate, "--database", _database(gateway))
    assert code == 1, err
    candidates_part, facts_part = out.split("not the push's:", 1)
    assert f"id={got.id}" in facts_part and f"id={got.id}" not in candidates_part
    assert all(f"id={i}" in candidates_part for i in causes)
    assert (
        f"{len(causes) + 1} decided differently; the push changes {len(causes)}; not the push's:"
        " 1 by the facts changed since, 0 by an earlier push, 0 of unknown cause"
    ) in out


# Last: the records it writes stay in the database of the tests after it.
def test_with_no_policy_stored_the_push_of_a_candidate_that_allows_changes_what_it_allows(
    gateway, tmp_path, capsys
):
    """A database that holds records and no policy version: what is in force is the empty
    policy, which denies everything (as a server with none does), so a candidate that allows a
    recorded call changes it, and the run fails."""
    got = _got_prompt(gateway)
    assert got.result == "allow"
    empty = str(tmp_path / "no-policy.db")
    db = Database(empty)
    try:
        FactStore(db)  # the facts' tables, and no version among them
        writer = DecisionRecords(db)
        writer.add(got)
        writer.flush()
    finally:
        db.close()
    candidate = _policy(
        tmp_path, support.test_policy() + '\nallow(_actor, "get", Prompt{"desk/apology"});\n'
    )
    code, out, err = replay(capsys, "--policy", candidate, "--database", empty, "--json")
    assert code == 1, out + err
    report = json.loads(out)
    assert report["in_force_version"] is None
    assert report["changed_by_push"] == 1 and report["replayed"] == 1
    (change,) = report["changed"]
    assert change["id"] == got.id and change["changed_by_push"] is True
    assert change["in_force"]["result"] == "deny" and change["new"]["result"] == "allow"


def test_a_record_whose_policy_version_is_not_held_is_of_unknown_cause_and_not_the_pushs(
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
    # held is the facts'; the others' cause cannot be told. None is the push's: it changes
    # nothing the policy in force decides.
    with _deleted(gateway, PROMPT_FACT):
        code, out, err = replay(capsys, "--version", str(version), "--database", database, "--json")
        assert code == 0, out + err
        report = json.loads(out)
        causes = {c["id"]: (c["cause"], c["policy_of_the_time"]) for c in report["changed"]}
        assert causes == {
            got.id: ("facts", {"result": "deny", "reason": "not_permitted", "unknown": None}),
            gone.id: ("unknown", {"result": None, "reason": None, "unknown": "version_not_held"}),
            unnamed.id: ("unknown", {"result": None, "reason": None, "unknown": "no_version"}),
        }
        assert report["different_by_cause"] == {
            "policy": 0,
            "earlier_push": 0,
            "facts": 1,
            "unknown": 2,
        }
        assert report["changed_by_push"] == 0

        code, out, err = replay(capsys, "--version", str(version), "--database", database)
    assert code == 0, err
    assert f"cause unknown: policy version {10**6} is not held any more" in out
    assert "cause unknown: the record names no policy version" in out
    assert "the push changes 0; not the push's: 1 by the facts changed since" in out
    assert "2 of unknown cause" in out


# Last: these put a later version in force than the one the records were made under.
def _pushed_without_read_rule(gw) -> int:
    """The test policy less `READ_RULE` in force (pushed once), as if pushed after the calls:
    sam's reads, allowed when recorded, are refused by it. Its version."""
    text = support.test_policy().replace(READ_RULE, "")
    now = gw.store.policy()
    if now.text != text:
        gw.store.put_policy(text, actor="test", note="without the read rule")
    return gw.store.policy().version


def _sams_reads(gw) -> list[DecisionRecord]:
    """The resources sam read today through the gateway (not the records tests wrote): allowed,
    or held by the policy for a person's review."""
    return [
        r
        for r in _records(gw)
        if not r.recovered
        and not r.later_fields()
        and r.method == "resources/read"
        and r.result in ("allow", "held")
        and r.principals[0] == 'User{"sam"}'
        and r.at > time.time() - 86400
    ]


def test_a_change_an_earlier_push_made_is_not_the_candidates_and_exits_0(gateway, tmp_path, capsys):
    reads = _sams_reads(gateway)
    assert len(reads) == 3
    then = reads[0].policy_version
    version = _pushed_without_read_rule(gateway)
    assert version > then
    # The version in force, and an edit that changes none of the recorded calls.
    candidate = _policy(
        tmp_path,
        gateway.store.policy().text + '\ndeny(_u: User, "call", Tool{"desk/nothing"});\n',
    )
    code, out, err = replay(
        capsys, "--policy", candidate, "--database", _database(gateway), "--json"
    )
    assert code == 0, out + err
    report = json.loads(out)
    assert report["in_force_version"] == version
    changed = {c["id"]: c for c in report["changed"]}
    assert set(changed) == {r.id for r in reads}
    for record in reads:
        change = changed[record.id]
        assert (change["old"]["result"], change["new"]["result"]) == (record.result, "deny")
        assert change["in_force"] == {"result": "deny", "reason": "not_permitted", "unknown": None}
        assert change["changed_by_push"] is False and change["cause"] == "earlier_push"
        # The policy of the time still decides it as it was decided.
        assert change["policy_of_the_time"]["result"] == record.result
    assert report["changed_by_push"] == 0
    assert report["different_by_cause"] == {
        "policy": 0,
        "earlier_push": 3,
        "facts": 0,
        "unknown": 0,
    }

    code, out, err = replay(capsys, "--policy", candidate, "--database", _database(gateway))
    assert code == 0, out + err
    pushs, apart = out.split("not the push's:", 1)
    assert all(f"id={r.id}" in apart and f"id={r.id}" not in pushs for r in reads)
    assert f"cause: an earlier push (policy version {then}, in force then, decides it allow" in out


def test_replaying_the_version_in_force_changes_nothing_the_push_would_and_exits_0(
    gateway, tmp_path, capsys
):
    reads = _sams_reads(gateway)
    version = _pushed_without_read_rule(gateway)
    database = _database(gateway)
    code, out, err = replay(capsys, "--version", str(version), "--database", database, "--json")
    assert code == 0, out + err
    report = json.loads(out)
    assert report["changed_by_push"] == 0 and report["push_effect_unknown"] == 0
    assert {c["id"] for c in report["changed"]} == {r.id for r in reads}
    assert {c["cause"] for c in report["changed"]} == {"earlier_push"}
    # The same text, given as a file.
    text = gateway.store.policy().text
    code, out, err = replay(
        capsys, "--policy", _policy(tmp_path, text), "--database", database, "--json"
    )
    assert code == 0, out + err
    assert json.loads(out)["changed_by_push"] == 0


def test_a_version_of_the_time_that_does_not_load_now_is_of_unknown_cause_and_said_once(
    gateway, tmp_path, capsys, monkeypatch
):
    reads = _sams_reads(gateway)
    then = reads[0].policy_version
    version = _pushed_without_read_rule(gateway)
    # A size limit (as the server reads it) that the version in force meets and the version
    # the records were made under is over.
    in_force = gateway.store.policy().text
    monkeypatch.setenv("BASTION_POLICY_MAX_BYTES", str(len(in_force.encode())))
    assert len(gateway.store.policy(then).text.encode()) > len(in_force.encode())
    # A candidate that allows nothing the gateway was asked: it changes what the policy in force
    # allows (the push's), and refuses sam's reads as the policy in force does (not the push's).
    candidate = _policy(tmp_path, 'allow(_u: User, "read", McpResource{"nowhere"});\n')
    code, out, err = replay(
        capsys, "--policy", candidate, "--database", _database(gateway), "--json"
    )
    assert code == 1, err
    report = json.loads(out)
    changed = {c["id"]: c for c in report["changed"]}
    for record in reads:
        change = changed[record.id]
        assert change["changed_by_push"] is False and change["cause"] == "unknown"
        assert change["policy_of_the_time"]["unknown"] == "version_not_loaded"
    pushs = [c for c in report["changed"] if c["changed_by_push"]]
    assert pushs and {c["cause"] for c in pushs} == {"policy"}
    assert report["changed_by_push"] == len(pushs)
    assert err.count("does not load here") == 1
    assert f"policy version {then} does not load here" in err
    # Under a limit the version in force is over too, what the push changes cannot be told.
    monkeypatch.setenv("BASTION_POLICY_MAX_BYTES", str(len(in_force.encode()) - 1))
    code, out, err = replay(capsys, "--policy", candidate, "--database", _database(gateway))
    assert code == 2 and out == ""
    assert f"policy version {version}, in force, does not load here" in err


def test_an_oso_cloud_check_of_a_string_actor_is_replayed_as_the_string_it_asked_of():
    """Oso Cloud's API keeps a String actor as ``{"type": "String", "id": ...}``: asked again as
    Oso Cloud asked it, it is that string, not an entity of the type ``String`` (which /v1 would
    read there, and the policy refuse)."""
    from bastion.audit.replay import LoggedDecision, replay
    from bastion.decide import Authorizer

    authz = Authorizer('allow(actor: String, "read", _repo: Repo) if actor = "ci";')
    request = {
        "actor": {"type": "String", "id": "ci"},
        "action": "read",
        "resource": {"type": "Repo", "id": "anvil"},
    }
    stored = ("p-1", "authorize", request, True, 1, None, time.time(), None, None, "k")
    record = LoggedDecision.of((*stored, "oso_cloud"))

    replayed = replay(authz, record)

    assert replayed.result == "allow" and replayed.same
    assert record.principals == ('"ci"',) and record.target == 'Repo{"anvil"}'
