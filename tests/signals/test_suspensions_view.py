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
