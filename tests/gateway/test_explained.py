"""The rules behind a decision are remembered per generation of the facts, and never outlive it.

`Explained` spares the record writer an explanation per call: within one generation of the facts
and policy, a question asked again with a context that agrees on every path the explanation read
gets the remembered rules. These tests try to make it answer with rules that no longer hold.
"""

from __future__ import annotations

from datetime import UTC, datetime

from bastion.decide import Authorizer
from bastion.decide.contract import decide_chain
from bastion.facts.model import Entity
from bastion.gateway.enforce import Caller, Enforcer, Explained
from bastion.policy.limits import PolicyLimits
from tests.waits import before_expiry, past

POLICY = """
actor User {}
resource Tool { roles = ["user", "admin"]; }
allow(user: User, "call", tool: Tool) if has_role(user, "admin", tool);
allow(user: User, "call", tool: Tool) if
    has_role(user, "user", tool) and context.annotations.readOnlyHint = true;
"""

SAM, SEARCH = Entity("User", "sam"), Entity("Tool", "desk/search")
QUESTION = (SAM, "call", SEARCH)
ADMIN_RULE = 'allow(user: User, "call", tool: Tool) if has_role(user, "admin", tool)'


def context(read_only: object = True, query: str = "a") -> dict:
    return {
        "time": datetime.now(UTC),
        "arguments": {"query": query},
        "annotations": {"readOnlyHint": read_only},
    }


def generation(authz: Authorizer, ctx: dict) -> int:
    return decide_chain(authz, [SAM], "call", SEARCH, ctx).generation


def setup() -> tuple[Authorizer, Explained]:
    authz = Authorizer(POLICY)
    authz.facts.insert(("has_role", SAM, "user", SEARCH))
    return authz, Explained()


def test_remembered_for_a_context_that_agrees_on_what_was_read() -> None:
    authz, explained = setup()
    first = context(query="a")
    rules = explained.explain(authz, QUESTION, first)
    assert any("readOnlyHint" in rule for rule in rules)
    # Other arguments and another time: the explanation never read them.
    again = context(query="something else")
    assert explained.get(generation(authz, again), QUESTION, again) == rules


def test_a_context_that_differs_on_a_read_path_is_explained_again() -> None:
    authz, explained = setup()
    explained.explain(authz, QUESTION, context(read_only=True))
    for other in (context(read_only=False), context(read_only=1), context(read_only=None)):
        assert explained.get(generation(authz, other), QUESTION, other) is None
    missing = {"time": datetime.now(UTC)}
    assert explained.get(generation(authz, missing), QUESTION, missing) is None


def test_another_question_is_not_answered_from_memory() -> None:
    authz, explained = setup()
    ctx = context()
    explained.explain(authz, QUESTION, ctx)
    other_tool = (SAM, "call", Entity("Tool", "desk/delete"))
    other_user = (Entity("User", "avery"), "call", SEARCH)
    for question in (other_tool, other_user, (SAM, "read", SEARCH)):
        assert explained.get(generation(authz, ctx), question, ctx) is None


def test_a_fact_change_forgets_and_the_new_rules_are_the_ones_that_decided() -> None:
    authz, explained = setup()
    ctx = context()
    before = explained.explain(authz, QUESTION, ctx)
    old_generation = generation(authz, ctx)
    authz.facts.insert(("has_role", SAM, "admin", SEARCH))
    new_generation = generation(authz, ctx)
    assert new_generation != old_generation
    assert explained.get(new_generation, QUESTION, ctx) is None
    after = explained.explain(authz, QUESTION, ctx)
    assert ADMIN_RULE in after and after != before
    assert explained.get(new_generation, QUESTION, ctx) == after
    # An explanation of the older facts never replaces what the newer ones say.
    assert explained.get(old_generation, QUESTION, ctx) is None


def test_a_fact_that_expires_forgets() -> None:
    def explained_before_expiry(at: float):
        authz, explained = setup()
        authz.facts.insert(("has_role", SAM, "admin", SEARCH), expires_at=at)
        ctx = context()
        assert ADMIN_RULE in explained.explain(authz, QUESTION, ctx)
        return authz, explained, ctx, generation(authz, ctx)

    (authz, explained, ctx, remembered), at = before_expiry(explained_before_expiry, 0.05)
    past(at)
    assert generation(authz, ctx) != remembered  # the expiry is a change of the facts
    assert explained.get(generation(authz, ctx), QUESTION, ctx) is None
    assert ADMIN_RULE not in explained.explain(authz, QUESTION, ctx)


def test_a_new_policy_forgets() -> None:
    authz, explained = setup()
    ctx = context()
    explained.explain(authz, QUESTION, ctx)
    remembered = generation(authz, ctx)
    authz.load_policy(POLICY.replace("readOnlyHint = true", "readOnlyHint = true and true = true"))
    assert generation(authz, ctx) != remembered
    assert explained.get(generation(authz, ctx), QUESTION, ctx) is None


def test_another_authorizer_never_gets_rules_remembered_for_the_first() -> None:
    # A replica that resyncs builds a new Authorizer; its facts' generations must not collide
    # with the old one's, whatever the number of changes on either side.
    authz, explained = setup()
    ctx = context()
    explained.explain(authz, QUESTION, ctx)
    remembered = generation(authz, ctx)
    for changes in range(1, 6):
        other = Authorizer(POLICY)
        for i in range(changes):
            other.facts.insert(("has_role", Entity("User", f"u{i}"), "admin", SEARCH))
        assert generation(other, ctx) != remembered
        assert explained.get(generation(other, ctx), QUESTION, ctx) is None


# Each listed tool's check looks for a pair of the groups the context names that contradict
# each other, in about 0.6 of the default evaluation budget (1,000,000 steps) for 800 groups,
# finds none, and so allows it.
PAIRS = """
actor User {}
actor Agent {}
resource Tool { permissions = ["list"]; }
clash() if g in context.groups and h in context.groups and g > h and h > g;
allow(_actor, "list", _tool: Tool) if not clash();
"""


def test_a_list_page_spends_one_evaluation_budget_not_one_per_item():
    """A page of a thousand tools, each checked with a budget of its own, would hold the event
    loop for a thousand budgets: the page is bounded as one decision is, and what is left once
    its budget is spent is not shown (fail closed)."""
    # On a time bound no machine reaches (the tool alone takes about 0.2 s, past the default
    # 100 ms): this is the step budget's test.
    limits = PolicyLimits(evaluation_max_milliseconds=60_000)
    enforcer = Enforcer(lambda: Authorizer(PAIRS, limits=limits), None)
    caller = Caller("sam", "agent", frozenset(), "127.0.0.1", "2026-07-28")
    tools = [Entity("Tool", f"lab/t{i}") for i in range(5)]
    groups = {"groups": [f"g{i}" for i in range(800)]}
    # One tool alone is shown (its check fits in a budget); the page spends the budget on the
    # first tool (once for the user, once more for the agent: past it), and hides the rest.
    assert enforcer.visible(caller, tools[:1], {"groups": groups["groups"][:400]}) == [True]
    assert enforcer.visible(caller, tools, groups) == [False] * 5
    assert enforcer.visible(caller, tools, {"groups": []}) == [True] * 5
