"""One small database layer for every store in bastion: SQLite (embedded default) or PostgreSQL.

SQL is written once with ``?`` placeholders; on PostgreSQL they become ``%s``. Schema migrations
are numbered per component and applied under a lock, so two replicas starting at once are safe.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

_PLACEHOLDER = re.compile(r"\?")


class Database:
    """A connection to SQLite (a file path or ``sqlite:///path``) or PostgreSQL (``postgresql://``).

    Thread-safe: one connection guarded by a lock. Use `transaction()` for writes that must apply
    together; a statement outside a transaction commits on its own.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_postgres = url.startswith(("postgresql://", "postgres://"))
        self._lock = threading.RLock()
        self._depth = 0
        if self.is_postgres:
            import psycopg

            self._conn = psycopg.connect(url, autocommit=True)
        else:
            path = url.removeprefix("sqlite:///").removeprefix("sqlite://")
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA busy_timeout=10000")
            self._conn.execute("PRAGMA foreign_keys=ON")

    def _sql(self, sql: str) -> str:
        return _PLACEHOLDER.sub("%s", sql) if self.is_postgres else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Run one statement and return its rows (empty for statements that return none)."""
        with self._lock:
            cur = self._conn.execute(self._sql(sql), tuple(params))
            return list(cur.fetchall()) if cur.description else []

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._lock:
            if self.is_postgres:
                with self._conn.cursor() as cur:
                    cur.executemany(self._sql(sql), rows)
            else:
                self._conn.executemany(sql, rows)

    def copy_rows(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Load many rows into ``table`` at once: PostgreSQL's COPY; plain inserts on SQLite."""
        with self._lock:
            if self.is_postgres:
                with (
                    self._conn.cursor() as cur,
                    cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy,
                ):
                    for row in rows:
                        copy.write_row(row)
            else:
                marks = ", ".join("?" * len(columns))
                self._conn.executemany(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows
                )

    @contextmanager
    def transaction(self, *, read_only: bool = False) -> Iterator[Database]:
        """All statements inside apply together or not at all. Nested calls join the outer one.

        ``read_only=True`` reads one consistent snapshot without taking SQLite's write lock.
        """
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            if self.is_postgres:
                begin = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if read_only else "BEGIN"
            else:
                begin = "BEGIN" if read_only else "BEGIN IMMEDIATE"
            self._conn.execute(begin)
            self._depth = 1
            try:
                yield self
            except BaseException:
                self._depth = 0
                self._conn.execute("ROLLBACK")
                raise
            self._depth = 0
            self._conn.execute("COMMIT")

    def migrate(self, component: str, migrations: Sequence[str]) -> int:
        """Apply the component's migrations not yet applied; return the schema version reached.

        ``migrations[i]`` is the SQL script of version ``i + 1``; statements are separated by
        ``;`` at line ends. Safe to call from several processes at once.
        """
        with self.transaction():
            if self.is_postgres:
                # One lock per component, held to the end of this transaction.
                self.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (f"bastion:{component}",))
            self.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " component TEXT NOT NULL, version INTEGER NOT NULL,"
                " PRIMARY KEY (component, version))"
            )
            rows = self.execute(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations WHERE component = ?",
                (component,),
            )
            current = rows[0][0]
            for version, script in enumerate(migrations, start=1):
                if version <= current:
                    continue
                for statement in (s.strip() for s in re.split(r";\s*$", script, flags=re.M)):
                    if statement:
                        self.execute(statement)
                self.execute(
                    "INSERT INTO schema_migrations (component, version) VALUES (?, ?)",
                    (component, version),
                )
            return max(current, len(migrations))

    def close(self) -> None:
        with self._lock:
            self._conn.close()
