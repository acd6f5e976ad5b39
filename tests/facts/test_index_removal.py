"""Facts removed together (`FactIndex.remove_all`, which drops expired facts) leave the index as
removing them one by one does; and a decision made after many facts expire together never uses
one of them. Before, the first decision after an expiry dropped each expired fact by itself, on
the event loop: 200,000 sharing one ``expires_at`` held it for 1.8 s (benchmarks/expiry_lag.py)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

import pytest

from bastion import Authorizer, Entity
from bastion.facts.index import FactIndex, Many
from bastion.turns import Turns
from tests.waits import before_expiry, past

USERS = [Entity("User", f"u{i}") for i in range(12)]
REPOS = [Entity("Repo", f"r{i}") for i in range(12)]


def random_fact(rng: random.Random) -> tuple:
    if rng.random() < 0.8:
        return ("has_role", rng.choice(USERS), rng.choice(["reader", "admin"]), rng.choice(REPOS))
    return ("stars", rng.choice(REPOS), rng.randrange(3))


def norm(index: FactIndex) -> tuple:
    """What an index holds, lookup indexes and expiries included, in a form to compare."""
    return (
        index.count,
        {key: set(pf.all) for key, pf in index.predicates.items()},
        {
            key: {
                shape: {k: sorted(v, key=repr) if v.__class__ is Many else v for k, v in m.items()}
                for shape, m in pf.modes.items()
            }
            for key, pf in index.predicates.items()
        },
        dict(index._expiry),
        index._entity_types,
    )


def indexed(facts: list[tuple]) -> FactIndex:
    """An index of ``facts`` with lookups (pinned and not) built and entities counted."""
    index = FactIndex()
    for fact, at in facts:
        index.add(fact, at)
    index.entities_of(frozenset({"User"}))  # counted from now on
    pf = index.predicate("has_role", 3)
    pf.mode("bfb")
    pf.mode("bbf", ((1, "reader"),))
    pf.mode("fbb", ((1, "admin"),))
    index.predicate("stars", 2).mode("fb")
    return index


@pytest.mark.parametrize("share", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("in_turns", [False, True])
def test_facts_removed_together_leave_the_index_as_removed_one_by_one(share, in_turns):
    """A part of the facts removed (fewer than stay: taken out of each lookup index; more:
    each index filled again with those that stay), with facts not held and facts given twice
    among them, in turns or not."""
    rng = random.Random(5)
    for _ in range(6):
        held = list({random_fact(rng): None for _ in range(120)})
        facts = [(fact, rng.choice([None, 1000.0])) for fact in held]
        one, bulk = indexed(facts), indexed(facts)
        gone = [fact for fact in held if rng.random() < share]
        gone += gone[:5] + [random_fact(rng) for _ in range(5)]  # twice; maybe not held
        removed = sum(one.remove(fact) for fact in gone)
        generation = bulk.generation
        assert bulk.remove_all(gone, Turns() if in_turns else None) == removed > 0
        assert norm(bulk) == norm(one)
        assert bulk.generation != generation
        # The entities only the removed facts named are let go of as after `remove`.
        assert one.let_go_of_released() == bulk.let_go_of_released()
        assert bulk._interned.keys() == one._interned.keys()


@pytest.mark.parametrize("in_turns", [False, True])
def test_expired_facts_are_purged_together_and_the_rest_kept(in_turns):
    """`purge_expired`: the facts due, in several expiries, go together; a fact given a later
    expiry since, or none, or removed since, is not taken by its first expiry's entry."""
    rng = random.Random(9)
    held = list({random_fact(rng): None for _ in range(150)})
    expiries = [10.0, 20.0, 30.0, None]
    facts = [(fact, rng.choice(expiries)) for fact in held]
    index = indexed(facts)
    later, never, removed = held[0], held[1], held[2]
    index.add(later, 40.0)
    index.add(never, None)
    index.remove(removed)
    purged = index.purge_expired(25.0, Turns() if in_turns else None)
    kept = {f for f, at in facts if at is None or at > 25.0} | {later, never}
    kept.discard(removed)
    assert purged == len(held) - 1 - len(kept)
    assert set(index) == kept
    assert index.next_expiry == 30.0
    assert norm(index) == norm(indexed([(f, index.expiry_of(f)) for f in kept]))
    due = {f for f, at in facts if at == 30.0} & kept - {later, never}
    assert index.purge_expired(35.0) == len(due)
    assert index.next_expiry == 40.0


def test_when_more_than_so_many_facts_will_have_expired():
    index = FactIndex()
    for n in range(5):
        index.add(("stars", REPOS[n], 1), 100.0 + n)
    for n in range(10):
        index.add(("stars", REPOS[n % 12], 2), 200.0)  # ten sharing one expiry
    assert index.crowded_expiry(0) == 100.0
    assert index.crowded_expiry(4) == 104.0  # the fifth
    assert index.crowded_expiry(5) == 200.0  # then ten at once
    assert index.crowded_expiry(14) == 200.0
    assert index.crowded_expiry(15) == float("inf")
    assert FactIndex().crowded_expiry(0) == float("inf")


POLICY = """
actor User {}
resource Repo { roles = ["reader"]; permissions = ["read"]; "read" if "reader"; }
allow(actor, action, resource) if has_permission(actor, action, resource);
"""


def loaded_before_expiry(
    expiring: list, kept: list, margin: float, before: Callable[[Authorizer], None] | None = None
) -> tuple[Authorizer, float]:
    """An `Authorizer` of `POLICY` holding ``expiring``, to expire together ``margin`` seconds
    after the load began, and ``kept``, with no expiry, and ``before`` (what the test asserts
    of it before the expiry) done; and that expiry, still ahead once both were done
    (`tests.waits.before_expiry`: the test is of what happens at the expiry, not of how fast
    facts load)."""

    def loaded(at: float) -> Authorizer:
        authz = Authorizer(POLICY)
        authz.facts.load([(fact, at) for fact in expiring] + [(fact, None) for fact in kept])
        if before is not None:
            before(authz)
        return authz

    return before_expiry(loaded, margin)


@pytest.mark.parametrize("kept", [10_000, 40_000])
def test_no_decision_after_many_facts_expire_together_uses_one(kept):
    """50,000 grants sharing one expiry, beside grants that do not expire (fewer, then more, so
    that both ways of removing them run): from the expiry on none allows, every view of the
    facts leaves them out, and the index is as if they had never been added."""
    user = Entity("User", "ada")
    expiring = [("has_role", user, "reader", Entity("Repo", f"e{n}")) for n in range(50_000)]
    others = [("has_role", user, "reader", Entity("Repo", f"k{n}")) for n in range(kept)]

    def before(authz: Authorizer) -> None:
        assert authz.authorize(user, "read", Entity("Repo", "e0"))
        assert len(authz.list(user, "read", "Repo")) == 50_000 + kept

    authz, at = loaded_before_expiry(expiring, others, 5, before)
    past(at)
    assert not authz.authorize(user, "read", Entity("Repo", "e0"))
    assert not authz.authorize(user, "read", Entity("Repo", "e49999"))
    assert authz.authorize(user, "read", Entity("Repo", "k0"))
    assert len(authz.list(user, "read", "Repo")) == kept
    assert len(authz.facts) == kept
    assert authz.facts.get(("has_role", user, None, None))[0][3].id.startswith("k")
    fresh = Authorizer(POLICY)
    fresh.facts.load([(fact, None) for fact in others])
    fresh.list(user, "read", "Repo")  # the same lookups built
    assert norm(authz._index) == norm(fresh._index)
    assert authz._index._expiring == {} and authz._index.next_expiry == float("inf")


def test_a_decision_sees_all_of_the_facts_that_expire_together_or_none():
    """Dropped on a worker thread in turns (`FactSet.purge_at`, as a replica does), facts that
    expire together go under one hold of the fact lock: a question asked meanwhile on another
    thread finds the first and the last of them both held or both gone, never one of each."""
    user = Entity("User", "ada")
    first, last = Entity("Repo", "e0"), Entity("Repo", "e29999")
    expiring = [("has_role", user, "reader", Entity("Repo", f"e{n}")) for n in range(30_000)]
    authz, at = loaded_before_expiry(expiring, [], 3)
    seen: list[tuple[bool, bool]] = []

    def ask() -> None:
        with authz.session() as s:
            seen.append((s.allowed(user, "read", first), s.allowed(user, "read", last)))

    ask()
    dropping = threading.Thread(target=authz.facts.purge_at, args=(at, Turns()))
    dropping.start()
    # Asked again once that thread holds the lock (a question would drop them itself, at once).
    while dropping.is_alive() and not (time.time() >= at and authz._index.lock.locked()):
        time.sleep(0.0001)
    while dropping.is_alive() or seen[-1] != (False, False):
        ask()
        time.sleep(0.0005)  # leave the lock to the thread that drops them
    dropping.join()
    assert seen[0] == (True, True) and seen[-1] == (False, False)
    assert [pair for pair in seen if pair[0] != pair[1]] == []
    assert len(authz.facts) == 0
