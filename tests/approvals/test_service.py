"""The approval model on a real SQLite file and a real PostgreSQL schema: who may answer is policy, approvals are bound to
the exact call, used once, expire, and a time-bounded approval is an expiring fact."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading

import pytest

from bastion import Authorizer, Entity, Variable
from bastion.agents.identity import owner_fact
from bastion.approvals.service import MAX_REQUIRED, Approvals, Call, NoApprover, NotAllowed
from bastion.approvals.settings import ApprovalSettings
from bastion.approvals.store import Answer, ApprovalRequest, ApprovalStore
from bastion.audit.log import AuditLog
from bastion.db import Database
from bastion.decide.contract import decide_chain, plainly_allowed
from bastion.facts.store import FactStore, StoredFact
from bastion.gateway.enforce import Enforcer
from bastion.oauth.store import OAuthStore
from bastion.policy.errors import EvaluationLimit
from bastion.policy.limits import PolicyLimits
from bastion.server.config import ConfigError
from bastion.signals.suspensions import Suspensions
from tests.approvals.support import POLICY_HEAD
from tests.outage_rounds import logged, through_a_cut
from tests.relays import Relay
from tests.waits import PATIENCE

POLICY = (
    POLICY_HEAD
    + """
allow(_agent: Agent, "call", _tool: Tool);
requires_approval(_user: User, "call", Tool{"crm/send"});
requires_approval(_user: User, "call", Tool{"crm/delete"});
requires_approval(_user: User, "call", Tool{"crm/wire"});
approver(boss: User, user: User, "call", Tool{"crm/send"}) if manager(user, boss);
approver(boss: User, user: User, "call", Tool{"crm/wire"}) if manager(user, boss);
approver(User{"cfo"}, _user: User, "call", Tool{"crm/wire"});
approvals_required(_user: User, "call", Tool{"crm/wire"}, 2);
approval_window(_user: User, "call", Tool{"crm/send"}, 30);
requires_approval(_user: User, "call", Tool{"crm/huge"});
approver(other: User, user: User, "call", Tool{"crm/huge"}) if other != user;
approvals_required(_user: User, "call", Tool{"crm/huge"}, 3000000000);
# Admins approve refunds, but never their own.
requires_approval(_user: User, "call", Tool{"crm/refund"});
approver(admin: User, _user: User, "call", Tool{"crm/refund"}) if admin in [User{"avery"}, User{"sam"}];
self_approval_forbidden(_user: User, "call", Tool{"crm/refund"});
# Two approvers, either of whom decides alone.
requires_approval(_user: User, "call", Tool{"crm/pay"});
approver(boss: User, user: User, "call", Tool{"crm/pay"}) if manager(user, boss);
approver(User{"cfo"}, _user: User, "call", Tool{"crm/pay"});
# A rule that never ends: whatever asks it spends the evaluation budget (EvaluationLimit).
spin(n: Integer) if m = n + 1 and spin(m);
requires_approval(_user: User, "call", Tool{"crm/spin"});
approver(User{"cfo"}, _user: User, "call", Tool{"crm/spin"}) if spin(0);
approval_window(_user: User, "call", Tool{"crm/spin"}, 60);
# Reviewers of held results: avery sees the report with its emails masked; what cfo sees of
# the spun report is asked of a rule over its budget.
mask(User{"avery"}, "call", Tool{"crm/report"}, "customers.*.email");
mask(User{"cfo"}, "call", Tool{"crm/spin"}, "customers.*.email") if spin(0);
# Exports: the manager approves, for up to an hour, unless the tool is frozen (then once
# only); a user on probation needs the cfo's approval too. Both turn on facts, not the policy.
declare frozen(Tool);
declare on_probation(User);
requires_approval(_user: User, "call", Tool{"crm/export"});
approver(boss: User, user: User, "call", Tool{"crm/export"}) if manager(user, boss);
approver(User{"cfo"}, _user: User, "call", Tool{"crm/export"});
approval_window(_user: User, "call", Tool{"crm/export"}, 60) if not frozen(Tool{"crm/export"});
approvals_required(user: User, "call", Tool{"crm/export"}, 2) if on_probation(user);
# "The user approves", written as a rule.
requires_approval(_user: User, "call", Tool{"crm/mine"});
approver(user: User, user, "call", Tool{"crm/mine"});
# Nobody could ever answer: the user may not approve their own call, and no approver rule
# names anyone else (none at all, or only the user).
requires_approval(_user: User, "call", Tool{"crm/purge"});
requires_review(_user: User, "call", Tool{"crm/purge"});
self_approval_forbidden(_user: User, "call", Tool{"crm/purge"});
requires_approval(_user: User, "call", Tool{"crm/ownonly"});
approver(user: User, user, "call", Tool{"crm/ownonly"});
self_approval_forbidden(_user: User, "call", Tool{"crm/ownonly"});
# Anyone but the user approves: any person, whether the facts name them or not.
requires_approval(_user: User, "call", Tool{"crm/peer"});
approver(other: User, user: User, "call", Tool{"crm/peer"}) if other != user;
self_approval_forbidden(_user: User, "call", Tool{"crm/peer"});
# Any two people but the user approve.
requires_approval(_user: User, "call", Tool{"crm/quorum"});
approver(other: User, user: User, "call", Tool{"crm/quorum"}) if other != user;
approvals_required(_user: User, "call", Tool{"crm/quorum"}, 2);
self_approval_forbidden(_user: User, "call", Tool{"crm/quorum"});
# A tool whose name holds a backslash and a quote (printable ASCII, as a client may name one):
# sam's manager approves it (for up to 30 minutes) and reviews its result with emails masked.
requires_approval(_user: User, "call", Tool{"crm/wire\\\\out\\"now"});
approver(boss: User, user: User, "call", Tool{"crm/wire\\\\out\\"now"}) if manager(user, boss);
approval_window(_user: User, "call", Tool{"crm/wire\\\\out\\"now"}, 30);
mask(User{"avery"}, "call", Tool{"crm/wire\\\\out\\"now"}, "customers.*.email");
# Only the user's manager closes an account, never the user: with no manager, nobody can.
requires_approval(_user: User, "call", Tool{"crm/close"});
approver(boss: User, user: User, "call", Tool{"crm/close"}) if manager(user, boss);
self_approval_forbidden(_user: User, "call", Tool{"crm/close"});
"""
)

sam, avery, cfo = Entity("User", "sam"), Entity("User", "avery"), Entity("User", "cfo")
bot = Entity("Agent", "bot")
send, delete, wire = (
    Entity("Tool", "crm/send"),
    Entity("Tool", "crm/delete"),
    Entity("Tool", "crm/wire"),
)
refund = Entity("Tool", "crm/refund")
pay = Entity("Tool", "crm/pay")
spin, report = Entity("Tool", "crm/spin"), Entity("Tool", "crm/report")
export = Entity("Tool", "crm/export")
mine = Entity("Tool", "crm/mine")
purge, ownonly, peer = (
    Entity("Tool", "crm/purge"),
    Entity("Tool", "crm/ownonly"),
    Entity("Tool", "crm/peer"),
)
close = Entity("Tool", "crm/close")
odd = Entity("Tool", 'crm/wire\\out"now')
quorum = Entity("Tool", "crm/quorum")


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def approvals_on(db: Database, clock: Clock) -> tuple[Approvals, Authorizer]:
    """The approvals of one process on ``db``, with the policy and its facts loaded."""
    authz = Authorizer(POLICY)
    base = [
        ("has_role", sam, "caller", send),
        ("has_role", sam, "caller", delete),
        ("has_role", sam, "caller", wire),
        ("manager", sam, avery),
    ]
    authz.facts.apply(base, [])
    approvals = Approvals(
        ApprovalStore(db, b"k" * 32, clock),
        FactStore(db),
        lambda: authz,
        lambda: 1,
        ApprovalSettings(),
        "https://bastion.test",
        b"b" * 32,
        AuditLog(db, clock),
        clock,
    )
    return approvals, authz


@pytest.fixture
def world(database_url):
    clock = Clock()
    db = Database(database_url)
    approvals, authz = approvals_on(db, clock)
    yield approvals, authz, approvals.facts, clock
    db.close()


def call(resource: Entity, arguments: dict | None = None, subject: str = "sam") -> Call:
    arguments = {"to": "x@example.com"} if arguments is None else arguments
    return Call(
        "approval",
        subject,
        "bot",
        "crm",
        "tools/call",
        "call",
        resource,
        arguments,
        repr(sorted(arguments.items())),
    )


def held(approvals: Approvals, c: Call):
    assert approvals.check(c).state == "hold"
    return approvals.hold(c, "d1", ("requires_approval(...)",), {})


def test_no_two_callers_share_a_binding_whatever_their_task_or_chain_spells(world):
    """The binding digest takes the chain and the task as JSON values: no task, chain or
    argument digest spelt with quotes, brackets or braces reads as another's."""
    approvals = world[0]
    base = call(send)
    variants = [
        (agents, task, digest)
        for agents in ((), ("bot",), ("t", "bot"), ('{"task":"t"}',), ('["t"]',))
        for task in ("", "t", '{"task":"t"}', '"}', '["t"]', "t\\", 't"]', "T")
        for digest in (base.arguments_digest, base.arguments_digest + '"],{"task":"t"}')
    ]
    bindings = {
        approvals.binding(dataclasses.replace(base, agents=agents, task=task, arguments_digest=d))
        for agents, task, d in variants
    }
    assert len(bindings) == len(variants)


def test_the_policy_names_the_approvers_and_the_user_may_not_approve_in_their_place(world):
    approvals, *_ = world
    request = held(approvals, call(send))
    assert request.approvers == ("avery",)
    with pytest.raises(NotAllowed, match="may not approve their own call"):
        approvals.answer(request.id, "sam", "approve", channel="api")
    with pytest.raises(NotAllowed, match="not an approver"):
        approvals.answer(request.id, "mallory", "approve", channel="api")
    # Nobody can answer as the agent: it is not a user the policy names.
    with pytest.raises(NotAllowed):
        approvals.answer(request.id, "bot", "approve", channel="api")
    done = approvals.answer(request.id, "avery", "approve", channel="api")
    assert done.status == "approved"
    assert approvals.check(call(send)).state == "approved"


def test_without_approver_rules_the_user_confirms_their_own_agents_call(world):
    approvals, *_ = world
    request = held(approvals, call(delete))
    assert (request.approvers, request.confirmer, request.person) == ((), "sam", True)
    with pytest.raises(NotAllowed):
        approvals.answer(request.id, "avery", "approve", channel="api")
    assert approvals.answer(request.id, "sam", "approve", channel="page").status == "approved"


def acting_as_itself(resource: Entity, agent: str = "nightly", agents: tuple = ()) -> Call:
    """A call of an agent acting as itself (client credentials: its token's subject is its own
    client id); ``agents``, a chain it delegated, ending with the agent calling."""
    return dataclasses.replace(
        call(resource, subject=agent), client_id=agents[-1] if agents else agent, agents=agents
    )


@pytest.fixture
def people(world):
    """``world`` whose approvals read the users' states, with pat a user who owns ``nightly``."""
    approvals, authz, facts, clock = world
    users = OAuthStore(approvals.store.db)
    for name in ("pat", "lee"):
        users.create_user(name, "hash", clock(), actor="test")
    approvals.user_state = users.user_state  # as a server's approvals read it
    facts.apply([owner_fact("nightly", "pat")], actor="test")
    return world


def test_an_agent_acting_as_itself_is_confirmed_by_its_owner_never_in_its_client_ids_name(people):
    approvals, *_ = people
    request = held(approvals, acting_as_itself(delete))
    assert (request.approvers, request.confirmer, request.person) == ((), "pat", False)
    for name in ("nightly", "mallory", "lee"):
        with pytest.raises(NotAllowed):
            approvals.answer(request.id, name, "approve", channel="api")
        assert approvals.may_answer(request, name) is not None
    assert approvals.store.get(request.id).answers == ()
    assert approvals.answer(request.id, "pat", "approve", channel="cli").status == "approved"


def test_a_delegated_chain_an_agent_began_as_itself_is_confirmed_by_that_agents_owner(people):
    approvals, *_ = people
    request = held(approvals, acting_as_itself(delete, agents=("nightly", "helper")))
    assert (request.confirmer, request.person) == ("pat", False)
    for name in ("nightly", "helper"):
        with pytest.raises(NotAllowed, match="agent"):
            approvals.answer(request.id, name, "approve", channel="api")
    assert approvals.answer(request.id, "pat", "approve", channel="api").status == "approved"


def test_an_approver_rule_naming_the_agent_itself_names_no_person(people):
    """``approver(user, user, ...)``, "the user approves", names the agent acting as itself:
    that is nobody, and its owner confirms, as with no approver rule."""
    approvals, *_ = people
    request = held(approvals, acting_as_itself(mine))
    assert (request.approvers, request.confirmer) == ((), "pat")
    with pytest.raises(NotAllowed, match="agent"):
        approvals.answer(request.id, "nightly", "approve", channel="api")
    assert approvals.answer(request.id, "pat", "approve", channel="api").status == "approved"
    # A person's call under the same rule: the user is the approver named.
    own = held(approvals, call(mine))
    assert own.approvers == ("sam",)
    assert approvals.answer(own.id, "sam", "approve", channel="api").status == "approved"


def test_a_call_nobody_could_answer_is_refused_at_once_and_nothing_is_held(people):
    """No approver rule names anyone and no person stands behind the call: an agent with no
    owner, or whose owner is no bastion user."""
    approvals, _authz, facts, _ = people
    facts.apply([owner_fact("ghostly", "ghost")], actor="test")
    for agent in ("orphan", "ghostly"):
        c = acting_as_itself(delete, agent=agent)
        assert approvals.check(c).state == "hold"
        with pytest.raises(NoApprover, match="approver"):
            approvals.hold(c, "d1", ("requires_approval(...)",), {})
        review = dataclasses.replace(c, kind="review")
        with pytest.raises(NoApprover):
            approvals.answerers(review, {})
    assert approvals.listed() == []
    # An approver rule that names a person is enough.
    named = held(approvals, acting_as_itself(pay, agent="orphan"))
    assert (named.approvers, named.confirmer) == (("cfo",), None)
    assert approvals.check(acting_as_itself(pay, agent="orphan")).state == "pending"


def test_a_call_only_its_user_could_confirm_under_self_approval_forbidden_is_refused_at_once(
    people,
):
    """Self-approval forbidden, and no approver rule names anyone else: the user (or the owner
    who confirms an agent acting as itself) may not answer, and nobody else may. Refused as a
    call with nobody behind it is, for approval and for review, and nothing is held. Before, it
    was held for nobody until it expired."""
    approvals, *_ = people
    for c in (call(purge), call(ownonly), acting_as_itself(purge)):
        assert approvals.check(c).state == "hold"
        with pytest.raises(NoApprover, match="forbids approving one's own call") as refused:
            approvals.hold(c, "d1", ("requires_approval(...)",), {})
        assert refused.value.reason == "no_approver"
        assert "approver" in refused.value.meaning and "self-approval" in refused.value.meaning
        with pytest.raises(NoApprover, match="forbids approving one's own call"):
            approvals.answerers(dataclasses.replace(c, kind="review"), {})
    assert approvals.listed() == []
    # An approver the rules name other than the user is enough, as before.
    refunding = held(approvals, call(refund))
    assert refunding.approvers == ("avery", "sam") and refunding.self_forbidden


def test_an_approver_rule_open_to_any_person_but_the_user_holds_the_call(world):
    """``approver(other, user, ...) if other != user`` lists only the people the facts name;
    with none named but the user, someone can still answer (a person no fact names): held, not
    refused, and such a person approves it."""
    approvals, *_ = world
    approvals.authorizer = lambda: Authorizer(POLICY)  # no facts: nobody the rule can list
    request = held(approvals, call(peer))
    assert (request.approvers, request.self_forbidden) == ((), True)
    with pytest.raises(NotAllowed, match="forbids approving one's own call"):
        approvals.answer(request.id, "sam", "approve", channel="api")
    assert approvals.answer(request.id, "lee", "approve", channel="api").status == "approved"


@pytest.mark.parametrize("variant", ["avery\u3164", "a  very", "sam\u3164", "\u3164"])
def test_a_name_no_user_can_have_answers_nothing_so_one_person_never_counts_twice(world, variant):
    """Under a rule open to any person but the user, two approvals needed: avery's name with a
    Hangul filler after it (shown blank), or with a second space, is no name a user can have
    (`bastion.names.check_name`), so it is not a second approver beside avery, nor sam passing
    for someone else past ``self_approval_forbidden``. Before, each counted as a person of its
    own: avery and her variant approved the call, or sam approved his own."""
    approvals, *_ = world
    approvals.authorizer = lambda: Authorizer(POLICY)
    request = held(approvals, call(quorum))
    assert approvals.answer(request.id, "avery", "approve", channel="api").status == "pending"
    assert approvals.may_answer(approvals.store.get(request.id), variant) is not None
    with pytest.raises(NotAllowed, match="cannot be a user's name"):
        approvals.answer(request.id, variant, "approve", channel="api")
    assert [a.approver for a in approvals.store.get(request.id).answers] == ["avery"]
    assert approvals.answer(request.id, "lee", "approve", channel="api").status == "approved"


def test_an_owner_replaced_while_the_call_waits_no_longer_confirms_it(people):
    approvals, _authz, facts, _ = people
    request = held(approvals, acting_as_itself(delete))
    facts.apply(
        [owner_fact("nightly", "lee")],
        [("has_relation", Entity("Agent", "nightly"), "owner", None)],
    )
    for name in ("pat", "lee"):
        with pytest.raises(NotAllowed):
            approvals.answer(request.id, name, "approve", channel="api")
    assert approvals.store.get(request.id).status == "pending"


def test_a_request_nobody_may_answer_any_more_is_closed_when_its_call_comes_back(world):
    """Closing an account waits for sam's manager, never sam. The manager fact is deleted while
    it waits: nobody may answer it now, so the retry closes it (expired, with its audit event)
    and is refused ``no_approver``, as a call held now would be. Before, it stayed pending for
    nobody until it expired (the retry was told ``approval_pending``)."""
    approvals, authz, *_ = world
    request = held(approvals, call(close))
    assert request.approvers == ("avery",) and request.self_forbidden
    assert approvals.check(call(close)).state == "pending"
    authz.facts.apply([], [("manager", sam, avery)])
    outcome = approvals.check(call(close))
    assert (outcome.state, outcome.reason) == ("refused", "no_approver")
    assert outcome.request.id == request.id
    assert "self-approval" in outcome.nobody.meaning and "approver" in outcome.nobody.meaning
    assert approvals.store.get(request.id).status == "expired"
    (closed,) = approvals.audit.events("approval.expired", request_id=request.id)
    assert closed.detail["reason"] == "no_approver"
    with pytest.raises(NotAllowed):
        approvals.answer(request.id, "avery", "approve", channel="api")
    # Asked again, it is refused at once, and nothing more is held.
    assert approvals.check(call(close)).state == "hold"
    with pytest.raises(NoApprover):
        approvals.hold(call(close), "d2", (), {})


def test_a_request_its_approver_may_still_answer_stays_pending(world):
    approvals, authz, *_ = world
    request = held(approvals, call(close))
    authz.facts.apply([("manager", sam, cfo)], [])  # another manager besides: still avery
    assert approvals.check(call(close)).state == "pending"
    assert approvals.get(request.id).status == "pending"
    assert [r.id for r in approvals.listed(status="pending")] == [request.id]
    assert approvals.answer(request.id, "avery", "approve", channel="api").status == "approved"


def test_a_request_nobody_may_answer_any_more_is_closed_when_a_person_looks_at_it(world):
    """Opened (`get`: the page, the API, the CLI) or listed, as when its call comes back."""
    approvals, authz, *_ = world
    opened = held(approvals, call(close, {"to": "opened@example.com"}))
    listed = held(approvals, call(close, {"to": "listed@example.com"}))
    authz.facts.apply([], [("manager", sam, avery)])
    assert approvals.get(opened.id).status == "expired"
    assert approvals.listed(status="pending") == []
    assert approvals.store.get(listed.id).status == "expired"
    assert len(approvals.audit.events("approval.expired")) == 2


def test_a_request_whose_confirming_owner_was_replaced_is_closed_and_asked_anew(people):
    """The owner who confirms an agent acting as itself is replaced while its call waits: the
    old owner confirms it no more, nor does the new one, so nobody may answer it. The retry
    closes it and is refused; the next is held for the new owner. Before, it waited for
    nobody until it expired."""
    approvals, _authz, facts, _ = people
    request = held(approvals, acting_as_itself(delete))
    facts.apply(
        [owner_fact("nightly", "lee")],
        [("has_relation", Entity("Agent", "nightly"), "owner", None)],
    )
    outcome = approvals.check(acting_as_itself(delete))
    assert (outcome.state, outcome.reason) == ("refused", "no_approver")
    assert "owner" in outcome.nobody.meaning and "send the call again" in outcome.nobody.meaning
    assert approvals.store.get(request.id).status == "expired"
    anew = held(approvals, acting_as_itself(delete))
    assert anew.id != request.id and anew.confirmer == "lee"
    assert approvals.answer(anew.id, "lee", "approve", channel="api").status == "approved"


def test_a_request_whose_approver_rules_spend_the_budget_now_is_closed(world):
    """Rules on who may answer that now spend the evaluation budget close it as they refuse a
    call at once (``evaluation_limit``): fail closed, never approved."""
    approvals, *_ = world
    request = held(approvals, call(close))
    rule = 'Tool{"crm/close"}) if manager(user, boss);'
    over = Authorizer(POLICY.replace(rule, rule.replace(";", " and spin(0);")))
    approvals.authorizer = lambda: over
    outcome = approvals.check(call(close))
    assert (outcome.state, outcome.reason) == ("refused", "evaluation_limit")
    assert approvals.store.get(request.id).status == "expired"


# -- who may answer: only people who can (not disabled, not suspended) ------------------------


@pytest.fixture
def standing(world):
    """``world`` whose approvals read the users' states and the kill switch, as a server's do:
    avery, cfo, dana and pat are bastion users, pat owns the agent ``nightly``."""
    approvals, authz, facts, clock = world
    users = OAuthStore(approvals.store.db)
    for name in ("avery", "cfo", "dana", "pat"):
        users.create_user(name, "hash", clock(), actor="test")
    approvals.user_state = users.user_state
    approvals.suspensions = Suspensions(clock)  # the replica's view, fed as the replica feeds it
    facts.apply([owner_fact("nightly", "pat")], actor="test")
    return approvals, authz, users, clock


def kill_switch(approvals: Approvals, name: str, on: bool = True) -> None:
    """Suspend (or resume) the user ``name``: the change the replica hands its view."""
    fact = ("suspended", Entity("User", name))
    if on:
        approvals.suspensions.apply([StoredFact(fact)], [])
    else:
        approvals.suspensions.apply([], [fact])


def test_a_call_held_only_for_a_disabled_or_suspended_approver_is_refused_at_once(standing):
    """sam's email waits for avery alone (his manager). Disabled, or suspended, she answers
    nothing: holding it would wait for nobody until it expired (before: held, the client told
    ``approval_pending``). Refused ``no_approver``, saying why, naming nobody; nothing held.
    An agent acting as itself whose owner (its confirmer) is disabled is refused so too."""
    approvals, _authz, users, clock = standing
    users.disable_user("avery", clock(), actor="test")
    with pytest.raises(NoApprover, match="disabled") as disabled:
        approvals.hold(call(send, {"to": "d@example.com"}), "d1", (), {})
    assert disabled.value.reason == "no_approver"
    assert "disabled" in disabled.value.meaning and "avery" not in disabled.value.meaning
    users.enable_user("avery", actor="test")
    kill_switch(approvals, "avery")
    with pytest.raises(NoApprover, match="suspended") as suspended:
        approvals.hold(call(send, {"to": "s@example.com"}), "d1", (), {})
    assert "suspended" in suspended.value.meaning and "avery" not in suspended.value.meaning
    with pytest.raises(NoApprover, match="suspended"):  # nor is a result held for her review
        approvals.answerers(dataclasses.replace(call(send), kind="review"), {})
    users.disable_user("pat", clock(), actor="test")
    with pytest.raises(NoApprover, match="disabled"):
        approvals.hold(acting_as_itself(delete), "d1", (), {})
    assert approvals.listed() == []
    kill_switch(approvals, "avery", on=False)
    assert held(approvals, call(send)).approvers == ("avery",)  # resumed: held for her again


def test_a_request_whose_only_approver_is_suspended_while_it_waits_is_closed_when_looked_at(
    standing,
):
    """avery is suspended (or disabled) while sam's email waits for her: nobody may answer it
    now. The retry closes it (expired, its audit event saying ``no_approver``) and is refused;
    a person opening it closes it too. Before, it waited for nobody until it expired."""
    approvals, _authz, users, clock = standing
    retried = held(approvals, call(send, {"to": "retried@example.com"}))
    opened = held(approvals, call(send, {"to": "opened@example.com"}))
    kill_switch(approvals, "avery")
    outcome = approvals.check(call(send, retried.arguments))
    assert (outcome.state, outcome.reason) == ("refused", "no_approver")
    assert outcome.request.id == retried.id and "suspended" in outcome.nobody.meaning
    assert approvals.get(opened.id).status == "expired"
    for request in (retried, opened):
        (closed,) = approvals.audit.events("approval.expired", request_id=request.id)
        assert closed.detail["reason"] == "no_approver" and "suspended" in closed.detail["why"]
    kill_switch(approvals, "avery", on=False)
    disabled = held(approvals, call(send, {"to": "disabled@example.com"}))
    users.disable_user("avery", clock(), actor="test")
    assert [r.id for r in approvals.listed(status="pending")] == []
    assert approvals.store.get(disabled.id).status == "expired"
    # Resumed or enabled, nobody answers the closed requests: the call is asked anew.
    users.enable_user("avery", actor="test")
    with pytest.raises(NotAllowed, match="expired, not pending"):
        approvals.answer(retried.id, "avery", "approve", channel="api")


def test_a_request_with_one_able_approver_among_disabled_and_suspended_ones_waits_for_them(
    standing,
):
    """sam's payment may be approved by any of his managers (avery, dana) or cfo. dana is
    disabled and avery suspended: cfo still may, so the call is held, stays pending when looked
    at, the others' answers are refused, and cfo's approves it."""
    approvals, authz, users, clock = standing
    authz.facts.apply([("manager", sam, Entity("User", "dana"))], [])
    users.disable_user("dana", clock(), actor="test")
    kill_switch(approvals, "avery")
    request = held(approvals, call(pay))
    assert request.approvers == ("avery", "cfo", "dana")
    assert approvals.check(call(pay)).state == "pending"
    assert approvals.get(request.id).status == "pending"
    for person, why in (("dana", "dana is disabled"), ("avery", "avery is suspended")):
        for answer in ("approve", "deny"):
            with pytest.raises(NotAllowed, match=why):
                approvals.answer(request.id, person, answer, channel="api")
    assert approvals.store.get(request.id).answers == ()
    assert approvals.answer(request.id, "cfo", "approve", channel="api").status == "approved"


# -- the sweep: closed with nobody looking ---------------------------------------------------


def swept(approvals: Approvals, clock: Clock) -> int:
    """One pass of the sweep, one interval later (it leaves requests younger than that)."""
    clock.now += approvals.settings.stranded_sweep_seconds
    return approvals.sweep_stranded()


def test_the_sweep_closes_a_request_whose_only_approver_was_disabled_with_nobody_looking(
    standing,
):
    """avery is disabled while sam's email waits for her, and nobody retries, opens or lists
    it: the sweep closes it as a look would (expired, its audit event saying no_approver). The
    payment cfo may still approve stays pending. Before, the email waited until it expired."""
    approvals, _authz, users, clock = standing
    kept = held(approvals, call(pay))
    stranded = held(approvals, call(send))
    users.disable_user("avery", clock(), actor="test")
    assert swept(approvals, clock) == 1
    assert approvals.store.get(stranded.id).status == "expired"
    (closed,) = approvals.audit.events("approval.expired", request_id=stranded.id)
    assert closed.detail["reason"] == "no_approver" and "disabled" in closed.detail["why"]
    assert approvals.store.get(kept.id).status == "pending"
    assert approvals.audit.events("approval.expired", request_id=kept.id) == []


def test_the_sweep_looks_at_a_bounded_number_a_pass_and_goes_on_where_it_stopped(standing):
    """Two answerable requests held first fill a pass of two: the next pass goes on after
    them and closes the two stranded ones, rather than looking at the first two again."""
    approvals, _authz, users, clock = standing
    approvals.settings = dataclasses.replace(approvals.settings, stranded_sweep_limit=2)
    requests = []
    for tool in (pay, pay, send, send):  # one a second: the pass takes them in this order
        clock.now += 1
        requests.append(held(approvals, call(tool, {"to": f"{len(requests)}@example.com"})))
    users.disable_user("avery", clock(), actor="test")
    assert [swept(approvals, clock) for _ in range(3)] == [0, 2, 0]
    assert [approvals.store.get(r.id).status for r in requests] == [
        "pending",
        "pending",
        "expired",
        "expired",
    ]


def test_the_sweep_reads_no_policy_when_nothing_is_pending_nor_one_just_held(world):
    """Nothing pending: nothing is read but the list. A request younger than the interval is
    left to the next pass (a replica behind the one that held it may not have its facts)."""
    approvals, authz, _facts, clock = world

    def unread():
        raise AssertionError("the sweep read the policy")

    approvals.authorizer = unread
    assert swept(approvals, clock) == 0
    approvals.authorizer = lambda: authz
    request = held(approvals, call(close))
    authz.facts.apply([], [("manager", sam, avery)])
    approvals.authorizer = unread
    assert approvals.sweep_stranded() == 0
    approvals.authorizer = lambda: authz
    assert swept(approvals, clock) == 1
    assert approvals.store.get(request.id).status == "expired"


def test_two_replicas_sweeping_at_once_close_a_request_once(postgres_url):
    """Two processes find the same stranded request in the same moment: one closes it, with
    one audit event; the other finds it closed (the close's conditional update)."""
    clock = Clock()
    dbs = [Database(postgres_url) for _ in range(2)]
    try:
        replicas = [approvals_on(db, clock)[0] for db in dbs]
        users = OAuthStore(dbs[0])
        users.create_user("avery", "hash", clock(), actor="test")
        for replica in replicas:
            replica.user_state = OAuthStore(replica.store.db).user_state
        for round_ in range(20):
            request = held(replicas[0], call(send, {"to": f"{round_}@example.com"}))
            users.disable_user("avery", clock(), actor="test")
            clock.now += replicas[0].settings.stranded_sweep_seconds
            start = threading.Barrier(2)
            closed: list[int] = []

            def sweep(replica, start=start, closed=closed):
                start.wait()
                closed.append(replica.sweep_stranded())

            threads = [threading.Thread(target=sweep, args=(r,)) for r in replicas]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            events = replicas[1].audit.events("approval.expired", request_id=request.id)
            assert (sorted(closed), len(events)) == ([0, 1], 1), round_
            assert replicas[1].store.get(request.id).status == "expired"
            users.enable_user("avery", actor="test")
    finally:
        for db in dbs:
            db.close()


def test_a_call_needing_more_approvals_than_people_who_may_give_them_is_refused(standing):
    """A wire needs two approvals, from avery and cfo. With cfo disabled one person may
    approve: held, it would wait for nobody. Refused at once; and a wire held while both could
    is closed when looked at once avery is suspended. Before, both waited until they expired."""
    approvals, _authz, users, clock = standing
    both = held(approvals, call(wire, {"to": "both@example.com"}))
    assert both.required == 2
    users.disable_user("cfo", clock(), actor="test")
    with pytest.raises(NoApprover, match="2 approvals") as refused:
        approvals.hold(call(wire, {"to": "one@example.com"}), "d1", (), {})
    assert refused.value.reason == "no_approver"
    assert "approvals_required" in refused.value.meaning and "cfo" not in refused.value.meaning
    users.enable_user("cfo", actor="test")
    assert approvals.check(call(wire, both.arguments)).state == "pending"
    approvals.answer(both.id, "avery", "approve", channel="api")
    kill_switch(approvals, "avery")  # her approval no longer counts: one may approve of two
    outcome = approvals.check(call(wire, both.arguments))
    assert (outcome.state, outcome.reason) == ("refused", "no_approver")
    assert approvals.store.get(both.id).status == "expired"


def test_identical_pending_calls_share_one_request_and_other_arguments_do_not(world):
    approvals, *_ = world
    first = held(approvals, call(send))
    assert approvals.check(call(send)).state == "pending"
    assert approvals.hold(call(send), "d2", (), {}).id == first.id
    other = call(send, {"to": "y@example.com"})
    assert approvals.check(other).state == "hold"
    assert approvals.hold(other, "d3", (), {}).id != first.id


def test_an_approval_is_used_once_and_a_replay_is_held_again(world):
    approvals, *_ = world
    request = held(approvals, call(send))
    approvals.answer(request.id, "avery", "approve", channel="api")
    outcome = approvals.check(call(send))
    assert outcome.state == "approved"
    assert approvals.use(outcome.request, "d9")
    assert not approvals.use(outcome.request, "d10")  # the same approval, twice: once only
    assert approvals.check(call(send)).state == "hold"
    assert approvals.check(call(send), request.id).reason == "approval_used"


def test_changed_arguments_do_not_match_the_approval_given(world):
    approvals, *_ = world
    request = held(approvals, call(send))
    approvals.answer(request.id, "avery", "approve", channel="api")
    changed = call(send, {"to": "attacker@example.com"})
    assert approvals.check(changed, request.id).reason == "approval_mismatch"
    assert approvals.check(changed).state == "hold"


def test_an_approval_does_not_match_another_user_agent_or_method(world):
    """The binding names the user, the agent and the method, not only the arguments: avery's
    approval of sam's call lets neither bob, another agent of sam's, nor another method through."""
    approvals, *_ = world
    request = held(approvals, call(send))
    approvals.answer(request.id, "avery", "approve", channel="api")
    others = {
        "another user": call(send, subject="bob"),
        "another agent": dataclasses.replace(call(send), client_id="another-bot"),
        "another method": dataclasses.replace(call(send), method="tools/other"),
    }
    for what, other in others.items():
        assert approvals.check(other).state == "hold", what
        assert approvals.check(other, request.id).reason == "approval_mismatch", what
    assert approvals.check(call(send)).state == "approved"


def test_a_denial_stands_until_the_request_would_have_expired(world):
    approvals, _, _, clock = world
    request = held(approvals, call(send))
    approvals.answer(request.id, "avery", "deny", channel="api", reason="not today")
    assert approvals.check(call(send)).reason == "approval_denied"
    clock.now += 601
    assert approvals.check(call(send)).state == "hold"


class Killed(BaseException):  # noqa: N818 - stands for SIGKILL, not an error
    """The process killed at this point: no handler of bastion's runs (it is no `Exception`),
    and what its open transaction wrote is gone with its connection."""


def killed(*args, **kwargs):
    raise Killed


@pytest.mark.parametrize(
    ("step", "tool", "answer", "minutes"),
    [
        ("resolve", pay, "deny", 0),  # the denial written, the request still pending
        ("grant", send, "approve", 15),  # approved, its grant for 15 minutes not yet written
    ],
)
def test_an_answer_killed_part_way_leaves_nothing_of_it(
    world, monkeypatch, step, tool, answer, minutes
):
    """An answer (its row, the resolution, a time-window grant, the audit events) is written
    whole or not at all. Killed between the answer's row and the request's resolution, it left
    a pending request whose denier could not deny again ("already answered") and that another
    approver's approval then approved: one denial no longer decided."""
    approvals, _, facts, _ = world
    request = held(approvals, call(tool))
    target = (approvals.store, "resolve") if step == "resolve" else (facts, "apply")
    monkeypatch.setattr(*target, killed)
    with pytest.raises(Killed):
        approvals.answer(request.id, "avery", answer, minutes=minutes, channel="api")
    monkeypatch.undo()
    after = approvals.get(request.id)
    assert (after.status, after.answers) == ("pending", ())
    assert approvals.audit.events(kind_prefix="approval.answer") == []
    assert list(facts.get(("approval_grant", None, None, None, None))) == []
    # The answer is given again, and counts as it would have.
    done = approvals.answer(request.id, "avery", answer, minutes=minutes, channel="api")
    assert done.status == ("denied" if answer == "deny" else "approved")


def test_an_approver_disabled_after_their_answer_was_checked_has_no_answer_recorded(
    world, database_url, monkeypatch
):
    """The page (or the API) found that avery may answer; another process disables her before
    her answer's transaction takes the request's lock: her standing is read under that lock,
    and the answer is refused, none recorded."""
    approvals, _authz, _facts, clock = world
    users = OAuthStore(approvals.store.db)
    users.create_user("avery", "hash", clock(), actor="test")
    approvals.user_state = users.user_state  # as a server's approvals read it
    request = held(approvals, call(send))
    assert approvals.may_answer(request, "avery") is None
    disabled: list[bool] = []

    def disabled_elsewhere() -> None:
        other = Database(database_url)
        try:
            disabled.append(OAuthStore(other).disable_user("avery", clock(), actor="test"))
        finally:
            other.close()

    meanwhile(monkeypatch, approvals, disabled_elsewhere)
    with pytest.raises(NotAllowed, match="avery is disabled"):
        approvals.answer(request.id, "avery", "approve", channel="api")
    assert disabled == [True]
    assert approvals.store.get(request.id).answers == ()
    assert approvals.store.get(request.id).status == "pending"


def test_a_pending_request_with_a_stored_denial_is_denied_and_cannot_be_approved(world):
    """What an earlier version left when killed between a denial and the request's resolution:
    the denial is stored, the request pending. One denial decides: it reads as denied, is
    settled as denied (with its audit event) where it is answered or checked, and another
    approver's approval is refused."""
    approvals, *_ = world
    for first in ("answer", "check", "list"):
        c = call(pay, {"to": f"{first}@example.com"})
        request = held(approvals, c)
        approvals.store.answer(
            request.id, Answer("avery", "deny", 0, "api", "no", approvals.clock())
        )
        if first == "answer":
            with pytest.raises(NotAllowed, match="denied"):
                approvals.answer(request.id, "cfo", "approve", channel="api")
        elif first == "list":
            assert request.id not in {r.id for r in approvals.listed(status="pending")}
        assert approvals.check(c).reason == "approval_denied"
        settled = approvals.get(request.id)
        assert settled.status == "denied" and not settled.approvals
        assert [e.kind for e in approvals.audit.events(request_id=request.id)].count(
            "approval.denied"
        ) == 1


def test_an_unanswered_request_expires_and_cannot_be_answered_after(world):
    approvals, _, _, clock = world
    request = held(approvals, call(send))
    clock.now += 601
    with pytest.raises(NotAllowed, match="expired"):
        approvals.answer(request.id, "avery", "approve", channel="api")
    assert approvals.check(call(send)).reason == "approval_expired"
    assert approvals.check(call(send)).state == "hold"


def test_an_approval_under_another_policy_version_does_not_count(world):
    approvals, *_ = world
    request = held(approvals, call(send))
    approvals.answer(request.id, "avery", "approve", channel="api")
    approvals.policy_version = lambda: 2
    assert approvals.check(call(send)).reason == "approval_mismatch"


def test_two_distinct_approvers_when_the_policy_requires_two(world):
    approvals, *_ = world
    request = held(approvals, call(wire))
    assert request.required == 2 and set(request.approvers) == {"avery", "cfo"}
    assert approvals.answer(request.id, "avery", "approve", channel="api").status == "pending"
    with pytest.raises(NotAllowed, match="already answered"):
        approvals.answer(request.id, "avery", "approve", channel="api")
    assert approvals.answer(request.id, "cfo", "approve", channel="api").status == "approved"


def test_an_approval_counts_only_while_its_approver_may_still_approve(world):
    """A wire needs two approvers. avery approves, then stops being sam's manager (or is
    disabled) before cfo approves: what decides is the second answer, and at that moment only
    cfo may approve, so the wire waits for another approver (dana, sam's other manager).
    avery's approval made it approved."""
    approvals, authz, _, clock = world
    authz.facts.apply([("manager", sam, Entity("User", "dana"))], [])
    users = OAuthStore(approvals.store.db)
    users.create_user("avery", "hash", clock(), actor="test")
    approvals.user_state = users.user_state  # as a server's approvals read it
    removed = held(approvals, call(wire, {"to": "removed@example.com"}))
    disabled = held(approvals, call(wire, {"to": "disabled@example.com"}))
    for request in (removed, disabled):
        assert approvals.answer(request.id, "avery", "approve", channel="api").status == "pending"
    authz.facts.apply([], [("manager", sam, avery)])
    assert approvals.answer(removed.id, "cfo", "approve", channel="api").status == "pending"
    authz.facts.apply([("manager", sam, avery)], [])
    users.disable_user("avery", clock(), actor="test")
    assert approvals.answer(disabled.id, "cfo", "approve", channel="api").status == "pending"
    for request in (removed, disabled):
        assert approvals.check(call(wire, request.arguments)).state == "pending"


def test_two_approvals_given_at_once_on_two_replicas_approve_a_request_needing_two(
    postgres_url,
):
    """Each answer is one transaction: two replicas taking the two approvals a request needs at
    the same moment must not each miss the other's and leave it pending with both given."""
    clock = Clock()
    dbs = [Database(postgres_url) for _ in range(2)]
    try:
        replicas = [approvals_on(db, clock)[0] for db in dbs]
        for round_ in range(20):
            request = held(replicas[0], call(wire, {"to": f"{round_}@example.com"}))
            start = threading.Barrier(2)
            failed: list[BaseException] = []

            def approve(replica, person, request_id=request.id, start=start, failed=failed):
                start.wait()
                try:
                    replica.answer(request_id, person, "approve", channel="api")
                except BaseException as e:  # told below, with the round
                    failed.append(e)

            threads = [
                threading.Thread(target=approve, args=(replica, person))
                for replica, person in zip(replicas, ("avery", "cfo"), strict=True)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            done = replicas[1].get(request.id)
            assert (done.status, len(done.approvals), failed) == ("approved", 2, []), round_
    finally:
        for db in dbs:
            db.close()


def test_an_approval_for_minutes_is_an_expiring_fact_the_contract_sees(world):
    approvals, authz, facts, clock = world
    request = held(approvals, call(send))
    with pytest.raises(NotAllowed, match="30 minutes at most"):
        approvals.answer(request.id, "avery", "approve", minutes=31, channel="api")
    approvals.answer(request.id, "avery", "approve", minutes=15, channel="api")
    [stored] = list(facts.get(("approval_grant", None, None, None, None)))
    assert stored.expires_at == clock.now + 15 * 60
    authz.facts.apply([stored.fact], [])  # what a replica does when it reads the change
    chain = decide_chain(authz, (sam, bot), "call", send, {})
    assert chain.obligations.requires_approval and chain.obligations.approval_granted
    other = decide_chain(authz, (sam, bot), "call", delete, {})
    assert not other.obligations.approval_granted


def test_an_approval_for_minutes_covers_the_chain_whose_call_was_held_and_no_other(world):
    """A grant for minutes is bound to the whole chain of the held call, as a single-use
    approval is: in (sam, A, B) the call is B's through A. A's grant for its own calls does not
    let B through on A's behalf; B's grant for its direct calls does not let it through working
    for A, nor the grant of B working for A its direct calls or its calls working for C."""
    approvals, authz, facts, _ = world
    first, sub, other = Entity("Agent", "A"), Entity("Agent", "B"), Entity("Agent", "C")

    def grant_for(agents: tuple[str, ...]) -> tuple:
        held_call = dataclasses.replace(
            call(send), client_id=agents[-1], agents=agents[1:] and agents
        )
        request = held(approvals, held_call)
        approvals.answer(request.id, "avery", "approve", minutes=15, channel="api")
        [stored] = list(facts.get(("approval_grant", sam, None, None, None)))
        authz.facts.apply([stored.fact], [])  # what a replica does when it reads the change
        return stored.fact

    def granted(principals: tuple) -> bool:
        decided = decide_chain(authz, principals, "call", send, {}).obligations
        assert decided.requires_approval
        plainly = plainly_allowed(authz, principals, "call", send, {}, ())
        assert plainly == decided.approval_granted  # the gateway's two questions agree
        return decided.approval_granted

    def revoke(fact: tuple) -> None:
        facts.apply(deletes=[fact])
        authz.facts.apply([], [fact])

    a_grant = grant_for(("A",))
    assert granted((sam, first)) and not granted((sam, first, sub))
    revoke(a_grant)
    b_grant = grant_for(("B",))
    assert granted((sam, sub))
    assert not granted((sam, first, sub)) and not granted((sam, other, sub))
    revoke(b_grant)
    grant_for(("A", "B"))
    assert granted((sam, first, sub))
    assert not granted((sam, sub)) and not granted((sam, other, sub)) and not granted((sam, first))
    assert not granted((sam, other, first, sub))


def test_an_approval_for_minutes_the_store_cannot_hold_is_refused_before_it_is_written(world):
    """An agent's client ID of 300 emoji (1,200 bytes: a trusted issuer's agent may be that
    long) makes a grant fact past the store's bound on a key. The answer for minutes is refused
    before anything is written (it was written, then the grant failed: a 500, the request
    approved with no grant and no final event); approving it once still works."""
    approvals, _, facts, _ = world
    agent = "\N{GRINNING FACE}" * 300
    request = held(approvals, dataclasses.replace(call(send), client_id=agent))
    with pytest.raises(NotAllowed, match="the store cannot hold this one"):
        approvals.answer(request.id, "avery", "approve", minutes=15, channel="api")
    assert approvals.get(request.id).status == "pending" and not approvals.get(request.id).approvals
    assert list(facts.get(("approval_grant", None, None, None, None))) == []
    assert approvals.answer(request.id, "avery", "approve", channel="api").status == "approved"


def test_no_approval_for_minutes_is_longer_than_max_window_minutes(world):
    approvals, _, facts, clock = world
    approvals.settings = dataclasses.replace(approvals.settings, max_window_minutes=10)
    request = held(approvals, call(send))  # the policy allows 30 minutes
    assert request.window_minutes == 10
    with pytest.raises(NotAllowed, match="10 minutes at most"):
        approvals.answer(request.id, "avery", "approve", minutes=11, channel="api")
    approvals.answer(request.id, "avery", "approve", minutes=10, channel="api")
    [stored] = list(facts.get(("approval_grant", None, None, None, None)))
    assert stored.expires_at == clock.now + 10 * 60


def test_an_answer_is_bound_by_the_terms_the_policy_gives_now_when_they_narrowed_since_the_hold(
    world,
):
    """The facts the terms turn on change while a call waits: the tool is frozen (the policy
    now allows it to be approved once only) and sam is put on probation (two approvals now).
    An answer is taken under the narrower of the terms of the hold and those of now: a grant
    for minutes was given, and a single approval approved the call, on the terms of the hold."""
    approvals, authz, facts, _ = world
    request = held(approvals, call(export))
    assert (request.window_minutes, request.required) == (60, 1)
    authz.facts.apply([("frozen", export), ("on_probation", sam)], [])
    with pytest.raises(NotAllowed, match="approved once only"):
        approvals.answer(request.id, "avery", "approve", minutes=30, channel="api")
    assert list(facts.get(("approval_grant", None, None, None, None))) == []
    assert approvals.answer(request.id, "avery", "approve", channel="api").status == "pending"
    assert approvals.check(call(export)).state == "pending"
    assert approvals.answer(request.id, "cfo", "approve", channel="api").status == "approved"


def test_an_approval_for_negative_minutes_is_refused_and_records_nothing(world):
    approvals, _, facts, _ = world
    request = held(approvals, call(send))
    with pytest.raises(NotAllowed, match="minutes must be a whole number of minutes"):
        approvals.answer(request.id, "avery", "approve", minutes=-5, channel="api")
    assert approvals.get(request.id).status == "pending" and not approvals.get(request.id).answers
    assert list(facts.get(("approval_grant", None, None, None, None))) == []


SPUN = 'approver(User{"cfo"}, _user: User, "call", Tool{"crm/spin"}) if spin(0);'


def held_calmly(approvals: Approvals, authz: Authorizer, c: Call, result=None) -> ApprovalRequest:
    """``c`` held under rules where cfo approves crm/spin without spinning; ``authz`` (whose
    approver rule for it spends the budget) decides again from then on."""
    approvals.authorizer = lambda: Authorizer(POLICY.replace(SPUN, SPUN.replace(" if spin(0)", "")))
    try:
        return approvals.hold(c, "d1", ("requires_approval(...)",), {}, result=result)
    finally:
        approvals.authorizer = lambda: authz


def test_a_call_whose_approver_rules_spend_the_evaluation_budget_is_refused_at_once(world):
    """Terms the policy cannot say within its budget are the narrowest: nobody may answer. The
    call is refused (fail closed) with ``evaluation_limit``, not held for nobody until it
    expires; the message says the approver rules ran out of budget."""
    approvals, *_ = world
    for kind in ("approval", "review"):
        c = dataclasses.replace(call(spin), kind=kind)
        with pytest.raises(NoApprover, match="evaluation budget") as refused:
            approvals.hold(c, "d1", ("requires_approval(...)",), {})
        assert refused.value.reason == "evaluation_limit"
        assert "budget" in refused.value.meaning
    assert approvals.listed() == []


def test_terms_the_policy_cannot_say_within_its_budget_when_answered_are_the_narrowest(world):
    # Held under rules that name cfo; when answered, the approver rule spends the budget:
    # nobody but the user may answer, once, and not even the user, as if approving their own
    # call were forbidden.
    approvals, authz, *_ = world
    request = held_calmly(approvals, authz, call(spin))
    assert (request.approvers, request.window_minutes) == (("cfo",), 60)
    with pytest.raises(NotAllowed, match="forbids approving one's own call"):
        approvals.answer(request.id, "sam", "approve", channel="api")
    with pytest.raises(NotAllowed, match="not an approver"):
        approvals.answer(request.id, "cfo", "approve", channel="api")
    assert approvals.store.get(request.id).status == "pending"
    # Nobody may answer it, then: looked at, it is closed (before, it waited for nobody).
    assert approvals.get(request.id).status == "expired"


def reviewed(approvals: Approvals, resource: Entity, result) -> ApprovalRequest:
    review = dataclasses.replace(call(resource), kind="review")
    return approvals.hold(review, "d1", ("requires_review(...)",), {}, result=result)


def test_a_reviewers_mask_over_the_evaluation_budget_withholds_the_whole_result(world):
    approvals, authz, *_ = world
    result = {"structuredContent": {"customers": [{"name": "Ada", "email": "ada@example.com"}]}}
    request = held_calmly(approvals, authz, dataclasses.replace(call(spin), kind="review"), result)
    assert approvals.reviewer_masks(request, "cfo") == ("",)
    seen = approvals.review_view(request, "cfo")
    assert "Ada" not in repr(seen) and "ada@example.com" not in repr(seen)
    # The held result itself is untouched: what is masked is only the reviewer's view.
    assert approvals.held_result(request) == result


def test_a_held_result_that_is_not_an_mcp_result_is_hidden_from_a_masked_reviewer(world):
    # Not a dict: no mask path can say which part of it is the email, so a mask hides it all.
    approvals, *_ = world
    request = reviewed(approvals, report, ["ada@example.com"])
    assert approvals.reviewer_masks(request, "avery") == ("customers.*.email",)
    assert approvals.review_view(request, "avery") is None
    # A reviewer the policy masks nothing for sees it as held.
    assert approvals.review_view(request, "cfo") == ["ada@example.com"]


def test_a_target_whose_name_holds_a_backslash_or_a_quote_is_answered_as_itself(world):
    """A request keeps its target as the record spells it, its backslash and quote escaped;
    read back, it is that very tool. Read back as another (the escapes kept as characters of
    the name), who may answer, the grant for minutes and the reviewer's masks were the policy's
    for a tool nobody named: sam confirmed the call his manager must approve, and avery saw the
    emails masked for her."""
    approvals, authz, facts, _ = world
    request = held(approvals, call(odd))
    assert request.approvers == ("avery",)
    assert approvals.may_answer(request, "sam") is not None
    with pytest.raises(NotAllowed):
        approvals.answer(request.id, "sam", "approve", channel="api")
    approvals.answer(request.id, "avery", "approve", minutes=15, channel="api")
    [stored] = list(facts.get(("approval_grant", None, None, None, None)))
    assert stored.fact[-1] == odd
    authz.facts.apply([("has_role", sam, "caller", odd), stored.fact], [])
    assert decide_chain(authz, (sam, bot), "call", odd, {}).obligations.approval_granted
    result = {"structuredContent": {"customers": [{"name": "Ada", "email": "ada@example.com"}]}}
    review = reviewed(approvals, odd, result)
    assert approvals.reviewer_masks(review, "avery") == ("customers.*.email",)
    assert "ada@example.com" not in repr(approvals.review_view(review, "avery"))


def test_a_call_only_policy_refuses_an_approval_for_minutes(world):
    approvals, *_ = world
    request = held(approvals, call(delete))
    with pytest.raises(NotAllowed, match="once only"):
        approvals.answer(request.id, "sam", "approve", minutes=5, channel="api")


def test_every_step_is_in_the_audit_log(world):
    approvals, *_ = world
    request = held(approvals, call(send))
    approvals.answer(request.id, "avery", "approve", channel="page", reason="ok")
    approvals.use(approvals.check(call(send)).request, "d7")
    kinds = [e.kind for e in approvals.audit.events(limit=10)]
    assert {"approval.requested", "approval.answer", "approval.approved", "approval.used"} <= set(
        kinds
    )


def test_held_results_are_deleted_once_their_request_expires(world):
    approvals, _, _, clock = world
    review = Call("review", "sam", "bot", "crm", "resources/read", "read", send, None, "")
    request = approvals.hold(review, "d1", (), {}, result={"secret": "value"})
    assert approvals.held_result(request) == {"secret": "value"}
    assert approvals.store.drop_expired_results() == 0
    clock.now += 601
    assert approvals.store.drop_expired_results() == 1
    assert approvals.held_result(request) is None


def test_what_a_request_holds_is_sealed_in_the_database(world):
    approvals, *_ = world
    request = held(approvals, call(send, {"to": "ada@example.com", "note": "private words"}))
    [(raw,)] = approvals.store.db.execute(
        "SELECT arguments FROM approval_requests WHERE id = ?", (request.id,)
    )
    assert b"private words" not in bytes(raw) and b"ada@" not in bytes(raw)
    # Sealed for this request: moved to another row, it does not open.
    other = held(approvals, call(delete))
    approvals.store.db.execute(
        "UPDATE approval_requests SET arguments = ? WHERE id = ?", (bytes(raw), other.id)
    )
    from cryptography.exceptions import InvalidTag

    with pytest.raises(InvalidTag):
        approvals.get(other.id)


def test_the_policy_may_forbid_approving_ones_own_call_even_to_an_approver(world):
    approvals, authz, *_ = world
    authz.facts.apply([("has_role", sam, "caller", refund)], [])
    request = held(approvals, call(refund))
    assert set(request.approvers) == {"avery", "sam"} and request.self_forbidden
    with pytest.raises(NotAllowed, match="forbids approving one's own call"):
        approvals.answer(request.id, "sam", "approve", channel="api")
    assert approvals.answer(request.id, "avery", "approve", channel="api").status == "approved"


def test_a_number_of_approvals_past_any_column_is_held_and_can_never_be_met(world):
    """The policy may require any 64-bit number of approvals; PostgreSQL's INTEGER column holds
    32 bits, so a call held under 3,000,000,000 was a failed write there (the gateway's 500).
    The number is bounded at MAX_REQUIRED: as before, more answers than anyone can give. Its
    approver rule is open to anyone but the user, so it is held (approvers the facts name
    could not give as many: refused at once, `_nobody`)."""
    approvals, *_ = world
    huge = Entity("Tool", "crm/huge")
    request = held(approvals, call(huge))
    assert request.required == MAX_REQUIRED
    done = approvals.answer(request.id, "cfo", "approve", channel="api")
    assert done.status == "pending"  # one answer of MAX_REQUIRED
    assert approvals.check(call(huge)).state == "pending"


@pytest.mark.parametrize("bad", [-1, 525_601, 3_000_000_000, 1.5, "60", True])
def test_a_window_past_a_year_or_not_a_whole_number_is_refused_by_the_settings(bad):
    with pytest.raises(ConfigError, match="approvals.max_window_minutes must be a whole number"):
        ApprovalSettings.from_mapping({"max_window_minutes": bad}, env={})
    assert ApprovalSettings.from_mapping({"max_window_minutes": 525_600}, env={})


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("stranded_sweep_limit", 0),
        ("stranded_sweep_limit", 10_001),
        ("stranded_sweep_limit", 2.5),
        ("stranded_sweep_limit", True),
        ("stranded_sweep_seconds", 0),
        ("stranded_sweep_seconds", -1),
        ("stranded_sweep_seconds", "30"),
    ],
)
def test_a_sweep_setting_out_of_bounds_is_refused_by_the_settings(key, bad):
    with pytest.raises(ConfigError, match=f"approvals.{key} must be"):
        ApprovalSettings.from_mapping({key: bad}, env={})
    chosen = ApprovalSettings.from_mapping(
        {"stranded_sweep_limit": 10_000, "stranded_sweep_seconds": 0.5}, env={}
    )
    assert (chosen.stranded_sweep_limit, chosen.stranded_sweep_seconds) == (10_000, 0.5)


@pytest.mark.parametrize(
    ("reason", "withheld", "refusal"),
    [
        ("x" * 2001, (), "a reason holds at most 2000 characters"),
        ("", tuple(f"f{i}" for i in range(101)), "at most 100 fields can be withheld"),
        ("", ("x" * 257,), "1 to 256 characters"),
        ("", ("",), "1 to 256 characters"),
    ],
)
def test_an_answer_past_the_bounds_of_a_reason_or_withheld_fields_is_refused_unrecorded(
    world, reason, withheld, refusal
):
    """Whichever way the answer comes (the API, a page, the CLI all answer here)."""
    approvals, *_ = world
    review = Call("review", "sam", "bot", "crm", "resources/read", "read", send, None, "")
    request = approvals.hold(review, "d1", (), {}, result={"secret": "value"})
    with pytest.raises(NotAllowed, match=refusal):
        approvals.answer(
            request.id, "avery", "approve", channel="page", reason=reason, withheld_fields=withheld
        )
    assert approvals.get(request.id).status == "pending" and not approvals.get(request.id).approvals


def test_a_review_stands_for_an_approval_only_when_that_approval_unlocked_its_run(world):
    """A call held for approval and review comes back naming either: the review counts for the
    approval step only if it holds the result of the run the call's approval was spent on (the
    decision that spent it held the result). A review of a run no approval unlocked (the policy
    asked for no approval then), or of another run, does not let the call skip its approval."""
    approvals, _, _, clock = world
    reviewed = dataclasses.replace(call(send), kind="review")
    unapproved = approvals.hold(reviewed, "d-unapproved", (), {}, {"content": []})
    assert approvals.check(call(send), unapproved.id).reason == "approval_mismatch"
    approval = held(approvals, call(send))
    approvals.answer(approval.id, "avery", "approve", channel="api")
    assert approvals.use(approvals.check(call(send)).request, "d-run")
    # The run's result is held by the decision that spent the approval: none other stands for it.
    assert approvals.check(call(send), unapproved.id).reason == "approval_mismatch"
    assert approvals.check(call(send)).state == "hold"
    approvals.answer(unapproved.id, "avery", "deny", channel="api")  # settle it: one pending
    review = approvals.hold(reviewed, "d-run", (), {}, {"content": []})
    for named in (None, approval.id, review.id):
        outcome = approvals.check(call(send), named)
        assert (outcome.state, outcome.review.id) == ("reviewing", review.id), named
    clock.now = review.expires_at  # the review lapsed unanswered: the next call is a new one
    assert approvals.check(call(send)).state == "hold"
    assert approvals.check(call(send), approval.id).reason == "approval_used"


def meanwhile(monkeypatch, approvals: Approvals, change) -> None:
    """``change`` happens once, just before the answer's transaction begins: what another
    process commits while this one checks the answer, or waits for the request's lock behind
    another answer (on PostgreSQL up to ``lock_timeout``; on SQLite for the write lock)."""
    transaction = approvals.store.db.transaction
    done: list[bool] = []

    def after_change(*args, **kwargs):
        if not done:
            done.append(True)
            change()
        return transaction(*args, **kwargs)

    monkeypatch.setattr(approvals.store.db, "transaction", after_change)


def test_an_approver_removed_while_their_answer_waits_for_the_lock_is_refused(world, monkeypatch):
    """Who may answer is read once, under the request's lock: avery stops being sam's manager
    between the check of her answer and its transaction, and her approval is not taken."""
    approvals, authz, facts, _ = world
    request = held(approvals, call(send))
    meanwhile(monkeypatch, approvals, lambda: authz.facts.apply([], [("manager", sam, avery)]))
    with pytest.raises(NotAllowed, match="not an approver"):
        approvals.answer(request.id, "avery", "approve", minutes=15, channel="page")
    after = approvals.get(request.id)
    assert (after.status, after.answers) == ("pending", ())
    assert approvals.audit.events(kind_prefix="approval.answer") == []
    assert list(facts.get(("approval_grant", None, None, None, None))) == []


def test_an_approval_whose_approver_is_removed_while_the_deciding_answer_waits_counts_nothing(
    world, monkeypatch
):
    """A wire needs two approvals: avery's is given, then she stops being sam's manager while
    cfo's answer waits for the lock. cfo's answer is counted with the policy of that moment,
    where avery's approval no longer counts: the wire waits for another approver (dana)."""
    approvals, authz, _, _ = world
    authz.facts.apply([("manager", sam, Entity("User", "dana"))], [])
    request = held(approvals, call(wire))
    approvals.answer(request.id, "avery", "approve", channel="api")
    meanwhile(monkeypatch, approvals, lambda: authz.facts.apply([], [("manager", sam, avery)]))
    assert approvals.answer(request.id, "cfo", "approve", channel="api").status == "pending"
    assert approvals.check(call(wire)).state == "pending"


def test_an_answer_that_reaches_the_lock_after_the_request_expired_is_refused(world, monkeypatch):
    """The request expires while an approval for minutes waits for its lock: no approval is
    recorded after the expiry, and no grant is made of it."""
    approvals, _, facts, clock = world
    request = held(approvals, call(send))

    def expire() -> None:
        clock.now = request.expires_at + 1

    meanwhile(monkeypatch, approvals, expire)
    with pytest.raises(NotAllowed, match="expired"):
        approvals.answer(request.id, "avery", "approve", minutes=15, channel="api")
    assert approvals.store.get(request.id).answers == ()
    assert list(facts.get(("approval_grant", None, None, None, None))) == []


def at_once(*work) -> list:
    """Run each of ``work`` in a thread of its own, released together; what each returned or
    raised, in order."""
    start = threading.Barrier(len(work))
    outcomes: list = [None] * len(work)

    def run(i: int) -> None:
        start.wait()
        try:
            outcomes[i] = work[i]()
        except Exception as e:  # told by the caller
            outcomes[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_an_approval_and_a_denial_given_at_once_on_two_replicas_decide_once(postgres_url):
    """Either of two approvers decides a payment alone; one approves on one replica as the
    other denies on another: exactly one answer is taken, the other is refused, and the record
    holds one answer and one decision."""
    clock = Clock()
    dbs = [Database(postgres_url) for _ in range(2)]
    try:
        replicas = [approvals_on(db, clock)[0] for db in dbs]
        for round_ in range(20):
            request = held(replicas[0], call(pay, {"to": f"{round_}@example.com"}))
            approved, denied = at_once(
                lambda r=request: replicas[0].answer(r.id, "avery", "approve", channel="api"),
                lambda r=request: replicas[1].answer(r.id, "cfo", "deny", channel="page"),
            )
            taken = [o for o in (approved, denied) if isinstance(o, ApprovalRequest)]
            refused = [o for o in (approved, denied) if isinstance(o, NotAllowed)]
            assert (len(taken), len(refused)) == (1, 1), (round_, approved, denied)
            done = replicas[1].get(request.id)
            assert done.status == taken[0].status in ("approved", "denied"), round_
            assert len(done.answers) == 1, round_
            kinds = [e.kind for e in replicas[0].audit.events(request_id=request.id)]
            assert kinds.count("approval.answer") == 1, (round_, kinds)
            assert kinds.count("approval.approved") + kinds.count("approval.denied") == 1
    finally:
        for db in dbs:
            db.close()


def test_each_run_of_a_call_held_for_approval_and_review_goes_with_its_own_review(world):
    """The approval of a call held for approval and review is spent by a run not marked in
    progress (a run past its bound, or spent before runs were marked); a retry while that run
    is upstream (no review holds its result yet) is held for a second approval, given too,
    which unlocks a second run. Each run's result is held by a review of its own, and a
    retry naming an approval or a review finds the review of that approval's run, however the
    two runs, the retries and the answers interleave; one naming nothing is delivered the
    oldest run's result first."""
    approvals, _, _, clock = world
    c = call(send, {"to": "twice@example.com"})
    reviewed = dataclasses.replace(c, kind="review")
    first = held(approvals, c)
    approvals.answer(first.id, "avery", "approve", channel="api")
    assert approvals.use(approvals.check(c).request, "d-run1")
    assert approvals.check(c).state == "hold"  # run 1 is upstream: nothing holds its result
    second = approvals.hold(c, "d-retry", (), {})
    approvals.answer(second.id, "avery", "approve", channel="api")
    r1 = approvals.hold(reviewed, "d-run1", (), {}, {"content": [{"type": "text", "text": "1"}]})
    for named in (None, first.id, r1.id):
        outcome = approvals.check(c, named)
        assert (outcome.state, outcome.reason, outcome.request.id, ids(outcome.review)) == (
            "reviewing",
            "",
            first.id,
            r1.id,
        ), named
    outcome = approvals.check(c, second.id)
    assert (outcome.state, outcome.request.id) == ("approved", second.id)
    assert approvals.use(outcome.request, "d-run2")
    clock.now += 1
    r2 = approvals.hold(reviewed, "d-run2", (), {}, {"content": [{"type": "text", "text": "2"}]})
    assert r2.id != r1.id  # run 2's result is not dropped into run 1's review
    assert approvals.held_result(r2)["content"][0]["text"] == "2"
    assert approvals.held_result(r1)["content"][0]["text"] == "1"
    for named, approval, review in (
        (first.id, first, r1),
        (r1.id, first, r1),
        (second.id, second, r2),
        (r2.id, second, r2),
    ):
        outcome = approvals.check(c, named)
        assert (outcome.state, outcome.reason, outcome.request.id, ids(outcome.review)) == (
            "reviewing",
            "",
            approval.id,
            review.id,
        ), named
    approvals.answer(r1.id, "avery", "approve", channel="api")
    assert ids(approvals.check(c).review) == r1.id  # the oldest run's result first
    assert approvals.use(approvals.get(r1.id), "d-delivery")
    assert ids(approvals.check(c).review) == r2.id


def ids(request: ApprovalRequest | None) -> str | None:
    return None if request is None else request.id


def test_a_retry_while_the_approved_run_is_upstream_is_in_progress_until_the_run_ends(world):
    """An approval spent by a run that goes upstream for at most ``runs_for`` seconds: the same
    call meanwhile (naming nothing, or the approval) is "in_progress", never "hold" (held for a
    new approval) nor refused as used; once that run has ended it is what it was before: a new
    call, or ``approval_used``. Another run's end does not end it."""
    approvals, *_ = world
    c = call(send, {"to": "in-flight@example.com"})
    request = held(approvals, c)
    approvals.answer(request.id, "avery", "approve", channel="api")
    assert approvals.use(approvals.check(c).request, "d-run", runs_for=120)
    for named in (None, request.id):
        outcome = approvals.check(c, named)
        assert (outcome.state, outcome.request.id) == ("in_progress", request.id), named
    other = call(send, {"to": "other@example.com"})
    assert approvals.check(other).state == "hold"  # only the very call is in progress
    approvals.run_ended(request.id, "d-other")
    assert approvals.check(c).state == "in_progress"
    approvals.run_ended(request.id, "d-run")
    assert approvals.check(c).state == "hold"
    assert approvals.check(c, request.id).reason == "approval_used"


def test_a_run_whose_end_is_never_told_holds_its_retries_no_longer_than_runs_for(world):
    """The replica running the call died (or its end could not be written): its retries are in
    progress until ``runs_for`` after the approval was spent, then the call is a new one."""
    approvals, _, _, clock = world
    c = call(send, {"to": "crashed@example.com"})
    request = held(approvals, c)
    approvals.answer(request.id, "avery", "approve", channel="api")
    assert approvals.use(approvals.check(c).request, "d-run", runs_for=120)
    clock.now += 119
    assert approvals.check(c).state == "in_progress"
    clock.now += 1
    assert approvals.check(c).state == "hold"


def test_a_run_still_in_flight_renews_its_mark_and_only_its_own_and_only_while_marked(world):
    """The process running the call renews its mark (a lease): each renewal keeps its retries
    in progress ``runs_for`` from then, past the bound it was spent with. Another call's
    renewal changes nothing; nor does a renewal once the run has ended, or once its approval
    was given back: neither is marked again."""
    approvals, _, _, clock = world
    c = call(send, {"to": "long-run@example.com"})
    request = held(approvals, c)
    approvals.answer(request.id, "avery", "approve", channel="api")
    assert approvals.use(approvals.check(c).request, "d-run", runs_for=120)
    clock.now += 100
    assert not approvals.renew_run(request.id, "d-other", 120)
    assert approvals.renew_run(request.id, "d-run", 120)
    clock.now += 100  # past the bound it was spent with
    assert approvals.check(c).state == "in_progress"
    assert approvals.renew_run(request.id, "d-run", 120)
    clock.now += 119
    assert approvals.check(c).state == "in_progress"
    clock.now += 1  # no renewal for one bound (the process is gone): the mark lapses
    assert approvals.check(c).state == "hold"
    approvals.run_ended(request.id, "d-run")
    assert not approvals.renew_run(request.id, "d-run", 120)
    assert approvals.check(c).state == "hold"
    # Given back: approved again, and no renewal marks it used nor in progress.
    again = call(send, {"to": "long-run-unsent@example.com"})
    request = held(approvals, again)
    approvals.answer(request.id, "avery", "approve", channel="api")
    assert approvals.use(approvals.check(again).request, "d-unsent", runs_for=120)
    assert approvals.unspend(request, "d-unsent", "CancelledError")
    assert not approvals.renew_run(request.id, "d-unsent", 120)
    back = approvals.get(request.id)
    assert (back.status, back.used_by, back.running_until) == ("approved", None, None)


def test_a_mark_that_cannot_be_renewed_is_logged_once_per_outage_not_at_every_round(
    postgres_url, caplog
):
    """The gateway renews the mark of an approved run in flight every third of its bound; while
    the approval store cannot be written it tries again at each round and says so once, not
    with a traceback at every round, and once that the mark is renewed again. The outage is the
    test's own: a relay to PostgreSQL it cuts."""
    caplog.set_level(logging.DEBUG, logger="bastion.gateway")
    with Relay(("127.0.0.1", 5432)) as relay:
        db = Database(postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}"))
        try:
            approvals, authz = approvals_on(db, Clock())
            c = call(send, {"to": "renewed-through-an-outage@example.com"})
            request = held(approvals, c)
            approvals.answer(request.id, "avery", "approve", channel="api")
            assert approvals.use(approvals.check(c).request, "d-run", runs_for=120)
            enforcer = Enforcer(lambda: authz, None, approvals=approvals)

            def said(level: int = logging.DEBUG) -> list[logging.LogRecord]:
                return [
                    r
                    for r in caplog.records
                    if r.name == "bastion.gateway"
                    and r.levelno >= level
                    and "approved run" in r.getMessage()
                ]

            async def scenario() -> None:
                renewing = asyncio.create_task(enforcer._renew_run(request.id, "d-run", 0.03))
                try:
                    relay.cut()
                    async with asyncio.timeout(PATIENCE):
                        while len(said()) < 6:  # rounds that failed
                            await asyncio.sleep(0.01)
                    assert len(said(logging.WARNING)) == 1, [r.getMessage() for r in said()]
                    relay.restore()
                    async with asyncio.timeout(PATIENCE):
                        while len(said(logging.WARNING)) < 2:
                            await asyncio.sleep(0.01)
                    assert not renewing.done()  # still marked: it goes on
                finally:
                    renewing.cancel()
                    await asyncio.gather(renewing, return_exceptions=True)

            asyncio.run(scenario())
            loud = said(logging.WARNING)
            assert "again" in loud[1].getMessage() and "again" not in loud[0].getMessage()
            assert approvals.check(c).state == "in_progress"
        finally:
            db.close()


@pytest.mark.parametrize("round_of", ["stranded", "results"])
def test_a_database_outage_is_logged_once_by_the_approvals_rounds_not_at_every_round(
    postgres_url, caplog, round_of
):
    """Each server sweeps stranded pending requests (every ``stranded_sweep_seconds``, 30 s)
    and deletes held results that expired (every 60 s); while the database is away each round
    fails, and that is said once (a warning with a traceback at every round, before), then once
    that the round works again. The outage is the test's own: a relay to PostgreSQL it cuts."""
    caplog.set_level(logging.DEBUG, logger="bastion.approvals")
    with Relay(("127.0.0.1", 5432)) as relay:
        db = Database(postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}"))
        try:
            approvals, _ = approvals_on(db, Clock())
            approvals.settings = dataclasses.replace(
                approvals.settings, stranded_sweep_seconds=0.01
            )
            about = "stranded" if round_of == "stranded" else "expired results"

            rounds = (
                approvals.sweep_stranded_forever
                if round_of == "stranded"
                else lambda: approvals.drop_expired_results_forever(0.01)
            )
            said = logged(caplog, "bastion.approvals", about)
            through_a_cut(relay, rounds, said)
            loud = said(logging.WARNING)
            assert len(loud) == 2 and "could not" in loud[0] and loud[1].endswith(" again"), loud
        finally:
            db.close()


def test_a_run_ends_before_its_result_is_held_for_review_never_between(world):
    """For a call held for approval and review the run's end is written after its result is held
    (`Approvals.hold` of the review): a retry finds the run in progress, then its review, never
    a moment where it would be held for a new approval."""
    approvals, *_ = world
    c = call(send, {"to": "reviewed@example.com"})
    reviewed = dataclasses.replace(c, kind="review")
    request = held(approvals, c)
    approvals.answer(request.id, "avery", "approve", channel="api")
    assert approvals.use(approvals.check(c).request, "d-run", runs_for=120)
    assert approvals.check(c).state == "in_progress"
    review = approvals.hold(reviewed, "d-run", (), {}, {"content": []})
    outcome = approvals.check(c)
    assert (outcome.state, ids(outcome.review)) == ("reviewing", review.id)
    approvals.run_ended(request.id, "d-run")
    outcome = approvals.check(c)
    assert (outcome.state, ids(outcome.review)) == ("reviewing", review.id)


def test_an_approval_is_given_back_only_by_the_call_that_spent_it_and_only_once(world):
    """A run that never reached the upstream gives its approval back: approved again, its expiry
    as it was, neither used nor in progress, with one audit event. Only the call that spent it
    can (another call's decision id changes nothing), and only while it is spent."""
    approvals, *_ = world
    c = call(send, {"to": "unsent@example.com"})
    request = held(approvals, c)
    approvals.answer(request.id, "avery", "approve", channel="api")
    approved = approvals.get(request.id)
    assert approvals.use(approvals.check(c).request, "d-run", runs_for=120)
    assert not approvals.unspend(request, "d-other", "ConnectionRefusedError")
    assert approvals.check(c).state == "in_progress"
    assert approvals.unspend(request, "d-run", "ConnectionRefusedError")
    back = approvals.get(request.id)
    assert (back.status, back.used_by, back.used_at, back.running_until) == (
        "approved",
        None,
        None,
        None,
    )
    assert back.expires_at == approved.expires_at
    assert not approvals.unspend(request, "d-run", "ConnectionRefusedError")  # not spent now
    (event,) = approvals.audit.events(kind="approval.unspent", request_id=request.id)
    assert (event.detail["decision_id"], event.detail["error"]) == (
        "d-run",
        "ConnectionRefusedError",
    )
    outcome = approvals.check(c)
    assert (outcome.state, outcome.request.id) == ("approved", request.id)
    assert approvals.use(outcome.request, "d-retry", runs_for=120)  # the retry spends it
    assert approvals.get(request.id).used_by == "d-retry"


def test_an_approval_checked_before_its_expiry_is_not_spent_after_it(world):
    """The call found its approval in force (`check`), and the expiry passed before it was
    spent (`use`): not spent, nothing unlocked; a released result likewise is not delivered."""
    approvals, _, _, clock = world
    c = call(send, {"to": "boundary@example.com"})
    request = held(approvals, c)
    approvals.answer(request.id, "avery", "approve", channel="api")
    found = approvals.check(c)
    assert found.state == "approved"
    clock.now = found.request.expires_at  # an instant later than the check: expired
    assert not approvals.use(found.request, "d-late", runs_for=120)
    late = approvals.get(request.id)
    assert (late.status, late.used_by, late.running_until) == ("approved", None, None)
    assert [e.kind for e in approvals.audit.events(request_id=request.id)].count(
        "approval.used"
    ) == 0


# -- fields withheld on release ------------------------------------------------------------------

CUSTOMERS = {
    "customers": [{"name": "Ada", "email": "ada@example.com", "card": {"number": "4111"}}],
    "invoices": [],
}
HELD_REPORT = {
    "content": [{"type": "text", "text": '{"customers": [{"name": "Ada"}]}'}],
    "structuredContent": CUSTOMERS,
}


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("customers.*.emial", "matches nothing"),  # a typo of the last key
        ("customer.*.email", "matches nothing"),  # a typo of the first key
        ("customers.3.email", "matches nothing"),  # past the end of the list
        ("customers.*.card.numbr", "matches nothing"),  # a typo under an object
        ("content.0.text", "matches nothing"),  # MCP's own fields are not the result's JSON
        ("$..email", "cannot be read"),  # JSONPath's descent: bastion reads no such path
    ],
)
def test_a_withheld_field_that_matches_nothing_in_the_held_result_is_refused_unreleased(
    world, path, says
):
    """A reviewer who mistypes a field to withhold is told so, naming it, and nothing is
    released: before, the mistyped path withheld nothing and the result went out whole."""
    approvals, *_ = world
    request = reviewed(approvals, send, HELD_REPORT)
    with pytest.raises(NotAllowed, match=says) as refused:
        approvals.answer(
            request.id,
            "avery",
            "approve",
            channel="api",
            withheld_fields=("customers.*.name", path),
        )
    assert repr(path) in str(refused.value)
    after = approvals.get(request.id)
    assert after.status == "pending" and after.answers == () and after.withheld_fields == ()
    assert approvals.held_result(after) == HELD_REPORT


@pytest.mark.parametrize(
    "path",
    [
        "customers.*.email",
        "$.customers[*].email",  # the JSONPath spelling of the same path
        "customers.0.card",
        "customers.*.email.domain",  # into text: the email is masked whole
        "invoices.*.amount",  # an empty list: nothing in it to withhold, in this result
        "invoices",
    ],
)
def test_a_withheld_field_that_reaches_the_held_result_is_taken(world, path):
    approvals, *_ = world
    request = reviewed(approvals, send, HELD_REPORT)
    answered = approvals.answer(
        request.id, "avery", "approve", channel="api", withheld_fields=(path,)
    )
    assert (answered.status, answered.withheld_fields) == ("released", (path,))


def test_a_withheld_field_is_matched_against_what_the_reviewer_sees_so_it_tells_nothing_masked(
    world,
):
    """avery reviews the odd wire's results with their emails masked: a path under an email is
    taken whether or not the hidden value holds it, so a reviewer cannot learn what is masked
    for them by which paths are refused."""
    approvals, *_ = world
    hidden = {"structuredContent": {"customers": [{"email": {"private": "ada@example.com"}}]}}
    for path in ("customers.*.email.private", "customers.*.email.anything"):
        request = reviewed(approvals, odd, hidden)
        assert approvals.reviewer_masks(request, "avery") == ("customers.*.email",)
        answered = approvals.answer(
            request.id, "avery", "approve", channel="api", withheld_fields=(path,)
        )
        assert answered.status == "released"


def test_with_two_reviewers_required_what_each_withholds_is_withheld_on_release(world):
    """A wire's result needs two reviewers: the first withholds the emails, the second releases
    it as it is. Before, only the deciding answer's fields were kept: the emails went out."""
    approvals, *_ = world
    request = reviewed(approvals, wire, HELD_REPORT)
    assert request.required == 2
    first = approvals.answer(
        request.id, "avery", "approve", channel="page", withheld_fields=("customers.*.email",)
    )
    assert first.status == "pending"
    second = approvals.answer(
        request.id, "cfo", "approve", channel="api", withheld_fields=("customers.*.card",)
    )
    assert second.status == "released"
    assert second.withheld_fields == ("customers.*.card", "customers.*.email")


def test_a_persons_requests_are_listed_however_many_name_others(database_url):
    """The list of what waits for a person (their page, ``GET /v1/approvals?approver=``) is
    filtered in the database: requests made later for other people, however many (anyone can
    have calls held), never push an earlier one for this person off it. Names are matched
    exactly (``%`` and ``_`` are no patterns, ``Avery`` is not ``avery``)."""
    db = Database(database_url)
    clock = Clock()
    store = ApprovalStore(db, b"k" * 32, clock)

    def held(n: int, approvers: tuple[str, ...], confirmer: str | None = None) -> None:
        clock.now += 1
        store.create(
            kind="approval", binding=f"b{n}", subject="sam", client_id="bot", server="crm",
            method="tools/call", action="call", target='Tool{"crm/send"}',
            arguments_digest="d", arguments={}, policy_version=1, decision_id=f"d{n}",
            rules=(), approvers=approvers, required=1, self_forbidden=False, window_minutes=0,
            seconds=3600, confirmer=confirmer,
        )  # fmt: skip

    held(0, ("avery",))
    held(1, (), confirmer="avery")  # no approver named: the person who confirms the call
    # More than twenty times the page's length: what the bounded scan before read.
    for n in range(2, 62):
        held(n, ("av%ry", "Avery", "avery_x", "x") if n % 2 else ("cfo",))
    mine = store.listed(status="pending", approver="avery", limit=2)
    assert [r.binding for r in mine] == ["b1", "b0"]
    found = store.listed(approver="av%ry", limit=3)
    assert [r.binding for r in found] == ["b61", "b59", "b57"]
    assert store.listed(approver="av_ry") == []


def test_an_agent_has_at_most_max_pending_per_agent_calls_waiting_for_people(world):
    """Each held call asks people (a page entry, a chat message): an agent varying its arguments
    could ask without end, burying the requests that matter and wearing the approvers down. Past
    ``max_pending_per_agent`` requests of one user's agent waiting at once, a new call is refused
    at once (``approval_limit``), nothing stored or announced; the same call again still finds
    its request, another agent of the user is counted apart, and an answered or expired request
    makes room."""
    approvals, _, _, clock = world
    approvals.settings = dataclasses.replace(approvals.settings, max_pending_per_agent=2)
    first = held(approvals, call(send, {"to": "1@example.com"}))
    held(approvals, call(send, {"to": "2@example.com"}))
    before = approvals.store.listed(status="pending")
    with pytest.raises(NoApprover, match="max_pending_per_agent") as refused:
        approvals.hold(call(send, {"to": "3@example.com"}), "d3", (), {})
    assert refused.value.reason == "approval_limit" and "2 calls" in refused.value.meaning
    assert approvals.store.listed(status="pending") == before
    assert approvals.hold(call(send, {"to": "1@example.com"}), "d4", (), {}).id == first.id
    other_agent = dataclasses.replace(call(send, {"to": "3@example.com"}), client_id="bot2")
    assert approvals.hold(other_agent, "d5", (), {}).status == "pending"
    approvals.answer(first.id, "avery", "deny", channel="api")
    assert approvals.hold(call(send, {"to": "3@example.com"}), "d6", (), {}).status == "pending"
    clock.now += approvals.settings.expiry_seconds + 1  # the two left expire
    for n in (4, 5):
        assert (
            approvals.hold(call(send, {"to": f"{n}@example.com"}), "d", (), {}).status == "pending"
        )


def test_max_pending_per_agent_is_a_whole_number_from_one():
    assert ApprovalSettings.from_mapping({}).max_pending_per_agent == 20
    assert ApprovalSettings.from_mapping({"max_pending_per_agent": 5}).max_pending_per_agent == 5
    for bad in (0, -1, 1.5, "5", True, 1_000_001):
        with pytest.raises(ConfigError, match="max_pending_per_agent"):
            ApprovalSettings.from_mapping({"max_pending_per_agent": bad})


def test_approval_terms_that_cannot_be_decided_are_the_narrowest(world):
    """The rules on answering a held call whose holding restricts (``approvals_required``,
    ``approval_expires``, ``self_approval_forbidden``) apply when their condition cannot be
    decided (an amount of "5000" against 1000), as they would for 5000; one whose value cannot
    be named at all (``2 / 0`` approvals) refuses the call at once with reason "undecided"."""
    approvals, authz, _, clock = world
    terms = (
        'approval_expires(_u: User, "call", Tool{"crm/send"}, 30) if context.amount > 1000;\n'
        'approvals_required(_u: User, "call", Tool{"crm/delete"}, 2) if context.amount > 1000;\n'
        'approvals_required(_u: User, "call", Tool{"crm/send"}, n) if n = 2 / context.per;\n'
    )
    authz.load_policy(POLICY + terms)
    for amount in (5000, "5000", True):
        held = approvals.hold(call(send, {"to": repr(amount)}), "d1", (), {"amount": amount})
        assert held.expires_at - clock() <= 30, amount
        # Two approvals where only the user confirms it: nobody could give them.
        with pytest.raises(NoApprover, match="needs 2 approvals|forbids"):
            approvals.hold(call(delete, {"n": repr(amount)}), "d1", (), {"amount": amount})
    held = approvals.hold(call(send, {"to": "small"}), "d1", (), {"amount": 50})
    assert held.expires_at - clock() > 30
    with pytest.raises(NoApprover, match="approvals_required rule for it cannot be decided") as e:
        approvals.hold(call(send, {"to": "per"}), "d1", (), {"per": 0})
    assert e.value.reason == "undecided"


# Windows whose condition cannot be decided: crm/send has a 30-minute window, and a shorter
# one for large amounts; crm/delete has a window for large amounts only. An amount of "5000"
# (a string against 1000) cannot be decided; 5000 and 50 can.
UNDECIDED_WINDOWS = (
    'approval_window(_u: User, "call", Tool{"crm/send"}, 5) if context.amount > 1000;\n'
    'approval_window(_u: User, "call", Tool{"crm/delete"}, 60) if context.amount > 1000;\n'
)


def test_a_shorter_window_whose_condition_cannot_be_decided_shortens_the_window(world):
    """The window is the shortest the rules that may hold give: a rule for 5 minutes whose
    condition cannot be decided counts, as it would for 5000; it must not leave the longer
    window of another rule in force (before, the approver was offered 30 minutes)."""
    approvals, authz, facts, clock = world
    authz.load_policy(POLICY + UNDECIDED_WINDOWS)
    for amount, minutes in (("5000", 5), (5000, 5), (True, 5), (50, 30)):
        c = call(send, {"to": repr(amount)})
        request = approvals.hold(c, "d1", (), {"amount": amount})
        assert request.window_minutes == minutes, amount
    request = approvals.hold(call(send, {"to": "'5000'"}), "d1", (), {"amount": "5000"})
    with pytest.raises(NotAllowed, match="5 minutes at most"):
        approvals.answer(request.id, "avery", "approve", minutes=30, channel="api")
    assert list(facts.get(("approval_grant", None, None, None, None))) == []


def test_a_lone_window_whose_condition_cannot_be_decided_gives_no_window(world):
    """Whether a window exists at all widens what an approval allows: a rule that cannot be
    decided gives none (the call is approved once only), where 5000 would give its hour."""
    approvals, authz, facts, _ = world
    authz.load_policy(POLICY + UNDECIDED_WINDOWS)
    for amount, minutes in (("5000", 0), (True, 0), (50, 0), (5000, 60)):
        request = approvals.hold(call(delete, {"n": repr(amount)}), "d1", (), {"amount": amount})
        assert request.window_minutes == minutes, amount
    request = approvals.hold(call(delete, {"n": "'5000'"}), "d1", (), {"amount": "5000"})
    with pytest.raises(NotAllowed, match="approved once only"):
        approvals.answer(request.id, "sam", "approve", minutes=1, channel="api")
    assert list(facts.get(("approval_grant", None, None, None, None))) == []
    assert approvals.answer(request.id, "sam", "approve", channel="api").status == "approved"


def test_a_shorter_window_that_cannot_be_decided_when_answered_bounds_the_answer(world):
    """Read again when someone answers (away from the call: its arguments are the context),
    the shorter window that cannot be decided bounds the answer too, even where the call was
    held under a policy without it."""
    approvals, authz, facts, clock = world
    request = held(approvals, call(send, {"amount": "5000"}))
    assert request.window_minutes == 30
    authz.load_policy(
        POLICY
        + 'approval_window(_u: User, "call", Tool{"crm/send"}, 5) if'
        + " context.arguments.amount > 1000;\n"
    )
    with pytest.raises(NotAllowed, match="5 minutes at most"):
        approvals.answer(request.id, "avery", "approve", minutes=30, channel="api")
    approvals.answer(request.id, "avery", "approve", minutes=5, channel="api")
    [stored] = list(facts.get(("approval_grant", None, None, None, None)))
    assert stored.expires_at == clock.now + 5 * 60


def test_a_window_whose_length_cannot_be_named_gives_the_narrowest_terms(world):
    """A window rule whose minutes cannot be named at all (``60 / 0``) where another rule gives
    a window: how short the window is cannot be said, and the terms are the narrowest (the call
    is refused with reason "undecided", as for ``approvals_required``). Alone, it gives no
    window, as a rule that does not hold."""
    approvals, authz, *_ = world
    authz.load_policy(
        POLICY
        + 'approval_window(_u: User, "call", Tool{"crm/send"}, n) if n = 60 / context.per;\n'
        + 'approval_window(_u: User, "call", Tool{"crm/delete"}, n) if n = 60 / context.per;\n'
    )
    with pytest.raises(NoApprover, match="approval_window rule for it cannot be decided") as e:
        approvals.hold(call(send, {"to": "per"}), "d1", (), {"per": 0})
    assert e.value.reason == "undecided"
    assert approvals.hold(call(send, {"to": "two"}), "d1", (), {"per": 2}).window_minutes == 30
    assert approvals.hold(call(send, {"to": "one"}), "d1", (), {"per": 1}).window_minutes == 30
    assert approvals.hold(call(send, {"to": "six"}), "d1", (), {"per": 6}).window_minutes == 10
    assert approvals.hold(call(delete, {"n": "per"}), "d1", (), {"per": 0}).window_minutes == 0


def test_the_windows_strict_reading_is_compiled_with_the_policy(world):
    """The strict reading of ``approval_window`` is compiled when the policy loads, as the
    contract's questions are: questions through ``query`` that spend the compile budget cannot
    leave a held call without it (it would be refused over budget, or its window read wide)."""
    approvals, _, facts, _ = world
    tags = "\n".join(f'tagged(t: Tool, "t{i}") if has_role(_u, "caller", t);' for i in range(100))
    authz = Authorizer(
        POLICY + UNDECIDED_WINDOWS + tags, limits=PolicyLimits(policy_max_compiled_literals=1000)
    )
    approvals.authorizer = lambda: authz
    refused = 0
    for args in [(Variable("t"), "t1"), (send, Variable("n")), (Variable("t"), Variable("n"))]:
        try:
            authz.query("tagged", *args)
        except EvaluationLimit as err:
            assert err.limit == "policy_max_compiled_literals"
            refused += 1
    assert refused  # the budget is spent
    request = approvals.hold(call(send, {"to": "'5000'"}), "d1", (), {"amount": "5000"})
    assert request.window_minutes == 5
    assert approvals.hold(call(send, {"to": "50"}), "d1", (), {"amount": 50}).window_minutes == 30


# Any person but the user approves; the number of approvals, the expiry and the window are
# taken from the call's context, so each may come out as any value.
VALUED_TERMS = """
requires_approval(_user: User, "call", Tool{"crm/terms"});
approver(other: User, user: User, "call", Tool{"crm/terms"}) if other != user;
approval_window(_user: User, "call", Tool{"crm/terms"}, 30);
approvals_required(_u: User, "call", Tool{"crm/terms"}, n) if n = context.n;
approval_expires(_u: User, "call", Tool{"crm/terms"}, s) if s = context.s;
approval_window(_u: User, "call", Tool{"crm/terms"}, m) if m = context.m;
"""
terms = Entity("Tool", "crm/terms")


@pytest.mark.parametrize(
    ("given", "required", "seconds", "window"),
    [
        ({"n": 2, "s": 60, "m": 10}, 2, 60, 10),  # as written
        ({"n": 2.5}, 3, 600, 30),  # half an approval more is one more
        ({"n": 0}, 1, 600, 30),  # none asks no more than the default
        ({"s": 30.5}, 1, 30.5, 30),
        ({"s": float("inf")}, 1, 600, 30),
        ({"m": 8.5}, 1, 600, 8),  # the whole minutes within it
        ({"m": "5"}, 1, 600, 0),  # no number: this call only
        ({"m": True}, 1, 600, 0),
        ({"m": -3}, 1, 600, 0),
        ({"m": float("inf")}, 1, 600, 30),  # the longest is the other rule's
    ],
)
def test_a_term_given_as_another_number_narrows_the_terms_as_written(
    world, given, required, seconds, window
):
    approvals, authz, _, clock = world
    authz.load_policy(POLICY + VALUED_TERMS)
    request = approvals.hold(call(terms, {"to": repr(given)}), "d1", (), given)
    assert (request.required, request.window_minutes) == (required, window)
    assert request.expires_at - clock() == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("given", "rule"),
    [
        ({"n": "3"}, "approvals_required"),  # dropped, one approval would do instead of three
        ({"n": True}, "approvals_required"),
        ({"n": [3]}, "approvals_required"),
        ({"n": float("nan")}, "approvals_required"),
        ({"s": "30"}, "approval_expires"),  # dropped, the default expiry: longer
        ({"s": float("nan")}, "approval_expires"),
        ({"s": 0}, "approval_expires"),  # lapsed before it is made
        ({"s": -5}, "approval_expires"),
    ],
)
def test_a_term_given_as_no_number_refuses_the_hold_never_widens_it(world, given, rule):
    approvals, authz, *_ = world
    authz.load_policy(POLICY + VALUED_TERMS)
    with pytest.raises(NoApprover, match=f"{rule} rule for it cannot be decided") as refused:
        approvals.hold(call(terms, {"to": repr(given)}), "d1", (), given)
    assert refused.value.reason == "undecided"


def test_an_approval_raced_for_by_two_replicas_on_either_database_lets_one_call_through(
    database_url,
):
    """Two retries of an approved call reach two replicas at the same moment, on SQLite (two
    connections to one file) as on PostgreSQL: one spends the approval, the other finds it
    spent, and the call is held anew after."""
    clock = Clock()
    dbs = [Database(database_url) for _ in range(2)]
    try:
        replicas = [approvals_on(db, clock)[0] for db in dbs]
        for round_ in range(20):
            c = call(send, {"to": f"race{round_}@example.com"})
            request = held(replicas[0], c)
            replicas[0].answer(request.id, "avery", "approve", channel="api")

            def retry(replica, n, c=c):
                outcome = replica.check(c)
                return outcome.state == "approved" and replica.use(outcome.request, f"d{n}")

            spent = at_once(lambda: retry(replicas[0], 1), lambda: retry(replicas[1], 2))
            assert sorted(spent) == [False, True], (round_, spent)
            assert replicas[1].check(c).state == "hold"
            kinds = [e.kind for e in replicas[0].audit.events(request_id=request.id)]
            assert kinds.count("approval.used") == 1, (round_, kinds)
    finally:
        for db in dbs:
            db.close()


def test_a_released_result_raced_for_by_two_replicas_is_delivered_once(database_url):
    """A reviewer released a result; two retries of its call reach two replicas at the same
    moment: one is delivered the result, the other gets nothing of it, and the held result is
    deleted once delivered."""
    clock = Clock()
    dbs = [Database(database_url) for _ in range(2)]
    try:
        replicas = [approvals_on(db, clock)[0] for db in dbs]
        for round_ in range(10):
            review = dataclasses.replace(
                call(send, {"to": f"released{round_}@example.com"}), kind="review"
            )
            request = replicas[0].hold(
                review,
                f"run{round_}",
                ("requires_review(...)",),
                {},
                {"structuredContent": {"round": round_}},
            )
            replicas[0].answer(request.id, "avery", "approve", channel="api")

            def retry(replica, n, review=review):
                outcome = replica.check(review)
                if outcome.state != "released":
                    return None
                result = replica.held_result(outcome.request)
                return result if replica.use(outcome.request, f"d{n}") else None

            delivered = at_once(lambda: retry(replicas[0], 1), lambda: retry(replicas[1], 2))
            assert sorted(delivered, key=repr) == [
                None,
                {"structuredContent": {"round": round_}},
            ], (round_, delivered)
            after = replicas[1].get(request.id)
            assert after.status == "delivered" and replicas[1].held_result(after) is None
            kinds = [e.kind for e in replicas[0].audit.events(request_id=request.id)]
            assert kinds.count("review.delivered") == 1, (round_, kinds)
    finally:
        for db in dbs:
            db.close()
