"""Two replicas (two `Database` objects on one PostgreSQL schema) spending the same one-time
row at once: a connection's ``state``, and a connection revoked by both. The first replica is
paused right after each statement it sends on the table, and the second does the whole of its
own work there, on a thread of its own: whatever point the code leaves between reading the row
and removing it is where the second one runs. Exactly one of them gets the row."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from bastion.connections.store import (
    ConnectionStore,
    RevocationHold,
    StoredConnection,
    StoredFlow,
)
from bastion.db import Database
from tests.waits import PATIENCE


@pytest.fixture
def replicas(postgres_url):
    one, two = Database(postgres_url), Database(postgres_url)
    yield ConnectionStore(one), ConnectionStore(two)
    one.close()
    two.close()


def _race(first: ConnectionStore, second: ConnectionStore, table: str, work: Callable) -> list:
    """``work(first)`` with ``work(second)`` run whole, on another thread, right after the
    first statement ``first`` sends on ``table``; both results, the first replica's first."""
    send = first.db.execute
    theirs: list = []
    others: list[threading.Thread] = []

    def execute(sql: str, *args, **kwargs):
        rows = send(sql, *args, **kwargs)
        if table in sql and not others:
            others.append(threading.Thread(target=lambda: theirs.append(work(second))))
            others[0].start()
            # A second replica that waits for a lock the first holds would wait forever here:
            # the first goes on at the join's end, and the second finishes after it.
            others[0].join(PATIENCE)
        return rows

    first.db.execute = execute
    try:
        mine = work(first)
    finally:
        first.db.execute = send
    assert others, f"the first replica sent nothing on {table}"
    others[0].join(PATIENCE)
    return [mine, *theirs]


def test_a_connection_state_is_taken_by_one_replica_only(replicas):
    one, two = replicas
    one.add_flow(StoredFlow("s-1", "alice", "tracker", "sealed", 100.0), older_than=0.0)
    taken = _race(one, two, "upstream_connection_flows", lambda store: store.take_flow("s-1"))
    assert sorted(flow is not None for flow in taken) == [False, True], taken


def test_a_connection_revoked_on_two_replicas_at_once_is_revoked_by_one(replicas):
    one, two = replicas
    one.put(StoredConnection("alice", "tracker", "sealed", "", 100.0, 1.0, 1.0))
    gone = _race(one, two, "upstream_connections", lambda s: s.delete("alice", "tracker"))
    assert sorted(row is not None for row in gone) == [False, True], gone
    assert one.get("alice", "tracker") is None


def test_a_revocation_due_is_claimed_by_one_replica_only(replicas):
    one, two = replicas
    one.put(StoredConnection("alice", "tracker", "sealed", "", 100.0, 1.0, 1.0))
    hold = RevocationHold("r-1", "gone", now=100.0, lease_until=100.0, give_up_at=10_000.0)
    one.revoke("alice", "tracker", "test", hold)
    claimed = _race(
        one,
        two,
        "upstream_revocations",
        lambda s: s.claim_revocations(["tracker"], f"replica-{id(s)}", 200.0, 300.0, 10),
    )
    assert sorted(len(taken) for taken in claimed) == [0, 1], claimed
    [[pending]] = [taken for taken in claimed if taken]
    assert (pending.id, pending.attempts) == ("r-1", 2)
