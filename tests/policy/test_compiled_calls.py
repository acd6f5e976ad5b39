"""What compiled policy code calls to decide: a predicate that only facts make true is read where
it is used (no call, no generator for a lookup by key), and a rule that only passes its arguments
on is the rule it calls. Each shortcut gives the same answers, and spends the same budget, as
the call it saves."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bastion import Authorizer, Entity
from bastion.policy.errors import EvaluationLimit
from bastion.policy.limits import PolicyLimits

GITCLUB = Path(__file__).resolve().parents[2] / "examples" / "gitclub.polar"
User, Org, Repo, Doc = (
    (lambda i: Entity("User", i)),
    (lambda i: Entity("Organization", i)),
    (lambda i: Entity("Repository", i)),
    (lambda i: Entity("Doc", i)),
)


def python_calls(fn, *args) -> int:
    """How many Python frames ``fn(*args)`` runs, itself included: calls, and each start or
    resumption of a generator (C functions are not counted)."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(profile)
    try:
        fn(*args)
    finally:
        sys.setprofile(None)
    return calls


def test_a_role_inherited_from_the_parent_organization_is_decided_in_eight_python_calls():
    # authorize; allow's dispatch on the action, then on the actor's and the resource's types;
    # "read" if "reader"; "reader" if "member" on "parent" (the parent read in place); "member"
    # on the organization; the deny rule. Were the parent read through a generator, allow a
    # call of its own, or authorize's set-up a call, it would take more (fourteen before).
    authz = Authorizer.from_files(GITCLUB)
    authz.facts.apply(
        [
            ("has_role", User("alice"), "member", Org("acme")),
            ("has_relation", Repo("anvil"), "parent", Org("acme")),
        ],
        [],
    )
    alice, anvil = User("alice"), Repo("anvil")
    assert authz.authorize(alice, "read", anvil)
    assert python_calls(authz.authorize, alice, "read", anvil) <= 8


LINKS = """
actor User {}
resource Doc {}
declare link(Doc, Doc);
declare blocked(Doc, Doc, Doc, Doc);
allow(_u: User, "read", d: Doc) if link(d, x) and link(x, y) and link(y, z) and blocked(d, x, y, z);
allow(_u: User, "read", d: Doc) if link(d, Doc{"goal"});
"""


@pytest.fixture(scope="module")
def links() -> list[tuple]:
    """Forty links out of each of forty documents, and one to the goal."""
    found = [("link", Doc(f"d{i}"), Doc(f"d{j}")) for i in range(40) for j in range(40)]
    return [*found, ("link", Doc("start"), Doc("d0")), ("link", Doc("near"), Doc("goal"))]


def test_facts_read_in_place_spend_a_step_each_as_their_function_would(links):
    # 40^3 combinations, never true: the search is bounded by the budget, not by its size.
    authz = Authorizer(LINKS, limits=PolicyLimits(evaluation_max_steps=10_000))
    authz.facts.apply(links, [])
    with pytest.raises(EvaluationLimit) as err:
        authz.authorize(User("u"), "read", Doc("d1"))
    assert err.value.limit == "evaluation_max_steps"


def test_facts_read_in_place_give_the_answers_of_their_function(links):
    authz = Authorizer(LINKS)
    authz.facts.apply(links, [])
    assert authz.authorize(User("u"), "read", Doc("near"))
    assert not authz.authorize(User("u"), "read", Doc("start"))
    assert not authz.authorize(User("u"), "read", Doc("goal"))
    assert not authz.authorize(User("u"), "read", Doc("nowhere"))


def test_a_rule_that_passes_its_arguments_in_another_order_is_not_taken_for_the_one_it_calls():
    authz = Authorizer(
        """
allow(actor, action, resource) if permitted(resource, action, actor);
permitted(resource, action, actor) if granted(actor, action, resource);
declare granted(String, String, String);
"""
    )
    authz.facts.apply([("granted", "alice", "read", "doc")], [])
    assert authz.authorize("alice", "read", "doc")
    assert not authz.authorize("doc", "read", "alice")
