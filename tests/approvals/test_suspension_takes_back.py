"""A suspension takes back what was approved before it, on a real SQLite file and a real
PostgreSQL schema: a held call's approval, an approval for minutes and a released result of the
suspended user or agent, or given by the suspended approver, are closed when the suspension is
stored, whichever way it is written. Lifted (or lapsed), the suspension brings none of them back:
the call is held again and the people are asked again. Before, each was used after the resume."""

# ruff: noqa: F401, F811 (`world` and `people` are fixtures, imported for the tests to take)
from __future__ import annotations

import dataclasses
import threading
import uuid

import psycopg
import pytest

from bastion.approvals.service import NoApprover, NotAllowed
from bastion.audit.replay import NotReplayable, question_of
from bastion.db import Database
from bastion.facts.model import Entity
from bastion.facts.store import FactStore, StoredFact
from bastion.signals.suspensions import Suspensions, apply_facts, resume, suspend, suspension
from tests.approvals.test_agents_acting_as_themselves import call as call_tool
from tests.approvals.test_service import (
    Clock,
    acting_as_itself,
    approvals_on,
    call,
    delete,
    held,
    people,
    report,
    reviewed,
    send,
    standing,
    world,
)
from tests.approvals.test_unanswerable import RULES, TOOL, approver
from tests.signals.support import running
from tests.signals.test_kill_switch import client_id
from tests.waits import PATIENCE, eventually

GRANTS = ("approval_grant", None, None, None, None)


def suspended_and_resumed(facts, kind: str, id: str) -> None:
    """The kill switch on, then off again, as the API and the command line write it."""
    suspend(facts, suspension(kind, id), "test")
    assert resume(facts, suspension(kind, id), "test").deleted == 1


def voided(approvals, request_id: str) -> dict:
    """The request's status, and the detail of its ``*.void`` audit event."""
    request = approvals.store.get(request_id)
    (event,) = approvals.audit.events(f"{request.kind}.void", request_id=request_id)
    return {"status": approvals.store.get(request_id).status, **event.detail}


def test_an_approval_given_before_its_agent_was_suspended_is_not_used_after_the_resume(world):
    approvals, _, facts, _ = world
    request = held(approvals, call(send))
    approvals.answer(request.id, "avery", "approve", channel="api")
    assert approvals.check(call(send)).state == "approved"
    suspended_and_resumed(facts, "agent", "bot")
    outcome = approvals.check(call(send))
    assert outcome.state == "hold", outcome
    detail = voided(approvals, request.id)
    assert (detail["status"], detail["reason"], detail["was"]) == ("void", "suspended", "approved")
    assert detail["suspended"] == repr(Entity("Agent", "bot"))
    # Held again, the call asks the people again.
    assert held(approvals, call(send)).id != request.id


def test_an_approval_for_minutes_is_taken_back_by_its_users_suspension(world):
    approvals, _, facts, _ = world
    request = held(approvals, call(send))
    approvals.answer(request.id, "avery", "approve", minutes=15, channel="api")
    assert len(facts.get(GRANTS)) == 1
    # Another user's approval is not theirs to lose.
    other = held(approvals, call(delete, subject="lee"))
    approvals.answer(other.id, "lee", "approve", minutes=0, channel="api")
    suspended_and_resumed(facts, "user", "sam")
    assert facts.get(GRANTS) == []
    assert approvals.check(call(send)).state == "hold"
    assert approvals.check(call(delete, subject="lee")).state == "approved"


@pytest.mark.parametrize(
    ("agents", "kind", "id"),
    [
        ((), "agent", "bot"),
        (("coder", "bot"), "agent", "coder"),  # the agent the calling one works for
        (("coder", "bot"), "user", "sam"),
        (("coder", "bot"), "user", "avery"),  # who approved it
    ],
)
def test_an_approval_for_minutes_given_under_a_task_is_taken_back_as_one_under_none(
    world, agents, kind, id
):
    """A grant given under a task names the chain and the task as a JSON object
    (`approval_grant_agent`): the suspension of an agent of that chain, of its user or of its
    approver finds it there and deletes it, as it deletes one given under no task."""
    approvals, _, facts, _ = world
    in_task = dataclasses.replace(call(send), agents=agents, task="task_1")
    request = held(approvals, in_task)
    approvals.answer(request.id, "avery", "approve", minutes=15, channel="api")
    (grant,) = facts.get(GRANTS)
    assert '"task":"task_1"' in grant.fact[2].id
    suspended_and_resumed(facts, kind, id)
    assert facts.get(GRANTS) == []
    assert approvals.check(in_task).state == "hold"


def test_what_a_suspended_approver_approved_is_taken_back_and_no_one_elses(world):
    approvals, _, facts, _ = world
    request = held(approvals, call(send))
    approvals.answer(request.id, "avery", "approve", minutes=15, channel="api")
    confirmed = held(approvals, call(delete))
    approvals.answer(confirmed.id, "sam", "approve", channel="api")
    suspended_and_resumed(facts, "user", "avery")
    assert approvals.check(call(send)).state == "hold"
    assert facts.get(GRANTS) == []
    assert voided(approvals, request.id)["suspended"] == repr(Entity("User", "avery"))
    assert approvals.check(call(delete)).state == "approved"  # sam confirmed it: not avery's


def test_a_result_released_before_its_agent_was_suspended_is_not_delivered_after(world):
    approvals, _, facts, _ = world
    review = reviewed(approvals, report, {"customers": []})
    approvals.answer(review.id, "sam", "approve", channel="api")
    reviewing = dataclasses.replace(call(report), kind="review")
    assert approvals.check(reviewing).state == "released"
    suspended_and_resumed(facts, "agent", "bot")
    assert approvals.check(reviewing).state != "released"
    assert approvals.held_result(approvals.store.get(review.id)) is None
    assert voided(approvals, review.id)["was"] == "released"


def test_an_agent_acting_as_itself_loses_its_approval_to_its_owners_suspension(people):
    approvals, _, facts, _ = people  # pat owns nightly
    request = held(approvals, acting_as_itself(delete))
    assert request.confirmer == "pat"
    approvals.answer(request.id, "pat", "approve", channel="api")
    suspended_and_resumed(facts, "user", "pat")
    assert approvals.check(acting_as_itself(delete)).state == "hold"


def test_a_suspension_written_as_a_fact_takes_back_as_much(world):
    """Through the fact APIs (``/v1/facts``, Oso Cloud's, ``bastion facts``), with the kill
    switch's scope: the same approvals are closed in the same transaction."""
    approvals, _, facts, _ = world
    request = held(approvals, call(send))
    approvals.answer(request.id, "avery", "approve", channel="api")
    fact = ("suspended", Entity("Agent", "bot"))
    apply_facts(facts, [StoredFact(fact)], [], "test")
    facts.apply([], [fact], actor="test")
    assert approvals.check(call(send)).state == "hold"


# -- through the real gateway and /v1/suspensions ---------------------------------------------


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    yield from running(tmp_path_factory, "suspension-takes-back", RULES)


def kill_switch(bastion, method: str, path: str, **body) -> None:
    key, _ = bastion.app.state.keys.create("kill switch", ["suspensions"], created_by="t")
    answer = bastion.http.request(
        method,
        f"{bastion.url}{path}",
        json=body or None,
        headers={"authorization": f"Bearer {key}"},
    )
    assert answer.status_code in (200, 201), answer.text


def test_a_call_approved_before_its_agent_was_suspended_is_held_again_after_the_resume(bastion):
    """sam's search, approved by casey, waits for its retry; the agent is suspended through the
    API, then resumed. The retry is held for a new approval, not run on the old one."""
    name, query = "casey", "held-before-suspension"
    approver(bastion, name, query)
    token = bastion.token("sam", "deskhttp")
    data = call_tool(bastion, token, {"query": query})["error"]["data"]
    assert data["reason"] == "approval_pending", data
    approvals = bastion.app.state.approvals
    approvals.answer(data["approval_id"], name, "approve", channel="api")
    agent = approvals.store.get(data["approval_id"]).client_id
    kill_switch(bastion, "POST", "/v1/suspensions", kind="agent", id=agent)
    kill_switch(bastion, "DELETE", f"/v1/suspensions/agent/{agent}")
    retried = call_tool(bastion, token, {"query": query})
    assert retried["error"]["data"]["reason"] == "approval_pending", retried
    assert retried["error"]["data"]["approval_id"] != data["approval_id"]
    assert approvals.store.get(data["approval_id"]).status == "void"


# -- a replica that has not heard of the suspension yet ---------------------------------------
#
# The approvals below are a replica's whose view of the kill switch has not been told of the
# suspension (``world`` reads none; ``standing``'s is fed by hand, and is not fed here): the
# suspension is stored, and the change log has not reached them yet. What they decide on their
# view must not unlock anything once the suspension is lifted.


def answerer(request) -> str:
    """Someone who may approve ``request``: its approver, or who confirms it where none is."""
    return request.approvers[0] if request.approvers else request.confirmer


@pytest.mark.parametrize(
    ("kind", "id", "held_call"),
    [
        ("agent", "bot", call(send)),
        ("user", "sam", call(send)),
        ("user", "pat", acting_as_itself(delete)),  # the owner of the agent acting as itself
    ],
    ids=["agent", "user", "owner"],
)
def test_a_call_held_by_a_replica_behind_its_suspension_is_refused_not_approved_later(
    people, kind, id, held_call
):
    """The lagging replica passed the call (its view holds no suspension) and would hold it for
    people: the request would be one the suspension never saw, answered during it and used
    after the resume. It is refused ``suspended``, nothing kept; after the resume the call is
    held anew and the people asked as for any call."""
    approvals, _, facts, _ = people
    suspend(facts, suspension(kind, id), "test")
    with pytest.raises(NoApprover) as refused:
        request = approvals.hold(held_call, "d1", ("requires_approval(...)",), {})
        # Were it kept: approved during the suspension, it must still not be used after.
        approvals.answer(request.id, answerer(request), "approve", channel="api")
    assert refused.value.reason == "suspended"
    assert approvals.store.latest("approval", approvals.binding(held_call)) is None
    assert resume(facts, suspension(kind, id), "test").deleted == 1
    assert approvals.check(held_call).state == "hold"
    request = held(approvals, held_call)
    approvals.answer(request.id, answerer(request), "approve", channel="api")
    assert approvals.check(held_call).state == "approved"


def test_an_answer_taken_by_a_replica_behind_its_approvers_suspension_does_not_count(standing):
    """avery is suspended; the replica that takes her approval has not heard of it yet (its
    view says she may answer). Her answer is refused as a suspended person's is, and nothing is
    recorded: resumed, the request is as it was, and her answer then counts."""
    approvals, _authz, _users, _clock = standing
    facts = approvals.facts
    request = held(approvals, call(send))
    suspend(facts, suspension("user", "avery"), "test")
    assert approvals.may_answer(request, "avery") is None  # the replica's view: not suspended
    with pytest.raises(NotAllowed, match="avery is suspended"):
        approvals.answer(request.id, "avery", "approve", minutes=15, channel="api")
    after = approvals.store.get(request.id)
    assert (after.status, after.answers) == ("pending", ())
    assert facts.get(GRANTS) == []
    assert resume(facts, suspension("user", "avery"), "test").deleted == 1
    assert approvals.check(call(send)).state == "pending"
    assert approvals.answer(request.id, "avery", "approve", channel="api").status == "approved"


def lagging(bastion, monkeypatch) -> None:
    """The gateway's view of the kill switch is one the change log never reaches: a replica that
    has not heard of the suspensions stored from now on (until the test ends)."""
    monkeypatch.setattr(bastion.app.state.gateway.enforcer, "suspensions", Suspensions())


def replayed_as(bastion, answer: dict) -> str:
    """Why ``bastion audit replay`` does not replay the record of the refusal ``answer``."""
    record = bastion.records.get(answer["error"]["data"]["decision_id"])
    with pytest.raises(NotReplayable) as why:
        question_of(record)
    return why.value.reason


def refusal(bastion, answer: dict) -> tuple:
    """What a refusal of the kill switch's shows: the agent's error (what it says the refusal
    means, its data but the decision id), the record's result, reason, who it notes suspended,
    rules and obligations, and the alerts it was counted in."""
    error = answer["error"]
    decision_id = error["data"]["decision_id"]
    bastion.flush()
    record = bastion.records.get(decision_id)
    bastion.app.state.alerts.write_repeats()  # a raising within the cooldown, counted in memory
    raised = sorted(
        (a.name, a.severity, a.principal)
        for a in bastion.app.state.alerts.store.list()
        if decision_id in a.decision_ids
    )
    data = {k: v for k, v in error["data"].items() if k != "decision_id"}
    meaning = error["message"].partition("): ")[2]  # after "refused this request (target)"
    noted = record.context.get("suspended")
    return (
        (error["code"], meaning, data),
        (record.result, record.reason, noted, tuple(record.rules), record.obligations),
        raised,
    )


def test_a_call_a_lagging_gateway_passes_to_be_held_is_refused_as_the_kill_switch_refuses(
    bastion, monkeypatch
):
    """The gateway of a replica that has not heard of the agent's suspension passes its call to
    be held; the hold finds the suspension stored and refuses it (nothing kept). The agent is
    told, the decision recorded and its owner alerted as the kill switch does where its view
    has heard: reason ``suspended``, the suspended agent noted in the record's context, and
    ``suspended_still_calling`` raised, linked to this refusal. Before, it was refused as a
    hold nobody could answer: no agent noted, and no alert."""
    name, query = "casey-lagging", "held-while-lagging"
    approver(bastion, name, query)
    token = bastion.token("sam", "deskhttp")
    agent = client_id(token)
    lagging(bastion, monkeypatch)
    suspend(bastion.store, suspension("agent", agent), "test")
    try:
        answer = call_tool(bastion, token, {"query": query})
        at_hold = refusal(bastion, answer)
        # Replay says the kill switch refused it (the policy had asked for the hold).
        assert replayed_as(bastion, answer) == "suspended"
        monkeypatch.undo()  # heard: refused at the door, before the policy is asked
        heard = bastion.app.state.gateway.enforcer.suspensions
        assert eventually(lambda: heard.first((Entity("Agent", agent),)) is not None)
        answer = call_tool(bastion, token, {"query": query})
        at_door = refusal(bastion, answer)
        assert replayed_as(bastion, answer) == "suspended"
    finally:
        assert resume(bastion.store, suspension("agent", agent), "test").deleted == 1
    refused_so = (
        (-32003, "suspended", {"reason": "suspended"}),
        ("deny", "suspended", f'Agent{{"{agent}"}}', (), {}),  # refused before the policy
        [("suspended_still_calling", "high", f'Agent{{"{agent}"}}')],
    )
    assert at_door == refused_so
    assert at_hold == refused_so
    pending = bastion.app.state.approvals.listed(status="pending", limit=200)
    assert [r.id for r in pending if r.client_id == agent] == []  # nothing kept


REVIEWED = f"""
declare signs_for(User, String);
requires_review(_user: User, "call", {TOOL}) if starts_with(context.arguments.query, "reviewed");
approver(boss: User, _user: User, "call", {TOOL}) if signs_for(boss, context.arguments.query);
"""


@pytest.fixture(scope="module")
def reviewing(tmp_path_factory):
    """A bastion whose calls of queries starting "reviewed" have their result held for review."""
    yield from running(tmp_path_factory, "suspension-reviewing", REVIEWED)


def test_a_result_a_lagging_gateway_would_hold_for_review_is_withheld_as_the_kill_switch_refuses(
    reviewing, monkeypatch
):
    """The call ran (the lagging view passed it); holding its result for review finds the
    agent's suspension stored. The result is withheld, and the refusal told, recorded and
    alerted as the kill switch's: reason ``suspended``, the agent noted, and
    ``suspended_still_calling`` raised; the record still says it was the review's hold."""
    bastion = reviewing
    name, query = "casey-reviewing", "reviewed-while-lagging"
    approver(bastion, name, query)
    token = bastion.token("sam", "deskhttp")
    agent = client_id(token)
    lagging(bastion, monkeypatch)
    suspend(bastion.store, suspension("agent", agent), "test")
    try:
        answer = call_tool(bastion, token, {"query": query})
    finally:
        assert resume(bastion.store, suspension("agent", agent), "test").deleted == 1
    told, (result, reason, noted, _, obligations), raised = refusal(bastion, answer)
    assert told == (-32003, "suspended", {"reason": "suspended"})
    assert (result, reason, noted) == ("deny", "suspended", f'Agent{{"{agent}"}}')
    assert obligations["approval"] == {"kind": "review"}
    assert raised == [("suspended_still_calling", "high", f'Agent{{"{agent}"}}')]
    # The kill switch's refusal, not what people answered: replay says so.
    assert replayed_as(bastion, answer) == "suspended"
    pending = bastion.app.state.approvals.listed(status="pending", limit=200)
    assert [r.id for r in pending if r.client_id == agent] == []  # nothing kept


# -- a suspension and a request written at once, on two replicas (PostgreSQL) ------------------


def other_replica() -> str:
    """The name of another replica's connection, by which this test sees it wait on a lock."""
    return f"other-replica-{uuid.uuid4().hex[:8]}"


class Elsewhere:
    """``act`` on another thread: what the replica whose connection is named ``role`` does."""

    def __init__(self, url: str, role: str, act) -> None:
        self.url, self.role, self.act = url, role, act
        self.outcome: list = []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            self.outcome.append(self.act())
        except BaseException as e:  # noqa: BLE001 (the test reads it)
            self.outcome.append(e)

    def start_and_wait_for_a_lock(self) -> None:
        """Started; returns once it has ended or waits on a lock (it may need one we hold)."""
        self.thread.start()
        assert eventually(lambda: not self.thread.is_alive() or self._waits())

    def _waits(self) -> bool:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return bool(
                conn.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = %s"
                    " AND wait_event_type = 'Lock'",
                    (self.role,),
                ).fetchall()
            )

    def result(self):
        self.thread.join(PATIENCE)
        assert not self.thread.is_alive(), "the other replica never finished"
        return self.outcome[0]


def test_a_request_made_while_a_suspension_commits_elsewhere_is_refused(postgres_url):
    """One replica writes the agent's suspension; before it commits, another (READ COMMITTED)
    holds a call of that agent. The suspension's take-back cannot see a request not yet
    committed, and the hold cannot see a suspension not yet committed: one must wait for the
    other. Here the hold waits, then sees the suspension, and refuses."""
    role = other_replica()
    approvals, _ = approvals_on(Database(postgres_url, role=role), Clock())
    suspender = Database(postgres_url)
    holding = Elsewhere(postgres_url, role, lambda: approvals.hold(call(send), "d1", (), {}))
    try:
        with suspender.transaction():
            suspend(FactStore(suspender), suspension("agent", "bot"), "test")
            holding.start_and_wait_for_a_lock()
        outcome = holding.result()
        assert isinstance(outcome, NoApprover) and outcome.reason == "suspended", outcome
        assert approvals.store.latest("approval", approvals.binding(call(send))) is None
    finally:
        suspender.close()
        approvals.store.db.close()


def test_a_suspension_written_while_a_request_commits_elsewhere_takes_it_back(postgres_url):
    """The other way round: the request is being made (its transaction open) when another
    replica writes the agent's suspension. The suspension waits for it, and takes it back."""
    approvals, _ = approvals_on(Database(postgres_url), Clock())
    role = other_replica()
    facts = FactStore(Database(postgres_url, role=role))
    suspender = Elsewhere(
        postgres_url, role, lambda: suspend(facts, suspension("agent", "bot"), "test")
    )
    approvals.on_new_request.append(lambda request: suspender.start_and_wait_for_a_lock())
    try:
        request = approvals.hold(call(send), "d1", (), {})
        assert suspender.result().inserted == 1
        assert approvals.store.get(request.id).status == "void"
        assert approvals.check(call(send)).state == "hold"
    finally:
        facts.close()
        approvals.store.db.close()
