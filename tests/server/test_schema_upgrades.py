"""Upgrading and rolling back bastion over one database (docs/operations.md, "Upgrading").

Each store migrates its component's schema at start (`Database.migrate`). A migration that fails
part way, or whose process is killed, leaves the component at the version before, whole, and the
next start completes it. A database migrated by a newer bastion is refused by an older one that
starts on it (a rollback), naming the versions; and a replica already running when a newer one
migrates stops deciding (the gateway, `/v1`, the token endpoint) rather than go on with rules
the newer schema may have changed under it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import psycopg
import pytest
from starlette.testclient import TestClient

from bastion.db import Database, DatabaseSettingError, SchemaNewer
from bastion.facts.store import SCHEMA_VERSION
from bastion.server.app import create_app
from bastion.server.config import ServerConfig
from tests.conftest import POSTGRES_URL
from tests.server.conftest import ADMIN_KEY, POLICY
from tests.waits import eventually

V1 = "CREATE TABLE widgets (id TEXT PRIMARY KEY, name TEXT NOT NULL)"
V2 = """
    CREATE TABLE gadgets (id TEXT PRIMARY KEY);
    ALTER TABLE widgets ADD COLUMN colour TEXT NOT NULL DEFAULT 'red';
"""


def versions(db: Database, component: str) -> list[int]:
    rows = db.execute(
        "SELECT version FROM schema_migrations WHERE component = ? ORDER BY version", (component,)
    )
    return [version for (version,) in rows]


def table_exists(db: Database, table: str) -> bool:
    if db.is_postgres:
        return db.execute("SELECT to_regclass(?) IS NOT NULL", (table,))[0][0]
    rows = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,))
    return bool(rows)


def test_a_migration_that_fails_part_way_leaves_the_version_before_whole(database_url):
    db = Database(database_url)
    try:
        assert db.migrate("widgets", [V1]) == 1
        db.execute("INSERT INTO widgets (id, name) VALUES ('w1', 'first')")
        # Version 2's second statement fails after its first one ran.
        broken = "CREATE TABLE gadgets (id TEXT PRIMARY KEY);\nINSERT INTO nowhere VALUES (1)"
        with pytest.raises(Exception) as refused:
            db.migrate("widgets", [V1, broken])
        assert not isinstance(refused.value, SchemaNewer)
        assert versions(db, "widgets") == [1]
        assert not table_exists(db, "gadgets")
        # The next start, with the migration as released, completes it; the data is kept.
        assert db.migrate("widgets", [V1, V2]) == 2
        assert versions(db, "widgets") == [1, 2]
        assert db.execute("SELECT id, name, colour FROM widgets") == [("w1", "first", "red")]
    finally:
        db.close()


# A process that migrates `widgets` to version 2, whose second statement runs until the process
# is killed: on SQLite, an insert of rows without end (its pages spill to the WAL file); on
# PostgreSQL, an ALTER TABLE waiting for a lock the test holds.
_KILLED_MIDWAY = """
import sys
from bastion.db import Database
url, second = sys.argv[1], sys.argv[2]
db = Database(url)
print("migrating", flush=True)
db.migrate("widgets", [{v1!r}, "CREATE TABLE gadgets (id TEXT PRIMARY KEY);\\n" + second])
"""
_FOREVER_SQLITE = (
    "INSERT INTO gadgets WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n)"
    " SELECT 'gadget-' || i || '-' || hex(randomblob(64)) FROM n"
)
_WAITS_POSTGRES = "ALTER TABLE widgets ADD COLUMN colour TEXT"


def test_a_migration_killed_part_way_leaves_the_version_before_whole(database_url, tmp_path):
    db = Database(database_url)
    db.migrate("widgets", [V1])
    db.execute("INSERT INTO widgets (id, name) VALUES ('w1', 'first')")
    holder = None
    if db.is_postgres:
        holder = psycopg.connect(database_url, autocommit=True)
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE widgets IN ACCESS EXCLUSIVE MODE")
    script = textwrap.dedent(_KILLED_MIDWAY.format(v1=V1))
    second = _WAITS_POSTGRES if db.is_postgres else _FOREVER_SQLITE
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, database_url, second], stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout.readline() == b"migrating\n"
        if db.is_postgres:
            with psycopg.connect(POSTGRES_URL, autocommit=True) as watcher:
                assert eventually(
                    lambda: (
                        watcher.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                            " AND query LIKE 'ALTER TABLE widgets%'"
                        ).fetchone()[0]
                        == 1
                    )
                )
        else:
            wal = f"{database_url}-wal"
            assert eventually(lambda: os.path.getsize(wal) > 8_000_000)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if holder is not None:
            holder.execute("ROLLBACK")
            holder.close()
    db.close()
    db = Database(database_url)
    try:
        assert versions(db, "widgets") == [1]
        assert not table_exists(db, "gadgets")
        assert db.migrate("widgets", [V1, V2]) == 2
        assert db.execute("SELECT id, name, colour FROM widgets") == [("w1", "first", "red")]
    finally:
        db.close()


def test_a_database_migrated_by_a_newer_bastion_is_refused_naming_the_versions(database_url):
    newer = Database(database_url)
    newer.migrate("widgets", [V1, V2])
    newer.close()
    older = Database(database_url)
    try:
        with pytest.raises(SchemaNewer) as refused:
            older.migrate("widgets", [V1])
        message = str(refused.value)
        assert "widgets" in message
        assert "version 2" in message and "version 1" in message
        assert isinstance(refused.value, DatabaseSettingError)  # the CLI's clear refusal
        assert versions(older, "widgets") == [1, 2]  # nothing changed
    finally:
        older.close()


def test_bastion_serve_refuses_a_database_of_a_newer_bastion(tmp_path):
    database = str(tmp_path / "bastion.db")
    env = {**os.environ, "BASTION_ADMIN_KEY": ADMIN_KEY, "BASTION_CONFIG": "/nonexistent"}
    made = subprocess.run(
        [sys.executable, "-m", "bastion.cli", "keys", "create", "--database", database]
        + ["--name", "ops", "--scope", "admin"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert made.returncode == 0, made.stderr
    db = Database(database)
    db.migrate("facts", _facts_migrations())
    # What a newer bastion's third migration of the facts leaves.
    db.execute(
        "INSERT INTO schema_migrations (component, version) VALUES ('facts', ?)",
        (SCHEMA_VERSION + 1,),
    )
    db.close()
    served = subprocess.run(
        [sys.executable, "-m", "bastion.cli", "serve", "--database", database, "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert served.returncode == 2, served.stdout + served.stderr
    assert "facts" in served.stderr
    assert f"version {SCHEMA_VERSION + 1}" in served.stderr
    assert f"version {SCHEMA_VERSION}" in served.stderr


def _facts_migrations() -> list[str]:
    from bastion.facts import store

    return store._MIGRATIONS


def test_a_running_replica_stops_deciding_once_a_newer_bastion_migrates(database_url, tmp_path):
    policy = tmp_path / "policy.polar"
    policy.write_text(POLICY)
    config = ServerConfig(database=database_url, admin_key=ADMIN_KEY, policy_file=str(policy))
    question = {"actor": "User:alice", "action": "read", "resource": "Org:acme"}
    with TestClient(create_app(config)) as api:
        api.headers["authorization"] = f"Bearer {ADMIN_KEY}"
        assert api.post("/v1/authorize", json=question).status_code == 200
        # A newer bastion starts on the same database and migrates the facts past this one.
        newer = Database(database_url)
        newer.execute(
            "INSERT INTO schema_migrations (component, version) VALUES ('facts', ?)",
            (SCHEMA_VERSION + 1,),
        )
        newer.close()

        def reason() -> str:
            ready = api.get("/readyz")
            return "" if ready.status_code == 200 else ready.json()["reason"]

        assert eventually(lambda: reason().startswith("schema_newer: ")), reason()
        assert f"facts version {SCHEMA_VERSION + 1}" in reason()
        refused = api.post("/v1/authorize", json=question)
        assert refused.status_code == 503
        assert "newer bastion" in refused.text


def test_a_component_migrated_once_is_not_migrated_again_under_its_lock(postgres_url):
    """A transaction that makes an `AuditLog` (a connection revoked, say) takes the audit tables'
    migration lock no more once its `Database` brought them to this version in a transaction of
    its own: held to the transaction's end, it made every such transaction of every process wait
    on one another, and on any process stopped while it held it (seen: lock_timeout, 30 s, past
    in CI). A first migration still waits for it."""
    from bastion.audit.log import AuditLog
    from bastion.db import DatabaseUnavailable

    url = f"{postgres_url}%20-clock_timeout%3D1s"  # a wait refused after a second, not 30
    db, fresh = Database(url), Database(url)
    holder = psycopg.connect(POSTGRES_URL)
    try:
        AuditLog(db)
        holder.execute("SELECT pg_advisory_xact_lock(hashtext('bastion:audit'))")
        with db.transaction():
            AuditLog(db).record("test.recorded", actor="test")
        assert [e.kind for e in AuditLog(db).events()] == ["test.recorded"]
        with pytest.raises(DatabaseUnavailable):
            AuditLog(fresh)
    finally:
        holder.rollback()
        holder.close()
        db.close()
        fresh.close()
