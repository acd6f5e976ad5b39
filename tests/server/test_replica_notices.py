"""A replica that has heard of a commit (PostgreSQL's notice) has it applied before the gateway
decides anything: `Replica.heard_not_applied` is None only while every commit it heard of is
read, waits for the read otherwise, and says False (the gateway then refuses, as on stale facts)
when the read does not come within the time given. A notice of nothing new (another
deployment's, sharing the database) clears with the next read."""

from __future__ import annotations

import asyncio
import threading
import time

from bastion.facts.model import Entity
from bastion.facts.store import FactStore, StoredFact
from bastion.server.replica import Replica

POLICY = """
actor User {}
resource Repo { roles = ["reader"]; permissions = ["read"]; "read" if "reader"; }
allow(actor, action, resource) if has_permission(actor, action, resource);
"""
ADA, REPO = Entity("User", "ada"), Entity("Repo", "r1")
READER = ("has_role", ADA, "reader", REPO)


async def settled(replica: Replica) -> None:
    """Until every notice heard so far is confirmed read: the tests' schemas share a database,
    so another test's commits are heard here too (and clear with the next read)."""
    for _ in range(100):
        waiting = replica.heard_not_applied(5)
        if waiting is None:
            return
        assert await waiting
    raise AssertionError("notices never stopped coming")


def test_a_heard_commit_is_applied_before_anything_is_decided(postgres_url):
    writer = FactStore.open(postgres_url)
    writer.put_policy(POLICY)

    async def scenario():
        replica = Replica(postgres_url, max_staleness=30)
        await replica.start()
        try:
            await settled(replica)  # current: nothing to wait for
            # Its LISTEN in force (a thread of its own makes it): a commit before would go
            # unheard, found by the next poll instead.
            deadline = time.monotonic() + 30
            while not replica.listening:
                assert time.monotonic() < deadline, "the replica never listened"
                await asyncio.sleep(0.01)
            # The follower's reads are held back, as on a loaded machine.
            held, read = threading.Event(), replica.store.changes_since

            def slow_read(*args, **kwargs):
                held.wait(10)
                return read(*args, **kwargs)

            replica.store.changes_since = slow_read
            seq = (await asyncio.to_thread(writer.apply, [StoredFact(READER)])).seq
            deadline = time.monotonic() + 30
            while (waiting := replica.heard_not_applied(5)) is None:
                assert time.monotonic() < deadline, "the commit's notice never came"
                await asyncio.sleep(0.01)
            assert replica.applied < seq  # heard of, not applied: deciding now would be wrong
            # Not read within the time given: False (the gateway refuses).
            assert await replica.heard_not_applied(0.2) is False
            # Given up on once, the same notice is refused at once when the same task asks again
            # (a gateway message asks twice: its connect, then its own decision): no second
            # wait. Another task (another message) waits as ever.
            waits: list = []
            until = replica._until
            replica._until = lambda *args: waits.append(args) or until(*args)  # type: ignore[method-assign]
            assert await replica.heard_not_applied(5) is False
            assert waits == []

            async def another_message() -> bool:
                asked = replica.heard_not_applied(0.2)
                assert asked is not None
                return await asked

            assert await asyncio.create_task(another_message()) is False and len(waits) == 1
            replica._until = until  # type: ignore[method-assign]
            held.set()
            assert await waiting is True
            assert replica.applied >= seq
            assert replica.authz.authorize(ADA, "read", REPO)
            await settled(replica)
            # A notice of nothing new clears with the next read that finds nothing more.
            replica._notified(str(seq + 1000))
            again = replica.heard_not_applied(5)
            assert again is not None and await again is True
            await settled(replica)
            assert replica.applied == seq
        finally:
            held.set()
            await replica.stop()

    try:
        asyncio.run(scenario())
    finally:
        writer.close()


def test_a_notice_that_has_arrived_but_is_not_handled_yet_is_waited_for(postgres_url, monkeypatch):
    """The listener's thread can be slow to handle a notice that is already here (it waits for
    the GIL while messages are decided): a message decided meanwhile would not know of it. It is
    waited for, then the commit it tells of."""
    arrived, release = threading.Event(), threading.Event()
    notified = Replica._notified

    def slow(replica: Replica, payload: str) -> None:
        arrived.set()
        release.wait(20)
        notified(replica, payload)

    monkeypatch.setattr(Replica, "_notified", slow)
    writer = FactStore.open(postgres_url)
    writer.put_policy(POLICY)

    async def scenario():
        replica = Replica(postgres_url, max_staleness=30)
        await replica.start()
        try:
            deadline = time.monotonic() + 30
            while not replica.listening:
                assert time.monotonic() < deadline, "the replica never listened"
                await asyncio.sleep(0.01)
            release.set()
            await settled(replica)
            release.clear()
            arrived.clear()
            seq = (await asyncio.to_thread(writer.apply, [StoredFact(READER)])).seq
            assert await asyncio.to_thread(arrived.wait, 20)
            assert replica.applied < seq and not replica.authz.authorize(ADA, "read", REPO)
            # Not handled within the time given: False (the gateway refuses, as on stale facts),
            # and the same task (a message's second ask) is refused at once, without a second
            # wait.
            waiting = replica.heard_not_applied(0.05)
            assert waiting is not None and await waiting is False
            waiting = replica.heard_not_applied(20)
            assert waiting is not None and await waiting is False

            async def another_message() -> bool:
                # Handled while it waits: the message is decided on the commit.
                asked = replica.heard_not_applied(20)
                assert asked is not None
                threading.Timer(0.02, release.set).start()
                return await asked

            assert await asyncio.create_task(another_message()) is True
            assert replica.applied >= seq and replica.authz.authorize(ADA, "read", REPO)
        finally:
            release.set()
            await replica.stop()

    try:
        asyncio.run(scenario())
    finally:
        writer.close()
