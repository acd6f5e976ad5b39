"""One small database layer for every store in bastion: SQLite (embedded default) or PostgreSQL.

SQL is written once with ``?`` placeholders; on PostgreSQL they become ``%s``. Schema migrations
are numbered per component and applied under a lock, so two replicas starting at once are safe.
On PostgreSQL a writer announces a commit with NOTIFY (`Database.notify`) and a process follows
a channel with a `Listener`, which reconnects by itself and says when it may have missed some.

Every PostgreSQL connection is opened by `connect`: named (``application_name``), with TCP
keepalives and a user timeout, so a peer gone silent is noticed in seconds. A `Database` whose
connection was lost opens it again on next use; a statement is sent again only when that cannot
apply it twice, and anything else is a `DatabaseUnavailable` for the caller to answer with 503.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import resource
import select
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

import psycopg
from psycopg.conninfo import conninfo_to_dict

from bastion.redaction import safe_url, without_url_secrets
from bastion.retries import Backoff, Outage, kind_of

log = logging.getLogger("bastion.db")

_PLACEHOLDER = re.compile(r"\?")
# How long a `Database` whose reconnection failed answers `DatabaseUnavailable` at once, without
# trying again: callers queue on its lock, and each must not wait a connection timeout.
_RECONNECT_INTERVAL = 0.5
# The errors of a connection that may be gone; `_lost` tells which really are.
_CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)


def _server_ended(error: BaseException | None) -> bool:
    """Whether the server said, in ``error`` or the errors it arose from, that it is ending the
    connection (SQLSTATE 57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now)."""
    seen = 0
    while error is not None and seen < 8:
        if getattr(error, "sqlstate", None) in ("57P01", "57P02", "57P03"):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be reached, or the connection was lost under a statement that could not
    safely be sent again. A transaction was rolled back, unless the connection was lost while it
    committed; a write outside one may or may not have been applied: the message says which.
    Retry later: the API answers 503."""


class StorageFull(DatabaseUnavailable):
    """A write refused because the database's storage is full (SQLite's file, its WAL or its
    temporary files; PostgreSQL's ``disk_full``, or a quota or file size limit reached): nothing
    of it was applied. Reads go on; the write goes in once there is room (`storage_full_report`
    says so meanwhile). The API answers 503, the CLI one line."""


_LOCK_REFUSED = (
    "the database was busy: a lock this request needs was held past lock_timeout (by another"
    " replica's transaction, say); nothing was written; retry"
)
_STATEMENT_CANCELLED = (
    "the database was busy: a statement of this request ran past statement_timeout (or was"
    " cancelled); nothing was written; retry"
)
_SQLITE_BUSY_REFUSED = (
    "the database was busy: another connection (another process's, say) held its write lock"
    " past busy_timeout; nothing was written; retry"
)
_CONNECTION_BUSY = (
    "the database was busy: this server's connection was held by other requests (waiting for"
    " a lock, say) past {bound}; nothing was written; retry"
)


class DatabaseSettingError(ValueError):
    """A database setting that names no database bastion can use: empty, in-memory, another
    product's URL, a directory, a file that is not there where one must be. The message names
    the path or URL and what to give instead."""


class SchemaNewer(DatabaseSettingError):
    """A newer bastion migrated the database past the schema this one knows (a rollback onto
    it, or an old replica left running in a rolling upgrade). This bastion must not use it: the
    newer one may keep state there (a revocation, a binding) that this one would not honour.
    The message names each component and both versions."""


# Each component's schema version as this process's code knows it (its number of migrations),
# for every component migrated here (`Database.migrate`), so a running process can tell when a
# newer bastion migrates the database under it (`schema_and_clock`).
_KNOWN_SCHEMA: dict[str, int] = {}
_KNOWN_SCHEMA_LOCK = threading.Lock()


# The errors of a file that cannot grow: no space left, a quota reached, a size limit reached.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


# PostgreSQL gives ``disk_full`` (53100) to ENOSPC alone: a quota (EDQUOT) or a file size limit
# (EFBIG) reached on a table's or a temporary file's write is ``internal_error`` (XX000), told
# only by its message, ``could not extend file "base/...": Disk quota exceeded`` (md.c, fd.c:
# the OS's text last). Read in English, the server's default ``lc_messages``.
_POSTGRES_FULL_WRITES = ("could not extend file", "could not write")
_POSTGRES_FULL_TEXTS = tuple(f": {os.strerror(n)}" for n in (errno.EDQUOT, errno.EFBIG))


def storage_full(error: BaseException, sqlite_path: str | None = None) -> bool:
    """Whether ``error`` says the storage written to is full: SQLite's ``database or disk is
    full`` (the file's disk, or its temporary files'), or its ``disk I/O error`` on a write to
    the database ``sqlite_path`` where a quota or file size limit is found reached
    (`_sqlite_limit_reached`), PostgreSQL's ``disk_full`` (SQLSTATE 53100) or a quota or file
    size limit its write reached (XX000 saying so), or a file's write refused for want of room
    (ENOSPC, EDQUOT, EFBIG). The one test of it, for the database's writes and for files (keys,
    the decision journal, the CLI)."""
    if isinstance(error, StorageFull):
        return True
    if isinstance(error, sqlite3.OperationalError):
        code = getattr(error, "sqlite_errorcode", None)
        if code in _SQLITE_WRITE_FAILED and sqlite_path is not None:
            return _sqlite_limit_reached(sqlite_path)
        return code == sqlite3.SQLITE_FULL
    if isinstance(error, OSError):
        return error.errno in _FULL_ERRNOS
    if isinstance(error, psycopg.errors.InternalError_):
        said = error.diag.message_primary or ""
        return said.startswith(_POSTGRES_FULL_WRITES) and said.endswith(_POSTGRES_FULL_TEXTS)
    return isinstance(error, psycopg.errors.DiskFull)


# SQLite's codes for a write the OS refused: ENOSPC is SQLITE_FULL, but a quota (EDQUOT) or a file
# size limit (EFBIG) is one of these, as an I/O failure is, and Python's sqlite3 does not expose
# the errno (``sqlite3_system_errno``).
_SQLITE_WRITE_FAILED = frozenset(
    {
        sqlite3.SQLITE_IOERR_WRITE,
        sqlite3.SQLITE_IOERR_FSYNC,
        sqlite3.SQLITE_IOERR_TRUNCATE,
        sqlite3.SQLITE_IOERR_SHMSIZE,
    }
)
# How near a file size limit a database file is when a write past it failed: the largest page
# SQLite writes (64 KiB) and a WAL frame's header.
_A_PAGE_OR_SO = 65536 + 24
_PROBE = bytes(8192)


def _sqlite_limit_reached(path: str) -> bool:
    """After SQLite's I/O error on a write to the database ``path``: whether a limit refused it
    rather than the disk. Looked at once per such error, on the thread of the statement (a
    worker's, never the event loop's): RLIMIT_FSIZE is set and a file of the database is within
    a page of it, or a probe (8 KiB written, forced to disk and removed, beside the file) is
    refused for want of room (EDQUOT, EFBIG, ENOSPC). Anything else is the I/O error it is."""
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit != resource.RLIM_INFINITY:
        for suffix in ("", "-wal", "-journal", "-shm"):
            with suppress(OSError):
                if os.path.getsize(path + suffix) >= limit - _A_PAGE_OR_SO:
                    return True
    probe = f"{path}.room-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            left = memoryview(_PROBE)
            while left:  # a short write, then the refusal
                left = left[os.write(fd, left) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        return e.errno in _FULL_ERRNOS
    finally:
        with suppress(OSError):
            os.unlink(probe)
    return False


# Since a write of this process was refused for want of room, until one goes in: what /readyz
# says (`storage_full_report`). One for the process: its stores share a database.
_full_since: str | None = None


def _refused_for_room(error: BaseException, message: str) -> StorageFull:
    """The `StorageFull` to raise for ``error``; noted for `storage_full_report`, and logged
    once until a write goes in again."""
    global _full_since
    # A server's log says so once per outage; a command (no log configured) says it in its one
    # line of refusal, not twice.
    if _full_since is None and log.hasHandlers():
        log.error("the database's storage is full (%s): writes are refused", first_line(error))
    _full_since = message
    return StorageFull(message)


def file_refused(error: OSError) -> StorageFull:
    """The `StorageFull` to answer for a file's write refused for want of room (a key file
    made on first use, say); the log names the file, the message does not (a client reads it)."""
    if log.hasHandlers():
        log.error("%s cannot be written: %s", error.filename or "a file", error.strerror or error)
    return _refused_for_room(
        error,
        f"the server's storage is full ({error.strerror or error}); nothing was written:"
        " make room, then retry",
    )


def _written() -> None:
    global _full_since
    if _full_since is not None:
        _full_since = None
        if log.hasHandlers():
            log.warning("the database takes writes again")


def storage_full_report() -> str | None:
    """What the last write refused for want of room said, until a write goes in again; None
    when no write is being refused for it."""
    return _full_since


def unstorable(error: BaseException) -> bool:
    """Whether ``error`` says the values written cannot be stored (text that is not Unicode, an
    integer too large, a constraint broken, an index entry too large), so that writing them again
    will fail again; not a database that is unavailable, busy or full, which a retry may get
    past."""
    return isinstance(
        error,
        UnicodeError
        | ValueError
        | TypeError
        | OverflowError
        | sqlite3.InterfaceError
        | sqlite3.DataError
        | sqlite3.IntegrityError
        | psycopg.DataError
        | psycopg.IntegrityError
        | psycopg.errors.ProgramLimitExceeded,
    )


def application_name(url: str, role: str) -> str:
    """The ``application_name`` of a connection of bastion's: its role (``bastion``,
    ``bastion-listen``, ...), after the URL's own ``application_name`` if it has one, so an
    operator (or a test) can tell one deployment's connections from another's."""
    prefix = conninfo_to_dict(url).get("application_name")
    return f"{prefix}/{role}" if prefix else role


# Connection parameters bastion sets unless the database URL sets them itself. A peer gone
# without a word is noticed in about 10 s, not the OS's minutes (unanswered statement) or
# 2 hours (idle connection).
CONNECTION_DEFAULTS = {
    "connect_timeout": 5,
    "tcp_user_timeout": 10_000,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}


# Session settings bastion asks for, before the URL's own ``options`` (which win: the last
# ``-c`` of a name counts). No wait for a lock lasts past ``lock_timeout``: a transaction of
# another replica that holds one (paused, or cut off with its TCP still up) would otherwise hold
# every request that needs it, and each one's worker thread, for as long as it lasts; and a
# session left in a transaction and silent is ended by the server after a minute, letting go of
# its locks. A wait refused is `DatabaseUnavailable` (503, retry).
SESSION_DEFAULTS = "-c lock_timeout=30s -c idle_in_transaction_session_timeout=60s"


def connect(url: str, role: str, read_only: bool = False) -> psycopg.Connection:
    """A PostgreSQL connection as bastion opens every one: autocommit, named after ``role``,
    with `CONNECTION_DEFAULTS` for what the URL does not set, and `SESSION_DEFAULTS` before
    the URL's own ``options``; with ``read_only``, one whose every transaction is read-only
    (after the URL's options: it cannot be undone by them). An error names the URL without its
    password (libpq quotes a URL it cannot parse)."""
    try:
        given = conninfo_to_dict(url)
        defaults = {k: v for k, v in CONNECTION_DEFAULTS.items() if k not in given}
        options = f"{SESSION_DEFAULTS} {given.get('options', '')}".strip()
        if read_only:
            options += " -c default_transaction_read_only=on"
        return psycopg.connect(
            url,
            autocommit=True,
            application_name=application_name(url, role),
            options=options,
            **defaults,
        )
    except psycopg.Error as e:
        raise type(e)(without_url_secrets(str(e), url)) from None


def _lock_wait(conn: psycopg.Connection) -> float:
    """How long, in seconds, a statement of the session may wait at most: the smaller of its
    ``lock_timeout`` and ``statement_timeout`` that is set (-1 if neither: PostgreSQL's 0 is
    "without end"), as `SESSION_DEFAULTS`, the URL's ``options`` or the role's or database's
    own settings left them."""
    rows = conn.execute(
        "SELECT setting FROM pg_settings WHERE name IN ('lock_timeout', 'statement_timeout')"
    ).fetchall()
    bounds = [int(setting) for (setting,) in rows if int(setting) > 0]
    return min(bounds) / 1000 if bounds else -1.0


def _readable(fd: int) -> bool:
    """Whether bytes (or the end) wait on the socket ``fd``; True if it cannot be told (closed
    meanwhile). poll, not select: a busy process's descriptors may be numbered past 1024."""
    try:
        waiting = select.poll()
        waiting.register(fd, select.POLLIN)
        return bool(waiting.poll(0))
    except (OSError, ValueError):
        return True


def _is_read(sql: str) -> bool:
    """A statement that changes nothing, so sending it twice is harmless."""
    return sql.lstrip()[:6].upper() == "SELECT"


# The listeners that confirm what they hear (`Listener` with ``confirms``), a row each, and the
# numbers of the barriers `Database.confirm_heard` sends them. PostgreSQL only.
LISTENER_MIGRATIONS = [
    """
    CREATE TABLE IF NOT EXISTS listener_marks (
        listener TEXT PRIMARY KEY,
        channel TEXT NOT NULL,
        backend_pid INTEGER NOT NULL,
        backend_start TIMESTAMPTZ,
        heard BIGINT NOT NULL
    );
    CREATE SEQUENCE IF NOT EXISTS listener_barriers
    """,
]
# A barrier's payload: this, the schema whose sequence numbered it (notices are the database's,
# and deployments in other schemas of it have barriers and listeners of their own), ``:`` and its
# number. No other notice's payload begins so (grant ids, sequence numbers and `USERS_CHANGED` do
# not), and no listener hands one to its owner.
BARRIER_PREFIX = "barrier:"
# The listeners on a channel whose connection is open (the backend of that pid, started when the
# row says: a pid reused by another session is not the listener) and that have not handled a
# barrier. A backend whose start another role's session cannot read (NULL) counts as open.
_UNCONFIRMED = """
    SELECT m.listener FROM listener_marks m
    JOIN pg_stat_activity a ON a.pid = m.backend_pid
    WHERE m.channel = ? AND m.heard < ?
      AND (a.backend_start IS NULL OR m.backend_start IS NULL OR a.backend_start = m.backend_start)
"""
# `Listener`'s defaults: how often it asks its connection, and how long after the last answer it
# stops trusting it (`Listener.healthy`).
_HEARTBEAT = 0.5
_STALE_AFTER = 2.0
# A `Listener` whose connection is lost tries again after `_LISTEN_RETRY_FIRST` seconds, doubled
# at each further failure in a row up to `_LISTEN_RETRY_LONGEST` (each drawn between half and the
# whole: `Backoff`). A database down for an hour is not tried by every replica twice a second at
# the same moments; once it is back, a replica listens again (and catches up) within the longest
# wait, and meanwhile reads the log or the database instead of trusting what it has heard.
_LISTEN_RETRY_FIRST = 0.5
_LISTEN_RETRY_LONGEST = 5.0
# How long `Database.confirm_heard` waits. A listener that has handled no barrier by then has
# answered nothing for `_STALE_AFTER` (so it reads the database instead of its memory), or has the
# barrier waiting on its socket (`Listener.behind`), unless its owner set other bounds.
CONFIRM_WAIT = _STALE_AFTER + _HEARTBEAT


def ensure_listener_marks(db: Database) -> None:
    """PostgreSQL: create the tables of confirming listeners if they are missing (every store
    whose writes are confirmed, and every owner of a confirming `Listener`, asks)."""
    if db.is_postgres:
        db.migrate("listeners", LISTENER_MIGRATIONS)


class Database:
    """A connection to SQLite (a file path or ``sqlite:///path``) or PostgreSQL (``postgresql://``).

    Thread-safe: one connection guarded by a lock. Use `transaction()` for writes that must apply
    together; a statement outside a transaction commits on its own.

    On PostgreSQL a lost connection (a server restart or failover, `pg_terminate_backend`, a
    network device or ``idle_session_timeout`` dropping it) is opened again on next use. A
    connection found dead before a statement is sent is replaced first, so that statement runs
    as if nothing happened. One lost under a statement: a read outside a transaction is sent
    once more on a new connection; a write, or anything inside a transaction (which the server
    rolled back), raises `DatabaseUnavailable`, and so does a failed reconnection. A transaction
    is never replayed in part. ``role`` names the connection (see `application_name`).

    A SQLite file is created readable and writable by its owner only (0600); SQLite gives its
    ``-wal`` and ``-shm`` files the same mode. ``busy_timeout``: how long a SQLite statement
    waits for a lock another connection holds before it fails (`DatabaseUnavailable`); by
    default the URL's ``?busy_timeout=``, else 10 s.

    A thread waits for the connection, which another thread may hold while it waits for a lock,
    as long as a statement waits for a lock (SQLite's ``busy_timeout``, PostgreSQL's
    ``lock_timeout`` or, if smaller, ``statement_timeout``), then gets `DatabaseUnavailable`: the threads queued on the connection
    behind a stuck statement would otherwise each wait their own timeout in turn, and the last
    one all of them together.
    """

    def __init__(
        self,
        url: str,
        *,
        role: str = "bastion",
        busy_timeout: float | None = None,
        read_only: bool = False,
    ) -> None:
        self.url = url
        self.role = role
        # Reads only: a SQLite file opened read-only (never created), a PostgreSQL session whose
        # transactions are read-only; `migrate` checks the schema instead of changing it.
        self.read_only = read_only
        self.is_postgres = is_postgres(url)
        self._lock = threading.RLock()
        self._depth = 0
        # Components this object brought to (or found at) a version in a transaction of its own
        # that committed: `migrate` of them again takes no lock (see there).
        self._migrated: dict[str, int] = {}
        self._after_commit: list[Callable[[], None]] = []
        self._confirming: set[str] = set()  # channels `confirm_after_commit` waits for
        self._conn: Any = None
        self._sqlite_path: str | None = None  # the SQLite file written, for `storage_full`
        self._retry_at = 0.0
        self._failure = ""
        # From a lost connection (or a first one that cannot open) to the next one that opens:
        # said once when it begins, once when it ends.
        self._outage = Outage(log)
        self._wait = -1.0  # seconds a thread waits for the connection (-1: without end)
        if self.is_postgres:
            self._connection()
        else:
            file = sqlite_file(url)
            self._wait = file.busy_timeout if busy_timeout is None else busy_timeout
            if read_only:
                self._conn = sqlite3.connect(
                    f"{Path(file.path).resolve().as_uri()}?mode=ro",
                    uri=True,
                    check_same_thread=False,
                    isolation_level=None,
                    timeout=self._wait,
                )
            else:
                _create_private(file.path)
                self._sqlite_path = file.path
                self._conn = sqlite3.connect(
                    file.path, check_same_thread=False, isolation_level=None, timeout=self._wait
                )
                _use_wal(self._conn)
            self._conn.execute(f"PRAGMA synchronous={file.synchronous}")
            self._conn.execute("PRAGMA foreign_keys=ON")

    def _sql(self, sql: str) -> str:
        return _PLACEHOLDER.sub("%s", sql) if self.is_postgres else sql

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """The connection to this thread, once no other holds it (at once for a thread that
        holds it already); `DatabaseUnavailable` if that takes longer than a lock wait."""
        if not self._lock.acquire(timeout=self._wait):
            bound = "busy_timeout" if not self.is_postgres else "lock_timeout or statement_timeout"
            raise DatabaseUnavailable(_CONNECTION_BUSY.format(bound=f"{bound} ({self._wait:g} s)"))
        try:
            yield
        finally:
            self._lock.release()

    # -- the PostgreSQL connection, opened again when lost ---------------------------------------

    def _connection(self) -> Any:
        """Under the lock, outside a transaction: the connection, replaced first if it is gone.

        Idle, a connection of ours is sent nothing by the server (it LISTENs to nothing), so
        anything readable on its socket is the message of its end (``terminating connection``)
        or the end itself: a statement sent on it would be lost, so it is replaced unsent.
        """
        conn = self._conn
        if conn is not None and not conn.closed:
            try:
                readable = _readable(conn.fileno())
            except psycopg.Error:
                readable = True
            if not readable:
                return conn
            self._drop("the server ended the connection while it was idle")
        if time.monotonic() < self._retry_at:
            raise DatabaseUnavailable(self._failure)
        try:
            conn = connect(self.url, self.role, self.read_only)
            try:
                self._wait = _lock_wait(conn)
            except psycopg.Error:
                conn.close()
                raise
            self._conn = conn
        except psycopg.Error as e:
            # Said once per outage, not at every attempt.
            self._outage.failed("%s: cannot connect to PostgreSQL: %s", self.role, first_line(e))
            self._retry_at = time.monotonic() + _RECONNECT_INTERVAL
            self._failure = f"the database is unavailable ({first_line(e)}); retry"
            raise DatabaseUnavailable(self._failure) from e
        self._outage.ended("%s: connected to PostgreSQL again", self.role)
        self._retry_at, self._failure = 0.0, ""
        return self._conn

    def _drop(self, why: str) -> None:
        """Under the lock: forget a connection that is gone (closing what is left of it)."""
        conn, self._conn = self._conn, None
        self._failure = f"the database connection was lost ({why}); retry"
        self._outage.failed(
            "%s: PostgreSQL connection lost (%s); reconnecting on next use", self.role, why
        )
        if conn is not None:
            with suppress(psycopg.Error):
                conn.close()

    def _lost(self, conn: Any, error: Exception) -> bool:
        """Whether ``error`` (raised on ``conn``) means the connection is gone; then drop it.

        Gone: psycopg marked it closed or broken, or the server said it is ending it (SQLSTATE
        class 57P, as for ``pg_terminate_backend``) in ``error`` or the error it arose from.
        psycopg does not mark every such connection broken: one ended while a pipelined
        ``executemany`` was under way is left "busy", and fails every later statement with
        "cannot exit pipeline mode while busy"."""
        if not isinstance(error, _CONNECTION_ERRORS):
            return False
        if not (conn.closed or conn.broken or _server_ended(error)):
            return False
        if conn is self._conn:
            self._drop(first_line(error))
        return True

    def _run(self, work: Callable[[Any], Any], *, again: bool) -> Any:
        """``work(connection)`` under the lock. On PostgreSQL, a connection found gone is
        replaced first; one lost under ``work`` is replaced and ``work`` run once more only if
        ``again`` (it changes nothing) and no transaction is open."""
        with self._turn():
            if not self.is_postgres:
                try:
                    done = work(self._conn)
                except sqlite3.OperationalError as e:
                    if getattr(e, "sqlite_errorcode", 0) & 0xFF in (
                        sqlite3.SQLITE_BUSY,
                        sqlite3.SQLITE_LOCKED,
                    ):
                        raise DatabaseUnavailable(_SQLITE_BUSY_REFUSED) from e
                    if storage_full(e, self._sqlite_path):
                        raise self._full(e, transaction=self._depth > 0) from e
                    raise
                if not again and not self._depth:
                    _written()
                return done
            in_transaction = self._depth > 0
            if in_transaction and self._conn is None:
                raise DatabaseUnavailable(self._failure)
            conn = self._conn if in_transaction else self._connection()
            try:
                done = work(conn)
                if not again and not in_transaction:
                    _written()
                return done
            except (psycopg.errors.DiskFull, psycopg.errors.InternalError_) as e:
                if not storage_full(e):
                    raise
                raise self._full(e, transaction=in_transaction) from e
            except psycopg.errors.LockNotAvailable as e:
                raise DatabaseUnavailable(_LOCK_REFUSED) from e
            except psycopg.errors.QueryCanceled as e:
                raise DatabaseUnavailable(_STATEMENT_CANCELLED) from e
            except _CONNECTION_ERRORS as e:
                if not self._lost(conn, e):
                    raise
                if in_transaction:
                    raise DatabaseUnavailable(
                        f"the database connection was lost ({first_line(e)}); the transaction"
                        " was rolled back; retry"
                    ) from e
                if not again:
                    raise DatabaseUnavailable(
                        f"the database connection was lost during a write ({first_line(e)}),"
                        " which may or may not have been applied; retry"
                    ) from e
            conn = self._connection()
            try:
                return work(conn)
            except _CONNECTION_ERRORS as e:
                if not self._lost(conn, e):
                    raise
                raise DatabaseUnavailable(
                    f"the database connection was lost again ({first_line(e)}); retry"
                ) from e

    @staticmethod
    def _full(error: BaseException, *, transaction: bool) -> StorageFull:
        """A write refused for want of room: a transaction's (rolled back) or a statement's
        alone (never applied)."""
        what = "the transaction was rolled back" if transaction else "nothing was written"
        return _refused_for_room(
            error,
            f"the database's storage is full ({first_line(error)}); {what}: make room, then retry",
        )

    # -- statements ------------------------------------------------------------------------------

    def execute(
        self, sql: str, params: Sequence[Any] = (), *, read: bool | None = None
    ) -> list[tuple]:
        """Run one statement and return its rows (empty for statements that return none).

        ``read`` says the statement changes nothing (by default: it is a ``SELECT``), so it may
        be sent again on a new connection if the first was lost under it.
        """
        sql = self._sql(sql)
        params = tuple(params)

        def run(conn: Any) -> list[tuple]:
            cur = conn.execute(sql, params)
            return list(cur.fetchall()) if cur.description else []

        return self._run(run, again=_is_read(sql) if read is None else read)

    def data_version(self, wait: bool = True) -> int | None:
        """SQLite's ``PRAGMA data_version`` on this connection: it changes when another
        connection commits. None on PostgreSQL, and while another thread uses the connection:
        at once with ``wait`` False (the event loop does not wait for a worker's statement),
        else past the wait for a lock. Read on the gateway's call path (revocation), so without
        `execute`'s general handling."""
        if self.is_postgres or not self._lock.acquire(timeout=self._wait if wait else 0):
            return None
        try:
            return self._conn.execute("PRAGMA data_version").fetchone()[0]
        finally:
            self._lock.release()

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        def run(conn: Any) -> None:
            if self.is_postgres:
                with conn.cursor() as cur:
                    cur.executemany(self._sql(sql), rows)
            else:
                conn.executemany(sql, rows)

        self._run(run, again=False)

    def copy_rows(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Load many rows into ``table`` at once: PostgreSQL's COPY; plain inserts on SQLite."""

        def run(conn: Any) -> None:
            if self.is_postgres:
                with (
                    conn.cursor() as cur,
                    cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy,
                ):
                    for row in rows:
                        copy.write_row(row)
            else:
                marks = ", ".join("?" * len(columns))
                conn.executemany(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows
                )

        self._run(run, again=False)

    @contextmanager
    def transaction(self, *, read_only: bool = False) -> Iterator[Database]:
        """All statements inside apply together or not at all. Nested calls join the outer one.

        ``read_only=True`` reads one consistent snapshot without taking SQLite's write lock.
        A connection lost inside rolls the transaction back (the server does); the caller gets
        `DatabaseUnavailable`, and may run the whole transaction again.
        """
        with self._turn():
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
            # Nothing is sent before BEGIN, so it may be sent again on a new connection.
            self._run(lambda conn: conn.execute(begin), again=True)
            self._depth = 1
            try:
                try:
                    yield self
                finally:
                    self._depth = 0
                self._commit()
            except BaseException as e:
                self._after_commit.clear()
                self._confirming.clear()
                self._rollback()  # also after a COMMIT that failed (SQLite may leave it open)
                if storage_full(e) and not isinstance(e, StorageFull):  # PostgreSQL COMMIT
                    raise self._full(e, transaction=True) from e
                raise
            if not read_only:
                _written()
            callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            callback()

    def lock(self, name: str, *, shared: bool = False) -> None:
        """Inside a transaction: hold the lock ``name`` until it ends, so writers of one thing
        (one approval's binding, the change log) take turns across processes; ``shared`` ones
        run side by side, and only wait for one that is not. PostgreSQL's advisory lock;
        nothing on SQLite, where BEGIN IMMEDIATE lets one writer in at a time."""
        if self.is_postgres:
            function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
            self.execute(f"SELECT {function}(hashtext(?))", (name,))

    def _rollback(self) -> None:
        conn = self._conn
        if conn is None:
            return  # lost: the server rolled the transaction back
        if not self.is_postgres and not conn.in_transaction:
            return  # SQLite rolled it back itself (on a full disk, say): ROLLBACK would fail
        try:
            conn.execute("ROLLBACK")
        except _CONNECTION_ERRORS as e:
            if not self._lost(conn, e):
                raise

    def _commit(self) -> None:
        conn = self._conn
        if conn is None:
            raise DatabaseUnavailable(self._failure)
        try:
            conn.execute("COMMIT")
        except sqlite3.OperationalError as e:
            if storage_full(e, self._sqlite_path):
                raise self._full(e, transaction=True) from e
            raise
        except _CONNECTION_ERRORS as e:
            if not self._lost(conn, e):
                raise
            raise DatabaseUnavailable(
                f"the database connection was lost while committing ({first_line(e)}): the"
                " write may or may not have been applied; check before retrying"
            ) from e

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
            self.execute("SELECT pg_notify(?, ?)", (channel, payload), read=False)

    def confirm_after_commit(self, channel: str) -> None:
        """PostgreSQL: once the transaction in progress has committed (at once outside one),
        `confirm_heard` on ``channel``, once however often this is asked in the transaction:
        its commit returns only when every listener that confirms has handled its notices.
        SQLite: nothing (each process reads the file's state itself)."""
        if not self.is_postgres:
            return
        with self._lock:
            if channel in self._confirming:
                return
            self._confirming.add(channel)
        self.after_commit(lambda: self.confirm_heard(channel))

    def confirm_heard(self, channel: str, timeout: float = CONFIRM_WAIT) -> bool:
        """PostgreSQL: wait until every listener that confirms (`Listener` with ``confirms``,
        in any process) and whose connection is open has handled every notice on ``channel``
        committed before this call; whether they all did within ``timeout`` seconds (those that
        did not are logged). A barrier (`BARRIER_PREFIX` and a number of the ``listener_barriers``
        sequence, taken after those commits) is sent on the channel; notices of one channel
        arrive in commit order, so a listener that has handled it has handled them, and it
        writes the number to its row of ``listener_marks``. One that has not within
        `CONFIRM_WAIT` has stopped trusting what it remembers (`Listener.healthy`), or reads
        the notice it has not handled yet (`Listener.behind`). A database that fails meanwhile
        ends the wait (logged): what was committed stays committed."""
        with self._lock:
            self._confirming.discard(channel)
        try:
            [(barrier, _)] = self.execute(
                "SELECT n, pg_notify(?, ?::text || current_schema() || ':' || n)"
                " FROM (SELECT nextval('listener_barriers') AS n) b",
                (channel, BARRIER_PREFIX),
                read=False,
            )
            deadline = time.monotonic() + timeout
            pause = 0.0005
            while True:
                waiting = [row[0] for row in self.execute(_UNCONFIRMED, (channel, barrier))]
                left = deadline - time.monotonic()
                if not waiting or left <= 0:
                    break
                time.sleep(min(pause, left))
                pause = min(pause * 2, 0.025)
        except (DatabaseUnavailable, psycopg.Error) as e:
            log.warning(
                "could not confirm that every listener on %s heard a commit: %s",
                channel,
                first_line(e),
            )
            return False
        if waiting:
            log.warning(
                "listeners on %s did not confirm a commit within %g s (they read the database"
                " until they do): %s",
                channel,
                timeout,
                ", ".join(waiting),
            )
        return not waiting

    def migrate(self, component: str, migrations: Sequence[str]) -> int:
        """Apply the component's migrations not yet applied; return the schema version reached.

        ``migrations[i]`` is the SQL script of version ``i + 1``; statements are separated by
        ``;`` at line ends. Safe to call from several processes at once. On a read-only
        `Database`, nothing is applied: `DatabaseSettingError` unless every one is already.
        """
        if self.read_only:
            return self._migrated_read_only(component, len(migrations))
        if self._migrated.get(component) == len(migrations):
            # Done once by this object: not again, and not under the component's lock, which a
            # call inside a transaction (`AuditLog(db)` where a connection is revoked, say)
            # would hold to its end, making every such transaction of every process wait on
            # one another, and on any process stopped while it held it.
            return len(migrations)
        # Inside another transaction (this thread's), the outer one may still roll back.
        own_transaction = self._depth == 0
        with self.transaction():
            self.lock(f"bastion:{component}")
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
            if current > len(migrations):
                raise SchemaNewer(_newer_message([(component, current, len(migrations))]))
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
        with _KNOWN_SCHEMA_LOCK:
            _KNOWN_SCHEMA[component] = max(_KNOWN_SCHEMA.get(component, 0), len(migrations))
        if own_transaction:
            self._migrated[component] = len(migrations)
        return len(migrations)

    def _migrated_read_only(self, component: str, known: int) -> int:
        """`migrate` on a read-only `Database`: the schema version reached, if it is this
        code's (``known``); else `SchemaNewer`, or `DatabaseSettingError` for one not reached
        yet (which only a process that may write can reach)."""
        try:
            rows = self.execute(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations WHERE component = ?",
                (component,),
            )
        except (sqlite3.Error, psycopg.Error):
            rows = [(0,)]
        current = rows[0][0]
        if current > known:
            raise SchemaNewer(_newer_message([(component, current, known)]))
        if current < known:
            raise DatabaseSettingError(
                f"the database's {component} tables are not at this bastion's version ({current}"
                f" of {known}) and it is read here without writing: start bastion serve on it"
                " once (it migrates them), then try again"
            )
        return known

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()


# Rows a retention deletes per transaction, so other writers wait little for the database.
PRUNE_BATCH = 5000


def prune_rows(
    db: Database,
    component: str,
    table: str,
    key: str,
    where: str,
    params: Sequence[Any],
    children: Sequence[tuple[str, str]] = (),
    batch: int = PRUNE_BATCH,
) -> dict[str, int]:
    """Delete the rows of ``table`` that ``where`` selects (SQL over its columns, with
    ``params``), ``batch`` per transaction, each with the rows of its ``children`` (``(table,
    column)``, the column holding ``table``'s ``key``), deleted first. The rows are locked as
    they are chosen (PostgreSQL: ``FOR UPDATE``, which reads ``where`` again on a row changed
    meanwhile; SQLite's writers take turns), so a row changed to be kept stays with its
    children. Nothing while ``component``, whose migrations make the tables, was never migrated
    in ``db``. Returns the rows deleted per table, a table with none left out."""
    if not db.execute("SELECT 1 FROM schema_migrations WHERE component = ?", (component,)):
        return {}
    lock = " FOR UPDATE" if db.is_postgres else ""
    deleted: dict[str, int] = {}
    while True:
        with db.transaction():
            keys = [
                row[0]
                for row in db.execute(
                    f"SELECT {key} FROM {table} WHERE {where} ORDER BY {key} LIMIT ?{lock}",
                    (*params, batch),
                )
            ]
            marks = ", ".join("?" * len(keys))
            for name, column in (*children, (table, key)):
                if keys:
                    gone = db.execute(
                        f"DELETE FROM {name} WHERE {column} IN ({marks}) RETURNING 1", keys
                    )
                    if gone:
                        deleted[name] = deleted.get(name, 0) + len(gone)
        if len(keys) < batch:
            return deleted


def schema_and_clock(db: Database) -> tuple[str | None, float | None]:
    """Why this process must stop using ``db`` (a component it migrated, `Database.migrate`, is
    at a later version there than its code knows: a newer bastion has migrated it since; None
    while none is) and, on PostgreSQL, the `clock_skew` of this process, read by one statement
    (a replica asks both once a second, `Replica`). On SQLite the database is on this machine
    and its clock is this process's: None."""
    with _KNOWN_SCHEMA_LOCK:
        known = dict(_KNOWN_SCHEMA)
    query = "SELECT component, MAX(version){} FROM schema_migrations GROUP BY component"
    skew = None
    if db.is_postgres:
        before = time.time()
        rows = db.execute(query.format(", EXTRACT(EPOCH FROM clock_timestamp())::float8"))
        skew = clock_skew(before, time.time(), rows[0][2]) if rows else None
    elif known:
        rows = db.execute(query.format(""))
    else:
        rows = []
    ahead = sorted((c, v, known[c]) for c, v, *_ in rows if c in known and v > known[c])
    return (_newer_message(ahead) if ahead else None), skew


def clock_skew(before: float, after: float, database_time: float) -> float:
    """How many seconds this process's clock (`time.time`) is ahead of the database's (negative:
    behind), given the database's time read between ``before`` and ``after`` on this one: the
    least consistent with the round trip (0 when the database's time falls within it), so a
    slow answer never makes a clock look off."""
    if before > database_time:
        return before - database_time
    if after < database_time:
        return after - database_time
    return 0.0


def _newer_message(ahead: list[tuple[str, int, int]]) -> str:
    """What `SchemaNewer` and `schema_and_clock` say of ``(component, version there, version
    known)``."""
    which = ", ".join(
        f"{component} version {there} (this bastion knows version {known})"
        for component, there, known in ahead
    )
    return (
        f"a newer bastion migrated the database: {which}; run that version (or newer), or"
        " restore the backup taken before the upgrade to run this one (docs/operations.md,"
        ' "Upgrading")'
    )


def first_line(error: BaseException) -> str:
    """The first line of an error's message (psycopg's run to several), for logs and answers."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def round_failed(outage: Outage, error: BaseException, message: str) -> bool:
    """Tell ``outage`` (a background round's, run again and again) that the round failed with
    ``error``: "``message`` (its first line); trying again", the database away
    (`DatabaseUnavailable`) as a warning, once for as long as it is away; another error at
    ERROR with its traceback, once for as long as it stays the same (`kind_of`). True if it
    was said (not at DEBUG)."""
    if isinstance(error, DatabaseUnavailable):
        return outage.failed(
            "%s (%s); trying again", message, first_line(error), kind="unavailable", stacklevel=2
        )
    return outage.failed(
        "%s (%s); trying again",
        message,
        first_line(error),
        kind=kind_of(error),
        level=logging.ERROR,
        exc_info=True,
        stacklevel=2,
    )


def _create_private(path: str) -> None:
    """Create the SQLite file ``path`` with mode 0600 if it does not exist yet (SQLite would make
    it 0644, readable by every local user), and warn if an existing one is readable by others."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileNotFoundError:
        raise DatabaseSettingError(
            f"cannot create the database {path}: its directory does not exist"
        ) from None
    except FileExistsError:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise DatabaseSettingError(
                f"{path} is a directory; give the path of a SQLite file (or a postgresql:// URL)"
            ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning(
                "%s is readable or writable by other users (mode %o); chmod 600 it",
                path,
                stat.S_IMODE(mode),
            )
        return
    os.close(fd)


# How a SQLite commit is made durable, chosen by the URL's ``?synchronous=``. ``full`` (the
# default) writes the log through to the disk at each commit, so a write that was answered
# outlives a power loss or an operating system crash, not only the process's end; ``normal``
# (SQLite's own default in WAL mode, 0.2 to 1 ms less per commit on a virtual disk) may lose the
# last commits then: a revocation, a suspension or a denial answered but gone after the power
# comes back.
SQLITE_SYNCHRONOUS = ("full", "normal")
# How long a SQLite statement waits for the write lock of another connection (another process's)
# by default, the URL's ``?busy_timeout=`` otherwise; a request waits as long for its turn on the
# connection. Past it the request is refused (503, retry), never left waiting for all before it.
SQLITE_BUSY_TIMEOUT = 10.0


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


class SqliteFile(NamedTuple):
    """A SQLite database as its URL names it: the file, its ``synchronous`` level (upper case,
    as the PRAGMA takes it) and its ``busy_timeout`` (seconds a statement waits for a lock that
    another connection holds, and a request for the connection other requests hold)."""

    path: str
    synchronous: str
    busy_timeout: float


def sqlite_file(url: str) -> SqliteFile:
    """The file of a SQLite URL (``sqlite:///path``, or a path) and its settings:
    ``?synchronous=full|normal`` and ``?busy_timeout=<seconds>``.

    A server's state must outlive it: an empty path and ``:memory:`` (which SQLite opens as a
    database thrown away on close) are refused, and so is a URL of any other scheme (``mysql://``
    would otherwise be a file name)."""
    scheme, sep, _ = url.partition("://")
    if sep and scheme != "sqlite":
        raise DatabaseSettingError(
            f"{safe_url(url)!r}: bastion's database is a SQLite file (a path or sqlite:///path) or a"
            f" postgresql:// URL, not {scheme}://"
        )
    path, _, query = url.removeprefix("sqlite:///").removeprefix("sqlite://").partition("?")
    if path in ("", ":memory:"):
        raise DatabaseSettingError(
            f"the database {url!r} names no file: give the path of a SQLite file (an empty"
            " path or :memory: is a database thrown away when the process ends) or a"
            " postgresql:// URL"
        )
    settings = dict(parse_qsl(query, keep_blank_values=True))
    level = settings.pop("synchronous", "full")
    busy = settings.pop("busy_timeout", str(SQLITE_BUSY_TIMEOUT))
    try:
        busy_timeout = float(busy)
    except ValueError:
        busy_timeout = -1.0
    if settings or level not in SQLITE_SYNCHRONOUS or not 0 <= busy_timeout <= 3600:
        raise DatabaseSettingError(
            f"the SQLite database {path!r} takes the settings"
            f" ?synchronous={'|'.join(SQLITE_SYNCHRONOUS)} and &busy_timeout=<seconds, 0 to 3600>,"
            f" not {query!r}"
        )
    return SqliteFile(path, level.upper(), busy_timeout)


def existing_database(url: str) -> str:
    """``url`` if it names a database that is there: a command other than those that set a
    deployment up must not make a new, empty one on a mistyped path (PostgreSQL databases are
    never created by connecting)."""
    if is_postgres(url):
        return url
    path = sqlite_file(url).path
    if os.path.isdir(path):
        raise DatabaseSettingError(
            f"{path} is a directory; give the path of a SQLite file (or a postgresql:// URL)"
        )
    if not os.path.exists(path):
        raise DatabaseSettingError(
            f"no database at {path} (bastion serve creates it); check --database,"
            " BASTION_DATABASE or database in the configuration"
        )
    return url


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
    ``name`` names the thread and the connection (see `application_name`). Attempts to connect
    again back off (``retries``; by default from `_LISTEN_RETRY_FIRST` up to
    `_LISTEN_RETRY_LONGEST` seconds), and an outage is logged once, when it begins and when it
    ends, not at every attempt.

    A notification can reach this process before its thread has handled it (the thread waits
    for the GIL while a request is decided): `behind` tells, so that a caller who must not act
    on what the notice would change (a revoked token, a changed fact) waits for it
    (`caught_up`) or reads the database.

    With ``confirms`` the listener says what it has heard, so that a writer can answer only once
    every process knows (`Database.confirm_heard`): it keeps a row of ``listener_marks`` (its
    owner creates the table: `ensure_listener_marks`) naming its connection's backend, written
    before it LISTENs, and writes there the number of each barrier it handles, after every
    notice before it. Once LISTENing it writes the number of the last barrier taken before
    ``on_listening``: whatever was committed before that barrier, the owner catches up on
    there. Barriers are never handed to ``on_notify``, whether or not the listener confirms.
    """

    def __init__(
        self,
        url: str,
        channel: str,
        *,
        on_notify: Callable[[str], None],
        on_listening: Callable[[], None],
        name: str,
        heartbeat: float = _HEARTBEAT,
        stale_after: float = _STALE_AFTER,
        confirms: bool = False,
        retries: Backoff | None = None,
    ) -> None:
        self.url = url
        self.retries = retries or Backoff(_LISTEN_RETRY_FIRST, _LISTEN_RETRY_LONGEST)
        self.confirms = confirms
        self.mark = f"{name}:{os.getpid()}:{uuid.uuid4().hex[:12]}"  # its row of listener_marks
        self._schema = ""  # the schema of its connection (`_register`): its barriers name it
        self.channel = channel
        self.name = name
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self.backend_pid: int | None = None
        self._on_notify = on_notify
        self._on_listening = on_listening
        self._connected = False
        self._answered_at = 0.0
        # The connection's socket while connected, and whether the thread is parked on it with
        # every notification it has read handled (see `behind`).
        self._fd = -1
        self._waiting = False
        self._parked = threading.Condition()  # told each time the thread parks (`caught_up`)
        self._stopping = threading.Event()
        # Written by `stop` to wake the thread parked on the socket (`_follow`), which would
        # otherwise end only at its next heartbeat; made by `start`.
        self._wake: tuple[int, int] | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def healthy(self) -> bool:
        return self._connected and time.monotonic() - self._answered_at < self.stale_after

    def behind(self) -> bool:
        """True when a notification may have reached this process and not been handled yet:
        bytes wait on the socket, or the thread is not parked waiting for them (it is reading
        them, handling them, or asking its heartbeat, which can read one too). The socket is
        looked at first: if the thread took the bytes in between, it had stopped waiting
        before, and the second look sees it. A notice still on its way from PostgreSQL is not
        seen; it left after its commit, not before the commit's client heard back."""
        fd = self._fd
        return fd < 0 or _readable(fd) or not self._waiting

    def caught_up(self, timeout: float) -> bool:
        """Wait until the thread has handled every notification that reached this process
        (not `behind`); False if that takes longer than ``timeout`` seconds, or the connection
        is lost meanwhile."""
        if not self.behind():
            return True
        deadline = time.monotonic() + timeout
        with self._parked:
            while self.behind():
                left = deadline - time.monotonic()
                if not self._connected or left <= 0 or not self._parked.wait(left):
                    return False
        return True

    def start(self) -> None:
        self._wake = os.pipe()
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stopping.set()
        if self._wake is None:
            return  # never started
        with suppress(OSError):
            os.write(self._wake[1], b"\0")
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():  # a thread still at work keeps reading them
            wake, self._wake = self._wake, None
            for fd in wake:
                os.close(fd)

    def _run(self) -> None:
        # From the connection's loss until the LISTEN is in force again: said once.
        outage = Outage(log)
        while not self._stopping.is_set():
            try:
                with connect(self.url, self.name) as conn:
                    if self.confirms:
                        self._register(conn)
                    conn.execute(f"LISTEN {self.channel}")
                    self.backend_pid = conn.info.backend_pid
                    barrier = _last_barrier(conn) if self.confirms else 0
                    self._on_listening()
                    if self.confirms:
                        self._confirm(conn, barrier)
                    self._answered_at = time.monotonic()
                    self._fd = conn.fileno()
                    self.retries.succeeded()
                    outage.ended("%s: listening on %s again", self.name, self.channel)
                    self._connected = True
                    self._follow(conn)
                    if self.confirms:
                        conn.execute("DELETE FROM listener_marks WHERE listener = %s", (self.mark,))
            except Exception as e:  # a dropped connection: reconnect, then catch up
                self._lost()
                if not self._stopping.is_set():
                    outage.failed(
                        "%s: notifications on %s lost (%s); reconnecting",
                        self.name,
                        self.channel,
                        first_line(e),
                    )
                    self._stopping.wait(self.retries.after_failure())
        self._lost()

    def _lost(self) -> None:
        self._connected, self._waiting, self._fd = False, False, -1
        with self._parked:
            self._parked.notify_all()  # a `caught_up` waiting gives up now

    def _follow(self, conn: psycopg.Connection) -> None:
        """Park on the socket until bytes come or the heartbeat is due, then handle every
        notification read, and park again only once they are handled. Bytes that were no
        notification (the server's last words, say) are followed by the heartbeat at once, so
        a connection the server ends is known lost before the thread parks on it again."""
        parked = select.poll()
        parked.register(self._fd, select.POLLIN)
        if self._wake is not None:
            parked.register(self._wake[0], select.POLLIN)  # `stop`
        beat = time.monotonic() + self.heartbeat
        while not self._stopping.is_set():
            self._waiting = True
            with self._parked:
                self._parked.notify_all()
            woke = parked.poll(max(0, (beat - time.monotonic()) * 1000))
            self._waiting = False
            if self._stopping.is_set():
                return
            heard = self._handle(conn)
            if (woke and not heard) or time.monotonic() >= beat:
                conn.execute("SELECT 1")
                self._answered_at = time.monotonic()
                beat = self._answered_at + self.heartbeat
                self._handle(conn)  # those the query read, kept for the next ``notifies``

    def _handle(self, conn: psycopg.Connection) -> bool:
        """Handle the notifications read, waiting for none; whether there were any. The last
        barrier among them is confirmed once all of them are handled."""
        heard = False
        barrier = 0
        for note in conn.notifies(timeout=0):
            heard = True
            if note.payload.startswith(BARRIER_PREFIX):
                schema, _, number = note.payload[len(BARRIER_PREFIX) :].rpartition(":")
                if schema == self._schema and number.isdigit():
                    barrier = max(barrier, int(number))
            else:
                self._on_notify(note.payload)
        if barrier and self.confirms:
            self._confirm(conn, barrier)
        return heard

    def _register(self, conn: psycopg.Connection) -> None:
        """Before LISTEN: this listener's row, for its connection's backend, confirming the
        barriers taken so far (what was committed before them, ``on_listening`` catches up on
        before this listener is healthy), and no more rows of listeners whose connection is
        gone."""
        self._schema = conn.execute("SELECT current_schema()").fetchone()[0]  # type: ignore[index]
        conn.execute(
            "DELETE FROM listener_marks m WHERE NOT EXISTS"
            " (SELECT 1 FROM pg_stat_activity a WHERE a.pid = m.backend_pid)"
        )
        conn.execute(
            "INSERT INTO listener_marks (listener, channel, backend_pid, backend_start, heard)"
            " SELECT %s, %s, pid, backend_start, %s FROM pg_stat_activity"
            " WHERE pid = pg_backend_pid()"
            " ON CONFLICT (listener) DO UPDATE SET backend_pid = EXCLUDED.backend_pid,"
            " backend_start = EXCLUDED.backend_start, heard = EXCLUDED.heard",
            (self.mark, self.channel, _last_barrier(conn)),
        )

    def _confirm(self, conn: psycopg.Connection, barrier: int) -> None:
        conn.execute(
            "UPDATE listener_marks SET heard = GREATEST(heard, %s) WHERE listener = %s",
            (barrier, self.mark),
        )


def _last_barrier(conn: psycopg.Connection) -> int:
    """The number of the last barrier taken (0 before the first)."""
    row = conn.execute(
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM listener_barriers"
    ).fetchone()
    return int(row[0]) if row else 0
