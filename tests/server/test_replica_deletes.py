"""A change whose deletes may match many facts (a wildcard, or many patterns) is put in force on a
worker thread, under the fact lock, as a large import is: on the event loop a delete of every
``has_role`` fact held every replica's loop for as long as it took."""

from __future__ import annotations

import asyncio

from bastion.facts.model import Entity
from bastion.facts.store import FactStore, StoredFact
from bastion.server import replica as replica_module
from bastion.server.replica import Replica
from tests.server.test_replica_probe import POLICY, reader
from tests.waits import PATIENCE


def test_a_wildcard_delete_is_put_in_force_off_the_event_loop(sqlite_url, monkeypatch):
    writer = FactStore.open(sqlite_url)
    writer.put_policy(POLICY)
    on_loop: list[list] = []
    load = replica_module.load_facts

    def noting(authz, facts, deletes=()):
        on_loop.append(list(deletes))  # load_facts runs on the event loop (`_small`)
        return load(authz, facts, deletes)

    monkeypatch.setattr(replica_module, "load_facts", noting)

    async def run() -> tuple[int, int]:
        replica = Replica(sqlite_url, max_staleness=30)
        await replica.start()
        try:
            seq = writer.apply([StoredFact(reader(n)) for n in range(50)]).seq
            await replica.wait_for(seq, PATIENCE)
            held = len(replica.authz.facts)
            exact = writer.apply([], [reader(0)]).seq  # one fact named whole: on the loop
            await replica.wait_for(exact, PATIENCE)
            every = writer.apply([], [("has_role", None, "reader", None)]).seq
            await replica.wait_for(every, PATIENCE)
            return held, len(replica.authz.facts)
        finally:
            await replica.stop()

    try:
        held, left = asyncio.run(run())
    finally:
        writer.close()
    assert (held, left) == (50, 0)
    assert [reader(0)] in on_loop
    assert not any(None in pattern for deletes in on_loop for pattern in deletes), on_loop


def test_deletes_are_matched_against_the_unused_facts_once_each(sqlite_url, monkeypatch):
    """A replica keeps the stored facts the policy in force does not use, to use them after a
    policy change, and drops those a change deletes. Each fact was tried against every pattern
    of every change with deletes: 300 unused facts and a change deleting 300 other facts took
    90,000 comparisons, and an application with many unused facts and large deletes held every
    replica's changes back (stale past max_staleness). Exact patterns are looked up; a wildcard
    is tried only against the unused facts of its predicate."""
    writer = FactStore.open(sqlite_url)
    writer.put_policy(POLICY)
    tried = []
    original = replica_module.matches

    def counting(fact, pattern):
        tried.append(pattern)
        return original(fact, pattern)

    monkeypatch.setattr(replica_module, "matches", counting)

    def archived(n: int) -> tuple:
        return ("is_archived", Entity("Repo", f"r{n}"))

    async def run() -> list:
        replica = Replica(sqlite_url, max_staleness=30)
        await replica.start()
        try:
            facts = [StoredFact(reader(n)) for n in range(300)]
            facts += [StoredFact(archived(n)) for n in range(300)]
            facts += [StoredFact(("is_public", Entity("Repo", "r0")))]
            seq = writer.apply(facts).seq
            await replica.wait_for(seq, PATIENCE)
            assert len(replica.unusable) == 301
            tried.clear()
            seq = writer.apply([], [reader(n) for n in range(300)] + [archived(0)]).seq
            await replica.wait_for(seq, PATIENCE)
            assert len(tried) <= 301  # not 301 x 301
            seq = writer.apply([], [("is_archived", None)]).seq
            await replica.wait_for(seq, PATIENCE)
            return [f.fact for f in replica.unusable]
        finally:
            await replica.stop()

    try:
        left = asyncio.run(run())
    finally:
        writer.close()
    assert left == [("is_public", Entity("Repo", "r0"))]
