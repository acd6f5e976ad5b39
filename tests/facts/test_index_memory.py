"""What the in-memory fact index holds is what its facts need: an entity a fact brought in is let
go of once no fact, index or compiled policy refers to it any more. Otherwise every entity ever
named (a deleted document's, an expired grant's, a request's context fact's) stayed for the life
of the process: a busy application made memory grow without end."""

from __future__ import annotations

from bastion import Authorizer, Entity
from tests.waits import before_expiry, past

POLICY = """
actor User {}
resource Repo {
  roles = ["reader"];
  permissions = ["read"];
  "read" if "reader";
}
allow(actor, action, resource) if has_permission(actor, action, resource);
allow(actor, "read", resource: Repo) if actor = User{"root"} and resource = Repo{"pinned"};
"""


def authorizer() -> Authorizer:
    authz = Authorizer()
    authz.load_policy(POLICY)
    authz.facts.insert(("has_role", Entity("User", "alice"), "reader", Entity("Repo", "kept")))
    return authz


def held(authz: Authorizer) -> int:
    """Entities the index keeps shared copies of."""
    return len(authz._index._interned)


def test_entities_of_deleted_facts_are_let_go_of():
    authz = authorizer()
    before = held(authz)
    for n in range(500):
        fact = ("has_role", Entity("User", f"u{n}"), "reader", Entity("Repo", f"r{n}"))
        authz.facts.insert(fact)
        assert authz.authorize(Entity("User", f"u{n}"), "read", Entity("Repo", f"r{n}"))
        authz.facts.delete(fact)
    with authz.facts.batch() as batch:
        for n in range(500):
            batch.insert(("has_role", Entity("User", f"v{n}"), "reader", Entity("Repo", "w")))
    authz.facts.delete(("has_role", None, "reader", Entity("Repo", "w")))  # a wildcard delete
    assert held(authz) == before
    # What facts still name is still shared, and still decided on.
    assert authz.authorize(Entity("User", "alice"), "read", Entity("Repo", "kept"))


def test_entities_of_expired_facts_are_let_go_of():
    def arrange(at: float) -> tuple[Authorizer, int]:
        authz = authorizer()
        before = held(authz)
        for n in range(200):
            authz.facts.insert(
                ("has_role", Entity("User", f"u{n}"), "reader", Entity("Repo", f"r{n}")), at
            )
        # Deleted before they expire, some: their expiry is still waiting when they go.
        for n in range(100):
            authz.facts.delete(("has_role", Entity("User", f"u{n}"), None, None))
        # None was inserted past its expiry (an insert then is dropped: nothing to let go of).
        assert len(authz.facts) == 1 + 100
        return authz, before

    # Arranged before the expiry whatever the machine's speed (made again, later, if not).
    (authz, before), at = before_expiry(arrange, 0.2)
    past(at)
    assert not authz.authorize(Entity("User", "u150"), "read", Entity("Repo", "r150"))
    assert held(authz) == before


def test_a_requests_context_facts_leave_nothing_behind():
    """Oso Cloud's context facts hold for one question: each request may name new entities."""
    authz = authorizer()
    before = held(authz)
    for n in range(500):
        user, repo = Entity("User", f"u{n}"), Entity("Repo", f"r{n}")
        with authz.session(facts=[("has_role", user, "reader", repo)]) as session:
            assert session.allowed(user, "read", repo)
        assert authz.actions(user, repo, facts=[("has_role", user, "reader", repo)]) == {"read"}
        assert authz.list(user, "read", "Repo", facts=[("has_role", user, "reader", repo)]) == [
            f"r{n}"
        ]
    assert held(authz) == before


def test_an_entity_the_policy_names_stays_shared():
    authz = authorizer()
    root, pinned = Entity("User", "root"), Entity("Repo", "pinned")
    assert authz.authorize(root, "read", pinned)
    authz.facts.insert(("has_role", root, "reader", pinned))
    authz.facts.delete(("has_role", root, "reader", pinned))
    assert pinned in authz._index._interned  # the compiled policy holds it
    assert authz.authorize(root, "read", pinned)
