"""A replica tries a failing expensive step again after a wait that grows (exponential, capped,
with jitter) and starts again from the ordinary one once the step works: a reload of every fact
behind a pruned change log, a fact snapshot. The waits are on a clock of the test's
(`replica._pause` replaced): what is counted is how many attempts fit in a given span of it,
never how long anything took. On a real SQLite file and a real PostgreSQL schema."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from bastion.facts.model import Entity
from bastion.facts.store import FactStore, StoredFact
from bastion.policy.limits import PolicyLimits
from bastion.server import replica as replica_module
from bastion.server.replica import Replica
from tests.waits import PATIENCE, eventually_async

POLICY = """
actor User {}
resource Repo {
  roles = ["reader"];
  permissions = ["read"];
  "read" if "reader";
}
allow(actor, action, resource) if has_permission(actor, action, resource);
"""
ALICE, ANVIL = Entity("User", "alice"), Entity("Repo", "anvil")
READS = StoredFact(("has_role", ALICE, "reader", ANVIL))
# Policy limits that refuse `REVOKING`, which a replica with the default ones stored.
SMALL = PolicyLimits(policy_max_bytes=len(POLICY) + 100)
REVOKING = POLICY.replace('"read" if "reader";', "") + "\n# " + "x" * 200 + "\n"
# A span of the test's clock: a retry every `_RETRY_INTERVAL` (0.25 s) would reload 480 times.
SPAN = 120.0


class TestClock:
    """Stands for `asyncio.sleep` in the replica's waits after a failure: each wait is noted
    and moves this clock on, and returns at once (after one turn of the event loop)."""

    __test__ = False

    def __init__(self) -> None:
        self.waits: list[float] = []

    @property
    def now(self) -> float:
        return sum(self.waits)

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture
def store(database_url):
    s = FactStore.open(database_url)
    s.put_policy(POLICY)
    s.apply([READS])
    yield s
    s.close()


@pytest.fixture
def clock(monkeypatch) -> TestClock:
    clock = TestClock()
    monkeypatch.setattr(replica_module, "_pause", clock, raising=False)
    return clock


def reloads(caplog) -> int:
    return sum("reloading a snapshot" in r.getMessage() for r in caplog.records)


async def behind_a_pruned_log(replica: Replica, store: FactStore, policy: str) -> None:
    """``policy`` put in force, and the log pruned past what ``replica`` applied, while its
    follower is held; then the follower goes on."""
    assert replica._task is not None
    replica._task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await replica._task
    store.put_policy(policy)
    store.apply([StoredFact(("has_role", Entity("User", "bo"), "reader", ANVIL))])
    store.prune_changes(keep=1)
    replica._task = asyncio.create_task(replica._follow())


def test_a_reload_that_keeps_failing_backs_off_then_starts_again_from_the_ordinary_wait(
    store, database_url, clock, caplog
):
    """Behind a pruned log, a replica whose limits refuse the policy in force cannot reload: it
    decides nothing, and must not read every fact again four times a second meanwhile."""

    async def scenario():
        replica = Replica(database_url, limits=SMALL)
        await replica.start()
        try:
            with caplog.at_level(logging.INFO, logger="bastion.replica"):
                await behind_a_pruned_log(replica, store, REVOKING)
                assert await eventually_async(
                    lambda: clock.now >= SPAN or reloads(caplog) >= 40, every=0.001
                )
                tried = reloads(caplog)
                assert "policy_max_bytes" in (replica.follow_error or "")
                # The waits double, up to `_RETRY_LONGEST` (30 s), each at least half of that:
                # 16 reloads at most in `SPAN`, where a fixed wait would reload 480 times.
                assert clock.now >= SPAN, f"{tried} reloads in {clock.now:.2f} s of waits"
                assert tried <= 16, f"{tried} reloads in {clock.now:.2f} s of waits"
                # The first is no longer than before: a blip is recovered from as soon.
                assert 0 < clock.waits[0] <= replica_module._RETRY_INTERVAL

                # A policy that loads here: the next reload works, and the waits start again.
                _, seq = store.put_policy(POLICY)
                await replica.wait_for(seq, PATIENCE)
                assert replica.follow_error is None and not replica.stale
                assert replica.authz.authorize(ALICE, "read", ANVIL)
                clock.waits.clear()
                await behind_a_pruned_log(replica, store, REVOKING)
                assert await eventually_async(lambda: len(clock.waits) >= 1, every=0.001)
                assert clock.waits[0] <= replica_module._RETRY_INTERVAL, clock.waits
        finally:
            await replica.stop()

    asyncio.run(scenario())


def test_a_replica_reloaded_under_a_policy_that_loads_decides_again(store, database_url, clock):
    """A replica that followed the log to a policy it cannot load decides nothing; fallen
    behind a pruned log meanwhile, it reloads every fact under the policy in force by then. If
    that one loads here, the reload puts it back to work, as following the log to it would."""

    async def scenario():
        replica = Replica(database_url, limits=SMALL)
        await replica.start()
        try:
            _, seq = store.put_policy(REVOKING)
            await replica.wait_for(seq, PATIENCE)
            assert replica.stale and replica.policy_refused is not None
            await behind_a_pruned_log(replica, store, POLICY)
            assert await eventually_async(lambda: replica.applied == store.head())
            assert replica.policy_version == store.policy().version
            assert (replica.policy_refused, replica.stale) == (None, False)
            assert replica.authz.authorize(ALICE, "read", ANVIL)
        finally:
            await replica.stop()

    asyncio.run(scenario())


def test_a_fact_snapshot_that_cannot_be_written_is_tried_again_less_and_less_often(
    store, database_url, clock, caplog, tmp_path
):
    """Each attempt copies every fact held; one that fails every time (a folder that is not
    there, a full disk) must not do so every `fact_snapshot_interval` for ever."""
    missing = str(tmp_path / "not-there" / "facts.snapshot")

    def attempts() -> int:
        return sum("cannot write the fact snapshot" in r.getMessage() for r in caplog.records)

    async def scenario():
        interval = 0.05
        replica = Replica(database_url, snapshot_path=missing, snapshot_interval=interval)
        with caplog.at_level(logging.WARNING, logger="bastion.replica"):
            await replica.start()
            try:
                span = 3600.0  # a fixed interval would try 72,000 times
                assert await eventually_async(
                    lambda: clock.now >= span or attempts() >= 40, every=0.001
                )
                tried = attempts()
                assert clock.now >= span, f"{tried} attempts in {clock.now:.2f} s of waits"
                # Doubling from 0.05 s up to an hour, each wait at least half of that.
                assert tried <= 20, f"{tried} attempts in {clock.now:.2f} s of waits"
                assert clock.waits[0] <= interval
            finally:
                replica.snapshot_path = ""
                await replica.stop()

    asyncio.run(scenario())
