"""One small database layer for every store in bastion: SQLite (embedded default) or PostgreSQL.

SQL is written once with ``?`` placeholders; on PostgreSQL they become ``%s``. Schema migrations
are numbered per component and applied under a lock, so two replicas starting at once are safe.
On PostgreSQL a writer announces a commit with NOTIFY (`Database.notify`) and a process follows
a channel with a `Listener`, which reconnects by itself and says when it may have missed some.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("bastion.db")

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
        self._after_commit: list[Callable[[], None]] = []
        if self.is_postgres:
            import psycopg

            self._conn = psycopg.connect(url, autocommit=True)
        else:
            path = url.removeprefix("sqlite:///").removeprefix("sqlite://")
            self._conn = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=10
            )
            _use_wal(self._conn)
            self._conn.execute("PRAGMA synchronous=NORMAL")
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
                self._after_commit.clear()
                self._conn.execute("ROLLBACK")
                raise
            self._depth = 0
            try:
                self._conn.execute("COMMIT")
            finally:
                callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            callback()

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the transaction in progress has committed (never if it rolls
        back); outside a transaction, at once. It runs on the committing thread, lock released."""
        with self._lock:
            if self._depth:
                self._after_commit.append(callback)
                return
        callback()

    def notify(self, channel: str, payload: str) -> None:
        """PostgreSQL: NOTIFY ``channel`` with ``payload``, delivered to its listeners when the
        transaction in progress commits (at once outside one). SQLite: nothing (no listeners)."""
        if self.is_postgres:
            self.execute("SELECT pg_notify(?, ?)", (channel, payload))

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


def _use_wal(conn: sqlite3.Connection, seconds: float = 10.0) -> None:
    """Switch the file to WAL. Connections opening a new file at once (replicas starting
    together) each try, and SQLite answers "locked" to all but one without waiting for the busy
    timeout, so this waits and tries again until the file is in WAL mode."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class Listener:
    """A PostgreSQL ``LISTEN`` on one channel, held by a thread of its own.

    ``on_notify(payload)`` is called, on that thread, for every notification. When the connection
    drops the thread reconnects; notifications sent in between are lost, so ``on_listening()`` is
    called each time the LISTEN is in force again, before `healthy` turns true: the owner catches
    up there on whatever was committed while it was not listening. `healthy` is true only while
    the connection is up and has answered within ``stale_after`` seconds (it is asked every
    ``heartbeat`` seconds), so a connection that hangs without an error is not trusted either.
    """

    def __init__(
        self,
        url: str,
        channel: str,
        *,
        on_notify: Callable[[str], None],
        on_listening: Callable[[], None],
        name: str,
        heartbeat: float = 0.5,
        stale_after: float = 2.0,
    ) -> None:
        self.url = url
        self.channel = channel
        self.name = name
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self.backend_pid: int | None = None
        self._on_notify = on_notify
        self._on_listening = on_listening
        self._connected = False
        self._answered_at = 0.0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def healthy(self) -> bool:
        return self._connected and time.monotonic() - self._answered_at < self.stale_after

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        import psycopg

        while not self._stopping.is_set():
            try:
                with psycopg.connect(
                    self.url,
                    autocommit=True,
                    application_name=self.name,
                    connect_timeout=5,
                    # A peer gone without a word is noticed in about 10 s, not the OS's minutes
                    # (unanswered heartbeat) or 2 hours (idle connection).
                    tcp_user_timeout=10_000,
                    keepalives=1,
                    keepalives_idle=5,
                    keepalives_interval=2,
                    keepalives_count=3,
                ) as conn:
                    conn.execute(f"LISTEN {self.channel}")
                    self.backend_pid = conn.info.backend_pid
                    self._on_listening()
                    self._answered_at = time.monotonic()
                    self._connected = True
                    while not self._stopping.is_set():
                        for note in conn.notifies(timeout=self.heartbeat):
                            self._on_notify(note.payload)
                        conn.execute("SELECT 1")
                        self._answered_at = time.monotonic()
            except Exception as e:  # a dropped connection: reconnect, then catch up
                self._connected = False
                if not self._stopping.is_set():
                    log.warning(
                        "%s: notifications on %s lost (%s); reconnecting",
                        self.name,
                        self.channel,
                        e,
                    )
                    self._stopping.wait(0.5)
        self._connected = False
