"""Fact snapshots: a replica started from one decides exactly as one loaded from the store, and a
snapshot that does not fit the database (damaged, foreign, of another schema or history, ahead
of the log) or is not signed with the database's snapshot key (forged, of an earlier format,
of another deployment) is ignored. On a real SQLite file and a real PostgreSQL schema."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import secrets
import stat
import threading
import time
import weakref
from pathlib import Path

import pytest

from bastion import turns
from bastion.cli import main as cli
from bastion.db import Database
from bastion.facts import snapshot
from bastion.facts.model import Entity
from bastion.facts.store import SCHEMA_VERSION, FactStore, StoredFact
from bastion.policy.errors import PolicyError
from bastion.policy.limits import PolicyLimits
from bastion.server.replica import Replica
from tests.waits import PATIENCE, eventually, eventually_async

POLICY = """
actor User {}
resource Org {
  roles = ["member", "admin"];
  permissions = ["read", "manage"];
  "read" if "member";
  "manage" if "admin";
  "member" if "admin";
}
resource Repo {
  roles = ["reader", "maintainer"];
  permissions = ["read", "push", "archive"];
  relations = { parent: Org };
  "read" if "reader";
  "push" if "maintainer";
  "reader" if "maintainer";
  "reader" if "member" on "parent";
}
declare is_public(Repo, Boolean);
declare stars(Repo, Integer);
has_permission(_: User, "read", repo: Repo) if is_public(repo, true);
has_permission(user: User, "archive", repo: Repo) if
  has_role(user, "maintainer", repo) and stars(repo, n) and n > 100;
allow(actor, action, resource) if has_permission(actor, action, resource);
"""

USERS = [Entity("User", f"u{i}") for i in range(6)]
ORGS = [Entity("Org", "acme"), Entity("Org", "globex")]
REPOS = [Entity("Repo", f"r{i}") for i in range(6)]
ACTIONS = ["read", "push", "archive", "manage"]
# What no fact of the store grants: USERS[5] is no admin of acme.
GRANT = ("has_role", USERS[5], "admin", ORGS[0])
# The key of the snapshots made here without a store.
KEY = secrets.token_bytes(32)


def facts() -> list[StoredFact]:
    out = [StoredFact(("has_relation", REPOS[i], "parent", ORGS[i % 2])) for i in range(len(REPOS))]
    out += [
        StoredFact(("has_role", USERS[0], "admin", ORGS[0])),
        StoredFact(("has_role", USERS[1], "member", ORGS[1])),
        StoredFact(("has_role", USERS[2], "maintainer", REPOS[3])),
        StoredFact(("has_role", USERS[3], "reader", REPOS[4])),
        StoredFact(("is_public", REPOS[5], True)),
        StoredFact(("is_public", REPOS[1], False)),
        StoredFact(("stars", REPOS[3], 101)),
        StoredFact(("stars", REPOS[4], 1)),
        # Until the far future: kept, with its expiry. One already expired: not loaded.
        StoredFact(("has_role", USERS[4], "reader", REPOS[0]), time.time() + 10**6),
        StoredFact(("has_role", USERS[5], "reader", REPOS[2]), time.time() - 1),
        # A fact the policy has no use for: stored, not in the index, offered again later.
        StoredFact(("has_role", USERS[5], "guest", REPOS[2])),
        StoredFact(("suspended", USERS[3])),
    ]
    return out


def decisions(replica: Replica) -> dict[tuple, bool]:
    return {
        (u, a, r): replica.authz.authorize(u, a, r)
        for u in USERS
        for a in ACTIONS
        for r in [*REPOS, *ORGS]
    }


def state(replica: Replica) -> tuple:
    """Everything a replica decides from, to compare two replicas with."""
    held = set(replica.authz.facts)
    return (
        held,
        {f: replica.authz.facts.expiry(f) for f in held},
        sorted(map(repr, replica.unusable)),
        replica.policy_version,
        replica.applied,
        replica.suspensions.holds(USERS[3]),
        decisions(replica),
    )


async def started(database: str, path: str = "") -> Replica:
    replica = Replica(database, snapshot_path=path, snapshot_interval=3600)
    await replica.start()
    return replica


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def store(database_url):
    s = FactStore.open(database_url)
    s.put_policy(POLICY)
    s.apply(facts())
    yield s
    s.close()


@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / "facts.snapshot")


async def write_one(database: str, path: str) -> Replica:
    """A replica loaded from the store that has written its snapshot; returned stopped."""
    replica = await started(database)
    replica.snapshot_path = path
    assert await replica.write_snapshot() is not None
    await replica.stop()
    return replica


def test_a_snapshot_waits_for_a_change_in_hand_without_holding_the_event_loop(
    store, database_url, path
):
    """A change added on a worker thread holds the fact lock (`Replica.in_force`): a snapshot
    begun meanwhile awaits the change, not the lock, so the event loop runs on."""

    async def scenario():
        replica = await started(database_url)
        lock = replica.authz.facts._index.lock
        held, alive = threading.Event(), threading.Event()
        seen: list[bool] = []

        def change_in_hand() -> None:
            with lock:
                held.set()
                # A deadline, not a figure: the loop sets `alive` at once unless it is stuck.
                seen.append(alive.wait(PATIENCE))

        worker = threading.Thread(target=change_in_hand)
        replica._changing = changing = asyncio.get_running_loop().create_future()
        worker.start()
        assert await eventually_async(held.is_set, every=0.001), "the change never took the lock"
        replica.snapshot_path = path
        writing = asyncio.create_task(replica.write_snapshot())
        for _ in range(3):
            await asyncio.sleep(0)
        alive.set()
        await asyncio.to_thread(worker.join)
        replica._changing = None
        changing.set_result(None)
        await writing
        await replica.stop()
        return seen

    assert run(scenario()) == [True]


def test_a_replica_started_from_a_snapshot_decides_as_one_loaded_from_the_store(
    store, database_url, path
):
    async def scenario():
        from_store = await write_one(database_url, path)
        from_snapshot = await started(database_url, path)
        assert from_snapshot.snapshot_seq == store.head()
        assert state(from_snapshot) == state(from_store)
        assert any(decisions(from_snapshot).values())
        await from_snapshot.stop()

    run(scenario())
    # The facts may say who may do what: the file is its owner's only, as the database is.
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_replica_knows_the_agents_owners_whether_loaded_from_a_snapshot_or_the_store(
    store, database_url, path
):
    """The kill switch stops an agent acting as itself while its owner is suspended: every way
    a replica loads its facts gives its suspensions view the owners, whatever the policy uses."""
    nightly = Entity("Agent", "nightly")
    store.apply([StoredFact(("has_relation", nightly, "owner", USERS[3]))])

    async def scenario():
        from_store = await write_one(database_url, path)
        from_snapshot = await started(database_url, path)
        for replica in (from_store, from_snapshot):
            assert replica.suspensions.owners(nightly) == (USERS[3],)
            assert replica.suspensions.first((nightly,)) == USERS[3]  # USERS[3] is suspended
        await from_snapshot._resync()
        assert from_snapshot.suspensions.first((nightly,)) == USERS[3]
        await from_snapshot.stop()

    run(scenario())


def test_writes_after_the_snapshot_are_replayed_before_the_replica_is_ready(
    store, database_url, path
):
    async def scenario():
        await write_one(database_url, path)
        store.apply(
            [StoredFact(("has_role", USERS[5], "maintainer", REPOS[0]))],
            deletes=[("has_role", USERS[0], None, None), ("is_public", None, True)],
        )
        store.apply([StoredFact(("stars", REPOS[0], 500))])
        store.put_policy(POLICY.replace('"manage" if "admin";', ""))
        # A guest role on repositories: the snapshot's unusable fact is usable now.
        store.put_policy(
            POLICY.replace(
                'roles = ["reader", "maintainer"];', 'roles = ["reader", "maintainer", "guest"];'
            ).replace('"push" if "maintainer";', '"push" if "maintainer";\n  "read" if "guest";')
        )
        from_snapshot = await started(database_url, path)
        from_store = await started(database_url)
        assert from_snapshot.applied == store.head()
        assert state(from_snapshot) == state(from_store)
        assert from_snapshot.authz.authorize(USERS[5], "archive", REPOS[0])
        assert not from_snapshot.authz.authorize(USERS[0], "manage", ORGS[0])
        assert not from_snapshot.authz.authorize(USERS[0], "read", REPOS[5])
        assert from_snapshot.authz.authorize(USERS[5], "read", REPOS[2])
        assert [f.fact[0] for f in from_snapshot.unusable] == ["suspended"]
        await from_snapshot.stop()
        await from_store.stop()

    run(scenario())


def test_a_replica_writes_its_snapshot_when_it_stops_and_starts_from_it(store, database_url, path):
    async def scenario():
        first = await started(database_url, path)
        store.apply([StoredFact(("has_role", USERS[5], "admin", ORGS[1]))])
        await first.wait_for(store.head(), PATIENCE)
        await first.stop()
        assert snapshot.read(path, store.snapshot_key()).origin.seq == store.head()
        second = await started(database_url, path)
        assert second.snapshot_seq == store.head()
        assert second.authz.authorize(USERS[5], "manage", ORGS[1])
        await second.stop()

    run(scenario())


def test_a_snapshot_taken_while_the_policy_in_force_does_not_load_never_restores_the_one_before(
    store, database_url, path
):
    """A replica that cannot load the policy in force (stored by one with larger limits) decides
    nothing; the snapshot it writes meanwhile must not bring back the policy it held before: a
    replica started from it decides under the policy in force, or not at all."""
    small = PolicyLimits(policy_max_bytes=len(POLICY) + 100)
    # Maintainers no longer push; larger than ``small`` allows.
    revoking = POLICY.replace('"push" if "maintainer";', "") + "\n# " + "x" * 200 + "\n"

    async def scenario():
        held = Replica(database_url, snapshot_path=path, snapshot_interval=3600, limits=small)
        await held.start()
        assert held.authz.authorize(USERS[2], "push", REPOS[3])
        version, seq = store.put_policy(revoking)
        await held.wait_for(seq, PATIENCE)
        assert held.stale and held.policy_refused is not None
        await held.stop()  # writes its snapshot, at ``seq``
        assert snapshot.read(path, store.snapshot_key()).origin.seq == seq
        # Started with limits that load it: under the policy in force, not the one before.
        larger = await started(database_url, path)
        assert (larger.policy_version, larger.stale) == (version, False)
        assert not larger.authz.authorize(USERS[2], "push", REPOS[3])
        await larger.stop()
        # Started again as it was: it refuses to start, as it does from the store, rather than
        # decide under the policy before.
        for start_from in (path, ""):
            again = Replica(
                database_url, snapshot_path=start_from, snapshot_interval=3600, limits=small
            )
            with pytest.raises(PolicyError, match="policy_max_bytes"):
                await again.start()
            await again.stop()

    run(scenario())


def ignored(database_url: str, path: str, caplog, why: str) -> None:
    """The replica ignores the snapshot with a log line saying ``why``, and decides from the
    store's facts."""

    async def scenario():
        with caplog.at_level(logging.WARNING, logger="bastion.replica"):
            replica = await started(database_url, path)
        assert any(why in r.getMessage() and "not used" in r.getMessage() for r in caplog.records)
        reference = await started(database_url)
        assert state(replica) == state(reference)
        await replica.stop()
        await reference.stop()

    run(scenario())


def test_a_damaged_snapshot_is_ignored(store, database_url, path, caplog):
    run(write_one(database_url, path))
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0x40
    Path(path).write_bytes(bytes(data))
    ignored(database_url, path, caplog, "damaged")


def test_a_truncated_snapshot_is_ignored(store, database_url, path, caplog):
    run(write_one(database_url, path))
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) - 100])
    ignored(database_url, path, caplog, "damaged or truncated")


def test_a_snapshot_with_bytes_added_after_its_signature_is_ignored(
    store, database_url, path, caplog
):
    # Whatever follows the HMAC (a second signature, another predicate's facts) makes the last
    # 32 bytes something else: never read as more facts.
    run(write_one(database_url, path))
    data = Path(path).read_bytes()
    Path(path).write_bytes(data + data[-32:])
    ignored(database_url, path, caplog, "damaged or truncated")


@pytest.mark.parametrize("key", [None, "zz" * 32, "ab" * 16])
def test_a_snapshot_is_ignored_once_the_key_row_is_deleted_or_damaged(
    store, database_url, path, caplog, key
):
    """Deleted, a new key is made and the snapshots signed before are ignored (docs: how to
    throw them all away); damaged (not hex, too short), none is used and none is written, and
    the facts come from the database."""
    run(write_one(database_url, path))
    with store.db.transaction():
        if key is None:
            store.db.execute("DELETE FROM facts_snapshot_key")
        else:
            store.db.execute("UPDATE facts_snapshot_key SET secret = ?", (key,))
    why = "HMAC does not match" if key is None else "holds no key of 32 bytes"
    ignored(database_url, path, caplog, why)


def test_a_file_that_is_not_a_snapshot_is_ignored(store, database_url, path, caplog):
    Path(path).write_bytes(b"\x80\x04\x95not a snapshot, and never unpickled")
    ignored(database_url, path, caplog, "not a bastion fact snapshot")


def test_a_snapshot_of_another_database_is_ignored(store, database_url, path, caplog, tmp_path):
    other = FactStore.open(str(tmp_path / "other.db"))
    other.put_policy(POLICY)
    # Granting what this database does not: it must never be used here.
    other.apply([*facts(), StoredFact(("has_role", USERS[5], "admin", ORGS[0]))])
    snapshot.take(other, path)
    other.close()
    ignored(database_url, path, caplog, "another database")


def unsigned(store: FactStore, path: str, extra: list[StoredFact]) -> None:
    """A snapshot as whoever can write its file, and cannot read the database, makes one: the
    store's facts and ``extra`` under the header of one this database's replicas would take (its
    identity, sequence, change and policy are no secret: the header is plain text), laid out as
    the writer lays it out, ending in a plain SHA-256 of all that (format 1's digest)."""
    head = store.head()
    policy = store.policy()
    assert policy is not None
    origin = snapshot.SnapshotOrigin(
        store.identity(), SCHEMA_VERSION, head, store.change_at(head), policy.version
    )
    data = b"".join(snapshot._parts(origin, snapshot.from_facts([*facts(), *extra])))
    Path(path).write_bytes(data + hashlib.sha256(data).digest())


def test_a_forged_snapshot_is_ignored_and_its_grant_never_decided(
    store, database_url, path, caplog
):
    """A grant added to a snapshot and its digest computed again: the replica that starts from
    it must not believe it, but load the facts from the database, saying why."""
    run(write_one(database_url, path))
    unsigned(store, path, [StoredFact(GRANT)])

    async def scenario():
        with caplog.at_level(logging.WARNING, logger="bastion.replica"):
            replica = await started(database_url, path)
        assert not replica.authz.authorize(USERS[5], "manage", ORGS[0]), "the forgery decided"
        reference = await started(database_url)
        assert state(replica) == state(reference)
        await replica.stop()
        await reference.stop()

    run(scenario())
    assert any(
        "not used" in r.getMessage()
        and "not signed with this database's snapshot key" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


def test_a_snapshot_written_before_snapshots_were_signed_is_ignored_once(
    store, database_url, path, caplog, monkeypatch
):
    """A snapshot of format 1 (a plain SHA-256, written by a bastion before 2026-12-07) does not
    stop the upgraded replica: it is ignored with a log line, the facts loaded from the
    database, and the replica's own snapshot, signed, is used at its next start."""
    with monkeypatch.context() as m:
        m.setattr(snapshot, "FORMAT", 1)  # its header, byte for byte, as format 1 wrote it
        unsigned(store, path, [])
    assert b'"format":1' in Path(path).read_bytes()
    ignored(database_url, path, caplog, "written by a bastion before 2026-12-07")

    async def again():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bastion.replica"):
            replica = await started(database_url, path)
        assert replica.snapshot_seq == store.head()
        assert not any("fact snapshot" in r.getMessage() for r in caplog.records)
        await replica.stop()

    run(again())


def test_a_snapshot_signed_with_another_key_is_ignored(store, database_url, path, caplog):
    """A snapshot of this very database (its identity, sequence and change), granting what it
    does not, signed with a key not its own (another deployment's, one made up) is never used."""
    head, policy = store.head(), store.policy()
    assert policy is not None
    origin = snapshot.SnapshotOrigin(
        store.identity(), SCHEMA_VERSION, head, store.change_at(head), policy.version
    )
    groups = snapshot.from_facts([*facts(), StoredFact(GRANT)])
    snapshot.write(path, origin, groups, secrets.token_bytes(32))
    ignored(database_url, path, caplog, "its HMAC does not match this database's snapshot key")


def test_every_replica_of_a_database_signs_with_its_key_and_no_snapshot_holds_it(
    store, database_url, path, tmp_path
):
    run(write_one(database_url, path))
    replica_store = FactStore.open(database_url)  # as another replica opens it
    elsewhere = FactStore.open(str(tmp_path / "elsewhere.db"))
    try:
        key = replica_store.snapshot_key()
        assert len(key) == 32 and key == store.snapshot_key() != elsewhere.snapshot_key()
        data = Path(path).read_bytes()
        assert key not in data and key.hex().encode() not in data
        assert snapshot.read(path, key).origin.seq == store.head()
        with pytest.raises(snapshot.SnapshotRefused, match="HMAC does not match"):
            snapshot.read(path, elsewhere.snapshot_key())
        with pytest.raises(ValueError, match="32 bytes"):
            snapshot.read(path, b"")
    finally:
        replica_store.close()
        elsewhere.close()


def test_a_snapshot_of_another_schema_version_is_ignored(store, database_url, path, caplog):
    origin = snapshot.SnapshotOrigin(
        store.identity(), SCHEMA_VERSION + 1, store.head(), store.change_at(store.head()), 1
    )
    snapshot.write(path, origin, snapshot.from_facts(facts()), store.snapshot_key())
    ignored(database_url, path, caplog, "schema version")


def test_a_snapshot_ahead_of_the_database_is_ignored(store, database_url, path, caplog):
    store.apply([StoredFact(("has_role", USERS[5], "admin", ORGS[0]))])
    snapshot.take(store, path)
    # The database restored from a backup taken before that write.
    _restore(store, store.head() - 1, ("has_role", USERS[5], "admin", ORGS[0]))
    ignored(database_url, path, caplog, "ends at")


def test_a_snapshot_of_another_history_is_ignored(store, database_url, path, caplog):
    store.apply([StoredFact(("has_role", USERS[5], "admin", ORGS[0]))])
    snapshot.take(store, path)
    # Restored to before that write, then another write took its sequence number.
    _restore(store, store.head() - 1, ("has_role", USERS[5], "admin", ORGS[0]))
    store.apply([StoredFact(("has_role", USERS[5], "member", ORGS[1]))])
    ignored(database_url, path, caplog, "another one")


def test_a_snapshot_older_than_the_pruned_log_is_ignored(store, database_url, path, caplog):
    snapshot.take(store, path)
    store.apply([StoredFact(("has_role", USERS[5], "admin", ORGS[0]))])
    store.apply([StoredFact(("has_role", USERS[4], "admin", ORGS[1]))])
    store.prune_changes(1)
    ignored(database_url, path, caplog, "no longer holds")


def test_a_snapshot_of_the_empty_log_is_not_the_start_of_a_pruned_one(database_url, path, caplog):
    """Sequence 0 has no change to check the log against: a snapshot taken before the first
    write, kept until the log's start was pruned, must not be replayed as if the log after it
    were whole (its first entries, the policy and a grant, are gone)."""
    store = FactStore.open(database_url)
    try:
        snapshot.take(store, path)
        store.put_policy(POLICY)
        store.apply([*facts(), StoredFact(("has_role", USERS[5], "admin", ORGS[0]))])
        store.apply([StoredFact(("has_role", USERS[4], "member", ORGS[1]))])
        store.prune_changes(1)

        async def scenario():
            replica = await started(database_url, path)
            reference = await started(database_url)
            assert replica.authz.authorize(USERS[5], "manage", ORGS[0])
            assert state(replica) == state(reference)
            await replica.stop()
            await reference.stop()

        run(scenario())
    finally:
        store.close()


def _restore(store: FactStore, seq: int, fact: tuple) -> None:
    """What restoring a backup taken at ``seq`` does to the log and to ``fact``, written after."""
    db: Database = store.db
    with db.transaction():
        db.execute("DELETE FROM changes WHERE seq > ?", (seq,))
    store.apply(deletes=[fact])
    with db.transaction():
        db.execute("DELETE FROM changes WHERE seq > ?", (seq,))


def test_the_cli_writes_a_snapshot_replicas_start_from(store, database_url, path, capsys):
    assert cli(["facts", "snapshot", path, "--database", database_url]) == 0
    assert f"as of sequence {store.head()}" in capsys.readouterr().err

    async def scenario():
        from_snapshot = await started(database_url, path)
        from_store = await started(database_url)
        assert from_snapshot.snapshot_seq == store.head()
        assert state(from_snapshot) == state(from_store)
        await from_snapshot.stop()
        await from_store.stop()

    run(scenario())


def test_a_snapshot_round_trips_every_kind_of_value():
    weird = 'quote" back\\slash \x00 nul é \U0001f600 \ud800'
    groups = snapshot.from_facts(
        [
            StoredFact(("p", Entity("T", weird), weird, 0, -(2**63), 2**63 - 1, True, False, 1)),
            StoredFact(("p", Entity("T", ""), "", 1, 1, 1, 1, True, True), 12.5),
            StoredFact(("q",)),
        ]
    )
    origin = snapshot.SnapshotOrigin("id", SCHEMA_VERSION, 3, 1.5, None)
    back = snapshot.decode(snapshot.encode(origin, groups, KEY), KEY)
    assert back.origin == origin
    # Compared with each value's type: True == 1 in Python, but a boolean is not an integer.
    assert typed(back.groups) == typed(groups)


def test_a_snapshot_written_in_turns_holds_the_facts_given(tmp_path, monkeypatch):
    """The writer numbers values and writes columns a chunk at a time, pausing between turns so
    that the event loop gets the GIL: with chunks of three facts and a pause after each, every
    kind of value, booleans beside integers and expiries still read back as they were given,
    and the file written part by part is the one `encode` makes whole."""
    pauses: list[float] = []
    monkeypatch.setattr(turns, "CHUNK", 3)
    monkeypatch.setattr(turns, "TURN", 0.0)
    monkeypatch.setattr(turns.time, "sleep", pauses.append)
    facts = (
        [
            StoredFact(("p", Entity("T", f"e{i}"), i % 4 == 0, i, f"s{i % 5}"), 100.0 + i)
            if i % 3 == 0
            else StoredFact(("p", Entity("T", f"e{i % 7}"), i, i % 2 == 1, "\ud800"))
            for i in range(40)
        ]
        + [StoredFact(("q", Entity("U", str(i)))) for i in range(8)]
        + [StoredFact(("r",))]
    )
    groups = snapshot.from_facts(facts)
    origin = snapshot.SnapshotOrigin("id", SCHEMA_VERSION, 3, 1.5, None)
    path = str(tmp_path / "facts.snapshot")
    size = snapshot.write(path, origin, groups, KEY)
    assert pauses and set(pauses) == {turns.PAUSE}
    data = Path(path).read_bytes()
    assert data == snapshot.encode(origin, groups, KEY) and size == os.path.getsize(path)
    back = snapshot.read(path, KEY)
    assert back.origin == origin
    assert typed(back.groups) == typed(groups)
    assert sum(len(g.expiries) for g in back.groups) == 14


def typed(groups: list[snapshot.PredicateRows]) -> list[str]:
    return sorted(
        repr([(type(a).__name__, a) for a in (g.name, *v)]) + repr(g.expiries.get(v))
        for g in groups
        for v in g.rows
    )


def test_facts_added_in_bulk_are_indexed_as_facts_added_one_by_one():
    import random

    from bastion.facts.index import FactIndex, Many

    rng = random.Random(5)
    users = [Entity("User", f"u{i}") for i in range(30)]
    repos = [Entity("Repo", f"r{i}") for i in range(30)]
    rows = list(
        {
            (rng.choice(users), rng.choice(["reader", "admin"]), rng.choice(repos))
            for _ in range(400)
        }
    )
    # Some before the lookups exist, some after, some into a predicate that holds facts already.
    first, second = rows[:100], rows[100:]
    one, bulk = FactIndex(), FactIndex()
    for index in (one, bulk):
        for fact in first:
            index.add(("has_role", *fact))
        pf = index.predicate("has_role", 3)
        pf.mode("bfb")
        pf.mode("bbf", ((1, "reader"),))
        pf.mode("fbb", ((1, "admin"),))
    for fact in second:
        one.add(("has_role", *fact))
    until = time.time() + 1000
    assert bulk.add_rows("has_role", 3, second + first[:5], {second[0]: until}) == len(second)
    one.add(("has_role", *second[0]), until)

    def norm(modes: dict) -> dict:
        return {
            shape: {k: sorted(v, key=repr) if v.__class__ is Many else v for k, v in index.items()}
            for shape, index in modes.items()
        }

    assert bulk.count == one.count == len(rows)
    assert bulk.predicates["has_role", 3].all == one.predicates["has_role", 3].all
    assert norm(bulk.predicates["has_role", 3].modes) == norm(one.predicates["has_role", 3].modes)
    assert bulk.expiry_of(("has_role", *second[0])) == until
    assert sorted(bulk.matching(("has_role", users[0], None, None))) == sorted(
        one.matching(("has_role", users[0], None, None))
    )


def test_facts_added_in_bulk_to_an_empty_predicate_are_indexed_as_one_by_one():
    """The bulk path that fills the indexes in the rows' own order (every row new), and the
    one where the rows repeat some facts."""
    import random

    from bastion.facts.index import FactIndex, Many

    rng = random.Random(9)
    users = [Entity("User", f"u{i}") for i in range(20)]
    repos = [Entity("Repo", f"r{i}") for i in range(20)]
    rows = list(
        {
            (rng.choice(users), rng.choice(["reader", "admin"]), rng.choice(repos))
            for _ in range(300)
        }
    )
    for bulk_rows in (rows, rows + rows[:40]):
        one, bulk = FactIndex(), FactIndex()
        for index in (one, bulk):
            pf = index.predicate("has_role", 3)
            pf.mode("bfb")
            pf.mode("bbf", ((1, "reader"),))
        for fact in rows:
            one.add(("has_role", *fact))
        assert bulk.add_rows("has_role", 3, bulk_rows) == len(rows)
        one_pf, bulk_pf = one.predicates["has_role", 3], bulk.predicates["has_role", 3]
        assert bulk.count == one.count == len(rows)
        assert bulk_pf.all == one_pf.all
        for shape, index in one_pf.modes.items():
            assert set(index) == set(bulk_pf.modes[shape])
            for key, found in index.items():
                mine = bulk_pf.modes[shape][key]
                assert found.__class__ is mine.__class__
                if found.__class__ is Many:
                    # Each fact once under its key: repeated rows add nothing.
                    assert sorted(found, key=repr) == sorted(mine, key=repr)
                else:
                    assert found == mine


def test_a_fact_written_after_a_snapshot_load_about_its_entities_is_found_and_removed():
    """The snapshot's entities are not in the interning table: a later write naming them holds
    its own copies, and reads and deletes match by value."""
    from bastion.decide import Authorizer

    groups = snapshot.from_facts(
        [StoredFact(("has_role", Entity("User", "alice"), "member", Entity("Org", "acme")))]
    )
    origin = snapshot.SnapshotOrigin("id", SCHEMA_VERSION, 0, None, None)
    snap = snapshot.decode(snapshot.encode(origin, groups, KEY), KEY)
    authz = Authorizer(POLICY)
    for g in snap.groups:
        assert authz.facts.load_rows(g.name, g.arity, g.rows, g.expiries) == []
    assert authz.authorize(Entity("User", "alice"), "read", Entity("Org", "acme"))
    authz.facts.apply([("has_role", Entity("User", "alice"), "admin", Entity("Org", "acme"))], [])
    assert authz.authorize(Entity("User", "alice"), "manage", Entity("Org", "acme"))
    authz.facts.apply([], [("has_role", Entity("User", "alice"), None, Entity("Org", "acme"))])
    assert not authz.authorize(Entity("User", "alice"), "read", Entity("Org", "acme"))
    assert len(authz.facts) == 0


def letting_go() -> bool:
    """Whether a replaced `Authorizer` is being let go of (`bastion.server.replica._let_go`)."""
    return any(t.name == "bastion-let-go" for t in threading.enumerate())


def frozen(replica: Replica) -> bool:
    """Whether an entity of the facts held is in none of the collector's generations."""
    entity = next(iter(replica.authz.facts))[1]
    assert gc.is_tracked(entity)
    return gc.get_freeze_count() > 0 and not any(
        o is entity for generation in (0, 1, 2) for o in gc.get_objects(generation)
    )


def test_what_a_start_loads_is_out_of_the_collectors_sight_until_the_replica_lets_it_go(
    store, database_url, path
):
    """The start's facts are frozen (`gc.freeze`), so the collector does not walk them. A new
    policy leaves them so: the replaced one frees itself (`CompiledPolicy.close`), without the
    collector. A stop gives them back, so that an `Authorizer` caught in a cycle is still
    freed."""

    async def scenario():
        gc.unfreeze()
        run_once = await write_one(database_url, path)
        assert not frozen(run_once) and gc.get_freeze_count() == 0  # stopped: given back
        for snapshot_path in (path, ""):  # from the snapshot, and from the database
            replica = await started(database_url, snapshot_path)
            try:
                assert frozen(replica)
                # A new policy: the facts stay frozen, the replaced policy is freed.
                replaced = weakref.ref(replica.authz._active.compiled)
                assert replica.authz.authorize(USERS[3], "read", REPOS[4])
                version, _ = store.put_policy(POLICY.replace('"read" if "reader";', ""))
                await replica.wait_for(store.head(), PATIENCE)
                assert replica.policy_version == version
                assert not replica.authz.authorize(USERS[3], "read", REPOS[4])
                assert frozen(replica) and replaced() is None
                store.put_policy(POLICY)
                await replica.wait_for(store.head(), PATIENCE)
            finally:
                await replica.stop()
            assert gc.get_freeze_count() == 0

    run(scenario())


def large_change() -> tuple[list[StoredFact], list[tuple]]:
    """A change of every kind of fact: new and repeated ones, one given twice (the last wins),
    one given again without its expiry, one already expired, one the policy has no use for;
    and deletes, applied first."""
    far = time.time() + 10**6
    inserts = [
        StoredFact(("has_role", Entity("User", f"n{i}"), "reader", REPOS[i % 6])) for i in range(40)
    ]
    inserts += [
        StoredFact(("has_role", USERS[0], "admin", ORGS[0])),  # held already
        StoredFact(
            ("has_role", USERS[4], "reader", REPOS[0])
        ),  # held until `far`: no longer expires
        StoredFact(("stars", REPOS[0], 7), far),
        StoredFact(("stars", REPOS[0], 7), far + 5),
        StoredFact(("has_role", USERS[1], "maintainer", REPOS[5]), time.time() - 1),
        StoredFact(("has_role", USERS[2], "guest", REPOS[1])),
        StoredFact(("is_public", REPOS[2], True)),
    ]
    return inserts, [("stars", REPOS[3], None), ("has_role", USERS[3], None, None)]


async def after_a_large_change(store, database_url) -> tuple[Replica, list[StoredFact]]:
    """A replica started, then `large_change` written and applied by it."""
    following = await started(database_url)
    inserts, deletes = large_change()
    store.apply(inserts, deletes=deletes)
    await following.wait_for(store.head(), PATIENCE)
    return following, inserts


@pytest.mark.parametrize("handed", [False, True])
@pytest.mark.parametrize("aside", [False, True])
def test_a_large_change_is_applied_as_a_replica_loaded_after_it_holds_it(
    store, database_url, monkeypatch, aside, handed
):
    """A change of more facts than the event loop checks itself is checked, and its values
    shared with the index's, on a worker thread in turns, then added there to the facts in force
    or, at least half as large as what the replica holds (``aside``), put in force in a new
    `Authorizer` built there (the facts held, the change's deletes, its facts); what the replica
    then holds and decides is what a replica that loads every fact after the change holds and
    decides. Written through a store that hands its changes over to the replica (``handed``,
    as `bastion serve`'s writers do), the change is taken as written, not decoded again."""
    from bastion.decide import FactSet
    from bastion.facts import store as store_module
    from bastion.server import replica as replica_module

    monkeypatch.setattr(replica_module, "_CHECKED_ON_LOOP", 2)
    monkeypatch.setattr(replica_module, "_BUILT_ASIDE", 2 if aside else 10**9)
    in_turns, check = [], FactSet.check

    def counted_check(self, facts, turns_=None):
        in_turns.append(turns_ is not None)  # on a worker thread
        return check(self, facts, turns_)

    monkeypatch.setattr(FactSet, "check", counted_check)
    decoded, loads = [], store_module.loads_in_turns

    def counted_loads(text, turns_):
        decoded.append(text)
        return loads(text, turns_)

    monkeypatch.setattr(store_module, "loads_in_turns", counted_loads)

    async def scenario():
        following = await started(database_url)
        if handed:
            store.handed = following.handed
        before = following.authz
        inserts, deletes = large_change()
        decoded[:] = []
        store.apply(inserts, deletes=deletes)
        await following.wait_for(store.head(), PATIENCE)
        assert len(decoded) == (0 if handed else 1)
        # Let go of at the follower's next turn.
        assert await eventually_async(lambda: not following.handed, every=0.05)
        assert in_turns[-1:] == [True]  # the change went by the worker thread
        assert (following.authz is not before) == aside
        del before
        # Its facts out of the collector's sight, as those of a start (`_freeze`); checked
        # before another replica starts here (a start freezes everything).
        entity = next(f[1] for f in following.authz.facts if f[1] == Entity("User", "n5"))
        assert gc.is_tracked(entity) and not any(
            o is entity for generation in (0, 1, 2) for o in gc.get_objects(generation)
        )
        loaded = await started(database_url)
        assert state(following) == state(loaded)
        held = set(following.authz.facts)
        assert ("has_role", Entity("User", "n7"), "reader", REPOS[1]) in held
        assert following.authz.facts.expiry(("has_role", USERS[4], "reader", REPOS[0])) is None
        assert following.authz.facts.expiry(("stars", REPOS[0], 7)) == inserts[43].expires_at
        assert ("stars", REPOS[3], 101) not in held
        assert ("has_role", USERS[2], "guest", REPOS[1]) in {f.fact for f in following.unusable}
        # Entities the index held already are shared, not copied.
        new = next(f for f in held if f[0] == "has_role" and f[1] == Entity("User", "n5"))
        assert new[3] is next(f[1] for f in held if f[0] == "has_relation" and f[1] == REPOS[5])
        await loaded.stop()
        # A policy with a guest role: the facts held back are offered again, the same way.
        store.put_policy(
            POLICY.replace(
                'roles = ["reader", "maintainer"];', 'roles = ["reader", "maintainer", "guest"];'
            ).replace('"push" if "maintainer";', '"push" if "maintainer";\n  "read" if "guest";')
        )
        in_turns[:] = []
        await following.wait_for(store.head(), PATIENCE)
        assert in_turns == [True]  # the facts held back, checked again on the worker thread
        assert ("has_role", USERS[2], "guest", REPOS[1]) in set(following.authz.facts)
        assert following.authz.authorize(USERS[2], "read", REPOS[1])
        assert [f.fact[0] for f in following.unusable] == ["suspended"]
        await following.stop()

    run(scenario())


def test_a_reload_leaves_the_facts_out_of_the_collectors_sight_and_frees_what_it_replaced(
    store, database_url
):
    """A reload (`_resync`) freezes what it loaded, as a start does, and the `Authorizer` it
    replaced is emptied on a worker thread a part at a time and freed by reference counting,
    without the collector (which it would otherwise keep walking every fact for: 0.26–1.26 s
    per full pass at 300,000 facts). One that a decision still holds is left whole for it."""

    async def scenario():
        replica = await started(database_url)
        expected = decisions(replica)
        was = gc.isenabled()
        gc.disable()
        try:
            held = replica.authz  # as a decision under way holds it
            replaced = weakref.ref(held)
            await replica._resync()
            assert eventually(lambda: not letting_go())
            assert replica.authz is not held and frozen(replica)
            assert set(held.facts) == set(replica.authz.facts)  # left whole
            del held
            assert replaced() is None
            replaced = weakref.ref(replica.authz)
            index = weakref.ref(replica.authz._index)
            await replica._resync()
            assert eventually(lambda: replaced() is None and index() is None)
            assert frozen(replica) and decisions(replica) == expected
        finally:
            if was:
                gc.enable()
            await replica.stop()

    run(scenario())


def test_a_replica_reloaded_while_serving_holds_what_one_loaded_at_its_start_holds(
    store, database_url, monkeypatch
):
    """A replica behind a pruned log loads every fact again while it serves (`_resync`): read,
    checked and added on a worker thread in turns, a part at a time. It then holds and decides
    what a replica loaded at its start holds and decides: expiries, the facts the policy cannot
    use, the suspensions, every decision."""
    from bastion.facts.index import FactIndex
    from bastion.server import replica as replica_module

    made, parts = [], []

    class Counted(turns.Turns):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    monkeypatch.setattr(replica_module, "Turns", Counted)
    monkeypatch.setattr(turns, "CHUNK", 3)
    add_all = FactIndex.add_all

    def counted_add_all(self, inserts, shared=False):
        parts.append(len(inserts))
        return add_all(self, inserts, shared)

    monkeypatch.setattr(FactIndex, "add_all", counted_add_all)

    async def scenario():
        loaded = await started(database_url)
        reloaded = await started(database_url)
        assert made == []  # at the start nothing decides yet: not in turns
        before, parts[:] = reloaded.authz, []
        await reloaded._resync()
        assert reloaded.authz is not before
        # Added three at a time (`CHUNK` here), every fact the policy can use.
        assert len(made) == 1 and max(parts) == 3 and sum(parts) == len(set(loaded.authz.facts))
        assert state(reloaded) == state(loaded)
        assert reloaded.suspensions.holds(USERS[3])
        await loaded.stop()
        await reloaded.stop()

    run(scenario())


def test_decisions_go_on_from_the_facts_before_a_change_built_aside_until_it_is_in_force(
    store, database_url, monkeypatch
):
    """While a large change is built aside (`_built_aside`), the event loop goes on deciding,
    from the facts before the change, whole; then from the facts after it, whole."""
    import threading as threads

    from bastion.decide import Authorizer
    from bastion.server import replica as replica_module

    monkeypatch.setattr(replica_module, "_CHECKED_ON_LOOP", 2)
    monkeypatch.setattr(replica_module, "_BUILT_ASIDE", 2)
    building, resume = threads.Event(), threads.Event()
    copy = Authorizer.copy

    def held_copy(self, turns_):
        building.set()
        assert resume.wait(PATIENCE)
        return copy(self, turns_)

    monkeypatch.setattr(Authorizer, "copy", held_copy)

    async def scenario():
        following = await started(database_url)
        before, held = decisions(following), set(following.authz.facts)
        inserts, deletes = large_change()
        store.apply(inserts, deletes=deletes)
        assert await asyncio.to_thread(building.wait, PATIENCE)
        for _ in range(3):
            await asyncio.sleep(0.01)
            assert decisions(following) == before and set(following.authz.facts) == held
        resume.set()
        await following.wait_for(store.head(), PATIENCE)
        loaded = await started(database_url)
        assert decisions(following) == decisions(loaded) != before
        await loaded.stop()
        await following.stop()

    run(scenario())


def test_a_large_change_added_in_place_holds_the_decisions_that_wait_for_it_not_the_event_loop(
    store, database_url, monkeypatch
):
    """A large change added to the facts in force (not `_built_aside`) is added on a worker
    thread, a part at a time, under one hold of the fact lock: no decision sees part of it.
    Meanwhile the event loop goes on, and a decision that asks the replica first (`in_force`,
    `heard_not_applied`: the decision service, the gateway) waits for the change, then sees it
    whole."""
    from bastion.facts.index import FactIndex
    from bastion.server import replica as replica_module

    monkeypatch.setattr(replica_module, "_CHECKED_ON_LOOP", 2)
    monkeypatch.setattr(replica_module, "_BUILT_ASIDE", 10**9)
    monkeypatch.setattr(turns, "CHUNK", 8)  # the change's 46 facts in six parts
    armed, adding, resume = [], threading.Event(), threading.Event()
    parts: list[int] = []  # the thread each part of the change was added on
    add_all = FactIndex.add_all

    def held_add_all(self, inserts, shared=False):
        if armed:
            parts.append(threading.get_ident())
            if len(parts) == 2 and parts[0] != armed[0]:  # off the loop's thread
                adding.set()  # after the first part, holding the lock
                assert resume.wait(PATIENCE)
        return add_all(self, inserts, shared)

    monkeypatch.setattr(FactIndex, "add_all", held_add_all)

    async def scenario():
        following = await started(database_url)
        before = decisions(following)
        armed.append(threading.get_ident())  # the event loop's thread
        inserts, deletes = large_change()
        store.apply(inserts, deletes=deletes)
        assert await asyncio.to_thread(adding.wait, PATIENCE)
        # The loop runs this; part of the change is in, and no one can read the facts now.
        lock = following.authz._index.lock
        assert not await asyncio.to_thread(lock.acquire, timeout=0)
        gate, heard = following.in_force(), following.heard_not_applied(2.0)
        assert gate is not None and heard is not None
        waiting = [asyncio.ensure_future(gate), asyncio.ensure_future(heard)]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiting)
        resume.set()
        await waiting[0]
        after = decisions(following)  # the first decision after the gate: the change whole
        assert await waiting[1] is True
        assert following.in_force() is None
        await following.wait_for(store.head(), PATIENCE)
        assert len(parts) > 2 and armed[0] not in parts
        loaded = await started(database_url)
        assert after == decisions(loaded) != before
        assert state(following) == state(loaded)
        await loaded.stop()
        await following.stop()

    run(scenario())


def test_a_large_change_added_in_place_is_let_go_of_after_it_is_applied_not_while_decisions_wait(
    store, database_url, monkeypatch
):
    """What a change added in place leaves behind (its facts as checked, given to `fill`) is let
    go of once `applied` has moved, on a worker thread: not while decisions wait for the change
    (`in_force`), and not between its being in force and `applied` moving (a decision then
    would see the change under the sequence before it)."""
    from bastion.decide import FactSet
    from bastion.server import replica as replica_module

    monkeypatch.setattr(replica_module, "_CHECKED_ON_LOOP", 2)
    monkeypatch.setattr(replica_module, "_BUILT_ASIDE", 10**9)
    filled: list[list] = []  # the facts as checked that `fill` added
    emptied: list[tuple] = []  # when they were let go of: (put in force then, applied)
    replicas: list[Replica] = []
    fill, empty = FactSet.fill, turns.Turns.empty

    def watched_fill(self, checked, clock, deletes=()):
        filled.append(checked)
        return fill(self, checked, clock, deletes)

    def watched_empty(self, items):
        if any(items is each for each in filled):
            emptied.append((replicas[0]._changing is not None, replicas[0].applied))
        return empty(self, items)

    monkeypatch.setattr(FactSet, "fill", watched_fill)
    monkeypatch.setattr(turns.Turns, "empty", watched_empty)

    async def scenario():
        following = await started(database_url)
        replicas.append(following)
        inserts, deletes = large_change()
        result = store.apply(inserts, deletes=deletes)
        await following.wait_for(result.seq, PATIENCE)
        await eventually_async(lambda: emptied)  # until the follower has let go of it
        await following.stop()
        return result.seq

    seq = run(scenario())
    assert len(filled) == 1 and filled[0] == []
    assert emptied == [(False, seq)]


def test_a_large_change_checked_under_a_policy_replaced_meanwhile_is_checked_again(
    store, database_url, monkeypatch
):
    """The worker thread checks the facts under the policy in force when it began; if another is
    in force when they are to be added, they are checked again under it, on the loop."""
    from bastion.decide import FactSet
    from bastion.server import replica as replica_module

    monkeypatch.setattr(replica_module, "_CHECKED_ON_LOOP", 10)
    shared = FactSet.shared
    stricter = POLICY.replace("declare is_public(Repo, Boolean);\n", "").replace(
        'has_permission(_: User, "read", repo: Repo) if is_public(repo, true);\n', ""
    )
    assert "is_public" not in stricter

    def shared_then_replaced(self, checked, turns=None):
        out = shared(self, checked, turns)
        self._authz.load_policy(stricter)  # as if a new version came in meanwhile
        return out

    monkeypatch.setattr(FactSet, "shared", shared_then_replaced)

    async def scenario():
        following, _ = await after_a_large_change(store, database_url)
        # The policy in force now has no use for is_public facts: the new one is held back.
        assert ("is_public", REPOS[2], True) in {f.fact for f in following.unusable}
        assert ("is_public", REPOS[2], True) not in set(following.authz.facts)
        assert ("has_role", Entity("User", "n7"), "reader", REPOS[1]) in set(following.authz.facts)
        await following.stop()

    run(scenario())


def test_the_facts_copied_out_of_an_index_do_not_change_with_it():
    """`FactIndex.rows` copies, under the lock, what `CopiedRows.grouped` then reads without it
    (a snapshot's writer, an `Authorizer` built aside): writes after the copy change nothing in
    it."""
    from bastion.facts.index import FactIndex

    index = FactIndex()
    a, b = ("has_role", USERS[0], "reader", REPOS[0]), ("has_role", USERS[1], "reader", REPOS[1])
    index.add(a, 100.0)
    index.add(("stars", REPOS[0], 3))
    copied = index.rows()
    index.add(b, 200.0)
    index.remove(a)
    index.add(("stars", REPOS[0], 3), 50.0)
    index.add(("is_public", REPOS[0], True))
    assert sorted(copied.grouped(), key=repr) == [
        ("has_role", 3, {a[1:]}, {a[1:]: 100.0}),
        ("stars", 2, {(REPOS[0], 3)}, {}),
    ]


@pytest.mark.parametrize("shared, parts", [(False, 1), (True, 1), (True, 25)])
def test_facts_added_all_at_once_are_indexed_as_facts_added_one_by_one(shared, parts):
    """`FactIndex.add_all` (the path of every write) against `add` of each pair in order: facts
    new and held already, repeated within the batch, with and without expiries (the last given
    wins; one given again without any no longer expires), into predicates with lookups and
    without, with the entity counts kept; with the values shared beforehand (`shared`, from
    equal objects that are not the index's); and given in parts, one call each (as a replica's
    next `Authorizer` is filled, `FactSet.fill`)."""
    import random

    from bastion.facts.index import FactIndex, Many, items_of

    rng = random.Random(11)
    users = [Entity("User", f"u{i}") for i in range(12)]
    repos = [Entity("Repo", f"r{i}") for i in range(12)]

    def pair() -> tuple[tuple, float | None]:
        if rng.random() < 0.7:
            fact = (
                "has_role",
                rng.choice(users),
                rng.choice(["reader", "admin"]),
                rng.choice(repos),
            )
        else:
            fact = ("stars", rng.choice(repos), rng.randrange(3))
        return fact, rng.choice([None, None, 1000.0 + rng.randrange(4)])

    def copied(fact: tuple) -> tuple:
        return (fact[0], *(Entity(v.type, v.id) if isinstance(v, Entity) else v for v in fact[1:]))

    def norm(index: FactIndex) -> tuple:
        return (
            index.count,
            {key: set(pf.all) for key, pf in index.predicates.items()},
            {
                key: {
                    shape: {
                        k: sorted(v, key=repr) if v.__class__ is Many else v for k, v in m.items()
                    }
                    for shape, m in pf.modes.items()
                }
                for key, pf in index.predicates.items()
            },
            dict(index._expiry),
            sorted(index._expiry_times),
            {at: sorted(items_of(b), key=repr) for at, b in index._expiring.items()},
            index.next_expiry,
            index._entity_types,
        )

    for _ in range(6):
        one, bulk = FactIndex(), FactIndex()
        earlier = [pair() for _ in range(50)]
        for index in (one, bulk):
            for fact, at in earlier:
                index.add(fact, at)
            index.entities_of(frozenset({"User"}))  # counted from now on
            pf = index.predicate("has_role", 3)
            pf.mode("bfb")
            pf.mode("bbf", ((1, "reader"),))
        batch = [pair() for _ in range(100)]
        held = one.count
        for fact, at in batch:
            one.add(fact, at)
        given = [(copied(fact), at) for fact, at in batch]
        generation = bulk.generation
        if shared:
            given = bulk.shared(given)
        step = -(-len(given) // parts)
        added = sum(
            bulk.add_all(given[i : i + step], shared=shared) for i in range(0, len(given), step)
        )
        assert added == one.count - held > 0
        assert norm(bulk) == norm(one)
        assert bulk.generation != generation
        # Facts that expire, given again without an expiry, in a batch where nothing expires:
        # they no longer expire.
        again = [(fact, None) for fact, at in batch if at is not None][:10]
        assert again and bulk._expiry
        for fact, at in again:
            one.add(fact, at)
        given = [(copied(fact), at) for fact, at in again]
        bulk.add_all(bulk.shared(given) if shared else given, shared=shared)
        assert norm(bulk) == norm(one)


def test_values_shared_for_the_index_keep_their_kind_and_are_one_object_each():
    """`FactIndex.shared` (a large change's values, before it is added): an entity the index
    holds comes back as the index's object, equal entities and strings new to it as one object,
    and an integer and a boolean that compare equal (1 and True) each as it was given."""
    from bastion.facts.index import FactIndex

    index = FactIndex()
    index.add(("member", Entity("User", "alice"), "admin", 1))
    held = index.intern(Entity("User", "alice"))  # the index's own object
    given = [
        (("member", Entity("User", "alice"), "ad" + "min", True), None),
        (("member", Entity("User", "bob"), "ad" + "min", 1), 5.0),
        (("member", Entity("User", "bob"), "reader", False), None),
        (("member", Entity("User", "bob"), "reader", 0), None),
    ]
    out = index.shared(given)
    assert out == given
    assert [[v.__class__ for v in fact] for fact, _ in out] == [
        [v.__class__ for v in fact] for fact, _ in given
    ]
    assert [at for _, at in out] == [None, 5.0, None, None]
    assert out[0][0][1] is held
    assert out[1][0][1] is out[2][0][1] is out[3][0][1]
    assert out[0][0][2] is out[1][0][2] is index.intern("admin")
    assert out[2][0][2] is out[3][0][2]
