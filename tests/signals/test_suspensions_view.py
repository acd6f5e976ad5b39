"""This process's view of the suspensions in force (`bastion.signals.suspensions.Suspensions`):
an expired suspension writes no delete to the change log, so the view forgets it itself at the
next change; one still in force, or without an end, is never forgotten."""

from __future__ import annotations

from bastion.facts.model import Entity
from bastion.facts.store import StoredFact
from bastion.signals.suspensions import PREDICATE, Suspensions
from tests.clock import ManualClock


def suspended(name: str, until: float | None) -> StoredFact:
    return StoredFact((PREDICATE, Entity("User", name)), until)


def test_expired_suspensions_are_forgotten_and_the_others_kept():
    clock = ManualClock()
    view = Suspensions(clock)
    view.apply([suspended(f"u{i}", 1010.0) for i in range(1000)], ())
    view.apply([suspended("forever", None), suspended("hour", 4600.0)], ())
    assert view.holds(Entity("User", "u7")) and len(view._until) == 1002
    clock.now = 1011.0
    assert not view.holds(Entity("User", "u7"))  # over, whether or not it is forgotten
    view.apply([suspended("next", 2000.0)], ())
    assert len(view._until) == 3
    assert all(view.holds(Entity("User", n)) for n in ("forever", "hour", "next"))
    view.apply([], [(PREDICATE, Entity("User", "hour"))])
    assert not view.holds(Entity("User", "hour")) and view.holds(Entity("User", "forever"))


def owned(agent: str, owner: str) -> StoredFact:
    return StoredFact(("has_relation", Entity("Agent", agent), "owner", Entity("User", owner)))


def test_an_agent_acting_as_itself_is_held_by_its_owners_suspension_and_only_then():
    view = Suspensions(ManualClock())
    bot, pat = Entity("Agent", "bot"), Entity("User", "pat")
    view.apply([owned("bot", "pat"), suspended("pat", None)], ())
    # As itself (client credentials: its own id is the token's subject), or asked about alone.
    assert view.first((Entity("User", "bot"), bot)) == pat
    assert view.first((bot,)) == pat
    # Delegated to from an agent acting as itself: still no person in the chain.
    assert view.first((Entity("User", "job"), Entity("Agent", "job"), bot)) == pat
    # Acting for a person: that person bounds it, not its owner.
    assert view.first((Entity("User", "sam"), bot)) is None
    # The owner's fact deleted (by a pattern naming the agent, or a wildcard): no longer held.
    view.apply([], [("has_relation", bot, "owner", None)])
    assert view.first((bot,)) is None
    view.apply([owned("bot", "pat")], ())
    view.apply([], [("has_relation", None, None, None)])
    assert view.first((bot,)) is None and view.owners(bot) == ()
    # Another relation deleted leaves the owner alone.
    view.apply([owned("bot", "pat")], ())
    view.apply([], [("has_relation", bot, "parent", None)])
    assert view.first((bot,)) == pat
