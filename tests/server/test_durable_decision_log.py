"""The decision service's decisions kept in the database (``[server] decision_log =
"database"``): read back, and explained, by any process on the same database, and after a
restart; by the key that asked (or an admin key) only; pruned with the audit trail."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator

import httpx
import pytest

from bastion.audit.retention import DAY, prune
from bastion.db import Database, is_postgres
from bastion.facts.store import FactStore
from bastion.server.api.decisions import DecisionLog, DecisionRecord
from bastion.server.config import ConfigError, ServerConfig
from tests.waits import eventually

from .conftest import entity, role

DURABLE = {"BASTION_DECISION_LOG": "database"}
READ_ANVIL = {
    "actor": entity("User", "alice"),
    "action": "read",
    "resource": entity("Repo", "anvil"),
    "context": {"ip": "10.0.0.7"},
}


def _key(admin: httpx.Client, name: str, scopes: tuple[str, ...] = ("decide",)) -> dict:
    created = admin.post("/v1/keys", json={"name": name, "scopes": list(scopes)})
    created.raise_for_status()
    return {"authorization": f"Bearer {created.json()['key']}"}


def _stored(url: str) -> int:
    """The rows of the decision log's table (0 where it was never made)."""
    db = Database(url)
    try:
        if not db.execute("SELECT 1 FROM schema_migrations WHERE component = 'decision_log'"):
            return 0
        return db.execute("SELECT COUNT(*) FROM decision_log")[0][0]
    finally:
        db.close()


def test_a_decision_is_read_and_explained_by_another_process_and_after_a_restart(
    database_url, serve
):
    a, b = serve(database_url, **DURABLE), serve(database_url, **DURABLE)
    with a.client() as ca, b.client() as cb:
        # facts:read too: an explanation shows the facts its proofs rest on.
        readers = ("decide", "facts:read")
        app, other = _key(ca, "app", readers), _key(ca, "other", readers)
        seq = ca.post("/v1/facts", json={"facts": [role("alice", "reader", "Repo", "anvil")]})
        body = {**READ_ANVIL, "at_least": seq.json()["sequence"]}
        made = ca.post("/v1/authorize", json=body, headers=app)
        assert made.status_code == 200 and made.json()["allowed"] is True
        decision_id = made.json()["decision_id"]
        asked_here = ca.get(f"/v1/decisions/{decision_id}", headers=app).json()

        assert eventually(
            lambda: cb.get(f"/v1/decisions/{decision_id}", headers=app).status_code == 200
        )
        # The same record, context and all, from the process that did not make it.
        assert cb.get(f"/v1/decisions/{decision_id}", headers=app).json() == asked_here
        assert asked_here["request"]["context"] == {"ip": "10.0.0.7"}
        explained = cb.get(f"/v1/decisions/{decision_id}/explanation", headers=app)
        assert explained.status_code == 200, explained.text
        assert explained.json()["explanation"]["allowed"] is True
        assert explained.json()["exact"] is True
        assert cb.get(f"/v1/decisions/{decision_id}").status_code == 200  # an admin key

        # Another key is told what it is told of an id no record holds, word for word.
        prefix = decision_id.rpartition("-")[0]
        unknown = f"{prefix}-999999"
        for path in ("", "/explanation"):
            theirs = cb.get(f"/v1/decisions/{decision_id}{path}", headers=other)
            none = cb.get(f"/v1/decisions/{unknown}{path}", headers=other)
            assert theirs.status_code == none.status_code == 404
            assert theirs.json()["detail"].replace(decision_id, "ID") == none.json()[
                "detail"
            ].replace(unknown, "ID")
    a.stop()
    b.stop()
    c = serve(database_url, **DURABLE)
    with c.client() as cc:
        again = cc.get(f"/v1/decisions/{decision_id}", headers=app)
        assert again.status_code == 200 and again.json() == asked_here
        assert cc.get(f"/v1/decisions/{decision_id}", headers=other).status_code == 404


def test_a_decision_is_in_the_database_once_its_process_stops_cleanly(sqlite_url, serve):
    a = serve(sqlite_url, **DURABLE, BASTION_DECISION_LOG_SIZE="0")
    with a.client() as ca:
        ids = [ca.post("/v1/authorize", json=READ_ANVIL).json()["decision_id"] for _ in range(3)]
    a.stop()
    assert _stored(sqlite_url) == 3
    b = serve(sqlite_url, **DURABLE)
    with b.client() as cb:
        assert [cb.get(f"/v1/decisions/{i}").status_code for i in ids] == [200] * 3


@contextlib.contextmanager
def _writes_held(url: str) -> Iterator[None]:
    """No row goes into ``decision_log`` meanwhile (its writer waits, then tries again), while
    reads go on: a process killed now has stored none of the decisions it answered since."""
    if is_postgres(url):
        import psycopg

        with psycopg.connect(url) as conn:  # a transaction, rolled back on leaving
            conn.execute("LOCK TABLE decision_log IN SHARE MODE")
            yield
            # The killed process's inserts still wait for the lock in its backend (each its
            # own transaction): ended first, so that none is stored once the lock goes.
            waiting = "SELECT pid FROM pg_stat_activity WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
            for (pid,) in conn.execute(waiting).fetchall():
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            assert eventually(lambda: not conn.execute(waiting).fetchall())
            conn.rollback()
        return
    conn = sqlite3.connect(url, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")  # the write lock; WAL readers go on
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def _singles(ca: httpx.Client, app: dict, allowed: dict, refused: dict) -> dict[str, bool]:
    """Twelve single checks, one in three allowed: {decision id: allowed}."""
    answered = {}
    for n in range(12):
        made = ca.post("/v1/authorize", json=refused if n % 3 else allowed, headers=app)
        assert made.status_code == 200, made.text
        answered[made.json()["decision_id"]] = made.json()["allowed"]
    assert set(answered.values()) == {True, False}
    return answered


def _ids(header: str) -> list[str]:
    """The ids of an AuthZEN batch's ``X-Bastion-Decision-Ids`` range (``first..last``)."""
    first, last = header.split("..")
    prefix, n = first.rsplit("-", 1)
    return [f"{prefix}-{i}" for i in range(int(n), int(last.rsplit("-", 1)[1]) + 1)]


def _batches(ca: httpx.Client, app: dict, allowed: dict, refused: dict) -> dict[str, bool]:
    """A `/v1/authorize/batch` of five checks and AuthZEN's evaluations of four, each batch
    journalled in one write: {decision id: allowed}."""
    batch = ca.post(
        "/v1/authorize/batch",
        json={"checks": [allowed, refused, allowed, refused, refused]},
        headers=app,
    )
    assert batch.status_code == 200, batch.text
    answered = {r["decision_id"]: r["allowed"] for r in batch.json()["results"]}
    evaluations = {
        "subject": {"type": "User", "id": "alice"},
        "resource": {"type": "Repo", "id": "anvil"},
        "evaluations": [{"action": {"name": "read"}}, {"action": {"name": "push"}}] * 2,
    }
    made = ca.post("/access/v1/evaluations", json=evaluations, headers=app)
    assert made.status_code == 200, made.text
    decided = [e["decision"] for e in made.json()["evaluations"]]
    answered |= dict(zip(_ids(made.headers["x-bastion-decision-ids"]), decided, strict=True))
    assert list(answered.values()) == [True, False, True, False, False, True, False, True, False]
    return answered


@pytest.mark.parametrize("ask", [_singles, _batches], ids=["single checks", "batches"])
def test_a_process_killed_outright_loses_no_decision_it_answered(
    database_url, serve, tmp_path, ask
):
    """Each decision is journalled before its answer leaves the process (a batch's together, in
    one write): one killed outright (SIGKILL, the OOM killer) before its records were written
    has them written by the next process on the database, each once, as answered."""
    a = serve(database_url, **DURABLE)
    with a.client() as ca:
        app = _key(ca, "app", ("decide", "authzen"))
        seq = ca.post("/v1/facts", json={"facts": [role("alice", "reader", "Repo", "anvil")]})
        allowed = {**READ_ANVIL, "at_least": seq.json()["sequence"]}
        refused = {**READ_ANVIL, "action": "push"}
        with _writes_held(database_url):
            answered = ask(ca, app, allowed, refused)
            a.kill()
    assert _stored(database_url) == 0  # killed before any was written

    b = serve(database_url, **DURABLE)
    with b.client() as cb:
        for decision_id, allowed_then in answered.items():
            found = cb.get(f"/v1/decisions/{decision_id}", headers=app)
            assert found.status_code == 200, (decision_id, found.text)
            assert found.json()["result"] is allowed_then
            if ask is _singles:
                assert found.json()["request"]["actor"] == READ_ANVIL["actor"]
                assert found.json()["request"]["context"] == READ_ANVIL["context"]
    assert _stored(database_url) == len(answered)
    assert f"recovered {len(answered)} /v1 decision records" in b.log.read_text()
    # The dead process's journal is gone: the live one's is all that is left.
    assert len(list((tmp_path / "decisions").glob("*.decision-log"))) == 1


def test_with_the_default_memory_log_nothing_is_written(sqlite_url, serve):
    a = serve(sqlite_url)
    with a.client() as ca:
        decision_id = ca.post("/v1/authorize", json=READ_ANVIL).json()["decision_id"]
        assert ca.get(f"/v1/decisions/{decision_id}").status_code == 200
    a.stop()
    assert _stored(sqlite_url) == 0
    b = serve(sqlite_url, **DURABLE)
    with b.client() as cb:
        assert cb.get(f"/v1/decisions/{decision_id}").status_code == 404


def test_decisions_older_than_the_retention_are_pruned_with_the_audit_trail(database_url):
    from bastion.audit.decision_log import DecisionStore

    db = Database(database_url)
    try:
        store = DecisionStore(db)
        log = DecisionLog(10, store)
        now = time.time()
        old = log.record("authorize", {"n": 1}, True, 1, 1, asked_by="k1", api="v1")
        new = log.record("authorize", {"n": 2}, False, 2, 1, asked_by="k1", api="v1")
        store.flush()
        db.execute("UPDATE decision_log SET at = ? WHERE id = ?", (now - 40 * DAY, old))
        pruned = prune(db, 30, now, actor="test")
        assert pruned.rows.get("decision_log") == 1
        assert store.get(old) is None
        assert DecisionRecord(*store.get(new)).request == {"n": 2}
    finally:
        db.close()


def test_a_table_an_older_bastion_made_is_brought_to_the_api_column_and_its_rows_name_none(
    database_url,
):
    """An upgrade: the rows stored before rows named their API are read with none (``api``
    null), and a process that may write brings the table to the new column first; one that only
    reads (``bastion audit show``, ``replay``) reads it as it is and leaves it so."""
    from bastion.audit.decision_log import _MIGRATIONS, COMPONENT, DecisionStore, stored, window

    db = Database(database_url)
    try:
        db.migrate(COMPONENT, _MIGRATIONS[:1])  # as the bastion before rows named their API
        db.execute(
            "INSERT INTO decision_log (id, kind, request, result, sequence, policy_version, at,"
            " explanation, refusal, asked_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                "0123-1",
                "authorize",
                json.dumps(READ_ANVIL),
                "true",
                1,
                1,
                time.time(),
                None,
                None,
                "k1",
            ),
        )
        read_only = Database(database_url, read_only=True)
        try:  # read as it is, and left as it is: an older replica still starts on it
            (row,) = list(window(read_only, 0.0, time.time() + 60))
            assert DecisionRecord(*row).api is None
            assert DecisionRecord(*stored(read_only, "0123-1")).asked_by == "k1"
        finally:
            read_only.close()
        assert db.migrate(COMPONENT, _MIGRATIONS[:1]) == 1  # no SchemaNewer

        store = DecisionStore(db)  # a server started on it, with decision_log = "database"
        old = DecisionRecord(*store.get("0123-1"))
        assert old.api is None and old.to_json()["api"] is None
        assert old.request == READ_ANVIL and old.asked_by == "k1"
        new = DecisionLog(10, store).record("authorize", READ_ANVIL, True, 2, 1, api="authzen")
        store.flush()
        assert DecisionRecord(*stored(db, new)).api == "authzen"
    finally:
        db.close()


@pytest.mark.parametrize("value", ["disk", "Database", " memory", "postgres"])
def test_a_decision_log_setting_that_is_not_memory_or_database_is_refused_at_load(value):
    env = {"BASTION_CONFIG": "/nonexistent", "BASTION_DECISION_LOG": value}
    with pytest.raises(ConfigError, match="BASTION_DECISION_LOG: decision_log must be"):
        ServerConfig.load(env=env)
    assert ServerConfig.load(env={**env, "BASTION_DECISION_LOG": "database"}).decision_log == (
        "database"
    )
    assert ServerConfig.load(env={"BASTION_CONFIG": "/nonexistent"}).decision_log == "memory"


def test_a_decision_is_never_explained_on_facts_older_than_it_was_decided_on(sqlite_url, serve):
    """Another process reading a stored record may not have applied the facts it was decided on
    yet: it explains once it has (or answers 503 past ``consistency_timeout``), never on the
    facts before, which read otherwise (before, an allowed decision could be explained as
    ``allowed: false`` there)."""
    from bastion.audit.decision_log import DecisionStore
    from bastion.facts.model import Entity

    a = serve(sqlite_url, **DURABLE)
    db = Database(sqlite_url)
    try:
        # Written where this process hears of it only at its next look at the change log: the
        # decision is recorded as another process, which had applied it, made it.
        grant = ("has_role", Entity("User", "alice"), "reader", Entity("Repo", "anvil"))
        seq = FactStore(db).apply([grant]).seq
        store = DecisionStore(db)
        decision_id = DecisionLog(10, store).record("authorize", READ_ANVIL, True, seq, 1, api="v1")
        store.flush()
    finally:
        db.close()
    with a.client() as ca:
        explained = ca.get(f"/v1/decisions/{decision_id}/explanation")
    assert explained.status_code == 200, explained.text
    assert explained.json()["explanation"]["allowed"] is True
    assert explained.json()["explained_at_sequence"] >= seq
