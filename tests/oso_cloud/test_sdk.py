"""The official `oso-cloud` SDK, unchanged, against a real `bastion serve` over HTTP: every
method it has that does not need the application's database."""

from __future__ import annotations

import uuid

import pytest
from oso_cloud import Value, ValueOfType, typed_var

from tests.oso_cloud.conftest import admin


def ids() -> tuple[Value, Value, Value]:
    """A user, an org and a repo of this test only (the server is shared by the module)."""
    n = uuid.uuid4().hex[:8]
    return Value("User", f"u-{n}"), Value("Org", f"o-{n}"), Value("Repo", f"r-{n}")


def test_authorize_answers_from_the_facts_inserted(oso):
    alice, org, repo = ids()
    assert oso.authorize(alice, "read", repo) is False
    oso.insert(("has_role", alice, "member", org))
    oso.insert(("has_relation", repo, "parent", org))
    assert oso.authorize(alice, "read", repo) is True
    assert oso.authorize(alice, "push", repo) is False
    assert oso.authorize(alice, "manage", org) is False


def test_list_and_actions(oso):
    alice, org, repo = ids()
    other = Value("Repo", repo.id + "-2")
    oso.insert(("has_role", alice, "maintainer", repo))
    oso.insert(("has_role", alice, "reader", other))
    assert sorted(oso.list(alice, "read", "Repo")) == sorted([repo.id, other.id])
    assert oso.list(alice, "push", "Repo") == [repo.id]
    assert oso.actions(alice, repo) == ["push", "read"]
    assert oso.actions(alice, other) == ["read"]
    assert oso.actions(alice, org) == []


def test_list_pages_through_every_result(oso):
    alice, _, repo = ids()
    with oso.batch() as tx:
        for i in range(5):
            tx.insert(("has_role", alice, "reader", Value("Repo", f"{repo.id}-{i}")))
    first = oso.list_paginated(alice, "read", "Repo", page_size=2)
    assert len(first.results) == 2 and first.next_page_token is not None
    seen = list(first.results)
    token = first.next_page_token
    while token is not None:
        page = oso.list_paginated(alice, "read", "Repo", page_size=2, page_token=token)
        seen += page.results
        token = page.next_page_token
    assert seen == sorted(f"{repo.id}-{i}" for i in range(5))
    assert oso.list(alice, "read", "Repo") == seen


def test_get_with_values_types_and_wildcards(oso):
    alice, org, repo = ids()
    oso.insert(("has_role", alice, "admin", org))
    oso.insert(("has_role", alice, "reader", repo))
    oso.insert(("has_label", repo, "stars", 42))
    both = oso.get(("has_role", alice, None, None))
    assert sorted(both, key=repr) == sorted(
        [
            ("has_role", alice, Value("String", "admin"), org),
            ("has_role", alice, Value("String", "reader"), repo),
        ],
        key=repr,
    )
    assert oso.get(("has_role", alice, None, ValueOfType("Org"))) == [
        ("has_role", alice, Value("String", "admin"), org)
    ]
    assert oso.get(("has_role", alice, "reader", None)) == [
        ("has_role", alice, Value("String", "reader"), repo)
    ]
    assert oso.get(("has_label", repo, None, None)) == [
        ("has_label", repo, Value("String", "stars"), Value("Integer", "42"))
    ]
    # Trailing arguments left out are anything.
    assert oso.get(("has_label", repo)) == oso.get(("has_label", repo, None, None))
    assert oso.get(("has_role", Value("User", "nobody-at-all"), None, None)) == []


def test_delete_with_wildcards_and_types(oso):
    alice, org, repo = ids()
    oso.insert(("has_role", alice, "admin", org))
    oso.insert(("has_role", alice, "reader", repo))
    oso.insert(("has_role", alice, "maintainer", repo))
    # Any role on any Repo: the Org role stays.
    oso.delete(("has_role", alice, None, ValueOfType("Repo")))
    assert oso.get(("has_role", alice, None, None)) == [
        ("has_role", alice, Value("String", "admin"), org)
    ]
    oso.delete(("has_role", alice, "admin", org))
    assert oso.get(("has_role", alice, None, None)) == []
    # Deleting what is not there is no error.
    oso.delete(("has_role", alice, "admin", org))


def test_batch_applies_its_changes_in_order_as_one(oso):
    alice, org, repo = ids()
    oso.insert(("has_role", alice, "admin", org))
    with oso.batch() as tx:
        tx.delete(("has_role", alice, None, None))
        tx.insert(("has_role", alice, "reader", repo))
        tx.insert(("has_role", alice, "maintainer", repo))
        # A delete after an insert takes it back.
        tx.delete(("has_role", alice, "maintainer", repo))
        tx.insert(("is_public", repo))
    assert oso.get(("has_role", alice, None, None)) == [
        ("has_role", alice, Value("String", "reader"), repo)
    ]
    assert oso.get(("is_public", repo)) == [("is_public", repo)]
    oso.delete(("is_public", repo))  # public repos would show in other tests' lists


def test_a_batch_with_one_bad_fact_changes_nothing(oso):
    from oso_cloud import OsoException

    alice, org, repo = ids()
    with pytest.raises(OsoException) as e, oso.batch() as tx:
        tx.insert(("has_role", alice, "reader", repo))
        tx.insert(("has_role", alice, "member"))  # no has_role/2 in the policy
    assert e.value.status_code == 422
    assert "has_role/2" in str(e.value)
    assert oso.get(("has_role", alice, None, None)) == []


def test_context_facts_count_for_that_question_only(oso):
    bob, org, repo = ids()
    oso.insert(("has_relation", repo, "parent", org))
    member = ("has_role", bob, "member", org)
    assert oso.authorize(bob, "read", repo) is False
    assert oso.authorize(bob, "read", repo, [member]) is True
    # (Public repos of other tests are listed too: only this one depends on bob.)
    assert repo.id in oso.list(bob, "read", "Repo", [member])
    assert oso.actions(bob, repo, [member]) == ["read"]
    query = oso.build_query(("allow", bob, "read", repo)).with_context_facts([member])
    assert query.evaluate() is True
    # Never stored, and never seen by the next question.
    assert oso.get(("has_role", bob, None, None)) == []
    assert oso.authorize(bob, "read", repo) is False
    assert repo.id not in oso.list(bob, "read", "Repo")


def test_a_context_fact_already_stored_stays_stored(oso):
    carol, org, repo = ids()
    fact = ("has_role", carol, "reader", repo)
    oso.insert(fact)
    assert oso.authorize(carol, "read", repo, [fact]) is True
    assert oso.get(fact) == [("has_role", carol, Value("String", "reader"), repo)]
    assert oso.authorize(carol, "read", repo) is True


def test_context_facts_are_checked_like_stored_ones(oso):
    from oso_cloud import OsoException

    dan, org, repo = ids()
    with pytest.raises(OsoException) as e:
        oso.authorize(dan, "read", repo, [("has_role", dan, "member")])
    assert e.value.status_code == 422
    assert "has_role/2" in str(e.value)


def test_public_repos_by_a_fact_of_one_argument(oso):
    eve, _, repo = ids()
    assert oso.authorize(eve, "read", repo) is False
    oso.insert(("is_public", repo))
    assert oso.authorize(eve, "read", repo) is True
    assert oso.authorize(eve, "push", repo) is False
    oso.delete(("is_public", ValueOfType("Repo")))
    assert oso.authorize(eve, "read", repo) is False


def test_query_builder_evaluates_every_shape(oso):
    alice, org, repo = ids()
    other = Value("Repo", repo.id + "-x")
    oso.insert(("has_role", alice, "member", org))
    oso.insert(("has_relation", repo, "parent", org))
    oso.insert(("has_role", alice, "maintainer", other))
    r = typed_var("Repo")
    action = typed_var("String")
    assert sorted(oso.build_query(("allow", alice, "read", r)).evaluate(r)) == sorted(
        [repo.id, other.id]
    )
    assert oso.build_query(("allow", alice, "push", other)).evaluate() is True
    assert oso.build_query(("allow", alice, "push", repo)).evaluate() is False
    assert oso.build_query(("allow", alice, action, r)).evaluate({r: action}) == {
        repo.id: ["read"],
        other.id: ["push", "read"],
    }
    pairs = oso.build_query(("allow", alice, action, r)).evaluate((action, r))
    assert sorted(pairs) == sorted([("read", repo.id), ("push", other.id), ("read", other.id)])
    # and_: the repos alice may read whose parent is the org.
    in_org = (
        oso.build_query(("allow", alice, "read", r))
        .and_(("has_relation", r, "parent", org))
        .evaluate(r)
    )
    assert in_org == [repo.id]
    # in_: constrained to a set of ids.
    only = oso.build_query(("allow", alice, action, r)).in_(r, [other.id, "nope"]).evaluate(action)
    assert sorted(only) == ["push", "read"]
    # A fact predicate can be queried as well.
    u = typed_var("User")
    assert oso.build_query(("has_role", u, "member", org)).evaluate(u) == [alice.id]


def test_a_query_of_allow_answers_what_authorize_answers_deny_included(oso):
    """``build_query(("allow", ...)).evaluate()`` is the SDK's other way to ask ``authorize``
    (and to list actors, actions and resources at once): it answered allow where a ``deny``
    rule made ``authorize``, ``list`` and ``actions`` refuse."""
    alice, _, repo = ids()
    oso.insert(("has_role", alice, "maintainer", repo))
    r, action, u = typed_var("Repo"), typed_var("String"), typed_var("User")
    assert oso.build_query(("allow", alice, "push", repo)).evaluate() is True
    oso.insert(("is_archived", repo))
    assert oso.authorize(alice, "push", repo) is False
    assert oso.actions(alice, repo) == ["read"]
    assert oso.build_query(("allow", alice, "push", repo)).evaluate() is False
    assert oso.build_query(("allow", alice, action, repo)).evaluate(action) == ["read"]
    assert oso.build_query(("allow", alice, "push", r)).evaluate(r) == []
    assert oso.build_query(("allow", u, "push", repo)).evaluate(u) == []
    assert oso.build_query(("allow", alice, action, r)).evaluate({r: action}) == {repo.id: ["read"]}
    assert oso.build_query(("allow", u, "read", repo)).evaluate(u) == [alice.id]


def test_a_query_of_allow_answers_nothing_for_a_suspended_actor_and_leaves_it_out(bastion, oso):
    """``build_query(("allow", ...))`` is how the SDK lists what an actor may do: the kill switch
    holds there as in ``authorize`` and ``list``."""
    alice, org, repo = ids()
    bob = Value("User", alice.id + "-bob")
    oso.insert(("has_role", alice, "member", org))
    oso.insert(("has_role", bob, "member", org))
    oso.insert(("has_relation", repo, "parent", org))
    r, u = typed_var("Repo"), typed_var("User")

    def answers() -> tuple:
        return (
            oso.build_query(("allow", alice, "read", r)).evaluate(r),
            oso.build_query(("allow", alice, "read", repo)).evaluate(),
            sorted(oso.build_query(("allow", u, "read", repo)).evaluate(u)),
            oso.build_query(("allow", u, "read", repo)).in_(u, [alice.id]).evaluate(u),
        )

    before = answers()
    assert before == ([repo.id], True, sorted([alice.id, bob.id]), [alice.id])
    with admin(bastion) as http:
        made = http.post("/v1/suspensions", json={"kind": "user", "id": alice.id})
        assert made.status_code == 201, made.text
        try:
            # The actor given: no answer; left open: everyone but the suspended actor.
            assert answers() == ([], False, [bob.id], [])
        finally:
            lifted = http.delete(f"/v1/suspensions/user/{alice.id}")
            assert lifted.status_code in (200, 204), lifted.text
    assert answers() == before


def test_context_facts_never_lift_the_kill_switch(bastion, oso):
    """A context fact holds for its question as a stored one would, but the kill switch is read
    from the stored suspensions before the policy is asked, and a context fact only adds: the
    role it gives, or a suspension of its own, changes nothing for a suspended actor."""
    erin, org, repo = ids()
    oso.insert(("has_relation", repo, "parent", org))
    member = ("has_role", erin, "member", org)
    assert oso.authorize(erin, "read", repo, [member]) is True
    with admin(bastion) as http:
        made = http.post("/v1/suspensions", json={"kind": "user", "id": erin.id})
        assert made.status_code == 201, made.text
        try:
            assert oso.authorize(erin, "read", repo, [member]) is False
            assert oso.list(erin, "read", "Repo", [member]) == []
            assert oso.actions(erin, repo, [member]) == []
            query = oso.build_query(("allow", erin, "read", repo)).with_context_facts([member])
            assert query.evaluate() is False
            body = {
                "actor_type": "User",
                "actor_id": erin.id,
                "action": "read",
                "resource_type": "Repo",
                "resource_id": repo.id,
                "context_facts": [
                    {
                        "predicate": "has_role",
                        "args": [
                            {"type": "User", "id": erin.id},
                            {"type": "String", "id": "member"},
                            {"type": "Org", "id": org.id},
                        ],
                    }
                ],
            }
            answer = http.post("/api/authorize", json=body)
            assert answer.json() == {"allowed": False}
            assert answer.headers["bastion-refusal"] == "suspended"
        finally:
            lifted = http.delete(f"/v1/suspensions/user/{erin.id}")
            assert lifted.status_code in (200, 204), lifted.text
    assert oso.authorize(erin, "read", repo, [member]) is True


def test_in_with_tens_of_thousands_of_ids_keeps_exactly_those_the_rules_allow(oso):
    """Each row of the join is checked against the ids by hash: a list searched once per row
    held the event loop for seconds (60,000 ids against 2,000 repos: 9 s)."""
    alice, org, _ = ids()
    repos = [Value("Repo", f"{org.id}-{i}") for i in range(2000)]
    with oso.batch() as tx:
        tx.insert(("has_role", alice, "member", org))
        for repo in repos:
            tx.insert(("has_relation", repo, "parent", org))
    r = typed_var("Repo")
    wanted = [f"nope-{i}" for i in range(60_000)] + [repo.id for repo in repos[::7]]
    found = oso.build_query(("allow", alice, "read", r)).in_(r, wanted).evaluate(r)
    assert sorted(found) == sorted(repo.id for repo in repos[::7])


def test_policy_metadata_lists_each_resource_block(oso):
    meta = oso.get_policy_metadata()
    repo = meta.resources["Repo"]
    assert repo.roles == ["maintainer", "reader"]
    assert repo.permissions == ["push", "read"]
    assert repo.relations == {"parent": "Org"}
    assert meta.resources["Org"].relations == {}


def test_a_write_is_seen_by_the_next_read_through_oso_offset(bastion):
    # A fresh client: its first write gives it the OsoOffset header it sends from then on.
    client = bastion.oso("oso:read", "oso:write")
    alice, _, repo = ids()
    client.insert(("has_role", alice, "reader", repo))
    assert "OsoOffset" in client.api.session.headers
    assert int(client.api.session.headers["OsoOffset"]) > 0
    assert client.authorize(alice, "read", repo) is True


@pytest.mark.parametrize(
    "call",
    [
        lambda oso, u, r, v: oso.authorize_local(u, "read", r),
        lambda oso, u, r, v: oso.list_local(u, "read", "Repo", "repos.id"),
        lambda oso, u, r, v: oso.actions_local(u, r),
        lambda oso, u, r, v: oso.build_query(("allow", u, "read", v)).evaluate_local_select(
            {"id": v}
        ),
        lambda oso, u, r, v: oso.build_query(("allow", u, "read", v)).evaluate_local_filter(
            "repos.id", v
        ),
    ],
    ids=["authorize_local", "list_local", "actions_local", "select", "filter"],
)
def test_local_authorization_is_refused_with_a_message(oso, call):
    """Each of the SDK's local-authorization calls gets SQL for the application's database,
    which bastion does not see: an error that says so, never SQL that answers something."""
    from oso_cloud import OsoException

    alice, _, repo = ids()
    oso.insert(("has_role", alice, "reader", repo))
    with pytest.raises(OsoException) as e:
        call(oso, alice, repo, typed_var("Repo"))
    assert e.value.status_code == 404
    assert "local authorization" in str(e.value)
    assert "is not served by bastion" in str(e.value)


def test_a_parity_handle_is_an_error_not_an_answer(oso):
    """Oso Migrate's parity handles need a request id on the answer and ``/api/expect``, which
    bastion does not serve: ``authorize`` with one raises instead of answering, whether the
    expectation is given before or after."""
    from oso_cloud import OsoException, ParityHandle

    alice, _, repo = ids()
    oso.insert(("has_role", alice, "reader", repo))
    before = ParityHandle()
    before.expect(True)
    for handle in (ParityHandle(), before):
        with pytest.raises(OsoException) as e:
            oso.authorize(alice, "read", repo, parity_handle=handle)
        assert "Parity Handle" in str(e.value)
    assert oso.authorize(alice, "read", repo) is True


def test_a_suspension_the_policy_does_not_use_can_still_be_deleted(bastion):
    """The refusal of a delete the policy has no use for spares facts that are stored: the kill
    switch's ``suspended`` facts are kept whatever the policy says, and a key with
    ``suspensions`` may lift one by deleting it."""
    alice, _, repo = ids()
    oso = bastion.oso("oso:read", "oso:write", "suspensions")
    oso.insert(("has_role", alice, "reader", repo))
    with admin(bastion) as http:
        made = http.post("/v1/suspensions", json={"kind": "user", "id": alice.id})
        assert made.status_code == 201, made.text
    assert oso.authorize(alice, "read", repo) is False
    oso.delete(("suspended", alice))
    assert oso.authorize(alice, "read", repo) is True


def test_a_delete_of_no_fact_the_policy_uses_is_refused_not_answered_success(oso):
    """``get`` reads arguments left off the end as anything, but a delete sends each argument:
    ``delete(("has_role", alice))`` named ``has_role/1``, matched nothing and answered success,
    and the role the application meant to take back stayed (a misspelt predicate alike). A
    delete of a predicate and arity the policy has no use for that matches no stored fact is
    refused, and nothing of its batch is applied."""
    from oso_cloud import OsoException

    alice, org, _ = ids()
    member = ("has_role", alice, Value("String", "member"), org)
    oso.insert(member)
    for pattern in (
        ("has_role", alice),
        ("has_rol", alice, None, None),
        ("has_role", alice, None, None, None),
    ):
        with pytest.raises(OsoException) as e:
            oso.delete(pattern)
        assert e.value.status_code == 422, pattern
        assert f"no use for {pattern[0]}/{len(pattern) - 1} facts" in str(e.value)
        assert "has_role/3" in str(e.value)  # what it does use
    with pytest.raises(OsoException) as e, oso.batch() as tx:
        tx.delete(("has_role", alice, None, None))
        tx.insert(("is_public", Value("Repo", org.id)))
        tx.delete(("has_role", alice))
    assert e.value.status_code == 422
    assert "[2].deletes[0]" in str(e.value)
    assert oso.get(("has_role", alice)) == [member]
    assert oso.get(("is_public", Value("Repo", org.id))) == []
    # A misspelt entity type, as a value or as ValueOfType: no fact of it can be stored.
    for pattern in (
        ("has_role", Value("Usr", alice.id), None, None),
        ("has_role", alice, None, ValueOfType("Organisation")),
    ):
        with pytest.raises(OsoException) as e:
            oso.delete(pattern)
        assert e.value.status_code == 422, pattern
        assert "the policy declares no entity type" in str(e.value)
        assert "declared types: Agent, Org, Repo, Tool, User" in str(e.value)
    assert oso.get(("has_role", alice)) == [member]
    oso.delete(("has_role", alice, None, None))
    assert oso.get(("has_role", alice)) == []
    # Nothing left to delete of a fact the policy uses: no error, as in Oso Cloud.
    oso.delete(("has_role", alice, None, None))


def test_get_of_no_fact_the_policy_uses_is_refused_not_answered_empty(oso):
    """A misspelt predicate (or more arguments than any fact of it has) answered ``[]``, which an
    application reads as "no such fact": ``if not oso.get(("is_banend", user))`` let everyone
    in."""
    from oso_cloud import OsoException

    alice, org, _ = ids()
    oso.insert(("has_role", alice, "member", org))
    for pattern in (("has_rol", alice), ("has_role", alice, "member", org, Value("Org", "x"))):
        with pytest.raises(OsoException) as e:
            oso.get(pattern)
        assert e.value.status_code == 422, pattern
        assert f"no use for {pattern[0]} facts of {len(pattern) - 1} or more" in str(e.value)
    assert len(oso.get(("has_role", alice, "member", org))) == 1
