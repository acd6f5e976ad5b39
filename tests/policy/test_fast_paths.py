"""The decision contract's fast paths answer as the full decision does, over drawn policies.

`plainly_allowed` is the gateway's check of ``connect`` on every message: when it says yes, the
full decision is skipped, so a yes must never stand where `decide_chain` would refuse or attach
something the gateway acts on. `Remembered` gives an answer again from memory: it must be the
answer asked afresh, whatever changed meanwhile (the context fields a rule reads, the time, the
facts, the policy). Policies are drawn from rules of every predicate the contract reads, each
with a condition on facts, on the context, on the time, that cannot be decided, or that spends
the evaluation budget.
"""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from bastion import Authorizer, Entity
from bastion.decide.contract import (
    ChainDecision,
    decide_chain,
    plainly_allowed,
    policy_result,
    remembered_calls,
    remembered_connects,
)
from bastion.policy.limits import PolicyLimits
from tests.draws import fuzzed

NOW = 1_800_000_000
ann, bob = Entity("User", "ann"), Entity("User", "bob")
bot, sub = Entity("Agent", "bot"), Entity("Agent", "sub")
desk, search = Entity("McpServer", "desk"), Entity("Tool", "desk/search")
d1 = Entity("Device", "d1")
# The chain of a sub-agent as an approval_grant names it (`approval_grant_agent`).
bot_sub = Entity("Agent", '["bot","sub"]')

BASE = """
actor User {}
actor Agent {}
actor Device {}
resource McpServer {}
resource Tool {}
declare member(User);
declare member(Agent);
declare flagged(User);
declare flagged(Agent);
declare busy(McpServer);
declare step(Integer, Integer);
declare signal(User, String, Boolean, String, Integer);
declare signal(Agent, String, Boolean, String, Integer);
declare signal(Device, String, Boolean, String, Integer);
declare approval_grant(User, Agent, String, McpServer);
declare approval_grant(User, Agent, String, Tool);
allow(actor, "connect", _r: McpServer) if member(actor);
allow(actor, "call", _r: Tool) if member(actor);
loop(n) if step(n, m) and loop(m);
"""
# The steps `loop(0)` walks: more than one question's budget (`LIMITS`).
STEPS = [("step", n, n + 1) for n in range(300)]
LIMITS = PolicyLimits(evaluation_max_steps=1000)

# Every predicate the contract reads (`_decide_chain`, `_alerts`, `_stale_signals`,
# `read_only_holds`, `required_auth_age`), with the values that cannot be used ("bad") too.
# {act} and {res}: the target's action and resource type; {actor}: the principal's type.
HEADS = {
    "allow": 'allow(actor: {actor}, "{act}", _r: {res})',
    "deny": 'deny(actor: {actor}, "{act}", _r: {res})',
    "scope": 'requires_scope("{act}", _r: {res}, "desk:use")',
    "bad_scope": 'requires_scope("{act}", _r: {res}, 7)',
    "signal": 'requires_signal(actor: {actor}, "compliant", 300)',
    "device_signal": 'requires_signal(_d: Device, "managed", 300)',
    "bad_signal": 'requires_signal(actor: {actor}, "compliant", "old")',
    "approval": 'requires_approval(actor: {actor}, "{act}", _r: {res})',
    "review": 'requires_review(actor: {actor}, "{act}", _r: {res})',
    "limit": 'rate_limit(actor: {actor}, "{act}", _r: {res}, 10, 60)',
    "bad_limit": 'rate_limit(actor: {actor}, "{act}", _r: {res}, "many", 60)',
    "mask": 'mask(actor: {actor}, "{act}", _r: {res}, "secret")',
    "bad_mask": 'mask(actor: {actor}, "{act}", _r: {res}, 7)',
    "read_only": "read_only(actor: {actor}, _s: McpServer)",
    "recent": 'requires_recent_auth(actor: {actor}, "{act}", _r: {res}, 300)',
    "bad_recent": 'requires_recent_auth(actor: {actor}, "{act}", _r: {res}, "soon")',
    "alert": 'alert(actor: {actor}, "watch", "high")',
    "label": 'label(_r: {res}, "pii")',
}
# What a rule's condition reads: nothing, facts, context fields, the time; "undecided" cannot
# be decided with ``context.per`` 0 (no answer can be named: refused as "undecided" in an
# obligation, holds in a guardrail); "budget" spends the evaluation budget.
CONDITIONS = {
    "always": "",
    "flagged": "flagged({who})",
    "busy": 'busy(McpServer{{"desk"}})',
    "public": 'context.network.zone = "public"',
    "strict": "context.flags.strict = true",
    "device": 'context.device.id = "d1"',
    "old_token": "context.token.age > 300",
    "late": f"@current_unix_time > {NOW + 100}",
    "email": 'context.arguments.field = "email"',
    "passed": "context.passed_through = true",
    "undecided": "n = 2 / context.per and n > 1",
    "budget": "loop(0)",
}
TARGETS = {"connect": (desk, "McpServer"), "call": (search, "Tool")}


@st.composite
def rules(draw, actions: tuple[str, ...] = ("connect",)) -> tuple[str, ...]:
    """Up to five rules, each a head of `HEADS` on one of ``actions``, for users or agents,
    with a condition of `CONDITIONS` (or two)."""
    found = []
    for _ in range(draw(st.integers(0, 5))):
        head = draw(st.sampled_from(sorted(HEADS)))
        act = draw(st.sampled_from(actions))
        actor = draw(st.sampled_from(["User", "Agent"]))
        text = HEADS[head].format(act=act, res=TARGETS[act][1], actor=actor)
        # A condition on the principal where the head names one, else on ann.
        who = "actor" if "actor:" in text else 'User{"ann"}'
        conditions = draw(st.lists(st.sampled_from(sorted(CONDITIONS)), min_size=1, max_size=2))
        body = " and ".join(CONDITIONS[c].format(who=who) for c in conditions if CONDITIONS[c])
        found.append(f"{text} if {body};" if body else f"{text};")
    return tuple(found)


@functools.cache
def compiled(policy: tuple[str, ...]) -> str:
    return BASE + "\n".join(policy)


def authorizer(policy: tuple[str, ...]) -> Authorizer:
    a = Authorizer(compiled(policy), limits=LIMITS)
    a.facts.apply(STEPS, [])
    return a


FACTS = [
    ("member", ann),
    ("member", bob),
    ("member", bot),
    ("member", sub),
    ("flagged", ann),
    ("flagged", bot),
    ("busy", desk),
    ("signal", ann, "compliant", True, "mdm", NOW - 10),
    ("signal", ann, "compliant", True, "mdm", NOW - 1000),
    ("signal", bot, "compliant", True, "mdm", NOW - 10),
    ("signal", d1, "managed", True, "mdm", NOW - 10),
    ("approval_grant", ann, bot, "connect", desk),
    ("approval_grant", ann, bot_sub, "connect", desk),
    ("approval_grant", bob, bot, "connect", desk),
    ("approval_grant", ann, bot, "call", search),
]
facts = st.lists(st.sampled_from(FACTS), unique=True)
# Chains of one to three principals, users and agents in any order.
chains = st.lists(st.sampled_from([ann, bob, bot, sub]), min_size=1, max_size=3).map(tuple)
scopes = st.frozensets(st.sampled_from(["desk:use", "other"]))
ABSENT = object()
TIMES = [NOW, NOW + 400, NOW + 100_000]
# Each field a rule (or the contract) reads, with values that meet and miss each condition, and
# values of other types (``1`` is not ``true``).
FIELDS = {
    "time": st.sampled_from(TIMES).map(lambda t: datetime.fromtimestamp(t, UTC)),
    "network": st.sampled_from(["office", "public"]).map(lambda z: {"zone": z}),
    "flags": st.sampled_from([True, 1, False]).map(lambda v: {"strict": v}),
    "device": st.sampled_from(["d1", "d2", "", 1]).map(lambda d: {"id": d}),
    "token": st.sampled_from([10, 1000]).map(lambda age: {"age": age}),
    "arguments": st.sampled_from(["email", "name"]).map(lambda f: {"field": f}),
    "per": st.sampled_from([0, 1]),
    "passed_through": st.sampled_from([True, False]),
}


@st.composite
def contexts(draw) -> dict:
    """A context as the gateway builds one (``server`` and ``time`` always), each other field
    there or not."""
    context = {"server": "desk", "time": draw(FIELDS["time"])}
    for name, values in FIELDS.items():
        if name != "time" and draw(st.booleans()):
            context[name] = draw(values)
    return context


def connect_duties(full: ChainDecision, context: dict) -> list[str]:
    """What the gateway does with ``full``, the full decision of ``connect`` (`Gateway.admit`
    sends it to `Enforcer.decide`), beyond letting the message go on: empty when nothing.

    Acted on:
    - any refusal or step-up `policy_result` makes of it: a principal not allowed, a signal
      missing or stale, a scope the token lacks, an undecided obligation, the budget spent, a
      write under a read-only downgrade (``context.passed_through``), and a sign-in age asked
      for (``requires_recent_auth``: the token's ``auth_time`` is not part of the question, so
      asked as unknown, and any age asked for counts);
    - an approval not granted (`Enforcer._obligations` holds the message);
    - a review (`Enforcer._obligations` asks who may review, and refuses where nobody may or
      the approval store cannot be read);
    - a rate limit (counted by the limiter, which refuses past it).
    Left out, with why:
    - masks and labels: `Gateway.admit` and `Gateway.may_hear` keep only the record of the
      connect verdict; masks and labels are applied to a result the message's own verdict
      releases (`handlers`, `client_requests`), and connect has none;
    - alerts: they never change an answer, and are raised for the decisions the gateway records
      (docs/signals.md); a connect allowed with nothing to do is not recorded, and the
      message's own decision asks every alert rule of its principals again;
    - the scopes required and an approval granted: all held (else refused, or held, above);
    - read-only on a message not passed through: a connect writes nothing (`refuses_write`).
    """
    result, reason = policy_result(full, "connect", desk, context, None, lambda: NOW)
    duties = [] if result == "allow" else [f"{result}: {reason}"]
    obligations = full.obligations
    if result == "allow":
        if obligations.requires_approval and not obligations.approval_granted:
            duties.append("hold for approval")
        if obligations.requires_review:
            duties.append("ask who may review")
        if obligations.rate_limits:
            duties.append("count the rate limits")
    return duties


@fuzzed(800)
@given(rules(), facts, chains, scopes, contexts())
def test_plainly_allowed_says_yes_only_where_connect_has_nothing_to_do(
    policy, present, chain, granted, context
):
    a = authorizer(policy)
    a.facts.apply(present, [])
    full = decide_chain(a, chain, "connect", desk, context, granted)
    duties = connect_duties(full, context)
    fast = plainly_allowed(a, chain, "connect", desk, context, granted)
    assert not (fast and duties), f"plainly allowed, but the full decision would: {duties}"
    # Nor decided in full for nothing: the fast path is what spares every message that.
    assert fast or duties, "not plainly allowed, though the full decision has nothing to do"


# -- answers from memory: `Remembered` -----------------------------------------------------------


@st.composite
def changes(draw) -> list[tuple]:
    """What happens between two messages: each step a question (a chain, the token's scopes,
    ``connect`` or ``call``) asked after one change or none: of the facts (a fact added with
    an expiry already passed, too), a context field (replaced, changed in place, removed), the
    time, or the policy."""
    steps = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["ask", "facts", "expired", "field", "in_place", "drop",
                                     "time", "policy"]))  # fmt: skip
        if kind == "facts":
            change = (kind, draw(facts))
        elif kind == "expired":
            change = (kind, draw(st.sampled_from(FACTS)))
        elif kind in ("field", "in_place"):
            name = draw(st.sampled_from(sorted(FIELDS)))
            change = (kind, name, draw(FIELDS[name]))
        elif kind == "drop":
            change = (kind, draw(st.sampled_from(sorted(set(FIELDS) - {"time"}))))
        elif kind == "time":
            change = (kind, draw(FIELDS["time"]))
        elif kind == "policy":
            change = (kind, draw(rules(("connect", "call"))))
        else:
            change = (kind,)
        question = (draw(chains), draw(scopes), draw(st.sampled_from(sorted(TARGETS))))
        steps.append((change, question))
    return steps


@fuzzed(500)
@given(rules(("connect", "call")), facts, contexts(), changes())
def test_an_answer_from_memory_is_the_answer_asked_now(policy, present, context, steps):
    """One memory of each kind, as the gateway keeps them (`remembered_connects` for connect,
    `remembered_calls` for each message's own decision), through a run of changes: each
    answer, asked twice, is the one `plainly_allowed` (`decide_chain`) gives on what is in
    force then."""
    a = authorizer(policy)
    a.facts.apply(present, [])
    connects, calls = remembered_connects(), remembered_calls()
    for change, (chain, granted, action) in steps:
        kind = change[0]
        if kind == "facts":
            a.facts.apply(change[1], [f for f in present if f not in change[1]])
            present = change[1]
        elif kind == "expired":
            a.facts.insert(change[1], expires_at=time.time() - 1)
        elif kind == "field":
            context = {**context, change[1]: change[2]}
        elif kind == "in_place":
            # The caller's own context changed after the answer was kept.
            old = context.get(change[1])
            if isinstance(old, dict) and isinstance(change[2], dict):
                old.update(change[2])
            else:
                context[change[1]] = change[2]
        elif kind == "drop":
            context = {k: v for k, v in context.items() if k != change[1]}
        elif kind == "time":
            context = {**context, "time": change[1]}
        elif kind == "policy":
            a.load_policy(compiled(change[1]))
        resource = TARGETS[action][0]
        if action == "connect":
            expected = plainly_allowed(a, chain, action, resource, context, granted)
            memory = connects
        else:
            expected = decide_chain(a, chain, action, resource, context, granted)
            memory = calls
        for _ in range(2):
            got = memory(a, chain, action, resource, context, granted)
            assert got == expected, (change, chain, granted, action, context)
