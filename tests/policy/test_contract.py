"""The gateway's decision contract: every principal of a chain must be allowed; obligations."""

from __future__ import annotations

import functools
import itertools
from datetime import UTC, datetime

import pytest

import bastion.decide.contract as contract
from bastion import Authorizer, Entity
from bastion.decide.contract import (
    RateLimit,
    Remembered,
    decide_chain,
    plainly_allowed,
    remembered_calls,
    remembered_connects,
)
from bastion.policy.limits import PolicyLimits
from tests.waits import before_expiry, past

POLICY = """
actor User {}
actor Agent {}
resource Tool {
  roles = ["caller"];
  permissions = ["call"];
  "call" if "caller";
}
declare pii_tool(Tool);

requires_scope("call", tool: Tool, "crm.write") if tool = Tool{"crm/delete"};
mask(_actor, "call", tool: Tool, "$.customers[*].email") if pii_tool(tool);
rate_limit(_agent: Agent, "call", _tool: Tool, 5, 60);
requires_approval(_user: User, "call", Tool{"crm/delete"});
"""

ann, bot = Entity("User", "ann"), Entity("Agent", "bot")
search, delete = Entity("Tool", "crm/search"), Entity("Tool", "crm/delete")


def authz() -> Authorizer:
    a = Authorizer(POLICY)
    a.facts.apply(
        [
            ("has_role", ann, "caller", search),
            ("has_role", ann, "caller", delete),
            ("has_role", bot, "caller", search),
            ("pii_tool", search),
        ],
        [],
    )
    return a


def test_agent_cannot_exceed_the_user_it_acts_for():
    a = authz()
    a.facts.delete(("has_role", ann, None, search))
    decision = decide_chain(a, [ann, bot], "call", search)
    assert not decision.allowed and decision.refused_by == ann


def test_user_cannot_lend_an_agent_what_the_agent_lacks():
    decision = decide_chain(authz(), [ann, bot], "call", delete, granted_scopes=["crm.write"])
    assert not decision.allowed and decision.refused_by == bot


def test_an_empty_chain_is_refused():
    assert not decide_chain(authz(), [], "call", search).allowed


def test_obligations_masks_and_rate_limits_per_principal():
    decision = decide_chain(authz(), [ann, bot], "call", search, granted_scopes=[])
    assert decision.allowed
    assert decision.obligations.masks == ("$.customers[*].email",)
    assert decision.obligations.rate_limits == (RateLimit(bot, 5, 60),)
    assert not decision.obligations.requires_approval


def test_missing_scope_refuses_with_the_scope_to_step_up_to():
    a = authz()
    a.facts.insert(("has_role", bot, "caller", delete))
    refused = decide_chain(a, [ann, bot], "call", delete, granted_scopes=["crm.read"])
    assert (
        not refused.allowed
        and refused.missing_scopes == ("crm.write",)
        and refused.refused_by is None
    )
    granted = decide_chain(a, [ann, bot], "call", delete, granted_scopes=["crm.read", "crm.write"])
    assert granted.allowed and granted.obligations.required_scopes == ("crm.write",)
    assert granted.obligations.requires_approval


def test_a_policy_without_obligation_rules_has_none():
    a = Authorizer(
        'actor User {}\nresource Tool { roles = ["r"]; permissions = ["call"]; "call" if "r"; }'
    )
    a.facts.insert(("has_role", ann, "r", search))
    decision = decide_chain(a, [ann], "call", search, granted_scopes=[])
    assert (
        decision.allowed
        and decision.obligations.masks == ()
        and decision.obligations.rate_limits == ()
    )


def test_a_mask_whose_path_is_not_text_masks_everything_rather_than_nothing():
    # A rule that fires with a number or a boolean for its path still asks for a mask: dropping it
    # would send the result unmasked. It stands for a path that cannot be read (the whole
    # value, see bastion.gateway.masks.compile_paths).
    a = Authorizer(
        'actor User {}\nresource Tool {}\nallow(_u: User, "call", _t: Tool);\n'
        'mask(_u: User, "call", _t: Tool, path) if path = context.path;'
    )
    for path in (0, 1.5, True):
        decision = decide_chain(a, (ann,), "call", search, {"path": path})
        assert decision.allowed and decision.obligations.masks == ("",), path


def test_a_rate_limit_that_cannot_be_counted_refuses_rather_than_lets_through():
    # A limit whose numbers are not whole (5.0 calls, a 60.5 s window), not numbers, or a window
    # of no time, is still a limit asked for: dropping it would admit every call.
    for numbers in ("5, 60.5", "5.0, 60", '"5", 60', "5, 0", "true, 60"):
        a = Authorizer(
            'actor User {}\nresource Tool {}\nallow(_u: User, "call", _t: Tool);\n'
            f'rate_limit(_u: User, "call", _t: Tool, {numbers});'
        )
        decision = decide_chain(a, (ann,), "call", search, {})
        assert decision.obligations.rate_limits == (RateLimit(ann, 0, 1),), numbers


# -- the gateway's check of `connect` on every message: `plainly_allowed` ------------------------

PLAIN_BASE = """
actor User {}
actor Agent {}
resource McpServer {}
declare member(User, McpServer);
declare member(Agent, McpServer);
declare signal(User, String, Boolean, String, Integer);
declare approval_grant(User, Agent, String, McpServer);
declare busy(McpServer);
declare step(Integer, Integer);
allow(actor, "connect", server: McpServer) if member(actor, server);
"""
# Each adds something `decide_chain` would make the gateway decide and record in full.
PLAIN_RULES = {
    "deny": 'deny(_: Agent, "connect", server: McpServer) if busy(server);',
    "scope": 'requires_scope("connect", _: McpServer, "desk:use");',
    "bad_scope": 'requires_scope("connect", _: McpServer, 7);',
    "limit": 'rate_limit(_: Agent, "connect", _: McpServer, 10, 60);',
    "bad_limit": 'rate_limit(_: User, "connect", _: McpServer, "many", 60);',
    "approval": 'requires_approval(_: User, "connect", _: McpServer);',
    "signal": 'requires_signal(_: User, "compliant", 300);',
    "masked": 'mask(_: User, "connect", _: McpServer, "secret");',
    "recent": 'requires_recent_auth(_: User, "connect", _: McpServer, 300);',
    "budget": (
        'deny(_: User, "connect", _: McpServer) if loop(0);\nloop(n) if step(n, m) and loop(m);'
    ),
}
NOW = 1_800_000_000
desk = Entity("McpServer", "desk")


PLAIN_FACTS = [
    ("member", ann, desk),
    ("member", bot, desk),
    ("busy", desk),
    ("signal", ann, "compliant", True, "mdm", NOW - 10),
    ("signal", ann, "compliant", True, "mdm", NOW - 1000),
    ("approval_grant", ann, bot, "connect", desk),
]


@pytest.mark.parametrize(
    "rules",
    [
        (),
        *((r,) for r in PLAIN_RULES),
        ("approval", "limit"),
        ("scope", "signal"),
        ("deny", "budget"),
        ("recent", "scope"),
    ],
)
def test_plainly_allowed_is_decide_chain_allowing_with_nothing_to_do(rules):
    """Every set of facts, chain and scopes: `plainly_allowed` says yes exactly when
    `decide_chain` allows with no scope missing, no approval pending, no rate limit and no
    sign-in age to check."""
    a = plain_authorizer(frozenset(rules))
    context = {"time": datetime.fromtimestamp(NOW, UTC)}
    for chosen in itertools.product((False, True), repeat=len(PLAIN_FACTS)):
        facts = [f for f, keep in zip(PLAIN_FACTS, chosen, strict=True) if keep]
        a.facts.apply(facts, [])
        for chain in [(ann,), (ann, bot), (bot,), ()]:
            for scopes in [(), ("desk:use",), ("other",)]:
                full = decide_chain(a, chain, "connect", desk, context, granted_scopes=scopes)
                duties = full.obligations
                expected = (
                    full.allowed
                    and not full.missing_scopes
                    and not (duties.requires_approval and not duties.approval_granted)
                    and not duties.rate_limits
                    and duties.max_auth_age is None
                )
                got = plainly_allowed(a, chain, "connect", desk, context, scopes)
                assert got == expected, (facts, chain, scopes)
        a.facts.apply([], facts)


@functools.cache
def plain_authorizer(rules: frozenset[str]) -> Authorizer:
    """The policy of ``rules`` (compiled once per set of rules), with the steps that make the
    "budget" rule spend its evaluation budget."""
    policy = PLAIN_BASE + "\n".join(PLAIN_RULES[r] for r in sorted(rules))
    a = Authorizer(policy, limits=PolicyLimits(evaluation_max_steps=200))
    a.facts.apply([("step", n, n + 1) for n in range(300)], [])
    return a


def test_plainly_allowed_refuses_what_a_masked_or_limited_connect_is_not():
    # Masks are not a reason to decide connect in full (a connect returns nothing to mask);
    # a rate limit is.
    a = Authorizer(PLAIN_BASE + PLAIN_RULES["masked"])
    a.facts.apply([("member", ann, desk), ("member", bot, desk)], [])
    assert plainly_allowed(a, (ann, bot), "connect", desk, {}, ())
    b = Authorizer(PLAIN_BASE + PLAIN_RULES["limit"])
    b.facts.apply([("member", ann, desk), ("member", bot, desk)], [])
    assert not plainly_allowed(b, (ann, bot), "connect", desk, {}, ())


# -- the same questions answered from memory: `Remembered` ---------------------------------------


@pytest.mark.parametrize("rules", [(), ("deny",), ("scope", "signal"), ("approval",), ("limit",)])
def test_a_remembered_connect_is_the_one_decided_now(rules):
    """One memory through every change of the facts, chain and scopes: each answer, asked
    twice, is `plainly_allowed`'s on the facts in force then."""
    a = plain_authorizer(frozenset(rules))
    remembered = remembered_connects()
    context = {"time": datetime.fromtimestamp(NOW, UTC)}
    for chosen in itertools.product((False, True), repeat=len(PLAIN_FACTS)):
        facts = [f for f, keep in zip(PLAIN_FACTS, chosen, strict=True) if keep]
        a.facts.apply(facts, [])
        for chain in [(ann,), (ann, bot), (bot,)]:
            for scopes in [frozenset(), frozenset({"desk:use"})]:
                expected = plainly_allowed(a, chain, "connect", desk, context, scopes)
                for _ in range(2):
                    got = remembered(a, chain, "connect", desk, context, scopes)
                    assert got == expected, (facts, chain, scopes)
        a.facts.apply([], facts)


def remembered_yes(policy: str, facts: list, context: dict) -> tuple[Authorizer, Remembered]:
    """An authorizer with ``policy`` and ``facts``, and a memory that has just said yes."""
    a = Authorizer(PLAIN_BASE + policy)
    a.facts.apply(facts, [])
    remembered = remembered_connects()
    for _ in range(2):
        assert remembered(a, (ann, bot), "connect", desk, context, frozenset())
    return a, remembered


def test_a_remembered_connect_is_refused_when_a_field_it_read_changes():
    policy = 'deny(_: User, "connect", _: McpServer) if context.network.zone = "public";'
    office = {"network": {"ip": "10.0.0.1", "zone": "office"}, "scopes": []}
    a, remembered = remembered_yes(policy, [("member", ann, desk), ("member", bot, desk)], office)
    public = {**office, "network": {"ip": "10.0.0.1", "zone": "public"}}
    assert not remembered(a, (ann, bot), "connect", desk, public, frozenset())
    # A field no rule reads may change: the answer stays.
    moved = {**office, "scopes": ["other"]}
    assert remembered(a, (ann, bot), "connect", desk, moved, frozenset())


def test_a_remembered_connect_is_refused_when_its_time_runs_out():
    # A rule on the time, and a required signal's age: each read the time, never remembered.
    until = f'deny(_: User, "connect", _: McpServer) if @current_unix_time > {NOW + 100};'
    members = [("member", ann, desk), ("member", bot, desk)]
    signal = [("signal", ann, "compliant", True, "mdm", NOW - 10)]
    now = {"time": datetime.fromtimestamp(NOW, UTC)}
    later = {"time": datetime.fromtimestamp(NOW + 400, UTC)}
    for policy, facts in [(until, members), (PLAIN_RULES["signal"], members + signal)]:
        a, remembered = remembered_yes(policy, facts, now)
        assert not remembered(a, (ann, bot), "connect", desk, later, frozenset())


def test_a_remembered_connect_is_refused_once_a_fact_it_stood_on_expires():
    def remembered_before_expiry(at: float):
        a = Authorizer(PLAIN_BASE)
        a.facts.apply([("member", bot, desk)], [])
        a.facts.insert(("member", ann, desk), expires_at=at)
        remembered = remembered_connects()
        assert remembered(a, (ann, bot), "connect", desk, {}, frozenset())
        return a, remembered

    (a, remembered), at = before_expiry(remembered_before_expiry, 0.1)
    past(at)  # nothing written meanwhile: only the expiry changed the facts
    assert not remembered(a, (ann, bot), "connect", desk, {}, frozenset())


def test_a_remembered_connect_is_refused_under_a_new_policy():
    a, remembered = remembered_yes("", [("member", ann, desk), ("member", bot, desk)], {})
    a.load_policy(PLAIN_BASE + 'deny(_: Agent, "connect", _: McpServer);')
    assert not remembered(a, (ann, bot), "connect", desk, {}, frozenset())


class _Live(dict):
    """A context value that works out what is read from it when it is read (as
    ``context.behavior`` does): two of them compare equal whatever they would answer."""

    def __init__(self, answer: str) -> None:
        super().__init__()
        self.answer = answer

    def get(self, key, default=None):
        return self.answer if key == "state" else default


def test_a_connect_that_read_a_live_view_is_not_remembered():
    policy = 'deny(_: Agent, "connect", _: McpServer) if context.load.state = "busy";'
    a, remembered = remembered_yes(policy, [("member", ann, desk), ("member", bot, desk)], {})
    calm, busy = {"load": _Live("calm")}, {"load": _Live("busy")}
    assert remembered(a, (ann, bot), "connect", desk, calm, frozenset())
    assert not remembered(a, (ann, bot), "connect", desk, busy, frozenset())


def test_a_remembered_connect_tells_true_from_one_inside_a_field():
    policy = 'deny(_: User, "connect", _: McpServer) if context.flags.strict matches Boolean;'
    members = [("member", ann, desk), ("member", bot, desk)]
    a, remembered = remembered_yes(policy, members, {"flags": {"strict": 1}})
    strict = {"flags": {"strict": True}}
    assert not plainly_allowed(a, (ann, bot), "connect", desk, strict, frozenset())
    assert not remembered(a, (ann, bot), "connect", desk, strict, frozenset())


# -- the gateway's decision on each message, from memory: `remembered_calls` ---------------------

CALLS = """
actor User {}
actor Agent {}
resource Tool {}
declare caller(User, Tool);
declare caller(Agent, Tool);
declare pii_tool(Tool);
allow(actor, "call", tool: Tool) if caller(actor, tool);
deny(_: User, "call", _: Tool) if context.arguments.field = "email";
deny(_: Agent, "call", _: Tool) if "admin" in context.arguments.roles;
deny(_: User, "call", _: Tool) if context.arguments.flags.strict matches Boolean;
mask(_: User, "call", tool: Tool, "customers.*.email") if pii_tool(tool);
rate_limit(_: Agent, "call", _: Tool, 5, 60);
"""
CALL_FACTS = [("caller", ann, search), ("caller", bot, search)]


@pytest.fixture
def answered(monkeypatch):
    """Each `decide_chain` the memory asks (answers it did not give from memory)."""
    asked: list[str] = []

    def counted(authz, principals, action, resource, context=None, granted_scopes=None, task=""):
        asked.append(action)
        return decide_chain(authz, principals, action, resource, context, granted_scopes, task)

    monkeypatch.setattr(contract, "decide_chain", counted)
    return asked


def call_memory(policy: str = CALLS, facts: list = CALL_FACTS) -> tuple[Authorizer, Remembered]:
    a = Authorizer(policy)
    a.facts.apply(facts, [])
    return a, remembered_calls()


def test_a_remembered_call_is_kept_by_the_paths_the_policy_read(answered):
    """The policy reads ``context.arguments.field``, not the query: another query is answered
    from memory; another field is decided anew."""
    a, remembered = call_memory()
    asked = [
        remembered(a, (ann, bot), "call", search, {"arguments": {"query": q}}, frozenset())
        for q in "abc"
    ]
    assert all(d.allowed for d in asked) and len(answered) == 1
    email = {"arguments": {"query": "c", "field": "email"}}
    assert not remembered(a, (ann, bot), "call", search, email, frozenset()).allowed
    name = {"arguments": {"query": "c", "field": "name"}}
    assert remembered(a, (ann, bot), "call", search, name, frozenset()).allowed
    assert len(answered) == 3
    # The newest reading of a question is kept: no field again is decided again, then given
    # from memory as deciding it now gives it, obligations included.
    plain = {"arguments": {"query": "d"}}
    for _ in range(2):
        got = remembered(a, (ann, bot), "call", search, plain, frozenset())
        assert got == decide_chain(a, (ann, bot), "call", search, plain, frozenset())
    assert got.obligations.rate_limits and len(answered) == 4


def test_a_remembered_call_compares_a_value_read_whole_and_its_types():
    a, remembered = call_memory()
    ok = {"arguments": {"roles": ["reader"]}}
    assert remembered(a, (ann, bot), "call", search, ok, frozenset()).allowed
    admin = {"arguments": {"roles": ["reader", "admin"]}}
    assert not remembered(a, (ann, bot), "call", search, admin, frozenset()).allowed
    assert remembered(
        a, (ann, bot), "call", search, {"arguments": {"flags": {"strict": 1}}}, frozenset()
    ).allowed
    strict = {"arguments": {"flags": {"strict": True}}}
    assert not remembered(a, (ann, bot), "call", search, strict, frozenset()).allowed
    # What was read is kept as it was: the same list, changed since, is read again.
    roles = ["reader"]
    same = {"arguments": {"roles": roles}}
    assert remembered(a, (ann, bot), "call", search, same, frozenset()).allowed
    roles.append("admin")
    assert not remembered(a, (ann, bot), "call", search, same, frozenset()).allowed
    # A path through something that is not an object holds nothing, as the policy sees it.
    assert remembered(a, (ann, bot), "call", search, {"arguments": "text"}, frozenset()).allowed


def test_a_remembered_call_is_refused_when_an_object_it_read_into_is_gone(answered):
    """A value read inside an object (at any depth), or an object read whole, that is no
    longer there because an object on its way is now text, null or absent, is not the value
    read: decided anew, refused; and a list read whole compares its values type for type."""
    policy = CALLS + (
        'deny(_: User, "call", _: Tool) if not context.request.flags.mode = "safe";\n'
        'deny(_: Agent, "call", _: Tool) if not "reader" in context.grants.roles;\n'
        'deny(_: Agent, "call", _: Tool) if x in context.grants.roles and x matches Boolean;\n'
    )
    a, remembered = call_memory(policy)
    request, grants = {"flags": {"mode": "safe"}}, {"roles": ["reader", 1]}
    for _ in range(2):
        got = remembered(
            a, (ann, bot), "call", search, {"request": request, "grants": grants}, frozenset()
        )
        assert got.allowed
    assert len(answered) == 1
    gone = [
        {"request": "text", "grants": grants},
        {"request": None, "grants": grants},
        {"grants": grants},
        {"request": {"flags": "safe"}, "grants": grants},
        {"request": {"flags": {}}, "grants": grants},
        {"request": request, "grants": "text"},
        {"request": request},
        {"request": request, "grants": {"roles": ["reader", True]}},
    ]
    for context in gone:
        assert not remembered(a, (ann, bot), "call", search, context, frozenset()).allowed, context
    assert len(answered) == 1 + len(gone)


def test_a_remembered_call_follows_the_facts_and_the_policy(answered):
    a, remembered = call_memory()
    plain = {"arguments": {"query": "a"}}
    assert remembered(a, (ann, bot), "call", search, plain, frozenset()).allowed
    # A new fact: a mask the remembered answer did not have.
    a.facts.insert(("pii_tool", search))
    got = remembered(a, (ann, bot), "call", search, plain, frozenset())
    assert got.obligations.masks == ("customers.*.email",)
    # A revoked role: refused on the next call.
    a.facts.delete(("caller", bot, search))
    assert not remembered(a, (ann, bot), "call", search, plain, frozenset()).allowed
    a.facts.insert(("caller", bot, search))
    assert remembered(a, (ann, bot), "call", search, plain, frozenset()).allowed
    a.load_policy(CALLS + 'deny(_: Agent, "call", _: Tool);')
    assert not remembered(a, (ann, bot), "call", search, plain, frozenset()).allowed
    # Another chain or other scopes are another question.
    a.load_policy(CALLS)
    assert remembered(a, (ann, bot), "call", search, plain, frozenset()).allowed
    assert not remembered(a, (bot, ann), "call", delete, plain, frozenset()).allowed
    assert len(answered) == 7


def test_a_call_that_read_the_time_or_a_live_view_is_never_remembered(answered):
    until = CALLS + f'deny(_: User, "call", _: Tool) if @current_unix_time > {NOW + 100};'
    a, remembered = call_memory(until)
    now = {"time": datetime.fromtimestamp(NOW, UTC)}
    later = {"time": datetime.fromtimestamp(NOW + 400, UTC)}
    assert remembered(a, (ann, bot), "call", search, now, frozenset()).allowed
    assert not remembered(a, (ann, bot), "call", search, later, frozenset()).allowed
    # A time is ordered by the builtins (``context.time > "..."`` orders a time and a string:
    # it cannot be decided, so a deny rule so written always refuses).
    window = (
        CALLS
        + 'deny(_: User, "call", _: Tool) if time_after(context.time, "2027-01-01T00:00:00Z");'
    )
    a, remembered = call_memory(window)
    for _ in range(2):
        assert remembered(a, (ann, bot), "call", search, {}, frozenset()).allowed
    live = CALLS + 'deny(_: Agent, "call", _: Tool) if context.load.state = "busy";'
    a, remembered = call_memory(live)
    assert remembered(a, (ann, bot), "call", search, {"load": _Live("calm")}, frozenset()).allowed
    busy = {"load": _Live("busy")}
    assert not remembered(a, (ann, bot), "call", search, busy, frozenset()).allowed
    assert remembered(a, (ann, bot), "call", search, {"load": _Live("calm")}, frozenset()).allowed
    assert len(answered) == 7


def test_the_call_memory_is_bounded_by_what_its_readings_hold(answered):
    policy = CALLS + 'deny(_: User, "call", _: Tool) if context.arguments.note = "stop";'
    a, remembered = call_memory(
        policy, CALL_FACTS + [("caller", ann, delete), ("caller", bot, delete)]
    )
    remembered.SIZE = 100
    note = {"arguments": {"note": "n" * 60}}
    for tool in (search, delete, search):
        assert remembered(a, (ann, bot), "call", tool, note, frozenset()).allowed
    # The second reading did not fit beside the first: the memory started again without it.
    assert len(answered) == 3
    assert remembered(a, (ann, bot), "call", search, note, frozenset()).allowed
    assert len(answered) == 3
    # A reading of more text than one answer may hold is never kept.
    long = {"arguments": {"note": "n" * 5000}}
    for _ in range(2):
        assert remembered(a, (ann, bot), "call", delete, long, frozenset()).allowed
    assert len(answered) == 5


def test_an_approval_for_minutes_counts_under_the_task_it_was_given_under_alone():
    """An ``approval_grant`` given for a call under a task names the chain and the task
    (`approval_grant_agent`): the same call under another task, or under none, still needs
    its approval, whatever the call memory kept of the first (the task is part of the
    question it keeps answers under); and a grant given under no task counts under none only."""
    policy = PLAIN_BASE + PLAIN_RULES["approval"]
    a = Authorizer(policy)
    under_t1 = ("approval_grant", ann, contract.approval_grant_agent(("bot",), "t-1"), "connect")
    a.facts.apply([("member", ann, desk), ("member", bot, desk), (*under_t1, desk)], [])
    remembered = remembered_calls()

    def granted(task: str) -> bool:
        decided = remembered(a, (ann, bot), "connect", desk, {}, frozenset(), task)
        assert decided.allowed and decided.obligations.requires_approval
        return decided.obligations.approval_granted

    assert granted("t-1") and granted("t-1")  # the second from memory
    assert not granted("t-2")
    assert not granted("")
    a.facts.apply([("approval_grant", ann, bot, "connect", desk)], [(*under_t1, desk)])
    assert granted("")
    assert not granted("t-1")
    # A client id that reads as a task's grant is named as a list of one.
    assert contract.approval_grant_agent(('{"agents":["bot"],"task":"t-1"}',)) != (
        contract.approval_grant_agent(("bot",), "t-1")
    )
