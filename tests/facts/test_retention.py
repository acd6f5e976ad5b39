"""Nothing in the fact store grows without bound: the rows of facts expired past a grace period
are deleted (`FactStore.purge_expired`), in batches, never one written again meanwhile with a
later expiry or none; the change log is pruned with the audit trail (`prune_changes_before`),
from its beginning only and never its latest entry. An old database is upgraded in place. On a
real SQLite file and a real PostgreSQL schema."""

from __future__ import annotations

import logging
import threading
import time

import psycopg
import pytest

from bastion.audit.retention import prune
from bastion.db import Database
from bastion.facts import snapshot
from bastion.facts.model import Entity
from bastion.facts.retention import purge_expired_forever
from bastion.facts.store import (
    _MIGRATIONS,
    SCHEMA_VERSION,
    FactStore,
    StoredFact,
    _rows,
    prune_changes_before,
)
from tests.outage_rounds import logged, through_a_cut
from tests.relays import Relay
from tests.waits import PATIENCE, eventually

ALICE = Entity("User", "alice")
BOB = Entity("User", "bob")
ANVIL = Entity("Repo", "anvil")
FORGE = Entity("Repo", "forge")
KILN = Entity("Repo", "kiln")
HOUR = 3600.0
DAY = 86_400.0


def reader(user: Entity, repo: Entity) -> tuple:
    return ("has_role", user, "reader", repo)


@pytest.fixture
def store(database_url):
    s = FactStore.open(database_url)
    yield s
    s.close()


def rows(store: FactStore) -> dict[tuple, float | None]:
    """Every row of the facts table, expired or not: fact -> expiry."""
    return {f.fact: f.expires_at for f in store.get(include_expired=True)}


# -- expired facts --------------------------------------------------------------------------------


def test_an_expired_fact_is_deleted_after_the_grace_and_nothing_else_is(store):
    now = time.time()
    long_expired = [
        StoredFact(reader(ALICE, Entity("Repo", f"r{i}")), now - 2 * HOUR) for i in range(7)
    ]
    store.apply(
        [
            *long_expired,
            StoredFact(reader(ALICE, ANVIL), now - 60),  # expired, but within the grace
            StoredFact(reader(ALICE, FORGE), now + HOUR),
            StoredFact(reader(BOB, ANVIL)),
        ]
    )
    head = store.head()
    # Three per transaction: three batches, the last one short.
    assert store.purge_expired(HOUR, batch=3) == 7
    assert rows(store) == {
        reader(ALICE, ANVIL): now - 60,
        reader(ALICE, FORGE): now + HOUR,
        reader(BOB, ANVIL): None,
    }
    # No reader saw the deleted facts: no change-log entry, the sequence stands.
    assert store.head() == head
    assert store.purge_expired(HOUR) == 0


def test_a_fact_written_again_after_its_row_went_is_kept_with_its_new_expiry_or_none(store):
    now = time.time()
    store.apply(
        [
            StoredFact(reader(ALICE, ANVIL), now - 2 * HOUR),
            StoredFact(reader(ALICE, FORGE), now - 2 * HOUR),
            StoredFact(reader(ALICE, KILN), now - 2 * HOUR),
        ]
    )
    # Written again before the purge: the row's expiry is replaced, and the row kept.
    store.apply([StoredFact(reader(ALICE, KILN))])
    assert store.purge_expired(HOUR) == 2
    store.apply([StoredFact(reader(ALICE, ANVIL), now + HOUR), StoredFact(reader(ALICE, FORGE))])
    assert store.purge_expired(HOUR) == 0
    assert rows(store) == {
        reader(ALICE, ANVIL): now + HOUR,
        reader(ALICE, FORGE): None,
        reader(ALICE, KILN): None,
    }
    # A replica following the log, and a snapshot of the store, hold the same live facts.
    live = {(f.fact, f.expires_at) for f in store.get()}
    replayed: dict[tuple, float | None] = {}
    for change in store.changes_since(0):
        for fact in change.inserts:
            replayed[fact.fact] = fact.expires_at
    assert {(f, at) for f, at in replayed.items() if at is None or at > time.time()} == live
    _, facts, _ = store.snapshot()
    assert {(f.fact, f.expires_at) for f in facts} == live


def _writer_waiting(database_url: str, writer: Database) -> bool:
    """Whether a connection other than ``writer``'s waits for a lock (PostgreSQL)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        return bool(
            conn.execute(
                "SELECT 1 FROM pg_locks WHERE NOT granted AND pid <> %s",
                (writer._conn.info.backend_pid,),
            ).fetchall()
        )


def test_a_fact_written_again_while_the_purge_waits_for_the_writers_lock_is_kept(
    database_url, store
):
    now = time.time()
    store.apply([StoredFact(reader(ALICE, ANVIL), now - 2 * HOUR)])
    store.apply([StoredFact(reader(BOB, ANVIL), now - 2 * HOUR)])
    writer = FactStore.open(database_url)
    purged: list[int] = []
    purge = threading.Thread(target=lambda: purged.append(store.purge_expired(HOUR)))
    begun: list[str] = []  # SQLite: the statements the purge's connection has begun to run
    if not database_url.startswith("postgresql"):
        store.db._conn.set_trace_callback(begun.append)
    try:
        with writer.db.transaction():
            # A writer holds the writers' lock, the facts rewritten, uncommitted: one with no
            # expiry, one with a later one.
            writer.apply(
                [StoredFact(reader(ALICE, ANVIL)), StoredFact(reader(BOB, ANVIL), now + HOUR)]
            )
            purge.start()
            if database_url.startswith("postgresql"):
                assert eventually(lambda: _writer_waiting(database_url, writer.db))
            else:
                # SQLite: the purge's BEGIN IMMEDIATE has begun, and waits for the write lock.
                assert eventually(lambda: "BEGIN IMMEDIATE" in begun)
            assert purge.is_alive()
        purge.join(PATIENCE)
    finally:
        writer.close()
        if not database_url.startswith("postgresql"):
            store.db._conn.set_trace_callback(None)
    assert purged == [0]
    assert rows(store) == {reader(ALICE, ANVIL): None, reader(BOB, ANVIL): now + HOUR}


def test_an_old_database_is_upgraded_in_place_and_its_expired_rows_then_purged(database_url):
    now = time.time()
    old = Database(database_url)
    # The facts tables as bastion made them before the expiry index (schema version 2), with
    # rows written by hand as that version wrote them.
    assert old.migrate("facts", _MIGRATIONS[:2]) == 2
    facts = [StoredFact(reader(ALICE, ANVIL), now - 2 * HOUR), StoredFact(reader(BOB, ANVIL))]
    old.executemany(
        "INSERT INTO facts (key, predicate, arity, a1, a2, a3, a4, args, expires_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        _rows(facts),
    )
    old.execute(
        "INSERT INTO changes (seq, at, actor, kind, payload) VALUES (1, ?, 'old', 'facts', ?)",
        (now, '{"insert":[],"delete":[]}'),
    )
    old.close()

    store = FactStore.open(database_url)
    try:
        versions = store.db.execute(
            "SELECT version FROM schema_migrations WHERE component = 'facts' ORDER BY version"
        )
        assert [v for (v,) in versions] == list(range(1, SCHEMA_VERSION + 1))
        if store.db.is_postgres:
            index = store.db.execute(
                "SELECT 1 FROM pg_indexes WHERE indexname = 'facts_expires_at'"
                " AND schemaname = current_schema()"
            )
        else:
            index = store.db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'facts_expires_at'"
            )
        assert index == [(1,)]
        # What the old version wrote reads as it did, and goes on from its sequence.
        assert rows(store) == {reader(ALICE, ANVIL): now - 2 * HOUR, reader(BOB, ANVIL): None}
        assert store.apply([reader(ALICE, FORGE)]).seq == 2
        assert store.purge_expired(HOUR) == 1
        assert {f.fact for f in store.get()} == {reader(BOB, ANVIL), reader(ALICE, FORGE)}
        # A snapshot a replica of the old version wrote still starts a replica of this one.
        origin = snapshot.SnapshotOrigin(store.identity(), 2, 2, store.change_at(2), None)
        assert snapshot.check_origin(store, origin) is None
    finally:
        store.close()


# -- the change log -------------------------------------------------------------------------------


def age(store: FactStore, seqs: list[int], seconds: float) -> None:
    """Make the change-log entries at ``seqs`` ``seconds`` older, as if written that long ago."""
    for seq in seqs:
        store.db.execute("UPDATE changes SET at = at - ? WHERE seq = ?", (seconds, seq))


def test_the_change_log_loses_only_its_beginning_before_the_cutoff_and_never_its_latest_entry(
    store,
):
    seqs = [store.apply([reader(ALICE, Entity("Repo", f"r{i}"))]).seq for i in range(7)]
    # 1-4 old; 5 new; 6 old again (its writer's clock behind the others'); 7 old, the latest.
    age(store, [1, 2, 3, 4, 6, 7], 100 * DAY)
    before = time.time() - 90 * DAY
    assert prune_changes_before(store.db, before, batch=2) == {"changes": 4}
    # Only the log's beginning went: no hole that a replica reading past it would not notice.
    assert [c.seq for c in store.changes_since(0)] == [5, 6, 7]
    age(store, [5], 100 * DAY)
    assert prune_changes_before(store.db, before, batch=2) == {"changes": 2}
    assert [c.seq for c in store.changes_since(0)] == [7] == seqs[-1:]
    assert prune_changes_before(store.db, before) == {}
    # Sequences go on from the latest.
    assert store.apply([reader(BOB, ANVIL)]).seq == 8


def test_a_store_behind_the_pruned_change_log_sees_the_gap(database_url, store):
    follower = FactStore.open(database_url)
    try:
        applied = store.apply([reader(ALICE, ANVIL)]).seq
        store.apply([reader(ALICE, FORGE)])
        store.apply([reader(ALICE, KILN)])
        age(store, [1, 2, 3], 100 * DAY)
        store.apply([reader(BOB, ANVIL)])
        # The server's audit retention prunes the log with the trail, and records it.
        pruned = prune(store.db, 90, actor="test")
        assert pruned.rows == {"changes": 3}
        # The next entry a follower at ``applied`` reads is not ``applied + 1``: it must reload.
        assert [c.seq for c in follower.changes_since(applied)] == [4]
        assert {f.fact for f in follower.get()} == {
            reader(ALICE, ANVIL),
            reader(ALICE, FORGE),
            reader(ALICE, KILN),
            reader(BOB, ANVIL),
        }
    finally:
        follower.close()


def test_a_database_outage_is_logged_once_by_the_hourly_purge_not_at_every_round(
    postgres_url, caplog
):
    """The server's purge of expired facts runs hourly; while the database is away each round
    fails, and that is said once (a warning at every round, before), then once that the round
    works again. Here the rounds are made quick (``interval``); the outage is the test's own: a
    relay to PostgreSQL it cuts."""
    caplog.set_level(logging.DEBUG, logger="bastion.facts")
    with Relay(("127.0.0.1", 5432)) as relay:
        store = FactStore.open(postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}"))

        said = logged(caplog, "bastion.facts", "facts")
        try:
            through_a_cut(relay, lambda: purge_expired_forever(store, HOUR, interval=0.01), said)
        finally:
            store.close()
    loud = said(logging.WARNING)
    assert len(loud) == 2 and "failed" in loud[0] and loud[1].endswith(" again"), loud
