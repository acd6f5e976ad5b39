"""Property tests: the compiled engine agrees with the naive reference evaluator.

Hypothesis generates random facts (and, for the last test, small random recursive policies);
authorize, list, actions and query must give exactly the reference's answers.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bastion import Authorizer, Entity
from tests.policy.reference import Reference, lower_text

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

users = st.sampled_from([Entity("User", u) for u in ("alice", "bob", "carol")])
orgs = st.sampled_from([Entity("Organization", o) for o in ("acme", "beta")])
repos = st.sampled_from([Entity("Repository", r) for r in ("anvil", "rocket", "zeta")])
issues = st.sampled_from([Entity("Issue", i) for i in ("i1", "i2")])

gitclub_fact = st.one_of(
    st.tuples(st.just("has_role"), users, st.sampled_from(["member", "admin"]), orgs),
    st.tuples(
        st.just("has_role"), users, st.sampled_from(["reader", "maintainer", "admin"]), repos
    ),
    st.tuples(st.just("has_relation"), repos, st.just("parent"), orgs),
    st.tuples(st.just("has_relation"), issues, st.just("repository"), repos),
    st.tuples(st.just("has_relation"), issues, st.just("creator"), users),
    st.tuples(st.just("is_public"), repos),
    st.tuples(st.just("is_blocked"), users),
)

GITCLUB_ACTIONS = [
    "read",
    "push",
    "delete",
    "create_issue",
    "comment",
    "close",
    "manage_members",
    "create_repository",
]


def _engine(policy: str, facts: list[tuple]) -> Authorizer:
    authz = Authorizer(policy)
    authz.facts.apply(facts, [])
    return authz


@SETTINGS
@given(
    facts=st.lists(gitclub_fact, max_size=14),
    actor=users,
    action=st.sampled_from(GITCLUB_ACTIONS),
    resource=st.one_of(orgs, repos, issues),
)
def test_gitclub_authorize_list_and_actions_agree(facts, actor, action, resource):
    policy = (EXAMPLES / "gitclub.polar").read_text()
    authz = _engine(policy, facts)
    ref = Reference(authz.policy.program, facts, None, [actor, resource, action])
    allowed = ref.allowed(actor, action, resource)
    assert authz.authorize(actor, action, resource) == allowed
    explanation = authz.decide(actor, action, resource).explanation
    assert explanation.allowed == allowed
    # The explanation agrees with the answer: a proof of allow, and of deny when denied by one.
    proved = explanation.steps[0].ok and not any(s.ok for s in explanation.steps[1:])
    assert proved == allowed, str(explanation)
    for resource_type in ("Organization", "Repository", "Issue"):
        assert authz.list(actor, action, resource_type) == ref.list(actor, action, resource_type)
    assert authz.actions(actor, resource) == ref.actions(actor, resource)


folders = st.sampled_from([Entity("Folder", f) for f in "abcdef"])
folder_fact = st.one_of(
    st.tuples(st.just("has_relation"), folders, st.just("parent"), folders),  # cycles included
    st.tuples(st.just("has_role"), users, st.sampled_from(["viewer", "editor"]), folders),
    st.tuples(
        st.just("has_relation"), st.just(Entity("Document", "doc")), st.just("folder"), folders
    ),
)


@SETTINGS
@given(
    facts=st.lists(folder_fact, max_size=16), actor=users, action=st.sampled_from(["view", "edit"])
)
def test_recursive_folders_agree_on_cyclic_data(facts, actor, action):
    authz = _engine((EXAMPLES / "folders.polar").read_text(), facts)
    ref = Reference(authz.policy.program, facts, None, [actor, action])
    for folder in [Entity("Folder", f) for f in "abcdef"] + [Entity("Document", "doc")]:
        assert authz.authorize(actor, action, folder) == ref.allowed(actor, action, folder), folder
    assert authz.list(actor, action, "Folder") == ref.list(actor, action, "Folder")
    assert authz.actions(actor, Entity("Folder", "a")) == ref.actions(actor, Entity("Folder", "a"))


tools = st.sampled_from([Entity("Tool", t) for t in ("crm/search", "crm/delete", "billing/pay")])
agents_fact = st.one_of(
    st.tuples(
        st.just("has_role"),
        users,
        st.sampled_from(["member", "lead"]),
        st.just(Entity("Team", "support")),
    ),
    st.tuples(st.just("has_role"), users, st.just("admin")),
    st.tuples(st.just("has_relation"), tools, st.just("team"), st.just(Entity("Team", "support"))),
    st.tuples(st.just("has_attribute"), tools, st.just("risk"), st.sampled_from(["low", "high"])),
    st.tuples(st.just("has_attribute"), tools, st.just("kind"), st.just("payment")),
)
contexts = st.fixed_dictionaries(
    {},
    optional={
        "time": st.sampled_from(
            ["2026-11-30T09:00:00Z", "2026-11-28T09:00:00Z", "2026-11-30T20:00:00Z"]
        ),
        # 1 and 0 beside true and false: the one is not the other (docs/policy-language.md).
        "device": st.fixed_dictionaries(
            {}, optional={"managed": st.one_of(st.booleans(), st.integers(0, 1))}
        ),
        "client": st.fixed_dictionaries(
            {"ip": st.sampled_from(["10.0.0.1", "192.0.2.1", "not-an-ip"])}
        ),
        "arguments": st.fixed_dictionaries(
            {"amount": st.one_of(st.integers(0, 3000), st.booleans())}
        ),
    },
)


@SETTINGS
@given(facts=st.lists(agents_fact, max_size=10), actor=users, tool=tools, context=contexts)
def test_context_policy_agrees(facts, actor, tool, context):
    if "time" not in context:
        context["time"] = "2026-11-30T10:00:00Z"  # the engine would fill in "now"; fix it instead
    authz = _engine((EXAMPLES / "agents.polar").read_text(), facts)
    ref = Reference(authz.policy.program, facts, context, [actor, tool, "call", "list"])
    for action in ("call", "list"):
        assert authz.authorize(actor, action, tool, context) == ref.allowed(actor, action, tool)
    assert authz.actions(actor, tool, context) == ref.actions(actor, tool)
    assert authz.list(actor, "call", "Tool", context) == ref.list(actor, "call", "Tool")


# Small random policies: rules over two base relations, with recursion and negation of bases.
nodes = st.sampled_from([Entity("N", n) for n in "pqrs"])
BODIES = [
    "e(x, y)",
    "f(x, y)",
    "e(y, x)",
    "e(x, z) and {p}(z, y)",
    "{p}(x, z) and f(z, y)",
    "{p}(x, z) and {p}(z, y)",
    "e(x, y) and not f(x, y)",
    "f(x, y) and not e(y, x)",
    "{p}(y, x)",
]


@st.composite
def random_policies(draw):
    rules = []
    for pred in ("p", "q"):
        for _ in range(draw(st.integers(1, 3))):
            template = draw(st.sampled_from(BODIES))
            other = draw(st.sampled_from(["p", "q"]))
            rules.append(f"{pred}(x: N, y: N) if {template.format(p=other)};")
    return "resource N {}\ndeclare e(N, N);\ndeclare f(N, N);\n" + "\n".join(rules)


@SETTINGS
@given(
    policy=random_policies(),
    facts=st.lists(st.tuples(st.sampled_from(["e", "f"]), nodes, nodes), max_size=10),
    a=nodes,
    b=nodes,
)
def test_random_recursive_policies_agree_on_query(policy, facts, a, b):
    authz = _engine(policy, facts)
    ref = Reference(authz.policy.program, facts, None, [a, b])
    for pred in ("p", "q"):
        expected = ref.holds(pred, None, None)
        assert set(authz.query(pred, None, None)) == expected, policy
        assert set(authz.query(pred, a, None)) == {t for t in expected if t[1] == a}, policy
        assert set(authz.query(pred, None, b)) == {t for t in expected if t[2] == b}, policy
        assert bool(authz.query(pred, a, b)) == ((pred, a, b) in expected), policy


STRINGS_POLICY = """
actor User {}
resource Tool {}

allow(_u: User, "send", _t: Tool) if
  lower(context.to, to) and ends_with(to, context.domain) and not contains(to, "+");
allow(_u: User, "read", _t: Tool) if starts_with(context.uri, "a") or lower(context.uri, "ab");
allow(_u: User, "list", _t: Tool) if contains(context.to, context.uri);
"""
# With letters whose lower case is ASCII though they are not (the Kelvin sign, İ), others
# lowered as usual (É), and Σ, whose lower case str.lower gives by what follows it.
texts = st.one_of(
    st.text(alphabet="aAbB@+.kK\u212aiI\u0130\u0307\u00c9\u00e9\u03a3\u03c3", max_size=5),
    st.integers(0, 2),
    st.booleans(),
)


@SETTINGS
@example(context={"to": "a@ban\u212a", "domain": "@bank"})
@example(context={"to": "\u0130", "domain": "i"})
@example(context={"to": "a\u03a3", "domain": "\u03c3"})
@example(context={"to": "\u00c9", "domain": "\u00e9"})
@given(
    context=st.fixed_dictionaries(
        {}, optional={"to": texts, "domain": texts, "uri": texts, "unused": texts}
    )
)
def test_string_builtins_agree(context):
    authz = Authorizer(STRINGS_POLICY)
    tool, actor = Entity("Tool", "t"), Entity("User", "u")
    # The reference lets lower's unbound output range over the domain: give it every candidate.
    lowered = [lower_text(v) for v in context.values() if isinstance(v, str)]
    ref = Reference(authz.policy.program, [], context, [actor, tool, *lowered])
    for action in ("send", "read", "list"):
        assert authz.authorize(actor, action, tool, context) == ref.allowed(actor, action, tool)
    assert authz.actions(actor, tool, context) == ref.actions(actor, tool)


DEVICE_POLICY = """
actor User {}
resource Tool {}
resource Device {}
declare device_compliance(Device, String);
declare owns(User, Device);

allow(_u: User, "call", _t: Tool) if device_compliance(Device{context.device.id}, "compliant");
allow(u: User, "read", _t: Tool) if d = Device{context.device.id} and owns(u, d);
allow(u: User, "list", _t: Tool) if owns(u, d) and not d = Device{context.other};
deny(_u: User, "read", _t: Tool) if device_compliance(Device{context.device.id}, "not-compliant");
deny(u: User, "list", _t: Tool) if
  id = context.other and owns(u, Device{id}) and not device_compliance(Device{id}, "compliant");
"""
# Device{""} may be stored, but no request's "" names it.
devices = st.sampled_from([Entity("Device", d) for d in ("laptop-7", "phone-2", "")])
device_fact = st.one_of(
    st.tuples(
        st.just("device_compliance"), devices, st.sampled_from(["compliant", "not-compliant"])
    ),
    st.tuples(st.just("owns"), users, devices),
)
# Ids of devices, and values that name none: empty, a number, a boolean, a list, an object.
device_ids = st.one_of(
    st.sampled_from(["laptop-7", "phone-2", "tablet-1", ""]),
    st.sampled_from([0, 1, True, False, ["Device", "laptop-7"], {"id": "laptop-7"}]),
)


@SETTINGS
@example(
    facts=[("device_compliance", Entity("Device", ""), "compliant")],
    actor=Entity("User", "alice"),
    context={"device": {"id": ""}},
)
@given(
    facts=st.lists(device_fact, max_size=8),
    actor=users,
    context=st.fixed_dictionaries(
        {},
        optional={
            "device": st.fixed_dictionaries({}, optional={"id": device_ids}),
            "other": device_ids,
        },
    ),
)
def test_entities_made_from_context_values_agree(facts, actor, context):
    authz = _engine(DEVICE_POLICY, facts)
    tool = Entity("Tool", "t")
    # Variables range over the domain: give it the context's values.
    given = [context.get("other"), context.get("device", {}).get("id")]
    extra = [v for v in given if isinstance(v, (str, int))]
    ref = Reference(
        authz.policy.program, facts, context, [actor, tool, "call", "read", "list", *extra]
    )
    for action in ("call", "read", "list"):
        assert authz.authorize(actor, action, tool, context) == ref.allowed(actor, action, tool)
        explanation = authz.decide(actor, action, tool, context).explanation
        assert explanation.allowed == ref.allowed(actor, action, tool)
    assert authz.actions(actor, tool, context) == ref.actions(actor, tool)


NEGATED_POLICY = """
actor User {}
resource Tool {}

allow(_u: User, "call", _t: Tool) if not context.amount > 1000;
allow(_u: User, "read", _t: Tool) if not (context.a / context.b >= 1 or context.tier < "m");
allow(_u: User, "list", _t: Tool) if forall(x in context.xs, not x * 2 > context.amount);
"""
# Values of every kind, zero (a division by it), a number past 64 bits once doubled, and none.
odd_values = st.one_of(
    st.sampled_from([0, 1, 2, 5000, 2**62, -0.0, 1.5, True, False, "", "a", "z", "5000"]),
    st.lists(st.sampled_from([0, 2**62, "x", True]), max_size=2),
)


@SETTINGS
@given(
    context=st.fixed_dictionaries(
        {},
        optional={
            "amount": odd_values,
            "a": odd_values,
            "b": odd_values,
            "tier": odd_values,
            "xs": st.lists(odd_values.filter(lambda v: not isinstance(v, list)), max_size=3),
        },
    )
)
# 0 and False in one list: the reference once kept only one of them in its domain.
@example(context={"amount": 0, "xs": [0, False]})
def test_negations_over_values_that_cannot_be_decided_agree(context):
    authz = Authorizer(NEGATED_POLICY)
    tool, actor = Entity("Tool", "t"), Entity("User", "u")
    # Variables range over the domain: give it the list's items.
    ref = Reference(authz.policy.program, [], context, [actor, tool, *context.get("xs", [])])
    for action in ("call", "read", "list"):
        assert authz.authorize(actor, action, tool, context) == ref.allowed(actor, action, tool)
        explanation = authz.decide(actor, action, tool, context).explanation
        assert explanation.allowed == ref.allowed(actor, action, tool)


GUARDED_POLICY = """
actor User {}
resource Tool {}

allow(_u: User, "call", _t: Tool);
allow(_u: User, "read", _t: Tool);
allow(_u: User, "list", _t: Tool) if not over(context.amount, context.b);
allow(_u: User, "get", _t: Tool) if not (context.hold = true and not over(context.a, context.b));
deny(_u: User, "call", _t: Tool) if context.amount > 1000 and context.hold = true;
deny(_u: User, "read", _t: Tool) if over(context.a, context.b);
deny(_u: User, "get", _t: Tool) if not context.tier >= "m";
over(x, y) if x / y >= 1;
over(x, _y) if x < "m";
"""


# Without booleans beside 0 and 1: the reference's sets would take ``True`` for ``1``, and a
# called rule's variables range over them (booleans are compared in the tests above).
guarded_values = st.one_of(
    st.sampled_from([0, 2, 5000, 2**62, -0.0, 1.5, "", "a", "z", "5000"]),
    st.lists(st.sampled_from([0, 2**62, "x"]), max_size=2),
)


@SETTINGS
@given(
    context=st.fixed_dictionaries(
        {},
        optional={
            "amount": guarded_values,
            "a": guarded_values,
            "b": guarded_values,
            "tier": guarded_values,
            "hold": st.sampled_from([True, "yes"]),
        },
    )
)
def test_deny_rules_and_called_rules_over_values_that_cannot_be_decided_agree(context):
    """A deny rule, and a rule called under a 'not', that may hold but cannot be decided refuse:
    every question agrees with the reference's two readings (what holds, what may hold)."""
    authz = Authorizer(GUARDED_POLICY)
    tool, actor = Entity("Tool", "t"), Entity("User", "u")
    # The called rule's variables range over the domain: give it the context's values.
    given = [v if not isinstance(v, list) else tuple(v) for v in context.values()]
    ref = Reference(authz.policy.program, [], context, [actor, tool, *given])
    for action in ("call", "read", "list", "get"):
        allowed = ref.allowed(actor, action, tool)
        assert authz.authorize(actor, action, tool, context) == allowed, action
        assert authz.decide(actor, action, tool, context).allowed == allowed, action
    assert authz.actions(actor, tool, context) == ref.actions(actor, tool)


LOWERED_POLICY = """
actor User {}
resource Tool {}

allow(_u: User, _a: String, _t: Tool);
deny(_u: User, "call", _t: Tool) if lower(context.cmd, c) and c = "rm";
deny(_u: User, "read", _t: Tool) if lower(context.cmd, c) and ends_with(c, context.domain);
deny(_u: User, "list", _t: Tool) if context.hold = true and dangerous(context.cmd);
allow(_u: User, "get", _t: Tool) if not (lower(context.cmd, c) and contains(c, "r"));
dangerous(x) if lower(x, c) and starts_with(c, "r");
"""


@SETTINGS
@given(
    context=st.fixed_dictionaries(
        {},
        optional={
            "cmd": st.one_of(texts, st.lists(st.sampled_from(["RM", 1]), max_size=2)),
            "domain": texts,
            "hold": st.sampled_from([True, False, "yes"]),
        },
    )
)
def test_lowering_in_deny_rules_and_under_a_not_fails_closed_as_the_reference(context):
    """``lower`` binding its output in strict code: where it can read its value the engine and
    the reference agree exactly; where it cannot (no string), the reference lets the output
    range over every value and the engine stops the rule as undecided (it holds, however the
    rest of the rule would have been decided): so it refuses whatever the reference refuses."""
    authz = Authorizer(LOWERED_POLICY)
    tool, actor = Entity("Tool", "t"), Entity("User", "u")
    given = [v if not isinstance(v, list) else tuple(v) for v in context.values()]
    lowered = [lower_text(v) for v in given if isinstance(v, str)]
    actions = ["call", "read", "list", "get"]
    ref = Reference(
        authz.policy.program, [], context, [actor, tool, "rm", *actions, *given, *lowered]
    )
    readable = not isinstance(context.get("cmd", ""), (list, int))  # a bool is an int
    for action in actions:
        allowed = ref.allowed(actor, action, tool)
        answer = authz.authorize(actor, action, tool, context)
        assert authz.decide(actor, action, tool, context).allowed == answer, action
        if readable:
            assert answer == allowed, (action, context)
        else:
            assert not answer or allowed, action
