"""Many facts that expire together are dropped by a replica on a worker thread, in turns, as a
large change is put in force: before, the first decision after their expiry dropped them on the
event loop, which answered nothing else meanwhile (200,000 facts: 1.8 s,
benchmarks/expiry_lag.py). Decisions made meanwhile wait for it (`Replica.in_force`), and none
made after the expiry uses one of the facts."""

from __future__ import annotations

import asyncio
import time

from bastion.facts.model import Entity
from bastion.facts.store import FactStore, StoredFact
from bastion.server.replica import Replica
from tests.server.test_replica_probe import POLICY
from tests.waits import PATIENCE

MANY = 50_000


def grant(n: int) -> tuple:
    return ("has_role", Entity("User", f"u{n}"), "reader", Entity("Repo", f"r{n}"))


def test_many_facts_expiring_together_are_dropped_off_the_event_loop(sqlite_url):
    writer = FactStore.open(sqlite_url)
    writer.put_policy(POLICY)
    kept = grant(MANY)
    writer.apply([StoredFact(kept)])
    first = grant(0)

    async def run() -> dict:
        replica = Replica(sqlite_url, max_staleness=60)
        await replica.start()
        try:
            lead = 4.0
            while True:  # the facts written, and in force here, before they expire
                expires_at = time.time() + lead
                seq = writer.apply([StoredFact(grant(n), expires_at) for n in range(MANY)]).seq
                await replica.wait_for(seq, PATIENCE)
                if time.time() < expires_at - 1:
                    break
                lead *= 2
            authz = replica.authz
            assert authz.authorize(first[1], "read", first[3])
            seen = {"turns": 0, "turns_while_dropped": 0, "decided_after": 0, "allowed_after": 0}
            done = asyncio.Event()

            async def decide() -> None:
                while not done.is_set():
                    await asyncio.sleep(0)
                    asked = time.time()
                    if (changing := replica.in_force()) is not None:
                        await changing
                    allowed = authz.authorize(first[1], "read", first[3])
                    if asked >= expires_at:
                        seen["decided_after"] += 1
                        seen["allowed_after"] += allowed

            await asyncio.sleep(max(0.0, expires_at - 0.5 - time.time()))
            deciding = asyncio.ensure_future(decide())
            deadline = expires_at + 60
            while (authz.facts.held > 1 or seen["decided_after"] < 3) and time.time() < deadline:
                await asyncio.sleep(0)
                seen["turns"] += 1
                if time.time() >= expires_at and replica.in_force() is not None:
                    seen["turns_while_dropped"] += 1
            done.set()
            await deciding
            seen["held"] = len(authz.facts)
            seen["kept"] = authz.authorize(kept[1], "read", kept[3])
            return seen
        finally:
            await replica.stop()

    try:
        seen = asyncio.run(run())
    finally:
        writer.close()
    assert seen["held"] == 1 and seen["kept"], seen
    # No decision asked from the expiry on was allowed by an expired fact.
    assert seen["decided_after"] > 0 and seen["allowed_after"] == 0, seen
    # The event loop went on turning, after the expiry, while the facts were being dropped.
    assert seen["turns_while_dropped"] >= 2, seen


def test_facts_expired_before_a_large_change_are_not_dropped_on_the_event_loop_by_it(
    sqlite_url, monkeypatch
):
    """A large change that comes once many facts have expired, before the follower dropped them
    on a worker thread (it was catching up on a busy log meanwhile: here it never looks for
    them), counts the facts held without dropping any: before, it counted them by `len`, which
    dropped every expired fact first, on the event loop (50,000: 0.2 s on a busy machine)."""
    from bastion.facts.index import FactIndex
    from tests.loop import noting_where

    monkeypatch.setattr(Replica, "_crowded_expiry", lambda self: float("inf"))
    seen: list[str] = []
    monkeypatch.setattr(FactIndex, "purge_expired", noting_where(FactIndex.purge_expired, seen))
    writer = FactStore.open(sqlite_url)
    writer.put_policy(POLICY)
    expiring, large = 2_000, 1_500  # each more than is dropped or checked on the loop

    async def run() -> int:
        replica = Replica(sqlite_url, max_staleness=60)
        await replica.start()
        try:
            lead = 1.0
            while True:  # the facts written, and in force here, before they expire
                expires_at = time.time() + lead
                facts = [StoredFact(grant(n), expires_at) for n in range(expiring)]
                await replica.wait_for(writer.apply(facts).seq, PATIENCE)
                if time.time() < expires_at - 0.2:
                    break
                lead *= 2
            await asyncio.sleep(expires_at + 0.05 - time.time())
            facts = [StoredFact(grant(n)) for n in range(MANY, MANY + large)]
            await replica.wait_for(writer.apply(facts).seq, PATIENCE)
            assert "event loop" not in seen, seen
            return await asyncio.to_thread(len, replica.authz.facts)
        finally:
            await replica.stop()

    try:
        held = asyncio.run(run())
    finally:
        writer.close()
    assert held == large  # the expired facts are gone, dropped on a worker thread
    assert seen and "event loop" not in seen, seen
