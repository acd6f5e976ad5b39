"""Storage, tried against a real `bastion serve`: files only their owner can read, a PostgreSQL
that goes away under the authorization server and the gateway (logins refused, connections
terminated, tables locked: only this test's), and an audit trail that does not grow for ever."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from bastion.audit import AuditLog
from bastion.audit.actor import cli_actor
from bastion.audit.decisions import DecisionRecord, DecisionRecords
from bastion.db import Database, DatabaseUnavailable
from bastion.facts.store import FactStore
from bastion.oauth.store import OAuthStore
from bastion.oauth.users import create_user
from tests import clients
from tests.gateway import support as gateway_support
from tests.gateway.streams import modern_headers, modern_request
from tests.gateway.support import PASSWORD, QUICKSTART, Running
from tests.oauth.test_authorization_rules import shown_error
from tests.postgres_outage import CommitCut
from tests.security.conftest import GATEWAY, OAUTH
from tests.server.conftest import ADMIN_KEY, ServerProcess, role
from tests.server.test_replicas import eventually
from tests.waits import PATIENCE

DAY = 86_400.0


def private(path: Path) -> bool:
    """Nobody but the owner may read, write or enter it."""
    return stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0


def _decision(at: float, n: int) -> DecisionRecord:
    return DecisionRecord(f"d{n}", at, "desk", "tools/call", "Tool:desk/x", ("User:sam",), "allow")


# -- files ----------------------------------------------------------------------------------------


def test_the_database_its_wal_and_shm_files_and_the_signing_keys_are_private(tmp_path, served):
    database = tmp_path / "bastion.db"
    keys = tmp_path / "keys"
    server = served(str(database), OAUTH % keys)
    with server.client() as http:
        fact = role("alice", "reader", "Repo", "anvil")
        assert http.post("/v1/facts", json={"facts": [fact]}).status_code == 200
        assert http.get("/jwks.json").json()["keys"]  # the first signing key is made
        for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
            assert path.exists() and private(path), oct(os.stat(path).st_mode)
        pems = list(keys.glob("*.pem"))
        assert pems and all(private(p) for p in pems)
        assert private(keys)
    server.stop()

    exported = tmp_path / "facts.jsonl"
    subprocess.run(
        [sys.executable, "-m", "bastion.cli", "facts", "export", str(exported)]
        + ["--database", str(database)],
        check=True,
        env={**os.environ, "BASTION_CONFIG": "/nonexistent"},
    )
    assert "anvil" in exported.read_text() and private(exported)


def test_a_sqlite_commit_is_written_through_to_the_disk_unless_the_url_says_otherwise(tmp_path):
    """synchronous=FULL: an answered write outlives a power loss, not only the process's end."""
    levels = {"FULL": 2, "NORMAL": 1}
    for url, level in [
        (str(tmp_path / "a.db"), "FULL"),
        (f"sqlite:///{tmp_path / 'b.db'}", "FULL"),
        (f"sqlite:///{tmp_path / 'c.db'}?synchronous=full", "FULL"),
        (f"sqlite:///{tmp_path / 'd.db'}?synchronous=normal", "NORMAL"),
    ]:
        db = Database(url)
        try:
            assert db.execute("PRAGMA synchronous") == [(levels[level],)], url
        finally:
            db.close()
    for query in ("synchronous=off", "synchronous=", "sync=full", "synchronous=full&x=1"):
        with pytest.raises(ValueError, match=r"takes the settings \?synchronous=full\|normal "):
            Database(f"sqlite:///{tmp_path / 'e.db'}?{query}")
    assert not (tmp_path / "e.db").exists()


def test_a_sqlite_wait_for_another_writers_lock_is_bounded_as_the_url_says(tmp_path):
    """10 s unless ``?busy_timeout=`` says otherwise; a value that is no bound is refused."""
    for url, milliseconds in [
        (str(tmp_path / "a.db"), 10_000),
        (f"sqlite:///{tmp_path / 'b.db'}?busy_timeout=2.5", 2_500),
        (f"sqlite:///{tmp_path / 'c.db'}?synchronous=normal&busy_timeout=0", 0),
    ]:
        db = Database(url)
        try:
            assert db.execute("PRAGMA busy_timeout") == [(milliseconds,)], url
        finally:
            db.close()
    for value in ("-1", "3601", "nan", "inf", "", "10s"):
        with pytest.raises(ValueError, match=r"&busy_timeout=<seconds, 0 to 3600>"):
            Database(f"sqlite:///{tmp_path / 'e.db'}?busy_timeout={value}")
    assert not (tmp_path / "e.db").exists()


# -- the audit trail's retention --------------------------------------------------------------------


def _pruned(database: str) -> list[dict]:
    """The ``audit.pruned`` events, oldest first, as ``bastion audit events --json`` shows them."""
    shown = subprocess.run(
        [sys.executable, "-m", "bastion.cli", "audit", "events", "--json", "--kind",
         "audit.pruned", "--database", database],
        capture_output=True, text=True, env={**os.environ, "BASTION_CONFIG": "/nonexistent"},
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    return [json.loads(line) for line in shown.stdout.splitlines()]


def _audit_trail(database: str, ages_in_days: list[float]) -> None:
    """An audit event and a decision record of each age."""
    db = Database(database)
    records = DecisionRecords(db)
    now = time.time()
    for n, age in enumerate(ages_in_days):
        AuditLog(db, clock=lambda age=age: now - age * DAY).record("token.issued", subject=f"u{n}")
        records.add(_decision(now - age * DAY, n))
    records.flush()
    db.close()


def _left(database: str) -> tuple[list[str], list[str]]:
    """The subjects of the events of `_audit_trail` still there, and the decision records'."""
    with sqlite3.connect(database) as conn:
        events = conn.execute(
            "SELECT subject FROM audit_events WHERE kind = 'token.issued' ORDER BY subject"
        ).fetchall()
        decisions = conn.execute("SELECT id FROM audit_decisions ORDER BY id").fetchall()
    return [e for (e,) in events], [d for (d,) in decisions]


def test_the_server_deletes_the_audit_trail_older_than_the_retention_by_itself(tmp_path, served):
    database = str(tmp_path / "bastion.db")
    _audit_trail(database, [400, 40, 5, 0])
    served(database, BASTION_AUDIT_RETENTION_DAYS="30")
    # No request asks for it: the server prunes on its own, off the request path.
    assert eventually(lambda: _left(database) == (["u2", "u3"], ["d2", "d3"]))
    # The deletion is itself recorded, by the server, after it (so it stays).
    [pruned] = _pruned(database)
    assert pruned["detail"]["actor"] == "server" and pruned["detail"]["days"] == 30
    assert (pruned["detail"]["events_deleted"], pruned["detail"]["decisions_deleted"]) == (2, 2)


def test_bastion_audit_prune_keeps_the_newest_decision_record_so_sequences_go_on(tmp_path):
    database = str(tmp_path / "bastion.db")
    _audit_trail(database, [400, 200, 100])

    def prune(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "bastion.cli", "audit", "prune", "--database", database, *args],
            capture_output=True,
            text=True,
            env={**os.environ, "BASTION_CONFIG": "/nonexistent"},
        )

    assert prune("--older-than", "0").returncode == 2  # it would delete everything
    done = prune("--older-than", "150")
    assert done.returncode == 0, done.stderr
    assert "deleted 2 audit events and 2 decision records" in done.stderr
    assert _left(database) == (["u2"], ["d2"])
    [pruned] = _pruned(database)
    assert pruned["kind"] == "audit.pruned" and pruned["detail"]["actor"] == cli_actor()
    assert (pruned["detail"]["events_deleted"], pruned["detail"]["decisions_deleted"]) == (2, 2)
    assert pruned["detail"]["days"] == 150
    assert abs(pruned["detail"]["before"] - (time.time() - 150 * DAY)) < 60
    assert prune("--older-than", "1").returncode == 0
    # Every event went; the newest decision record stays, so `audit tail -f` misses nothing.
    assert _left(database) == ([], ["d2"])
    # The record of each deletion outlives it.
    assert [p["detail"]["events_deleted"] for p in _pruned(database)] == [2, 1]
    db = Database(database)
    records = DecisionRecords(db)
    records.add(_decision(time.time(), 9))
    records.flush()
    (kept, d2), (seq, d9) = records.after(0)
    assert (d2.id, d9.id) == ("d2", "d9") and seq == kept + 1
    db.close()


def test_retention_deletes_in_batches_on_sqlite_and_postgresql(database_url):
    db = Database(database_url)
    now = time.time()
    audit, records = AuditLog(db), DecisionRecords(db)
    for n, age in enumerate([9, 8, 7, 6, 5, 1]):
        AuditLog(db, clock=lambda age=age: now - age * DAY).record("token.issued", subject=f"u{n}")
        records.add(_decision(now - age * DAY, n))
    records.flush()
    before = now - 2 * DAY
    assert (audit.prune(before, batch=2), records.prune(before, batch=2)) == (5, 5)
    assert [e.subject for e in audit.events()] == ["u5"]
    assert [r.id for _, r in records.after(0)] == ["d5"]
    db.close()


# -- the database goes away: the authorization server ------------------------------------------------


def test_oauth_endpoints_answer_503_temporarily_unavailable_while_the_database_is_away(
    outage, tmp_path, served
):
    role = outage.role()
    server = served(outage.url(role), OAUTH % (tmp_path / "keys"))
    client = {"client_name": "c", "redirect_uris": ["http://127.0.0.1:9/cb"]}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.post("/register", json=client).status_code == 201
        outage.block(role)
        refused = [
            http.post("/register", json=client),
            http.post("/token", data={"grant_type": "client_credentials", "client_id": "x"}),
            http.post(
                "/v1/keys",
                json={"name": "k", "scopes": ["decide"]},
                headers={"authorization": f"Bearer {ADMIN_KEY}"},
            ),
        ]
        for r in refused[:2]:
            assert r.status_code == 503, r.text
            assert r.json()["error"] == "temporarily_unavailable"
            assert r.headers["retry-after"]
        assert refused[2].status_code == 503
        assert refused[2].headers["content-type"] == "application/problem+json"
        outage.unblock(role)
        assert eventually(lambda: http.post("/register", json=client).status_code == 201)


def _blocked_by(database_url: str, pid: int) -> bool:
    """Whether a connection of PostgreSQL's waits on a lock the connection ``pid`` holds."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        found = "SELECT 1 FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
        return bool(conn.execute(found, (pid,)).fetchall())


def test_the_authorization_server_waits_on_its_database_off_the_event_loop(
    postgres_url, tmp_path, served
):
    """A database that answers slowly (a lock, a hanging connection) holds the requests that
    need it, never the server: its pages read and write the database in worker threads."""
    server = served(postgres_url, OAUTH % (tmp_path / "keys"))
    client = {"client_name": "c", "redirect_uris": ["http://127.0.0.1:9/cb"]}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        client_id = http.post("/register", json=client).json()["client_id"]
        answered: dict = {}

        def authorize() -> None:
            answered["response"] = http.get("/authorize", params={"client_id": client_id})

        with psycopg.connect(postgres_url) as blocker:
            blocker.execute("LOCK TABLE oauth_clients IN ACCESS EXCLUSIVE MODE")
            waiting = threading.Thread(target=authorize)
            waiting.start()
            # Until the authorization request waits on the lock (the blocker's, no one else's:
            # other tests share the database).
            assert eventually(lambda: _blocked_by(postgres_url, blocker.info.backend_pid))
            with httpx.Client(base_url=server.url, timeout=5) as other:
                health = [other.get("/healthz").status_code for _ in range(5)]
            assert waiting.is_alive() and "response" not in answered
            blocker.rollback()
        waiting.join(PATIENCE)
    assert health == [200] * 5
    # Then answered: the request lacks its response_type, which a client that registered itself
    # is told on bastion's page (it is not sent to its redirect URI unasked).
    assert shown_error(answered["response"])["error"] == "unsupported_response_type"


def test_every_connection_has_keepalives_and_timeouts_which_the_url_may_change(postgres_url):
    db = Database(postgres_url)
    assert db._conn.info.get_parameters()["tcp_user_timeout"] == "10000"
    db.close()
    db = Database(f"{postgres_url}&tcp_user_timeout=3000&connect_timeout=2", role="bastion-x")
    given = db._conn.info.get_parameters()
    assert (given["tcp_user_timeout"], given["connect_timeout"]) == ("3000", "2")
    assert given["keepalives_idle"] == "5" and given["application_name"] == "bastion-x"
    db.close()


# -- the database goes away: the gateway ----------------------------------------------------------


@pytest.fixture
def gateway(outage, tmp_path, served):
    """A served bastion with the gateway in front of the quickstart's desk, on PostgreSQL as a
    role of the test's; sam's token for desk. Yields (server, token, role)."""
    role = outage.role()
    url = outage.url(role)
    policy = tmp_path / "policy.polar"
    policy.write_text(gateway_support.test_policy())
    config = GATEWAY % (tmp_path / "keys", sys.executable, QUICKSTART / "server.py")
    server = served(url, config, BASTION_MAX_STALENESS_SECONDS="2")
    db = Database(url)
    create_user(OAuthStore(db), "sam", PASSWORD, time.time(), actor="test")
    FactStore(db).apply(gateway_support.facts())
    db.close()
    with httpx.Client(timeout=30) as http:
        person = Running(server.url, None, None, None, http, None)
        yield server, person.token("sam", "desk"), role
    server.stop()


def call(server: ServerProcess, token: str, n: int = 1) -> httpx.Response:
    return clients.post(
        f"{server.url}/mcp/desk",
        json=modern_request(n, "tools/call", {"name": "search_customers", "arguments": {}}),
        headers={
            **modern_headers(token, "tools/call", "search_customers"),
            "accept": "application/json",
        },
        timeout=30,
    )


def records(role_url: str) -> list[dict]:
    with psycopg.connect(role_url, autocommit=True) as conn:
        rows = conn.execute("SELECT record FROM audit_decisions ORDER BY seq").fetchall()
    return [json.loads(r) for (r,) in rows]


def test_the_gateway_refuses_calls_on_stale_facts_and_records_why(gateway, outage):
    server, token, role = gateway
    allowed = call(server, token).json()
    assert "result" in allowed, allowed
    # The change log cannot be read (a lock held by this test on its own table): the replica
    # cannot confirm its facts are current.
    with psycopg.connect(outage.url(), autocommit=True) as lock:
        lock.execute("BEGIN")
        lock.execute("LOCK TABLE changes IN ACCESS EXCLUSIVE MODE")

        def refused() -> dict | None:
            answer = call(server, token).json()
            return answer if "error" in answer else None

        assert eventually(lambda: refused() is not None)
        error = refused()["error"]
        assert error["code"] == -32007 and error["data"]["reason"] == "facts_stale"
        ready = httpx.get(f"{server.url}/readyz")
        assert ready.status_code == 503 and ready.json()["reason"].startswith("facts_stale")
        lock.execute("ROLLBACK")
    assert eventually(lambda: "result" in call(server, token).json())
    decision_id = error["data"]["decision_id"]

    def recorded() -> dict | None:
        return next((r for r in records(outage.url()) if r["id"] == decision_id), None)

    assert eventually(lambda: recorded() is not None)
    record = recorded()
    assert record["result"] == "unavailable" and record["reason"] == "facts_stale"


def test_a_token_whose_revocation_cannot_be_checked_is_refused(gateway, outage):
    server, token, role = gateway
    assert "result" in call(server, token).json()
    outage.block(role)
    # Remembered tokens were trusted only while revocations could be heard; now each use must
    # read its revocation state, and cannot: refused, with 503, never let through.
    assert eventually(lambda: call(server, token).status_code == 503)
    refused = call(server, token)
    assert refused.status_code == 503
    assert refused.json()["error"] == "temporarily_unavailable"
    outage.unblock(role)
    assert eventually(lambda: call(server, token).status_code == 200)
    assert "result" in call(server, token).json()


def test_decision_records_are_kept_while_they_cannot_be_written(gateway, outage):
    server, token, role = gateway
    ids = []
    with psycopg.connect(outage.url(), autocommit=True) as lock:
        lock.execute("BEGIN")
        lock.execute("LOCK TABLE audit_decisions IN ACCESS EXCLUSIVE MODE")
        for n in range(5):
            ids.append(call(server, token, n).json())
        # The writer's connection is lost while it waits: its batch must not be.
        assert eventually(lambda: f"{outage.tag}/bastion-records" in outage.terminate())
        for n in range(5, 10):
            ids.append(call(server, token, n).json())
        lock.execute("ROLLBACK")
    assert all("result" in answer for answer in ids)

    def written() -> int:
        return sum(r["method"] == "tools/call" for r in records(outage.url()))

    assert eventually(lambda: written() >= 10)


def test_past_the_buffer_the_oldest_decision_records_are_dropped_counted_and_logged(outage, caplog):
    role = outage.role()
    db = Database(outage.url(role), role="bastion-records")
    buffered = DecisionRecords(db, max_buffer=5)
    outage.block(role)
    for n in range(8):
        buffered.add(_decision(time.time(), n))
    with caplog.at_level(logging.ERROR, logger="bastion.audit"), pytest.raises(DatabaseUnavailable):
        buffered.flush()
    assert buffered.dropped == 3 and buffered.waiting == 5
    assert "3 decision records dropped" in caplog.text
    outage.unblock(role)
    assert eventually(lambda: _flushed(buffered))
    ids = [r.id for _, r in buffered.after(0)]
    assert ids == ["d3", "d4", "d5", "d6", "d7"]
    db.close()


def test_a_batch_whose_commit_was_lost_is_written_once_and_does_not_block_the_next(postgres_url):
    relay = CommitCut(postgres_url)
    db = Database(relay.url, role="bastion-records")
    buffered = DecisionRecords(db)
    buffered.add(_decision(time.time(), 1))
    relay.arm()
    # Committed, but the answer never came: the batch is kept, as it may not have been written.
    with pytest.raises(DatabaseUnavailable, match="committing"):
        buffered.flush()
    assert relay.cut.is_set() and buffered.waiting == 1
    buffered.add(_decision(time.time(), 2))
    # Written again, it is not written twice; nor does it stop every later record being written.
    assert eventually(lambda: _flushed(buffered))
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        ids = [i for (i,) in conn.execute("SELECT id FROM audit_decisions ORDER BY seq")]
    assert ids == ["d1", "d2"]
    db.close()
    relay.close()


def _flushed(records: DecisionRecords) -> bool:
    try:
        records.flush()
    except DatabaseUnavailable:
        return False
    return records.waiting == 0
