"""A value of one kind never equals a value of another: a boolean is not the number 1, and a
list is not an entity, wherever two values meet (a comparison, ``in``, a rule's head, a fact).

Python equates ``True`` with ``1`` and a list of two strings (a tuple here) with an entity (a
named tuple); the request's context is written by the caller (an MCP client writes the tool
arguments), so either confusion would let a request pass for what it is not.
"""

from __future__ import annotations

import pytest

from bastion import Authorizer, Entity, Variable
from bastion.decide.contract import ChainDecision, RateLimit, decide_chain, plainly_allowed

ALICE, BOB, REPO = Entity("User", "alice"), Entity("User", "bob"), Entity("Repo", "r")
BLOCKS = "actor User {}\nresource Repo {}\n"


def allowed(rules: str, context: dict, facts: tuple = ()) -> bool:
    authz = Authorizer(BLOCKS + rules)
    for fact in facts:
        authz.facts.insert(fact)
    answer = authz.authorize(ALICE, "read", REPO, context)
    # The explanation's interpreter decides alike (`explain: true`, a decision explained later):
    # a refusal is not explained by a proof that the rule held.
    decision = authz.decide(ALICE, "read", REPO, context)
    assert decision.allowed == answer
    if "deny(" not in rules:
        assert ("✓ allow(" in str(decision.explanation)) == answer
    return answer


@pytest.mark.parametrize(
    ("condition", "context"),
    [
        ("context.admin = true", {"admin": 1}),
        ("context.admin == true", {"admin": 1.0}),
        ("context.admin = false", {"admin": 0}),
        ("context.level = 1", {"level": True}),
        ("context.level == 0", {"level": False}),
        ("context.level in [1, 2]", {"level": True}),
        ("true in context.flags", {"flags": [1]}),
        ("context.flags = [true]", {"flags": [1]}),
        ("context.a = context.b", {"a": True, "b": 1}),
    ],
)
def test_a_boolean_in_the_context_is_not_the_number_one(condition, context):
    rule = f'allow(_u: User, "read", _r: Repo) if {condition};'
    assert not allowed(rule, context)


def test_a_boolean_and_a_number_are_different_values_to_not_equal():
    rule = 'deny(_u: User, "read", _r: Repo) if context.level != 1;\n'
    rule += 'allow(_u: User, "read", _r: Repo);'
    assert allowed(rule, {"level": 1})
    assert not allowed(rule, {"level": True})


def test_numbers_of_either_kind_still_compare_by_value():
    rule = 'allow(_u: User, "read", _r: Repo) if context.n = 1 and 2 in context.ns;'
    assert allowed(rule, {"n": 1.0, "ns": [2.0]})
    assert allowed(rule, {"n": 1, "ns": [3, 2]})


@pytest.mark.parametrize(
    "rule",
    [
        'allow(u: User, "read", _r: Repo) if context.owner = u;',
        'allow(u: User, "read", _r: Repo) if context.owner == u;',
        'allow(u: User, "read", _r: Repo) if u in context.owners;',
        'allow(u: User, "read", _r: Repo) if owner(context.owner, u);\nowner(x, x);',
        'allow(_u: User, "read", _r: Repo) if is_alice(context.owner);\nis_alice(User{"alice"});',
    ],
)
def test_a_list_in_the_context_is_never_taken_for_an_entity(rule):
    context = {"owner": ["User", "alice"], "owners": [["User", "alice"]]}
    assert not allowed(rule, context)


def test_a_list_in_the_context_finds_no_fact_about_an_entity():
    # The facts are bob's: a request that writes bob as a list must not borrow his role.
    rules = "declare member(User, Repo);\n"
    rules += 'allow(_u: User, "read", r: Repo) if member(context.on_behalf_of, r);'
    facts = [("member", BOB, REPO)]
    assert not allowed(rules, {"on_behalf_of": ["User", "bob"]}, facts)


def test_a_list_in_a_rule_of_the_policy_is_not_an_entity_either():
    rule = 'allow(u: User, "read", _r: Repo) if u = ["User", "alice"];'
    assert not allowed(rule, {})


def test_a_list_in_the_context_still_equals_the_same_list_written_in_the_policy():
    rule = 'allow(_u: User, "read", _r: Repo) if context.pair = ["User", "alice"] and'
    rule += ' ["a", 1] in context.pairs;'
    assert allowed(rule, {"pair": ["User", "alice"], "pairs": [["b", 2], ["a", 1]]})
    assert not allowed(rule, {"pair": ["User", "alice"], "pairs": [["a", True]]})


def test_a_rule_head_constant_matches_only_a_value_of_its_kind():
    rules = 'allow(_u: User, "read", _r: Repo) if level_ok(context.level);\n'
    rules += "level_ok(1);\nlevel_ok(2);\nlevel_ok(3);\n"
    assert allowed(rules, {"level": 2})
    assert not allowed(rules, {"level": True})
    flags = 'allow(_u: User, "read", _r: Repo) if enabled(context.flag);\nenabled(true);\n'
    assert allowed(flags, {"flag": True})
    assert not allowed(flags, {"flag": 1})


def test_query_answers_keep_a_list_and_an_entity_apart():
    authz = Authorizer(BLOCKS + "picked(x) if x in context.xs;")
    rows = authz.query("picked", Variable("x"), context={"xs": [["User", "alice"], "alice"]})
    assert sorted(rows, key=repr) == [("picked", "alice"), ("picked", ("User", "alice"))]
    assert not any(isinstance(value, Entity) for _, value in rows)


@pytest.mark.parametrize(
    "rules",
    [
        'allow(u: User, "read", _r: Repo) if level(u, context.n);',
        # Through a rule's argument, and with the value bound first by '='.
        'allow(u: User, "read", _r: Repo) if at(u, context.n);\nat(u, n) if level(u, n);',
        'allow(u: User, "read", _r: Repo) if n = context.n and level(u, n);',
    ],
)
def test_a_fact_holding_a_number_is_not_found_by_a_boolean_nor_the_other_way(rules):
    numbers = "declare level(User, Integer);\n" + rules
    facts = [("level", ALICE, 1)]
    assert allowed(numbers, {"n": 1}, facts)
    assert not allowed(numbers, {"n": True}, facts)
    booleans = numbers.replace("Integer", "Boolean")
    facts = [("level", ALICE, True)]
    assert allowed(booleans, {"n": True}, facts)
    assert not allowed(booleans, {"n": 1}, facts)
    assert not allowed(booleans, {"n": 1.0}, facts)


# Under a 'not', a condition that cannot be decided must not count as false: Oso's Polar stops
# with an error there (and so refuses), and "not false" would let the request through. A field
# the request leaves out is the one exception (negation as failure, docs/policy-language.md).
@pytest.mark.parametrize(
    ("rule", "context", "facts"),
    [
        # A limit written as a negation, given a value of another kind.
        ('allow(_u: User, "read", _r: Repo) if not context.amount > 1000;', {"amount": "5000"}, ()),
        ('allow(_u: User, "read", _r: Repo) if not context.amount > 1000;', {"amount": True}, ()),
        ('allow(_u: User, "read", _r: Repo) if not context.tier < "b";', {"tier": 0}, ()),
        (
            'allow(_u: User, "read", _r: Repo) if not context.amount * 2 > 1000;',
            {"amount": "x"},
            (),
        ),
        # Arithmetic with no value: division by zero, mod 0, a result outside 64 bits.
        (
            'allow(_u: User, "read", r: Repo) if\n  used(r, u) and seats(r, s) and not u / s >= 1;',
            {},
            (("used", REPO, 3), ("seats", REPO, 0)),
        ),
        ('allow(_u: User, "read", _r: Repo) if not context.n mod 0 = 0;', {"n": 4}, ()),
        ('allow(_u: User, "read", _r: Repo) if not context.n + 1 > 0;', {"n": 2**63 - 1}, ()),
        # Nested: the negation inside does not turn the failure back into a success.
        (
            'allow(_u: User, "read", _r: Repo) if not (true and not context.n / 0 > 1);',
            {"n": 1},
            (),
        ),
        # forall is a negation too.
        (
            'allow(_u: User, "read", _r: Repo) if forall(x in context.xs, x < 10);',
            {"xs": [1, "99"]},
            (),
        ),
    ],
)
def test_a_negation_over_a_condition_that_cannot_be_decided_refuses(rule, context, facts):
    assert not allowed(rule, context, facts)


def test_a_negation_over_a_field_left_out_or_decided_still_holds():
    rule = 'allow(_u: User, "read", _r: Repo) if not context.amount > 1000;'
    assert allowed(rule, {})
    assert allowed(rule, {"amount": 10})
    assert allowed(rule, {"amount": 10.5})
    assert not allowed(rule, {"amount": 5000})
    div = 'allow(_u: User, "read", _r: Repo) if not context.n / 2 >= 1;'
    assert allowed(div, {"n": 1})
    assert allowed(div, {})


def answers(rules: str, context: dict, facts: tuple = ()) -> bool:
    """Whether alice may read the repo, asked every way the engine answers (authorize, decide and
    its explanation, actions, list, query of allow and of deny): each must say the same."""
    authz = Authorizer(BLOCKS + "declare seen(Repo);\n" + rules)
    for fact in (("seen", REPO), *facts):
        authz.facts.insert(fact)
    answer = authz.authorize(ALICE, "read", REPO, context)
    assert authz.decide(ALICE, "read", REPO, context).allowed == answer
    assert ("read" in authz.actions(ALICE, REPO, context)) == answer
    assert authz.list(ALICE, "read", "Repo", context) == (["r"] if answer else [])
    rows = authz.query("allow", ALICE, Variable("a"), REPO, context=context)
    assert (("allow", ALICE, "read", REPO) in rows) == answer
    if authz.defines("deny", 3) and authz.holds("allow", ALICE, "read", REPO, context=context):
        assert authz.holds("deny", ALICE, "read", REPO, context=context) == (not answer)
    return answer


# A deny rule is a guardrail: one whose body may hold but cannot be decided refuses, as a 'not'
# over such a condition does in an allow rule; taken as false, a string would bypass it.
GUARDED = 'allow(_u: User, "read", _r: Repo);\n'


@pytest.mark.parametrize(
    ("deny", "context", "facts"),
    [
        ("context.amount > 1000", {"amount": "5000"}, ()),
        ("context.amount > 1000", {"amount": True}, ()),
        ("context.amount >= 1000", {"amount": [5000]}, ()),
        ('context.tier < "b"', {"tier": 0}, ()),
        # Arithmetic with no value, in a comparison, bound to a variable, passed to a rule.
        ("context.amount * 2 > 1000", {"amount": "x"}, ()),
        ("used(r, u) and seats(r, s) and u / s >= 1", {}, (("used", REPO, 3), ("seats", REPO, 0))),
        ("x = context.n + 1 and x > 0", {"n": 2**63 - 1}, ()),
        ("big(context.n mod 0)", {"n": 4}, ()),
        # In a rule the deny rule calls, however deep.
        ("over_limit(context.amount)", {"amount": "5000"}, ()),
        ("checked(context.amount)", {"amount": "5000"}, ()),
        # A negation in a deny rule turns the other way: its undecided body is false.
        ("not context.amount <= 1000", {"amount": "5000"}, ()),
        ("not within(context.amount)", {"amount": "5000"}, ()),
        ("forall(x in context.xs, x < 10)", {"xs": ["1"]}, ()),
    ],
)
def test_a_deny_rule_that_cannot_be_decided_refuses(deny, context, facts):
    helpers = (
        "declare used(Repo, Integer);\ndeclare seats(Repo, Integer);\n"
        "big(n) if n > 10;\nover_limit(x) if x > 1000;\nchecked(x) if over_limit(x);\n"
        "within(x) if x <= 1000;\n"
    )
    rules = GUARDED + helpers + f'deny(_u: User, "read", r: Repo) if {deny};'
    assert not answers(rules, context, facts)


@pytest.mark.parametrize("nan", [float("nan"), -float("nan")])
def test_a_number_that_is_not_a_number_cannot_be_ordered_and_fails_closed(nan):
    """NaN (Python's ``float("nan")`` reads it from the text "nan", so an application that
    turns a request's field into a float may pass one in) is in no order with anything: every
    ordering of it is false, so a guardrail over it did not fire and a 'not' over it held."""
    for condition in ("context.amount > 1000", "context.amount >= 0", "1000 < context.amount"):
        assert not answers(
            GUARDED + f'deny(_u: User, "read", _r: Repo) if {condition};', {"amount": nan}
        )
        assert not answers(
            f'allow(_u: User, "read", _r: Repo) if not {condition};', {"amount": nan}
        )
        # Read where it allows, it is false, as before: no order holds.
        assert not answers(f'allow(_u: User, "read", _r: Repo) if {condition};', {"amount": nan})
    assert answers(
        GUARDED + 'deny(_u: User, "read", _r: Repo) if context.amount > 1000;', {"amount": 5.0}
    )


def test_a_deny_rule_that_could_not_have_held_or_lacks_its_field_does_not_refuse():
    """Undecided is not "true": a deny rule with another condition decided false, or reading a
    field the request leaves out (the rule does not apply), lets the allow stand."""
    rules = (
        GUARDED
        + 'deny(_u: User, "read", _r: Repo) if context.amount > 1000 and context.hold = true;'
    )
    assert answers(rules, {"amount": "5000", "hold": False})
    assert not answers(rules, {"amount": "5000", "hold": True})
    assert answers(rules, {"hold": True})
    assert answers(rules, {"amount": 50, "hold": True})
    assert not answers(rules, {"amount": 5000, "hold": True})


# A builtin given what it cannot read (a text that is no address or time, a value that is no
# string): in strict code it may hold, so the guardrail refuses; a readable value decides.
UNREADABLE = [
    ('cidr_contains("10.0.0.0/8", context.ip)', {"ip": "10.0.0.300"}, {"ip": "192.0.2.1"}),
    ('cidr_contains("10.0.0.0/8", context.ip)', {"ip": ["10.0.0.1"]}, {"ip": "::1"}),
    ('time_after(context.at, "2027-01-01T00:00:00Z")', {"at": "someday"}, {"at": 0}),
    ('time_before(context.at, "2020-01-01T00:00:00Z")', {"at": True}, {"at": "2026-01-01"}),
    (
        'in_time_window(context.at, "Sat-Sun", "00:00", "23:59", "UTC")',
        {"at": "12:00"},
        {"at": "2026-12-07T12:00:00Z"},
    ),
    ('contains(context.q, "password")', {"q": ["password"]}, {"q": "hello"}),
    ('starts_with(context.uri, "secret://")', {"uri": 7}, {"uri": "public://a"}),
    ('ends_with(context.to, "@evil.example")', {"to": {"a": 1}}, {"to": "a@acme.example"}),
    ('lower(context.to, "x@evil.example")', {"to": ["X@EVIL.EXAMPLE"]}, {"to": "a@acme.example"}),
]


@pytest.mark.parametrize(("condition", "unreadable", "readable"), UNREADABLE)
def test_a_deny_rule_whose_builtin_cannot_read_its_value_refuses(condition, unreadable, readable):
    rules = GUARDED + f'deny(_u: User, "read", _r: Repo) if {condition};'
    assert not answers(rules, unreadable)
    assert answers(rules, readable)
    assert answers(rules, {})  # the field left out: the rule does not apply


@pytest.mark.parametrize(("condition", "unreadable", "readable"), UNREADABLE)
def test_a_negated_builtin_that_cannot_read_its_value_refuses(condition, unreadable, readable):
    rules = f'allow(_u: User, "read", _r: Repo) if not {condition};'
    assert not answers(rules, unreadable)
    assert answers(rules, readable)


@pytest.mark.parametrize(
    ("called", "context"),
    [
        ("over_limit(x) if x > 1000;", {"amount": "5000"}),
        ("over_limit(x) if x > 1000;", {"amount": True}),
        ("over_limit(x) if x * 2 > 1000;", {"amount": "x"}),
        ("over_limit(x) if y = x + 1 and y > 1000;", {"amount": 2**63 - 1}),
        ("over_limit(x) if above(x, 1000);\nabove(x, y) if x > y;", {"amount": "5000"}),
        # Recursive: the tables of a group that cannot be decided are not kept half made.
        (
            "over_limit(x) if step(x, 0);\nstep(x, n) if n < 3 and x > 1000;\n"
            "step(x, n) if n < 3 and step(x, n + 1);",
            {"amount": "5000"},
        ),
    ],
)
def test_a_negation_over_a_rule_that_cannot_decide_refuses(called, context):
    rules = f'allow(_u: User, "read", _r: Repo) if not over_limit(context.amount);\n{called}'
    assert not answers(rules, context)
    assert answers(rules, {"amount": 10})
    assert answers(rules, {})  # negation as failure: a field left out is no value


def test_what_cannot_be_decided_under_two_negations_is_false_again():
    """Each 'not' turns the polarity: under two, an undecided comparison is false, so a body that
    could not have held without it (``flag`` false) does not refuse."""
    rules = (
        'allow(_u: User, "read", _r: Repo) if not (context.flag = true and not small(context.amount));\n'
        "small(x) if x < 1000;\n"
    )
    assert answers(rules, {"flag": False, "amount": "5000"})
    assert not answers(rules, {"flag": True, "amount": "5000"})
    assert answers(rules, {"flag": True, "amount": 5})


# An obligation whose holding restricts is a guardrail too (`bastion.decide.authorizer.STRICT`):
# one whose condition may hold but cannot be decided applies, as a deny rule refuses; taken as
# false, a string would shed the approval, the mask or the limit a number asks for.
OBLIGED = BLOCKS + 'resource McpServer {}\nallow(_u: User, "read", _r: Repo);\n'
DESK = Entity("McpServer", "desk")
# Each obligation's rule (its condition written in ``{}``) and how the contract's answer for
# alice reading the repo shows it applied.
OBLIGATIONS = {
    "requires_approval": (
        'requires_approval(_u: User, "read", _r: Repo) if {};',
        lambda d: d.obligations.requires_approval,
    ),
    "requires_review": (
        'requires_review(_u: User, "read", _r: Repo) if {};',
        lambda d: d.obligations.requires_review,
    ),
    "read_only": ("read_only(_u: User, _s: McpServer) if {};", lambda d: d.obligations.read_only),
    "mask": (
        'mask(_u: User, "read", _r: Repo, "ssn") if {};',
        lambda d: d.obligations.masks == ("ssn",),
    ),
    "rate_limit": (
        'rate_limit(_u: User, "read", _r: Repo, 5, 60) if {};',
        lambda d: d.obligations.rate_limits == (RateLimit(ALICE, 5, 60),),
    ),
    "requires_scope": (
        'requires_scope("read", _r: Repo, "repo:big") if {};',
        lambda d: not d.allowed and d.missing_scopes == ("repo:big",),
    ),
    "requires_recent_auth": (
        'requires_recent_auth(_u: User, "read", _r: Repo, 60) if {};',
        lambda d: d.obligations.max_auth_age == 60,
    ),
    "requires_signal": (
        'requires_signal(_u: User, "compliant", 300) if {};',
        lambda d: not d.allowed and d.stale_signals == ("compliant",),
    ),
    "alert": (
        'alert(_u: User, "big", "high") if {};',
        lambda d: d.obligations.alerts == ((ALICE, "big", "high"),),
    ),
    "label": ('label(_r: Repo, "secret") if {};', lambda d: d.obligations.labels == ("secret",)),
}
CONDITIONS = [
    "context.amount > 1000",
    "over_limit(context.amount)",  # in a rule it calls
    "not context.amount <= 1000",  # a 'not' turns it over: false under it, so the 'not' holds
]
HELPERS = "over_limit(x) if x > 1000;\n"


def obligations(rule: str, context: dict) -> ChainDecision:
    """The contract's answer for alice reading the repo on the desk server, with no scopes."""
    authz = Authorizer(OBLIGED + HELPERS + rule)
    return decide_chain(authz, [ALICE], "read", REPO, {**context, "server": "desk"}, [])


@pytest.mark.parametrize("amount", ["5000", True, [5000], 5000])
@pytest.mark.parametrize("condition", CONDITIONS)
@pytest.mark.parametrize("obligation", OBLIGATIONS)
def test_an_obligation_that_cannot_be_decided_applies(obligation, condition, amount):
    rule, applied = OBLIGATIONS[obligation]
    assert applied(obligations(rule.format(condition), {"amount": amount}))
    assert not applied(obligations(rule.format(condition), {"amount": 50}))


@pytest.mark.parametrize("obligation", OBLIGATIONS)
def test_an_obligation_that_could_not_have_held_or_lacks_its_field_does_not_apply(obligation):
    """Undecided is not "true": with another condition decided false, or the field left out,
    the obligation does not apply."""
    rule, applied = OBLIGATIONS[obligation]
    both = rule.format("context.amount > 1000 and context.hold = true")
    assert not applied(obligations(both, {"amount": "5000", "hold": False}))
    assert applied(obligations(both, {"amount": "5000", "hold": True}))
    assert not applied(obligations(both, {"hold": True}))


@pytest.mark.parametrize(
    "rule",
    [
        'approvals_required(_u: User, "read", _r: Repo, 3) if context.amount > 1000;',
        'approval_expires(_u: User, "read", _r: Repo, 60) if context.amount > 1000;',
        'self_approval_forbidden(_u: User, "read", _r: Repo) if context.amount > 1000;',
    ],
)
def test_the_approval_terms_that_restrict_apply_when_they_cannot_be_decided(rule):
    """How a held call may be answered, as `bastion.approvals.service` asks it."""
    authz = Authorizer(OBLIGED + rule)
    name = rule.split("(")[0]
    args = [ALICE, "read", REPO] + ([] if name == "self_approval_forbidden" else [Variable("n")])
    assert authz.query(name, *args, context={"amount": "5000"})
    assert not authz.query(name, *args, context={"amount": 50})


@pytest.mark.parametrize(
    ("rule", "question"),
    [
        # Whose holding widens: what cannot be decided does not hold, as in an allow rule.
        ('approver(_a: User, _u: User, "read", _r: Repo) if context.amount < 1000;',
         ("approver", BOB, ALICE, "read", REPO)),
        ('approval_window(_u: User, "read", _r: Repo, 60) if context.amount < 1000;',
         ("approval_window", ALICE, "read", REPO, Variable("n"))),
        ('approval_grant(_u: User, _a: User, "read", _r: Repo) if context.amount < 1000;',
         ("approval_grant", ALICE, BOB, "read", REPO)),
        ('signal(_u: User, "compliant", true, "mdm", 0) if context.amount < 1000;',
         ("signal", ALICE, "compliant", Variable("v"), Variable("s"), Variable("t"))),
        ('would(_u: User, "read", _r: Repo, "deny", "big") if context.amount > 1000;',
         ("would", ALICE, "read", REPO, Variable("e"), Variable("n"))),
    ],
)  # fmt: skip
def test_the_rules_whose_holding_widens_do_not_hold_when_they_cannot_be_decided(rule, question):
    authz = Authorizer(OBLIGED + rule)
    assert not authz.query(*question, context={"amount": "5000"})
    assert authz.query(*question, context={"amount": 50 if "<" in rule else 5000})


@pytest.mark.parametrize(
    ("rule", "predicate"),
    [
        ('rate_limit(_u: User, "read", _r: Repo, n, 60) if n = 1000 / context.per;', "rate_limit"),
        ('mask(_u: User, "read", _r: Repo, "ssn") if n = 2 / context.per and n > 1;', "mask"),
        ('requires_scope("read", _r: Repo, "big") if over_limit(1000 / context.per);',
         "requires_scope"),
    ],
)  # fmt: skip
def test_an_obligation_whose_answers_cannot_be_named_refuses(rule, predicate):
    """Arithmetic with no result that the rule binds or passes on, in an obligation asked with
    an argument open (which limit, which path): no answer can be named, so the request is
    refused, ``reason`` "undecided" naming the obligation; never allowed without it."""
    decision = obligations(rule, {"per": 0})
    assert not decision.allowed
    assert (decision.reason, decision.undecided) == ("undecided", predicate)
    assert obligations(rule, {"per": 1}).allowed


def test_an_alert_rule_whose_answers_cannot_be_named_raises_an_alert_and_decides_nothing():
    """Alerts never change the answer: an ``alert`` rule whose names cannot be worked out (the
    same arithmetic as above) raises one alert saying so, of the highest severity, for the
    principal it was asked of, and the request is decided as without it."""
    rule = 'alert(_u: User, name, "high") if name = "x" and 1 / context.per matches Integer;'
    decision = obligations(rule, {"per": 0})
    assert decision.allowed
    assert decision.obligations.alerts == ((ALICE, "alert_undecided", "critical"),)
    assert obligations(rule, {"per": 1}).obligations.alerts == ((ALICE, "x", "high"),)


def test_the_rule_that_holds_a_call_it_cannot_decide_is_shown_to_its_approvers():
    """The rules a held call names for the people who answer it (`Session.prove`) are read as
    the obligation is: the rule, its condition marked "cannot be decided"."""
    rule = 'requires_approval(_u: User, "read", _r: Repo) if context.amount > 1000;'
    authz = Authorizer(OBLIGED + rule)
    with authz.session({"amount": "5000"}) as s:
        proof = s.prove("requires_approval", ALICE, "read", REPO)
    assert proof.allowed and proof.rules() == [rule.removesuffix(";")]
    assert "cannot be decided" in str(proof)


# ``lower`` binding its output (``lower(context.cmd, c) and c = "rm"``, the way to ignore case)
# from a value that is no string: in strict code nothing can be bound and no answer named, so
# the guardrail holds, as arithmetic with no result that a rule binds does; a list ["RM"] or a
# number must not slip past a deny that a string "RM" would meet.
LOWERED = [
    'lower(context.cmd, c) and c = "rm"',
    'lower(context.cmd, c) and starts_with(c, "rm")',
    "dangerous(context.cmd)",  # in a rule the deny rule calls
]
NOT_TEXT = [["RM"], 7, True, {"cmd": "RM"}]


@pytest.mark.parametrize("cmd", NOT_TEXT)
@pytest.mark.parametrize("condition", LOWERED)
def test_a_deny_rule_lowering_a_value_that_is_no_string_refuses(condition, cmd):
    rules = GUARDED + 'dangerous(x) if lower(x, c) and c = "rm";\n'
    rules += f'deny(_u: User, "read", _r: Repo) if {condition};'
    assert not answers(rules, {"cmd": cmd})
    assert not answers(rules, {"cmd": "RM"})
    assert answers(rules, {"cmd": "ls"})
    assert answers(rules, {})  # the field left out: the rule does not apply


@pytest.mark.parametrize("cmd", NOT_TEXT)
def test_a_negation_over_lowering_a_value_that_is_no_string_refuses(cmd):
    rules = 'allow(_u: User, "read", _r: Repo) if not (lower(context.cmd, c) and c = "rm");'
    assert not answers(rules, {"cmd": cmd})
    assert answers(rules, {"cmd": "ls"})
    assert answers(rules, {})


@pytest.mark.parametrize("cmd", NOT_TEXT)
def test_an_allow_rule_lowering_a_value_that_is_no_string_does_not_allow(cmd):
    """Ordinary code is unchanged: nothing is bound, so the rule does not hold."""
    rules = 'allow(_u: User, "read", _r: Repo) if lower(context.cmd, c) and c = "ls";'
    assert not answers(rules, {"cmd": cmd})
    assert answers(rules, {"cmd": "LS"})


def test_an_obligation_lowering_a_value_that_is_no_string_applies_or_refuses():
    """An obligation asked with every argument given applies; one whose answer is the lowered
    value (which path to mask) cannot name it, and refuses with ``reason`` "undecided"."""
    approval = (
        'requires_approval(_u: User, "read", _r: Repo) if lower(context.cmd, c) and c = "rm";'
    )
    assert obligations(approval, {"cmd": ["RM"]}).obligations.requires_approval
    assert not obligations(approval, {"cmd": "ls"}).obligations.requires_approval
    mask = 'mask(_u: User, "read", _r: Repo, path) if lower(context.field, path);'
    refused = obligations(mask, {"field": ["SSN"]})
    assert (refused.allowed, refused.reason, refused.undecided) == (False, "undecided", "mask")
    assert obligations(mask, {"field": "SSN"}).obligations.masks == ("ssn",)
    assert obligations(mask, {}).obligations.masks == ()


def test_the_explanation_shows_a_lowering_it_cannot_decide_as_holding():
    rule = 'deny(_u: User, "read", _r: Repo) if lower(context.cmd, c) and c = "rm";'
    authz = Authorizer(BLOCKS + GUARDED + rule)
    decision = authz.decide(ALICE, "read", REPO, {"cmd": ["RM"]})
    assert not decision.allowed
    assert "cannot be decided" in str(decision.explanation)


# A required scope that is no text (a number, a list) cannot be asked of a token: dropped, the
# call would need no scope at all. As a mask path or a rate limit that cannot be used restricts
# the most, it refuses the request, ``reason`` "undecided" naming ``requires_scope``.
@pytest.mark.parametrize("scope", [7, ["repo:big"], True, {"s": 1}])
@pytest.mark.parametrize("granted", [[], ["repo:big"], None])
def test_a_required_scope_that_is_no_text_refuses(scope, granted):
    authz = Authorizer(OBLIGED + 'requires_scope("read", _r: Repo, s) if s = context.scope;')
    context = {"scope": scope, "server": "desk"}
    decision = decide_chain(authz, [ALICE], "read", REPO, context, granted)
    assert not decision.allowed
    assert (decision.reason, decision.undecided) == ("undecided", "requires_scope")
    assert not plainly_allowed(authz, [ALICE], "read", REPO, context, granted or [])
    text = {"scope": "repo:big", "server": "desk"}
    assert decide_chain(authz, [ALICE], "read", REPO, text, ["repo:big"]).allowed
    assert decide_chain(authz, [ALICE], "read", REPO, text, []).missing_scopes == ("repo:big",)
    assert decide_chain(authz, [ALICE], "read", REPO, {"server": "desk"}, []).allowed
