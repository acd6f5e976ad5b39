"""No wait for a PostgreSQL lock lasts past ``lock_timeout`` (30 s unless the URL says
otherwise): a transaction of another replica that holds a lock (paused, or cut off with its TCP
still up) no longer holds every request that needs it, and its worker thread, for as long as it
lasts. The wait refused is `DatabaseUnavailable` (503, retry), with nothing written."""

from __future__ import annotations

from urllib.parse import quote

import psycopg
import pytest

from bastion.db import Database, DatabaseUnavailable


def with_options(url: str, options: str) -> str:
    """``url`` (whose query already holds ``options``: the test's search_path) with more."""
    assert "?options=" in url
    return url.replace("?options=", f"?options={quote(options)}%20", 1)


def test_every_connection_bounds_its_lock_waits_and_its_idle_transactions(postgres_url):
    db = Database(postgres_url, role="test-lock-waits")
    assert db.execute("SHOW lock_timeout") == [("30s",)]
    assert db.execute("SHOW idle_in_transaction_session_timeout") == [("1min",)]
    # The URL's own options still count (its search_path), and win over bastion's.
    db.execute("CREATE TABLE t (n integer)")
    assert db.execute("SELECT count(*) FROM t") == [(0,)]
    db.close()
    unbounded = Database(with_options(postgres_url, "-c lock_timeout=0"), role="test-lock-waits")
    assert unbounded.execute("SHOW lock_timeout") == [("0",)]
    unbounded.close()


@pytest.mark.parametrize("held", ["advisory", "row"])
def test_a_lock_held_past_lock_timeout_refuses_the_transaction_and_writes_nothing(
    postgres_url, held
):
    db = Database(with_options(postgres_url, "-c lock_timeout=200"), role="test-lock-waits")
    db.execute("CREATE TABLE t (n integer PRIMARY KEY)")
    db.execute("INSERT INTO t VALUES (1)")
    other = psycopg.connect(postgres_url)  # another replica, in a transaction it does not end
    try:
        if held == "advisory":
            other.execute("SELECT pg_advisory_xact_lock(hashtext('bastion:test'))")
        else:
            other.execute("SELECT n FROM t WHERE n = 1 FOR UPDATE")
        with pytest.raises(DatabaseUnavailable, match="lock_timeout"), db.transaction():
            db.execute("INSERT INTO t VALUES (2)")
            if held == "advisory":
                db.lock("bastion:test")
            else:
                db.execute("SELECT n FROM t WHERE n = 1 FOR UPDATE")
    finally:
        other.rollback()
        other.close()
    # Rolled back; the connection serves the next transaction, which the lock no longer holds.
    assert db.execute("SELECT n FROM t ORDER BY n") == [(1,)]
    with db.transaction():
        db.lock("bastion:test")
        db.execute("INSERT INTO t VALUES (3)")
    assert db.execute("SELECT n FROM t ORDER BY n") == [(1,), (3,)]
    db.close()


def test_a_statement_cancelled_by_the_urls_statement_timeout_is_refused_as_busy_not_an_error(
    postgres_url,
):
    """An operator's ``statement_timeout`` (in the URL's options) ends a statement however it is
    held (here behind a lock with no ``lock_timeout``): a 503 to retry, as a lock wait refused
    is, not a 500; nothing written. Threads waiting for the connection meanwhile wait no longer
    than that either (`Database` docstring)."""
    url = with_options(postgres_url, "-c lock_timeout=0 -c statement_timeout=300")
    db = Database(url, role="test-lock-waits")
    db.execute("CREATE TABLE t (n integer PRIMARY KEY)")
    other = psycopg.connect(postgres_url)
    try:
        other.execute("LOCK TABLE t IN EXCLUSIVE MODE")
        with pytest.raises(DatabaseUnavailable, match="statement_timeout"), db.transaction():
            db.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(DatabaseUnavailable, match="statement_timeout"):
            db.execute("INSERT INTO t VALUES (2)")
    finally:
        other.rollback()
        other.close()
    assert db.execute("SELECT n FROM t") == []
    db.close()
