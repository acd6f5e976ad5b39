"""The durable fact store behaves the same on a real SQLite file and a real PostgreSQL schema."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from bastion.db import Database
from bastion.facts.model import Entity, FactError
from bastion.facts.store import SCHEMA_VERSION, FactStore, StoredFact, check_storable, fact_key

ALICE = Entity("User", "alice")
BOB = Entity("User", "bob")
ACME = Entity("Org", "acme")
ANVIL = Entity("Repo", "anvil")


@pytest.fixture
def store(database_url):
    s = FactStore.open(database_url)
    yield s
    s.close()


def facts_of(store: FactStore, pattern=None) -> set[tuple]:
    return {f.fact for f in store.get(pattern)}


def test_inserted_facts_survive_reopening_the_store(database_url):
    s = FactStore.open(database_url)
    s.apply([("has_role", ALICE, "admin", ACME), ("is_public", ANVIL)])
    s.close()
    s = FactStore.open(database_url)
    assert facts_of(s) == {("has_role", ALICE, "admin", ACME), ("is_public", ANVIL)}
    s.close()


def test_every_write_gets_the_next_sequence(store):
    assert store.head() == 0
    first = store.apply([("is_public", ANVIL)])
    second = store.apply(deletes=[("is_public", None)])
    version, third = store.put_policy("allow(_, _, _);")
    assert (first.seq, second.seq, third) == (1, 2, 3)
    assert version == 1
    assert store.head() == 3
    changes = store.changes_since(0)
    assert [c.seq for c in changes] == [1, 2, 3]
    assert changes[0].inserts == (StoredFact(("is_public", ANVIL)),)
    assert changes[1].deletes == (("is_public", None),)
    assert changes[2].kind == "policy" and changes[2].policy_version == 1
    assert [c.seq for c in store.changes_since(2)] == [3]


def test_a_change_let_go_of_holds_no_facts(store, monkeypatch):
    """`Change.let_go`: a replica lets go of a change it applied a part at a time."""
    from bastion import turns

    monkeypatch.setattr(turns, "CHUNK", 2)
    store.apply([StoredFact(("is_public", ANVIL)), StoredFact(("is_public", ACME))])
    (change,) = store.changes_since(0)
    assert len(change.inserts) == 2
    change.let_go(turns.Turns())
    assert change.inserts == () and change.seq == 1


def test_wildcard_delete_removes_only_matching_facts(store):
    store.apply(
        [
            ("has_role", ALICE, "admin", ACME),
            ("has_role", ALICE, "member", ANVIL),
            ("has_role", BOB, "admin", ACME),
        ]
    )
    result = store.apply(deletes=[("has_role", ALICE, None, None)])
    assert result.deleted == 2
    assert facts_of(store) == {("has_role", BOB, "admin", ACME)}


def test_a_write_that_changes_nothing_logs_nothing(store):
    written = store.apply([("has_role", ALICE, "admin", ACME)])
    nothing = store.apply(deletes=[("has_role", BOB, None, None)])
    # No entry in the change log (a 404 of the kill switch wrote one), and as current as any.
    assert (nothing.seq, nothing.deleted, nothing.inserted) == (written.seq, 0, 0)
    assert [c.seq for c in store.changes_since(0)] == [written.seq]
    assert store.apply(deletes=[("has_role", ALICE, None, None)]).seq == written.seq + 1


def test_values_of_different_types_are_different_facts(store):
    store.apply([("level", ALICE, 1), ("level", ALICE, True), ("level", ALICE, "1")])
    assert len(store.get()) == 3
    store.apply(deletes=[("level", ALICE, True)])
    assert facts_of(store) == {("level", ALICE, 1), ("level", ALICE, "1")}


def test_patterns_beyond_the_indexed_columns_still_match_exactly(store):
    wide = ("wide", ALICE, "a", "b", "c", "d", "e")
    other = ("wide", ALICE, "a", "b", "c", "d", "f")
    store.apply([wide, other])
    assert facts_of(store, ("wide", None, None, None, None, None, "e")) == {wide}
    assert store.apply(deletes=[("wide", None, None, None, None, None, "f")]).deleted == 1
    assert facts_of(store) == {wide}


def test_a_batch_that_fails_changes_nothing(store):
    store.apply([("is_public", ANVIL)])
    with pytest.raises(FactError):
        store.apply(
            [("has_role", ALICE, "admin", ACME), ("bad", 1.5)], deletes=[("is_public", None)]
        )
    assert facts_of(store) == {("is_public", ANVIL)}
    assert store.head() == 1


def test_a_batch_interrupted_inside_the_transaction_leaves_nothing(store):
    class Boom(Exception):
        pass

    original = store._upsert

    def upsert_then_fail(rows):
        original(rows)
        raise Boom

    store._upsert = upsert_then_fail
    with pytest.raises(Boom):
        store.apply([("is_public", ANVIL)], deletes=[])
    store._upsert = original
    assert store.get() == [] and store.head() == 0 and store.changes_since(0) == []


def test_inserting_again_replaces_the_expiry(store):
    later = datetime.now(UTC) + timedelta(hours=1)
    store.apply([StoredFact(("is_public", ANVIL), later.timestamp())])
    assert store.get()[0].expires_at == pytest.approx(later.timestamp())
    store.apply([("is_public", ANVIL)])
    assert store.get()[0].expires_at is None
    assert len(store.get()) == 1


def test_expired_facts_are_not_returned(store):
    store.apply(
        [StoredFact(("is_public", ANVIL), time.time() - 1), StoredFact(("is_public", ACME), None)]
    )
    assert facts_of(store) == {("is_public", ACME)}
    assert len(store.get(include_expired=True)) == 2
    _, live, _ = store.snapshot()
    assert {f.fact for f in live} == {("is_public", ACME)}


def test_pages_cover_every_fact_once(store):
    store.apply([("is_public", Entity("Repo", f"r{i}")) for i in range(25)])
    seen, after = [], ""
    while page := store.get(("is_public", None), after=after, limit=10):
        seen += [f.fact for f in page]
        after = fact_key(page[-1].fact)
    assert len(seen) == 25 and len(set(seen)) == 25


def test_policy_versions_keep_who_and_when_and_roll_back(store):
    store.put_policy('allow(_, "read", _);', actor="key:ops", source="a.polar")
    store.put_policy('allow(_, "write", _);', actor="key:dev")
    assert store.policy().text == 'allow(_, "write", _);'
    version, _ = store.rollback_policy(1, actor="key:ops")
    assert version == 3
    assert store.policy().text == 'allow(_, "read", _);'
    versions = store.policy_versions()
    assert [v.created_by for v in versions] == ["key:ops", "key:dev", "key:ops"]
    assert versions[2].note == "rollback to version 1"
    with pytest.raises(LookupError):
        store.rollback_policy(42)


def test_snapshot_matches_the_head_sequence(store):
    store.apply([("is_public", ANVIL)])
    store.put_policy("allow(_, _, _);")
    seq, facts, policy = store.snapshot()
    assert seq == 2 and [f.fact for f in facts] == [("is_public", ANVIL)]
    assert policy.version == 1


def test_two_stores_starting_at_once_migrate_once(database_url):
    errors = []

    def start():
        try:
            FactStore(Database(database_url)).close()
        except Exception as e:  # pragma: no cover - the failure this test looks for
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    db = Database(database_url)
    # Each version recorded once: none applied twice.
    rows = db.execute("SELECT COUNT(*) FROM schema_migrations WHERE component = 'facts'")
    assert rows == [(SCHEMA_VERSION,)]
    db.close()


def test_concurrent_writers_get_distinct_gapless_sequences(database_url):
    stores = [FactStore.open(database_url) for _ in range(3)]
    seqs: list[int] = []
    lock = threading.Lock()

    def write(s: FactStore, n: int):
        for i in range(10):
            r = s.apply([("is_public", Entity("Repo", f"{n}-{i}"))])
            with lock:
                seqs.append(r.seq)

    threads = [threading.Thread(target=write, args=(s, n)) for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seqs) == list(range(1, 31))
    assert stores[0].count() == 30
    for s in stores:
        s.close()


def test_a_large_batch_with_repeats_is_stored_once_each_with_the_last_expiry(store):
    repos = [("is_public", Entity("Repo", f"r{i}")) for i in range(1500)]
    batch = [StoredFact(f) for f in repos] + [StoredFact(repos[0], 4102444800.0)]
    # Three hundred more given twice, the first copy with an expiry and the second without, or
    # the other way round: the copy given last is the one stored, as row by row.
    last = {}
    for i in range(1, 301):
        first, then = (4102444800.0 + i, None) if i % 2 else (None, 4102444800.0 + i)
        batch[i] = StoredFact(repos[i], first)
        batch.append(StoredFact(repos[i], then))
        last[repos[i]] = then
    store.apply(batch)
    assert store.count() == 1500
    assert store.get(repos[0])[0].expires_at == 4102444800.0
    stored = {f.fact: f.expires_at for f in store.get()}
    assert {fact: stored[fact] for fact in last} == last
    store.apply([StoredFact(f, 4102444800.0) for f in repos])
    assert {f.expires_at for f in store.get()} == {4102444800.0}
    assert store.count() == 1500


def test_a_large_batch_leaves_nothing_behind_for_the_next(store):
    """A large batch goes through a scratch table (`FactStore._upsert`): what one left there
    would come back with the next."""
    first = [("is_public", Entity("Repo", f"r{i}")) for i in range(600)]
    second = [("is_public", Entity("Repo", f"s{i}")) for i in range(600)]
    store.apply(first)
    store.apply([], deletes=[("is_public", None)])
    store.apply(second)
    assert facts_of(store) == set(second)


def test_a_failed_large_batch_leaves_nothing_and_the_next_one_works(store):
    repos = [("is_public", Entity("Repo", f"r{i}")) for i in range(800)]

    def fail_after_upsert(*a, **k):
        raise RuntimeError("stop")

    original = store._log
    store._log = fail_after_upsert
    with pytest.raises(RuntimeError):
        store.apply(repos)
    store._log = original
    assert store.count() == 0
    store.apply(repos)
    assert store.count() == 800


def test_a_change_written_here_is_handed_over_as_the_log_holds_it(store):
    """A change of facts written through a store with `FactStore.handed` is put there, by its
    sequence, with its entry in the log; `changes_since` takes it instead of decoding that entry
    only where the log holds the same entry (text, time, writer, kind) at that sequence."""
    import dataclasses

    handed: dict = {}
    store.handed = handed
    inserts = [
        StoredFact(("has_role", ALICE, "admin", ACME), 4102444800),  # an int: a float as read
        StoredFact(("flag", True, False, 0, -7, "", 'é"\\\u2028')),
        StoredFact(("is_public", ANVIL)),
    ]
    result = store.apply(inserts, deletes=[("has_role", BOB, None, None)], actor="someone")
    ((seq, (text, change)),) = handed.items()
    (read,) = store.changes_since(0)
    assert seq == change.seq == read.seq == result.seq
    assert (change.at, change.actor, change.kind) == (read.at, read.actor, read.kind)
    assert (change.actor, change.kind) == ("someone", "facts")
    assert change.inserts == read.inserts and change.deletes == read.deletes
    kinds = [[type(v) for v in (*f.fact, f.expires_at)] for f in change.inserts]
    assert kinds == [[type(v) for v in (*f.fact, f.expires_at)] for f in read.inserts]
    assert store.changes_since(0, handed={seq: (text, change)})[0] is change
    for other in (
        (text, dataclasses.replace(change, at=change.at + 1)),
        (text, dataclasses.replace(change, actor="another")),
        (text.replace("alice", "alicf"), change),
    ):
        (taken,) = store.changes_since(0, handed={seq: other})
        assert taken is not other[1] and taken == read
    # A policy change is not handed over.
    store.put_policy("actor User {}")
    assert list(handed) == [seq]


def test_a_write_that_does_not_commit_is_not_handed_over(store, monkeypatch):
    """Its sequence is the next write's: taken, it would stand for that one."""
    handed: dict = {}
    store.handed = handed
    commit = store.db._commit

    def commit_fails():
        store.db._conn.execute("ROLLBACK")
        raise RuntimeError("the commit failed")

    monkeypatch.setattr(store.db, "_commit", commit_fails)
    with pytest.raises(RuntimeError):
        store.apply([("is_public", ANVIL)])
    monkeypatch.setattr(store.db, "_commit", commit)
    assert handed == {} and store.head() == 0
    # Inside a transaction that then rolls back, it is handed over, and not taken: the log's
    # entry at its sequence is the next write's.
    with pytest.raises(RuntimeError), store.db.transaction():
        store.apply([("is_public", ANVIL)])
        raise RuntimeError("stop")
    assert store.head() == 0 and list(handed) == [1]
    stale = handed[1][1]
    store.handed = None
    store.apply([("has_role", ALICE, "admin", ACME)])
    (read,) = store.changes_since(0, handed=handed)
    assert read is not stale
    assert read.inserts == (StoredFact(("has_role", ALICE, "admin", ACME)),)


def test_a_writes_rows_and_facts_are_let_go_of_in_turns(store, monkeypatch):
    """Freed whole as `FactStore.apply` returned, the rows of 200,000 facts held the GIL for
    about 40 ms beside the event loop: they are let go of a part at a time (`Turns.empty`)."""
    from bastion import turns

    emptied: list[tuple] = []
    empty = turns.Turns.empty

    def watched(self, items):
        emptied.append((type(items[0]).__name__ if items else None, len(items)))
        empty(self, items)
        assert items == []

    monkeypatch.setattr(turns.Turns, "empty", watched)
    store.apply([("is_public", Entity("Repo", f"r{i}")) for i in range(1500)])
    assert emptied == [("tuple", 1500), ("StoredFact", 1500)]
    assert store.count() == 1500


@pytest.mark.parametrize("where", ["temp", "main"])
def test_a_write_refused_for_want_of_room_says_so_and_changes_nothing(sqlite_url, where):
    """SQLite's ``database or disk is full``, in the file or in the temporary space a large batch
    is sorted in, rolls the transaction back itself: the store says the storage is full (not
    that there was no transaction to roll back), nothing is written, and with room again the
    same write goes in."""
    from bastion.db import DatabaseUnavailable

    store = FactStore.open(sqlite_url)
    try:
        store.apply([("is_public", ANVIL)])
        store.db.execute("CREATE TEMP TABLE room (x)")  # the temporary schema, made now
        pages = store.db.execute(f"PRAGMA {where}.page_count")[0][0]
        store.db.execute(f"PRAGMA {where}.max_page_count = {pages + 2}")
        repos = [("is_public", Entity("Repo", f"r{i}")) for i in range(3000)]
        with pytest.raises(DatabaseUnavailable, match="storage is full .*rolled back"):
            store.apply(repos)
        assert store.head() == 1 and facts_of(store) == {("is_public", ANVIL)}
        assert not store.db._conn.in_transaction
        store.db.execute(f"PRAGMA {where}.max_page_count = 1073741823")
        store.apply(repos)
        assert store.head() == 2 and store.count() == 3001
    finally:
        store.close()


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), True, "tomorrow"])
def test_an_expiry_must_be_a_finite_time(bad):
    with pytest.raises(FactError):
        StoredFact.from_json({"predicate": "is_public", "args": [], "expires_at": bad})


def test_a_stored_fact_with_a_misspelt_expiry_is_refused_not_kept_for_ever():
    with pytest.raises(FactError, match="unknown key 'expires'"):
        StoredFact.from_json({"predicate": "is_public", "args": [], "expires": 1.0})


def test_the_change_log_reads_back_what_was_written(store):
    later = 4102444800.5
    quoted = Entity("Repo", 'a "quoted" \\ name')
    store.apply(
        [StoredFact(("is_public", quoted), later), ("level", ALICE, 3, True, "x")],
        deletes=[("has_role", None, "admin", ACME)],
    )
    (change,) = store.changes_since(0)
    assert set(change.inserts) == {
        StoredFact(("is_public", quoted), later),
        StoredFact(("level", ALICE, 3, True, "x")),
    }
    assert change.deletes == (("has_role", None, "admin", ACME),)


def test_pruning_the_change_log_keeps_the_head_and_sequences_go_on(store):
    for i in range(5):
        store.apply([("is_public", Entity("Repo", f"r{i}"))])
    assert store.prune_changes(2) == 3
    assert [c.seq for c in store.changes_since(0)] == [4, 5]
    assert store.prune_changes(0) == 1  # the latest entry always stays
    assert store.apply([("is_public", ANVIL)]).seq == 6
    assert store.count() == 6


def test_a_first_policy_is_stored_once_when_replicas_start_together(database_url):
    stores = [FactStore.open(database_url) for _ in range(3)]
    results: list = []
    threads = [
        threading.Thread(
            target=lambda s=s: results.append(s.put_policy("allow(_, _, _);", only_if_none=True))
        )
        for s in stores
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(None) == 2 and (1, 1) in results
    assert len(stores[0].policy_versions()) == 1
    for s in stores:
        s.close()


def test_a_fact_is_written_as_json_dumps_writes_it(store):
    """The store's key of a fact, its encoded arguments and its entry in the change log, made by
    encoders built once, are `json.dumps`'s text, byte for byte (the key is the fact's identity
    in the store, so another spelling of it would store the fact twice): with non-ASCII text,
    quotes, backslashes, control characters, and integers at their bounds."""
    import json

    from bastion.facts.model import arg_to_json
    from bastion.facts.store import _arg_key, _facts_payload, _rows
    from bastion.untrusted_json import MAX_INTEGER, MIN_INTEGER

    facts = [
        # (A NUL is refused: test_a_nul_is_refused_by_every_writer_of_the_store...)
        ("has_role", Entity("User", 'a"l\\ice\u2028é'), "ad\tmin\x01\x1f", Entity("Org", "😀")),
        ("stars", Entity("Repo", "r"), MAX_INTEGER),
        ("stars", Entity("Repo", "r"), MIN_INTEGER),
        ("flag", True, False, 0, "", "\u00e9t\u00e9"),
        ("\u00e9vent", Entity("T", "x")),
    ]
    rows = _rows([StoredFact(f) for f in facts])
    for fact, row in zip(facts, rows, strict=True):
        assert row[0] == fact_key(fact) == json.dumps([fact[0], *map(_arg_key, fact[1:])])
        assert row[7] == json.dumps([arg_to_json(a) for a in fact[1:]])
    assert json.loads(_facts_payload(rows, [])) == {
        "insert": [{"predicate": f[0], "args": [arg_to_json(a) for a in f[1:]]} for f in facts],
        "delete": [],
    }
    assert _facts_payload(rows[:1], []).startswith('{"insert":[{"predicate":"has_role","args":')
    assert _facts_payload(rows[4:], []).startswith('{"insert":[{"predicate":"\\u00e9vent",')


def test_a_nul_is_refused_by_every_writer_of_the_store_and_nothing_is_written(store):
    """PostgreSQL stores no NUL in text (SQLite does): the API refuses it before
    (tests/security/test_nul.py); the store refuses it for every other writer, the CLI and the
    library included, alike on both databases."""
    head = store.head()
    for fact in [
        ("has_role", Entity("User", "sam\x00"), "reader", Entity("Repo", "anvil")),
        ("has_role", Entity("User", "sam"), "read\x00er", Entity("Repo", "anvil")),
    ]:
        with pytest.raises(FactError, match=r"U\+0000 \(NUL\)"):
            store.apply([("has_role", Entity("User", "ok"), "reader", Entity("Repo", "a")), fact])
    assert store.head() == head and store.get() == []
    # The text "\\u0000" (a backslash, then u0000) is no NUL.
    store.apply([("has_role", Entity("User", "\\u0000"), "reader", Entity("Repo", "anvil"))])
    assert store.get()[0].fact[1].id == "\\u0000"


def test_half_a_surrogate_pair_is_refused_by_every_writer_and_nothing_is_written(store):
    """Half of a UTF-16 surrogate pair is not Unicode: neither database writes it as UTF-8 (a
    sign-in whose claim held one was a 500 on both). The API refuses it before; the store
    refuses it for every other writer, with a message that shows it as its escape."""
    head = store.head()
    for fact in [
        ("has_role", Entity("User", "sam\ud800"), "reader", Entity("Repo", "anvil")),
        ("has_role", Entity("User", "sam"), "\udfff", Entity("Repo", "anvil")),
        ("has_role", Entity("User", "sam"), "reader", Entity("Re\udc00po", "anvil")),
    ]:
        with pytest.raises(FactError, match="half of a UTF-16 surrogate pair") as refused:
            store.apply([("has_role", Entity("User", "ok"), "reader", Entity("Repo", "a")), fact])
        str(refused.value).encode("utf-8")  # the message itself is text
        with pytest.raises(FactError):
            check_storable(fact)
    assert store.head() == head and store.get() == []
    # A whole pair is one character (an emoji), and the text "\\ud800" is no surrogate.
    for text in ["\N{GRINNING FACE}", "\\ud800"]:
        store.apply([("has_role", Entity("User", text), "reader", Entity("Repo", "anvil"))])
    assert {f.fact[1].id for f in store.get()} == {"\N{GRINNING FACE}", "\\ud800"}
