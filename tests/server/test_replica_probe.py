"""On SQLite a replica polls the change log every ``poll_interval``; it reads the log only when
something was committed since its last read that reached the log's end began (its probe's
``PRAGMA data_version``), and is confirmed current either way. A commit from another
connection or process, whatever it wrote, is read by the next poll; one made while a read is
under way is read by the poll after."""

from __future__ import annotations

import asyncio
import contextlib

from bastion.db import Database
from bastion.facts.model import Entity
from bastion.facts.store import FactStore, StoredFact
from bastion.server.replica import Replica
from tests.waits import eventually_async

POLICY = """
actor User {}
resource Repo { roles = ["reader"]; permissions = ["read"]; "read" if "reader"; }
allow(actor, action, resource) if has_permission(actor, action, resource);
"""
ADA = Entity("User", "ada")


def reader(n: int) -> tuple:
    return ("has_role", ADA, "reader", Entity("Repo", f"r{n}"))


async def until(done, what: str = "never happened") -> None:
    assert await eventually_async(done, every=0.01), what


async def polls(replica: Replica, n: int) -> None:
    """Until the replica has confirmed itself current ``n`` more times (``n`` polls ended, the
    first perhaps under way when this was asked): a count of polls, not a time, however slowly
    a busy machine runs them."""
    for _ in range(n):
        confirmed = replica.confirmed_at

        def later(confirmed: float = confirmed) -> bool:
            return replica.confirmed_at > confirmed

        await until(later, "the log was not confirmed current")


@contextlib.asynccontextmanager
async def following(tmp_path):
    """A store with the policy, and a replica following it that polls every 10 ms."""
    path = str(tmp_path / "bastion.db")
    writer = FactStore.open(path)
    writer.put_policy(POLICY)
    replica = Replica(path, poll_interval=0.01)
    await replica.start()
    try:
        yield writer, replica
    finally:
        await replica.stop()


def counted_reads(replica: Replica) -> list[int]:
    """The replica's reads of the change log, counted as they are made."""
    reads, read = [], replica.store.changes_since

    def counting(*args, **kwargs):
        reads.append(1)
        return read(*args, **kwargs)

    replica.store.changes_since = counting
    return reads


def test_an_idle_log_is_confirmed_without_being_read(tmp_path):
    async def scenario():
        async with following(tmp_path) as (_, replica):
            reads = counted_reads(replica)
            await until(lambda: len(reads) >= 1)  # the first poll reads: nothing known yet
            await polls(replica, 1)  # that poll over
            before = len(reads)
            await polls(replica, 30)  # each confirmed current
            assert len(reads) == before, "the log was read with nothing committed"
            assert not replica.stale

    asyncio.run(scenario())


def test_any_commit_from_elsewhere_is_read_by_the_next_poll(tmp_path):
    async def scenario():
        async with following(tmp_path) as (writer, replica):
            reads = counted_reads(replica)
            await until(lambda: len(reads) >= 1)
            # A fact written by another connection (as another process would): applied.
            seq = (await asyncio.to_thread(writer.apply, [StoredFact(reader(1))])).seq
            await until(lambda: replica.applied >= seq)
            with replica.authz.session() as s:
                assert s.allowed(ADA, "read", Entity("Repo", "r1"))
            # A commit of anything else (a decision record, say) is read too, and finds nothing.
            await polls(replica, 1)  # the reads of that fact over
            before = len(reads)
            other = Database(str(tmp_path / "bastion.db"), role="another-writer")
            await asyncio.to_thread(other.execute, "CREATE TABLE unrelated (x)")
            await until(lambda: len(reads) > before)
            other.close()

    asyncio.run(scenario())


def test_a_commit_during_a_read_is_read_by_the_poll_after(tmp_path):
    async def scenario():
        async with following(tmp_path) as (writer, replica):
            # The read that finds a first fact commits a second right after it has read the
            # log: committed after that read began, which did not see it.
            committed, read = [], replica.store.changes_since

            def read_then_commit(*args, **kwargs):
                changes = read(*args, **kwargs)
                if not committed and any(c.seq >= 2 for c in changes):  # 1 is the policy
                    committed.append(writer.apply([StoredFact(reader(2))]).seq)
                return changes

            replica.store.changes_since = read_then_commit
            await asyncio.to_thread(writer.apply, [StoredFact(reader(1))])
            await until(lambda: bool(committed))
            await until(lambda: replica.applied >= committed[0])
            with replica.authz.session() as s:
                assert s.allowed(ADA, "read", Entity("Repo", "r2"))

    asyncio.run(scenario())
