"""``bastion approvals list|show|approve|deny`` on a real SQLite file and a real PostgreSQL, with the
deployment's key directory, and the audit commands that show approvals: the policy and facts stored in the
database decide who may answer, every refusal says why and changes nothing."""

from __future__ import annotations

import getpass
import json
import time

import pytest

from bastion.agents.identity import owner_fact
from bastion.approvals.store import Answer
from bastion.audit.decisions import DecisionRecord, DecisionRecords, new_decision_id
from bastion.audit.log import AuditLog
from bastion.cli import main
from bastion.db import Database
from bastion.facts.store import FactStore
from bastion.oauth.store import OAuthStore
from bastion.policy.parser import parse_fact
from tests.approvals.support import DELETE, REPORT, SEND, Holder, config, store_policy_and_facts

ISSUER = "http://127.0.0.1:9"


class Deployment:
    def __init__(self, tmp_path, database: str) -> None:
        self.database = database
        self.keys = tmp_path / "keys"
        self.config = tmp_path / "bastion.toml"
        self.config.write_text(config(ISSUER, self.database, self.keys))
        store_policy_and_facts(self.database)
        self.holder = Holder(self.database, self.keys, ISSUER)

    def status(self, request_id: str) -> str:
        return self.holder.approvals.get(request_id).status


@pytest.fixture
def deployment(tmp_path, database_url):
    """On a SQLite file, then on a PostgreSQL schema."""
    d = Deployment(tmp_path, database_url)
    yield d
    d.holder.close()


@pytest.fixture
def bastion(capsys, deployment, monkeypatch):
    """``bastion(*argv)`` -> (exit status, stdout, stderr), with --config added."""
    monkeypatch.delenv("BASTION_DATABASE", raising=False)

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main([*argv, "--config", str(deployment.config)])
        except SystemExit as e:  # argparse
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


# -- reading -------------------------------------------------------------------------------------


def test_list_shows_held_calls_with_their_approvers_newest_first(deployment, bastion):
    first = deployment.holder.hold(SEND)
    second = deployment.holder.hold(DELETE)
    code, out, _ = bastion("approvals", "list")
    assert code == 0
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [second.id, first.id]
    assert "pending" in lines[1] and "approvers avery" in lines[1]
    assert "sam via bot" in lines[1] and 'Tool{"crm/send"}' in lines[1]
    assert "approvers sam (confirms)" in lines[0]


def test_list_narrows_by_approver_and_status_and_prints_json(deployment, bastion):
    for_avery = deployment.holder.hold(SEND)
    sams_own = deployment.holder.hold(DELETE)
    _, out, _ = bastion("approvals", "list", "--approver", "avery")
    assert out.split("\t")[0] == for_avery.id and sams_own.id not in out
    _, out, _ = bastion("approvals", "list", "--status", "denied")
    assert out == ""
    _, out, _ = bastion("approvals", "list", "--json", "--limit", "1")
    [line] = out.splitlines()
    assert json.loads(line)["id"] == sams_own.id
    code, _, err = bastion("approvals", "list", "--limit", "0")
    assert code == 2 and "give a whole number from 1 to 200, not '0'" in err
    code, _, err = bastion("approvals", "list", "--status", "maybe")
    assert code == 2 and "invalid choice" in err


def test_show_prints_the_arguments_in_full_the_answers_and_the_audit_events(deployment, bastion):
    arguments = {"to": "ceo@example.com", "body": "line one\nline two", "cc": ["a", "b"]}
    held = deployment.holder.hold(SEND, arguments)
    assert bastion("approvals", "approve", held.id, "--as", "avery", "--reason", "fine")[0] == 0
    code, out, _ = bastion("approvals", "show", held.id)
    assert code == 0
    assert f"approval request {held.id}: approved" in out
    assert '"body": "line one\\nline two"' in out and '"cc": [' in out
    assert "approvers: avery; 1 needed" in out
    assert "avery approve (cli): fine" in out
    assert "approval.requested" in out and "approval.answer" in out
    assert "approval.approved" in out
    code, out, _ = bastion("approvals", "show", held.id, "--json")
    shown = json.loads(out)
    assert shown["arguments"] == arguments
    kinds = [e["kind"] for e in shown["events"]]
    assert kinds.index("approval.requested") < kinds.index("approval.answer")


def test_a_delegated_call_is_listed_and_shown_with_its_chain_of_agents(deployment, bastion):
    held = deployment.holder.hold(SEND, agents=("coder", "bot"))
    _, out, _ = bastion("approvals", "list")
    assert "sam via coder > bot\t" in out
    _, out, _ = bastion("approvals", "show", held.id)
    assert "user sam, agent bot (through coder)\n" in out
    _, out, _ = bastion("approvals", "show", held.id, "--json")
    assert json.loads(out)["agents"] == ["coder", "bot"]
    direct = deployment.holder.hold(SEND)
    _, out, _ = bastion("approvals", "show", direct.id)
    assert "user sam, agent bot\n" in out


def test_request_ids_never_read_as_an_option_on_the_command_line():
    from bastion.approvals.store import new_request_id

    assert not any(new_request_id().startswith("-") for _ in range(2000))


def test_an_unknown_request_is_refused_by_every_command(bastion):
    for argv in (
        ("show", "nope"),
        ("approve", "nope", "--as", "avery"),
        ("deny", "nope", "--as", "avery"),
    ):
        code, out, err = bastion("approvals", *argv)
        assert code == 2 and out == ""
        assert "no approval request has the id 'nope'" in err


# -- answering -----------------------------------------------------------------------------------


def test_the_approver_the_policy_names_approves_and_the_os_user_is_kept(deployment, bastion):
    held = deployment.holder.hold(SEND)
    code, out, _ = bastion("approvals", "approve", held.id, "--as", "avery")
    assert code == 0 and "\tapproved\t" in out
    request = deployment.holder.approvals.get(held.id)
    [answer] = request.answers
    assert (answer.approver, answer.channel) == ("avery", "cli")
    [event] = AuditLog(deployment.holder.db).events(kind="approval.answer", request_id=held.id)
    assert event.detail["via"] == f"cli:{getpass.getuser()}"


def test_a_person_the_policy_does_not_name_is_refused_and_nothing_changes(deployment, bastion):
    held = deployment.holder.hold(SEND)
    for person, why in (
        ("mallory", "not an approver"),
        ("bot", "is an agent of this call"),  # the agent itself
        ("sam", "may not approve their own call"),
    ):
        code, out, err = bastion("approvals", "approve", held.id, "--as", person)
        assert code == 2 and out == ""
        assert f"{person} may not approve request {held.id}" in err and why in err
    for variant in (" avery", "avery\u3164", "a  very"):
        code, _, err = bastion("approvals", "approve", held.id, "--as", variant)
        assert code == 2 and "a user name" in err, variant
    assert deployment.status(held.id) == "pending"
    assert deployment.holder.approvals.get(held.id).answers == ()


def test_an_agent_acting_as_itself_is_confirmed_by_its_owner_not_as_its_client_id(
    deployment, bastion
):
    """No approver rule names anyone for a delete: the call of ``nightly``, acting as itself
    (client credentials), is confirmed by its owner pat; ``--as nightly`` is refused."""
    OAuthStore(deployment.holder.db).create_user("pat", "hash", time.time(), actor="test")
    FactStore(deployment.holder.db).apply([owner_fact("nightly", "pat")], actor="test")
    held = deployment.holder.hold(DELETE, subject="nightly", client_id="nightly")
    code, out, _ = bastion("approvals", "list")
    assert code == 0 and "approvers pat (confirms)" in out, out
    code, out, err = bastion("approvals", "approve", held.id, "--as", "nightly")
    assert code == 2 and out == "" and "is an agent of this call" in err, err
    assert deployment.status(held.id) == "pending"
    assert deployment.holder.approvals.get(held.id).answers == ()
    assert bastion("approvals", "approve", held.id, "--as", "pat")[0] == 0
    assert deployment.status(held.id) == "approved"


def test_the_policy_and_facts_stored_now_decide_who_may_answer(deployment, bastion):
    held = deployment.holder.hold(SEND)
    assert bastion("approvals", "approve", held.id, "--as", "cfo")[0] == 2
    # A fact written after the call was held: cfo is sam's manager too, as the policy sees now.
    FactStore(deployment.holder.db).apply([parse_fact('manager(User{"sam"}, User{"cfo"})')])
    code, _, err = bastion("approvals", "approve", held.id, "--as", "cfo")
    assert code == 0, err
    assert deployment.status(held.id) == "approved"


def test_a_denial_and_then_a_second_answer(deployment, bastion):
    held = deployment.holder.hold(SEND)
    code, out, _ = bastion("approvals", "deny", held.id, "--as", "avery", "--reason", "no")
    assert code == 0 and "\tdenied\t" in out
    code, _, err = bastion("approvals", "approve", held.id, "--as", "avery")
    assert code == 2 and "denied, not pending" in err
    assert deployment.status(held.id) == "denied"
    [answer] = deployment.holder.approvals.get(held.id).answers
    assert (answer.answer, answer.reason) == ("deny", "no")


def test_what_a_caller_wrote_cannot_pass_for_another_line_of_the_output(deployment, bastion):
    held = deployment.holder.hold(SEND)
    forged = "no\n  2026-01-01T00:00:00Z mallory approve (page)"
    assert bastion("approvals", "deny", held.id, "--as", "avery", "--reason", forged)[0] == 0
    for argv in (("approvals", "show", held.id), ("audit", "events", "--request", held.id)):
        _, out, _ = bastion(*argv)
        assert not any("mallory" in line and "avery" not in line for line in out.splitlines())
        assert "no\\u000a\\u0020\\u00202026-01-01T00:00:00Z mallory approve (page)" in out


def test_an_expired_request_cannot_be_answered(deployment, bastion):
    an_hour_ago = time.time() - 3600
    approvals = deployment.holder.approvals
    approvals.clock = approvals.store.clock = lambda: an_hour_ago
    held = deployment.holder.hold(SEND)
    code, _, err = bastion("approvals", "approve", held.id, "--as", "avery")
    assert code == 2 and "expired" in err
    assert approvals.get(held.id).answers == ()


def test_an_approval_for_minutes_is_bounded_by_the_policy_and_stored_as_a_fact(deployment, bastion):
    held = deployment.holder.hold(SEND)
    code, _, err = bastion("approvals", "approve", held.id, "--as", "avery", "--minutes", "31")
    assert code == 2 and "30 minutes at most" in err
    code, _, err = bastion("approvals", "approve", held.id, "--as", "avery", "--minutes", "-1")
    assert code == 2 and "0 (this call only) or more" in err
    before = time.time()
    assert bastion("approvals", "approve", held.id, "--as", "avery", "--minutes", "15")[0] == 0
    [grant] = FactStore(deployment.holder.db).get(("approval_grant", None, None, None, None))
    assert grant.fact[1].id == "sam" and grant.fact[2].id == "bot"
    assert before + 15 * 60 <= grant.expires_at <= time.time() + 15 * 60


def test_a_held_result_is_released_with_fields_withheld(deployment, bastion):
    held = deployment.holder.hold(
        REPORT, kind="review", result={"structuredContent": {"customers": [{"email": "x"}]}}
    )
    code, out, _ = bastion(
        "approvals", "approve", held.id, "--as", "avery", "--withhold", "customers.*.email"
    )
    assert code == 0 and "\treleased\t" in out
    assert deployment.holder.approvals.get(held.id).withheld_fields == ("customers.*.email",)
    _, out, _ = bastion("approvals", "show", held.id)
    assert "released with withheld fields: customers.*.email" in out
    assert "email" not in out.split("answers:")[0].split("arguments:")[1].split("why:")[0]


def test_a_withheld_field_that_matches_nothing_is_refused_naming_it_and_nothing_released(
    deployment, bastion
):
    """A mistyped field to withhold: before, the result was released with it withholding
    nothing (the emails went out); now the command says which path matches nothing, exits 2,
    and the review stays pending."""
    result = {"structuredContent": {"customers": [{"email": "ada@example.com"}]}}
    held = deployment.holder.hold(REPORT, kind="review", result=result)
    code, out, err = bastion(
        "approvals", "approve", held.id, "--as", "avery", "--withhold", "customers.*.emial"
    )
    assert code == 2 and out == ""
    assert "'customers.*.emial' matches nothing in the held result" in err
    after = deployment.holder.approvals.get(held.id)
    assert after.status == "pending" and after.answers == ()


def test_show_as_a_reviewer_prints_the_held_result_masked_for_them(deployment, bastion):
    customers = {"customers": [{"name": "Ada", "email": "ada@example.com"}]}
    held = deployment.holder.hold(
        REPORT, kind="review", result={"structuredContent": customers, "content": []}
    )
    code, out, _ = bastion("approvals", "show", held.id, "--as", "avery")
    assert code == 0 and "result, as avery may see it:" in out and "ada@example.com" in out
    code, out, _ = bastion("approvals", "show", held.id, "--as", "cfo", "--json")
    assert code == 0
    [customer] = json.loads(out)["result"]["structuredContent"]["customers"]
    assert customer["name"] == "Ada" and customer["email"] != "ada@example.com"
    code, out, err = bastion("approvals", "show", held.id, "--as", "mallory")
    assert code == 2 and out == "" and "mallory may not review" in err
    code, _, _ = bastion("approvals", "show", held.id)
    assert code == 0
    call = deployment.holder.hold(SEND)
    code, _, err = bastion("approvals", "show", call.id, "--as", "avery")
    assert code == 2 and "holds a call, not a result" in err


def test_without_oauth_in_the_configuration_the_commands_say_what_is_missing(
    deployment, capsys, tmp_path
):
    bare = tmp_path / "bare.toml"
    bare.write_text(f'[server]\ndatabase = "{deployment.database}"\n')
    assert main(["approvals", "list", "--config", str(bare)]) == 2
    assert "[oauth]" in capsys.readouterr().err


# -- the audit trail -----------------------------------------------------------------------------


def test_audit_events_prints_the_approval_events_oldest_first(deployment, bastion):
    held = deployment.holder.hold(SEND)
    code, _, err = bastion("approvals", "approve", held.id, "--as", "avery")
    assert code == 0, err
    code, out, _ = bastion("audit", "events", "--kind", "approval.")
    assert code == 0
    kinds = [line.split(" ")[1] for line in out.splitlines()]
    assert kinds[0] == "approval.requested" and "approval.answer" in kinds
    assert all(k.startswith("approval.") for k in kinds)
    answer = next(line for line in out.splitlines() if " approval.answer " in line)
    assert (
        "approver=avery" in answer and "channel=cli" in answer and f"request_id={held.id}" in answer
    )
    _, out, _ = bastion("audit", "events", "--request", "someone-else")
    assert out == ""
    _, out, _ = bastion("audit", "events", "--kind", "approval_")  # LIKE's _ is not a wildcard
    assert out == ""
    _, out, _ = bastion("audit", "events", "--request", held.id, "--json")
    assert {json.loads(line)["detail"]["request_id"] for line in out.splitlines()} == {held.id}


def test_audit_tail_links_a_held_call_to_its_approval_request(deployment, bastion):
    """As the gateway writes them: the held call, the call its approval let through, and a result
    held for review, each linked to its request."""
    held = deployment.holder.hold(SEND)
    reviewed = deployment.holder.hold(REPORT, kind="review", result={"content": []})
    records = DecisionRecords(Database(deployment.database))
    for result, reason, request, kind in (
        ("held", "approval_pending", held, "approval"),
        ("allow", "", held, "approval"),
        ("held", "review_pending", reviewed, "review"),
    ):
        records.add(
            DecisionRecord(
                id=new_decision_id(),
                at=time.time(),
                server="crm",
                method="tools/call",
                target="crm/send",
                principals=("User:sam", "Agent:bot"),
                result=result,
                reason=reason,
                obligations={"approval": {"id": request.id, "kind": kind}},
            )
        )
    records.flush()
    records.db.close()
    code, out, _ = bastion("audit", "tail")
    assert code == 0
    held_line, allowed_line, review_line = out.splitlines()
    assert held_line.split()[1] == "held" and f"approval={held.id} " in held_line
    assert "reason=approval_pending" in held_line
    assert allowed_line.split()[1] == "allow" and f"approval={held.id} " in allowed_line
    assert review_line.split()[1] == "held" and f"review={reviewed.id} " in review_line


def test_names_that_would_read_as_others_are_shown_escaped_on_every_line(deployment, bastion):
    """An agent named ``Trusted Bot`` and a Hangul filler, a user whose id turns round with a
    right-to-left override, a target past a screen's width: shown escaped and cut, never as
    what they pass for."""
    held = deployment.holder.hold(SEND, agents=("Trusted Bot\u3164", "bot"))
    records = DecisionRecords(Database(deployment.database))
    records.add(
        DecisionRecord(
            id=new_decision_id(),
            at=time.time(),
            server="crm",
            method="tools/call",
            target="crm/" + "x" * 300 + "\u202eexe.",
            principals=('User{"mallory\u202egnp.exe"}', 'Agent{"Trusted Bot\u3164"}'),
            result="deny",
            reason="denied",
        )
    )
    records.flush()
    records.db.close()
    for argv in (("approvals", "list"), ("approvals", "show", held.id), ("audit", "tail")):
        code, out, _ = bastion(*argv)
        assert code == 0
        assert "\u3164" not in out and "\u202e" not in out, argv
        assert "Trusted Bot\\u3164" in out, argv
    assert 'User{\\"mallory\\u202egnp.exe\\"}' in out or "mallory\\u202egnp.exe" in out
    assert "x" * 200 not in out and "\u2026 (" in out


def test_a_task_that_would_read_as_another_is_shown_escaped_on_every_line(deployment, bastion):
    # bastion names its tasks itself (task_ and random letters): a task id comes only from a
    # token bastion issued. Whatever it holds, the terminal shows it escaped, never raw.
    task = "t-1\u202egnp.exe\x1b[2J\n  task t-2" + "x" * 300
    held = deployment.holder.hold(SEND, task=task)
    for argv in (("approvals", "list"), ("approvals", "show", held.id)):
        code, out, _ = bastion(*argv)
        assert code == 0, argv
        assert "\u202e" not in out and "\x1b" not in out, argv
        assert "t-1\\u202egnp.exe\\u001b[2J\\u000a" in out, argv
        assert not any(line.lstrip().startswith("task t-2") for line in out.splitlines()), argv
        assert "x" * 300 not in out, argv


def test_audit_events_are_found_by_kind_prefix_and_request_on_either_database(database_url):
    db = Database(database_url)
    try:
        log = AuditLog(db)
        log.record("approval.requested", request_id="a_1")
        log.record("approval.answer", request_id="a_1", reason='say "request_id": "b%2"')
        log.record("review.requested", request_id="b%2")
        log.record("approvalXrequested", request_id="a%1")
        assert {e.kind for e in log.events(kind_prefix="approval.")} == {
            "approval.requested",
            "approval.answer",
        }
        assert [e.kind for e in log.events(request_id="b%2")] == ["review.requested"]
        assert {e.kind for e in log.events(request_id="a_1")} == {
            "approval.requested",
            "approval.answer",
        }
        assert log.events(request_id="a_") == [] and log.events(kind_prefix="approval_") == []
    finally:
        db.close()


def test_two_answers_by_one_person_at_once_record_one(deployment, bastion):
    """The race a check-then-write lets through: the CLI and a page (here, the store written to
    directly, past the service's checks) answering for avery at the same moment."""
    held = deployment.holder.hold(SEND)
    assert bastion("approvals", "deny", held.id, "--as", "avery")[0] == 0
    late = Answer("avery", "approve", 0, "page", "", time.time())
    with pytest.raises(ValueError, match="already answered"):
        deployment.holder.approvals.store.answer(held.id, late)
    [answer] = deployment.holder.approvals.get(held.id).answers
    assert (answer.answer, answer.channel) == ("deny", "cli")
