"""Bad input never crashes the engine: it gets a PolicyError or FactError, and changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion import Authorizer, Entity, FactError, PolicyError

GITCLUB = (Path(__file__).resolve().parents[2] / "examples" / "gitclub.polar").read_text()
DECIDER = Authorizer(GITCLUB)  # shared by the tests that leave its facts as they found them
DECIDER.facts.insert(("is_public", Entity("Repository", "r")))
TOKENS = ["actor", "resource", "User", "Repo", "{", "}", "(", ")", "[", "]", ";", ",", ":", ".", "=", "==",
          "if", "and", "or", "not", "in", "on", '"read"', '"x"', "roles", "permissions", "relations", "x", "_",
          "allow", "deny", "context", "1", "-2", "true", "test", "setup", "assert", "declare", "matches", "#c\n"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=40).map(" ".join) | st.text(max_size=80))
def test_any_text_either_loads_or_is_refused_with_a_policy_error(text):
    try:
        Authorizer(text)
    except PolicyError as err:
        assert err.diagnostics and all(d.location.line >= 1 for d in err.diagnostics)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_any_fact_text_is_refused_cleanly_or_accepted(text):
    authz = Authorizer(GITCLUB)  # compiled once per example; small enough
    try:
        authz.facts.insert(text)
    except (FactError, PolicyError):
        assert len(authz.facts) == 0


values = st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=5), st.lists(st.integers(), max_size=2),
                   st.builds(Entity, st.sampled_from(["User", "Repository", "Nope", ""]), st.text(max_size=3)))  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.tuples(
        st.sampled_from(["has_role", "has_relation", "is_public", "zzz", ""]),
        values,
        values,
        values,
    )
)
def test_malformed_fact_tuples_are_refused_and_change_nothing(fact):
    before = sorted(DECIDER.facts, key=repr)
    try:
        added = DECIDER.facts.insert(fact)
    except FactError:
        assert sorted(DECIDER.facts, key=repr) == before
    else:
        if added:
            DECIDER.facts.delete(fact)


@settings(max_examples=200, deadline=None)
@given(values, values, values)
def test_decisions_on_any_arguments_deny_or_refuse_clearly(actor, action, resource):
    try:
        allowed = DECIDER.authorize(actor, action, resource)
    except FactError as err:
        assert "must be an Entity or a string, integer or boolean" in str(err)
        return
    if allowed:
        assert action == "read" and resource == Entity("Repository", "r")


def test_list_and_actions_refuse_unusable_arguments_clearly():
    import pytest

    with pytest.raises(FactError, match="actor must be an Entity"):
        DECIDER.list(["alice"], "read", "Repository")
    with pytest.raises(FactError, match="resource must be an Entity"):
        DECIDER.actions(Entity("User", "a"), {"id": 1})


@pytest.mark.parametrize(
    "literal",
    [
        "9" * 5000,  # past what Python reads as an integer (it was a ValueError, a 500)
        "9" * 30,  # past 64 bits: no stored fact or request number can equal it
        str(2**63),
        "-" + str(2**63 + 1),
        "9" * 400 + ".5",  # not finite as a float (it was an `inf` the compiled code lacked)
    ],
)
def test_a_number_written_outside_64_bits_or_not_finite_is_refused_where_it_is(literal):
    text = f'actor User {{}}\nresource Repo {{}}\nallow(_u: User, "read", _r: Repo) if\n  context.n < {literal};'
    with pytest.raises(PolicyError) as refused:
        Authorizer(text)
    (diagnostic,) = refused.value.diagnostics
    assert (diagnostic.location.line, diagnostic.location.column) == (4, 15)
    assert "64-bit" in diagnostic.message or "finite" in diagnostic.message


def test_numbers_at_the_edges_of_64_bits_load_and_compare():
    text = f"""actor User {{}}\nresource Repo {{}}
allow(_u: User, "read", _r: Repo) if context.n < {2**63 - 1} and context.n > -{2**63};"""
    assert Authorizer(text).authorize(Entity("User", "a"), "read", Entity("Repo", "r"), {"n": 5})
