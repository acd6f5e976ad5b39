"""A replica that has heard of a commit (PostgreSQL's notice) has it applied before the gateway
decides anything: `Replica.heard_not_applied` is None only while every commit it heard of is
read, waits for the read otherwise, and says False (the gateway then refuses, as on stale facts)
when the read does not come within the time given. A notice of nothing new (another
deployment's, sharing the database) clears with the next read."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Awaitable, Callable

import psycopg
import pytest

from bastion.facts import store as store_module
from bastion.facts.model import Entity
from bastion.facts.store import FactStore, StoredFact
from bastion.server import replica as replica_module
from bastion.server.replica import Replica
from tests.delayed_relay import DelayedRelay
from tests.waits import PATIENCE, eventually_async, reads_held

POLICY = """
actor User {}
resource Repo { roles = ["reader"]; permissions = ["read"]; "read" if "reader"; }
allow(actor, action, resource) if has_permission(actor, action, resource);
"""
ADA, REPO = Entity("User", "ada"), Entity("Repo", "r1")
READER = ("has_role", ADA, "reader", REPO)


@pytest.fixture(autouse=True)
def a_channel_of_its_own(monkeypatch):
    """The tests' schemas share one database, and PostgreSQL's notices are the database's: a
    commit by a test on the other worker was heard here too, and a notice that comes between
    two asks is a new one, waited for (`test_a_heard_commit_is_applied_before_anything_is_decided`
    then failed: a wait where none was due). Each test here notifies and listens on a channel of
    its own."""
    channel = f"bastion_changes_{uuid.uuid4().hex[:12]}"
    monkeypatch.setattr(store_module, "CHANGES_CHANNEL", channel)
    monkeypatch.setattr(replica_module, "CHANGES_CHANNEL", channel)


async def settled(replica: Replica) -> None:
    """Until every notice heard so far is confirmed read (each clears with the next read)."""
    for _ in range(100):
        waiting = replica.heard_not_applied(5)
        if waiting is None:
            return
        assert await waiting
    raise AssertionError("notices never stopped coming")


def with_a_replica(
    postgres_url: str,
    scenario: Callable[[Replica, FactStore], Awaitable[None]],
    *,
    replica_url: str | None = None,
    listening: bool = True,
) -> None:
    """Run ``scenario(replica, writer)`` with a replica of ``POLICY`` (reaching the database at
    ``replica_url``, by default ``postgres_url``) that listens for commits unless ``listening``
    is False, and a writer of its own."""
    writer = FactStore.open(postgres_url)
    writer.put_policy(POLICY)

    async def run():
        replica = Replica(replica_url or postgres_url, max_staleness=30)
        await replica.start()
        try:
            # Its LISTEN in force (a thread of its own makes it): a commit before would go
            # unheard, found by the next poll instead.
            heard = await eventually_async(lambda: not listening or replica.listening, every=0.01)
            assert heard, "the replica never listened"
            await scenario(replica, writer)
        finally:
            await replica.stop()

    try:
        asyncio.run(run())
    finally:
        writer.close()


async def written_then_decided(replica: Replica, writer: FactStore, unheard: str) -> None:
    """A grant written by ``writer``: the replica's next message waits for it (``unheard``:
    what it means if it does not) and is decided on it."""
    assert not replica.authz.authorize(ADA, "read", REPO)
    await asyncio.to_thread(writer.apply, [StoredFact(READER)])
    waiting = replica.heard_not_applied(30)
    assert waiting is not None, unheard
    assert await waiting is True
    assert replica.authz.authorize(ADA, "read", REPO)


def test_a_heard_commit_is_applied_before_anything_is_decided(postgres_url):
    async def scenario(replica: Replica, writer: FactStore) -> None:
        await settled(replica)  # current: nothing to wait for
        # The follower's reads are held back, as on a loaded machine.
        with reads_held(replica) as held:
            seq = (await asyncio.to_thread(writer.apply, [StoredFact(READER)])).seq
            deadline = time.monotonic() + PATIENCE
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

    with_a_replica(postgres_url, scenario)


def test_a_notice_that_has_arrived_but_is_not_handled_yet_is_waited_for(postgres_url, monkeypatch):
    """The listener's thread can be slow to handle a notice that is already here (it waits for
    the GIL while messages are decided): a message decided meanwhile would not know of it. It is
    waited for, then the commit it tells of."""
    arrived, release = threading.Event(), threading.Event()
    release.set()  # held from the commit on
    notified = Replica._notified

    def slow(replica: Replica, payload: str) -> None:
        arrived.set()
        release.wait(PATIENCE)
        notified(replica, payload)

    monkeypatch.setattr(Replica, "_notified", slow)

    async def scenario(replica: Replica, writer: FactStore) -> None:
        try:
            await settled(replica)
            release.clear()
            arrived.clear()
            # The write waits for every listener to confirm it, this one too, held here: it
            # runs aside, and what is asked meanwhile is what a message sent while it waits
            # would find.
            writing = asyncio.create_task(asyncio.to_thread(writer.apply, [StoredFact(READER)]))
            assert await asyncio.to_thread(arrived.wait, PATIENCE)
            seq = await asyncio.to_thread(writer.head)
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
                asked = replica.heard_not_applied(PATIENCE)
                assert asked is not None
                threading.Timer(0.02, release.set).start()
                return await asked

            assert await asyncio.create_task(another_message()) is True
            assert replica.applied >= seq and replica.authz.authorize(ADA, "read", REPO)
            assert (await writing).seq == seq
        finally:
            release.set()

    with_a_replica(postgres_url, scenario)


def test_a_fact_written_by_another_process_is_decided_on_once_the_write_returns(postgres_url):
    """The writer's call returns only once every replica has heard of its commit, however late
    the notice: here, once the replica is up, everything PostgreSQL sends it arrives half a
    second late, and its listener asks its connection rarely, so only the notice can tell it.
    The gateway's next message then waits for the change (`heard_not_applied`) and is decided
    on it. Before, the write returned at its commit, and a message decided at once was decided
    without it."""

    async def scenario(replica: Replica, writer: FactStore) -> None:
        listener = replica._listener
        assert listener is not None
        listener.heartbeat, listener.stale_after = 30.0, 60.0
        current = await eventually_async(
            lambda: listener.healthy and not listener.behind(), every=0.01
        )
        assert current, "the replica's listener never caught up"
        await settled(replica)
        relay.delay = 0.5  # from here on: the replica's start is not what is tested
        await written_then_decided(
            replica, writer, "the write returned before the replica heard of it"
        )

    with DelayedRelay() as relay:
        with_a_replica(postgres_url, scenario, replica_url=relay.url(postgres_url))


def test_while_its_listener_is_down_a_message_waits_for_a_read_of_the_log(
    postgres_url, monkeypatch
):
    """A replica whose listener cannot connect (a network fault for it alone) hears of no commit,
    and confirms none: a writer does not wait for it. Each message then waits for a read of the
    log begun after it, as a token is read while the revocation listener is down. Before, it was
    decided on the facts held until the next poll (every second). While the log cannot be read,
    the facts held decide (`max_staleness`): see test_replicas."""
    connect = psycopg.connect

    def deaf(*args, **kwargs):
        if kwargs.get("application_name") == "bastion-listen":
            raise psycopg.OperationalError("connection refused (held down by the test)")
        return connect(*args, **kwargs)

    monkeypatch.setattr(psycopg, "connect", deaf)

    async def scenario(replica: Replica, writer: FactStore) -> None:
        assert not replica.listening
        if (started := replica.heard_not_applied(30)) is not None:
            assert await started is True  # read since it began: nothing granted yet
        await written_then_decided(
            replica, writer, "decided on the facts held, with the listener down"
        )

    with_a_replica(postgres_url, scenario, listening=False)
