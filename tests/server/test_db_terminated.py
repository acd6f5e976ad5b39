"""A PostgreSQL connection ended by the server (``pg_terminate_backend``: SQLSTATE 57P01) under a
statement of a transaction is lost, whatever state psycopg is left in: the caller is told to
retry (`DatabaseUnavailable`), never handed psycopg's own error (a 500), and the next use
reconnects."""

from __future__ import annotations

import psycopg
import pytest

from bastion.db import Database, DatabaseUnavailable


def terminate(url: str, pid: int) -> None:
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


@pytest.mark.parametrize("rows", [1, 500])  # one statement, and a pipelined batch
def test_a_transaction_whose_connection_the_server_ends_is_unavailable_not_an_error(
    postgres_url, rows
):
    db = Database(postgres_url, role="test-terminated")
    db.execute("CREATE TABLE t (n integer)")
    pid = db.execute("SELECT pg_backend_pid()")[0][0]
    with pytest.raises(DatabaseUnavailable), db.transaction():
        db.execute("INSERT INTO t VALUES (0)")
        terminate(postgres_url, pid)
        db.executemany("INSERT INTO t VALUES (?)", [(n,) for n in range(rows)])
    # Rolled back by the server, and the next statement runs on a new connection.
    assert db.execute("SELECT count(*) FROM t")[0][0] == 0
    db.close()


def test_an_error_that_arose_from_the_server_ending_the_connection_means_it_is_lost(postgres_url):
    """psycopg may leave a connection ended under a pipelined ``executemany`` unmarked (seen in
    CI: "cannot exit pipeline mode while busy", raised from the server's 57P01). The error's
    origin says it is gone: it is dropped, and the next use reconnects."""
    db = Database(postgres_url, role="test-terminated")
    db.execute("SELECT 1")
    conn = db._conn
    assert not (conn.closed or conn.broken)
    try:
        try:
            raise psycopg.errors.AdminShutdown(
                "terminating connection due to administrator command"
            )
        except psycopg.Error:
            raise psycopg.OperationalError("cannot exit pipeline mode while busy")  # noqa: B904
    except psycopg.OperationalError as e:
        error = e
    assert db._lost(conn, error)
    assert db._conn is None
    # Any other error on a live connection is not a lost connection.
    assert not db._lost(db._connection(), psycopg.OperationalError("canceling statement"))
    assert db.execute("SELECT 1") == [(1,)]
    db.close()
