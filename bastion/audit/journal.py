"""The decision journal: each decision the gateway takes is appended to a local file before its
call goes upstream, and each the decision service answers (``decision_log = "database"``) before
its answer leaves the process, so that a process killed outright (SIGKILL, the OOM killer) loses
no record.

Records are buffered and written in batches (`bastion.audit.decisions`,
`bastion.audit.decision_log`), and an allowed call's record only once it is answered: a process
that dies in between took decisions the database never hears of. Each writer keeps a journal of
its own kind (`Journalled`: the gateway's, `GATEWAY`, in ``*.journal`` files; the decision
service's in ``*.decision-log`` ones), and a sweep of one kind reads only its own files.

Each process appends a line per decision to a file of its own (and, at the gateway, another
when bastion then holds or refuses the call it allowed: `DecisionJournal.amend`), with one
``os.write`` on an ``O_APPEND`` descriptor (the kernel keeps what was written when the process
dies), and holds an ``flock`` on it while it lives. With ``fsync`` (`[server]
decision_journal_fsync`), the record writer forces what was appended to the disk at each flush,
off the event loop, so that a power loss or an operating system crash loses only the lines
appended since the last flush; without it, any line not written out by the kernel yet. Once
every decision in it is stored the file is emptied; one that keeps growing is rewritten with
only the decisions not stored yet. At start, and every `SWEEP_SECONDS` after, a process takes the
journals of dead ones (their lock free) and writes every decision the database lacks: the
gateway's as a record marked ``recovered`` (its call may have reached its upstream: the outcome
is unknown), the decision service's as it was answered.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion.json_encoding import encoder, kept
from bastion.retries import Outage

if TYPE_CHECKING:
    from bastion.audit.buffered import BufferedWriter
    from bastion.db import Database

log = logging.getLogger("bastion.audit")

# What a journal line keeps of a record: enough to say who was let do what, when, on which
# policy and facts, and with which arguments (their digest). Not the context, rules or
# obligations: costly to encode on the call path, and known only to the full record. First
# what is the decision's own, then what the decisions of one answer share (all text), whose
# text is kept (`_shared_text`). Lines are read by the names their journal's header gives.
_OWN = ("id", "at", "arguments_digest", "policy_version", "sequence")
_SHARED = (
    "server",
    "method",
    "target",
    "principals",
    "result",
    "reason",
    "deciding_principal",
    "grant_id",
    "task",
    "session",
)
JOURNALED = _OWN + _SHARED
_JOURNALED = frozenset(JOURNALED)
SUFFIX = ".journal"
# A journal past this size, still holding decisions not stored, is rewritten with those only.
REWRITE_BYTES = 1 << 20
# How often a live process looks for the journals of dead ones (replicas sharing a directory).
SWEEP_SECONDS = 30.0
# Decision ids looked up per statement when recovering.
LOOKUP_BATCH = 500
# The first line of every journal: which database its decisions belong to. A journal of another
# database (a directory shared by two deployments) is left alone.
FORMAT = 1

# ASCII JSON: no line break can stand in a line, and its bytes are its text's. A line is an
# array of the `JOURNALED` values, in the order the header names them (half the cost of an
# object with their names, on the call path): the array of the `_OWN` ones and the kept array
# of the `_SHARED` ones, joined (a third of the cost of encoding them all each time).
_encode = encoder(separators=(",", ":"), default=str, check_circular=False)
_own = itemgetter(*_OWN)
_shared = itemgetter(*_SHARED)
_shared_text = kept(_encode)


def _line(fields: Mapping[str, Any]) -> bytes:
    """A decision's journal line: the `JOURNALED` values of its record's ``fields``."""
    return (_encode(_own(fields))[:-1] + "," + _shared_text(_shared(fields))[1:] + "\n").encode()


@dataclass(frozen=True)
class Journalled:
    """What one writer's journal keeps, and how a sweep stores it again: the gateway's
    (`GATEWAY`), and the decision service's durable log (`bastion.audit.decision_log`)."""

    # The table the records go to, by their ``id`` (its key): named in the header (the
    # gateway's, ``audit_decisions``, left out: its journals read as they always have).
    table: str
    # What its journals' names end with: a sweep reads only its own kind's (an older version
    # only ``*.journal``).
    suffix: str
    # The names of a line's values, in order (the header says them).
    fields: tuple[str, ...]
    # A decision's line, and its id, from what `DecisionJournal.append` is given.
    line: Callable[[Any], bytes]
    decision_id: Callable[[Any], str]
    # What the writer buffers for a decision (`BufferedWriter.restore`), from its line read
    # back (its values by name).
    restore: Callable[[dict[str, Any]], Any]
    # What the log says of the records recovered.
    outcome: str


def _recovered(entry: dict[str, Any]) -> tuple[Any, None]:
    """A gateway decision record from its journal line, marked ``recovered``, as it waits in
    the record writer (its rules not to be worked out: it has none)."""
    from bastion.audit.decisions import DecisionRecord

    return (DecisionRecord.from_dict({**entry, "recovered": True}), None)


GATEWAY = Journalled(
    table="audit_decisions",
    suffix=SUFFIX,
    fields=JOURNALED,
    line=_line,
    decision_id=itemgetter("id"),
    restore=_recovered,
    outcome="each is marked recovered, and its call may have reached its upstream",
)


# Journals of another database found in the directory, named in the log once.
_LEFT_ALONE: set[str] = set()


def database_identity(url: str) -> str:
    """The database a journal's decisions belong to, as its header names it: a SQLite file's
    real path, or a PostgreSQL server, database, user and options (never a password)."""
    from bastion.db import is_postgres, sqlite_file

    if is_postgres(url):
        from psycopg.conninfo import conninfo_to_dict

        # What names the tables written to: the server, the database, the role and its
        # options (a search_path: deployments may share a database, each in a schema).
        info = conninfo_to_dict(url)
        return _encode(
            [str(info.get(key, "")) for key in ("host", "port", "dbname", "user", "options")]
        )
    return os.path.realpath(sqlite_file(url).path)


def _header(database: str, kind: Journalled) -> bytes:
    """A journal's first line: its format, its database, the names of its lines' values, and
    (but for the gateway's) the table its records go to."""
    header = {"bastion_decision_journal": FORMAT, "database": database, "fields": kind.fields}
    if kind.table != GATEWAY.table:
        header["table"] = kind.table
    return (_encode(header) + "\n").encode()


class DecisionJournal:
    """This process's journal of one ``kind`` (`Journalled`). `append` runs on the event loop
    for each decision; `settled` and `sync` run on the record writer's thread once records are
    stored (or given up, counted and logged by the writer, `bastion.audit.buffered`). One lock keeps a line from being appended to a file that
    is being emptied or replaced; no disk wait (an fsync, a rewrite's writing) happens under it,
    so a call never waits for the disk. ``fsync``: force the journal to the disk at each flush
    (`sync`)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        database: str,
        fsync: bool = False,
        kind: Journalled = GATEWAY,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.database = database
        self.fsync = fsync
        self.kind = kind
        self._line, self._decision_id = kind.line, kind.decision_id
        self._header = _header(database, kind)
        self._lock = threading.Lock()
        # The lines of decisions not stored yet, by id: what a rewrite keeps.
        self._waiting: dict[str, bytes] = {}
        fd, partial = self._begin_file(self._header)
        self.path = self._place(fd, partial, None)
        self._fd = fd
        self._size = len(self._header)
        # What `sync` knows is on the disk: the file's first ``_synced`` bytes; whether the
        # directory holds a name given since (a new or rewritten file) not forced to the disk
        # yet; and ``_epoch``, changed whenever the file is emptied or replaced, so that a sync
        # that raced with either does not take what it forced for what the file holds now.
        self._synced = 0
        self._named = True
        self._epoch = 0
        self._rewriting = False  # a rewrite is writing its new file, outside the lock
        self.failed = 0  # appends the disk refused (full, say), logged
        # Since an append failed, until one goes in: by hand, not an `Outage`, for the reminder
        # every 10,000 refused appends (`_failed`), and no record per decision between.
        self._failing = False
        # Since a sync failed, until one succeeds.
        self._sync_outage = Outage(log)
        self._closed = False

    def _begin_file(self, content: bytes) -> tuple[int, Path]:
        """A journal holding ``content`` under a hidden name, locked (with ``fsync``, forced to
        the disk): a process sweeping the directory never finds it unlocked or half written."""
        partial = self.directory / f".{os.getpid()}-{os.urandom(6).hex()}.new"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, content)
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            partial.unlink(missing_ok=True)
            raise
        return fd, partial

    def _place(self, fd: int, partial: Path, path: Path | None) -> Path:
        """Put the journal begun at ``partial`` in place at ``path`` (else under its own name)."""
        path = path or self.directory / f"{partial.name[1:].removesuffix('.new')}{self.kind.suffix}"
        try:
            os.rename(partial, path)
        except BaseException:
            os.close(fd)
            partial.unlink(missing_ok=True)
            raise
        return path

    def append(self, fields: Any) -> None:
        """Journal a decision (the fields of its record) before its call goes upstream, or its
        answer leaves the process. A disk that refuses the line is logged; the decision goes on,
        its record written as usual."""
        line = self._line(fields)
        with self._lock:
            if self._closed:
                return
            self._waiting[self._decision_id(fields)] = line
            self._write_locked(line)

    def append_many(self, many: list[Any]) -> None:
        """Journal several decisions (a batch's checks, before its answer leaves) with one
        ``write``: as `append` each, without a call into the kernel for each."""
        lines = list(map(self._line, many))
        with self._lock:
            if self._closed:
                return
            self._waiting.update(zip(map(self._decision_id, many), lines, strict=True))
            self._write_locked(b"".join(lines))

    def _write_locked(self, data: bytes) -> None:
        """Append ``data`` (whole lines), under the lock."""
        try:
            written = os.write(self._fd, data)
        except OSError as e:
            self._failed(e)
            return
        if written < len(data):
            # The disk filled up mid-line: the part written is taken back (shrinking needs no
            # room), so that the next line, once there is room, is not glued to it.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            self._failed(OSError(errno.ENOSPC, f"{written} of {len(data)} bytes written"))
            return
        self._size += written
        if self._failing:
            self._failing = False
            log.warning("the decision journal %s is written again", self.path)

    def amend(self, fields: Mapping[str, Any], changed: Mapping[str, Any]) -> None:
        """Journal a decision again when what became of its call (``changed``, the values its
        record takes over ``fields``, those journalled) changes a journalled value: a call
        allowed by the policy and then held or refused by bastion (a result held for review,
        labels that could not be kept, a request the client never had) is recovered so, not
        as allowed. Recovery reads a decision's last line (`_entries`)."""
        for name, value in changed.items():
            if name in _JOURNALED and fields.get(name) != value:
                self.append({**fields, **changed})
                return

    def _failed(self, error: OSError) -> None:
        """Counted (`failed`); logged at the first failure of each outage, and every 10,000.
        The decision's record still waits in the record writer's buffer, as when the database
        is away: only a process killed outright meanwhile loses it."""
        self.failed += 1
        first, self._failing = not self._failing, True
        if first or self.failed % 10_000 == 0:
            log.error(
                "the decision journal %s cannot be written (%s; %d decisions so far): a process"
                " killed outright now loses the records not yet stored",
                self.path,
                error,
                self.failed,
            )

    def settled(self, ids: Iterable[str]) -> None:
        """These decisions need the journal no more. Empties it once none is left, or rewrites
        it, holding only those left, once it has grown past `REWRITE_BYTES`."""
        with self._lock:
            waiting = self._waiting
            for decision_id in ids:
                waiting.pop(decision_id, None)
            if self._closed:
                return
            header = len(self._header)
            content = None
            try:
                if not waiting:
                    if self._size > header:
                        os.ftruncate(self._fd, header)
                        self._size = header
                        self._synced = min(self._synced, header)
                        self._epoch += 1
                elif self._size > REWRITE_BYTES and not self._rewriting:
                    content = b"".join((self._header, *waiting.values()))
                    if len(content) * 2 > self._size:
                        content = None  # mostly still needed (the database is away): frees little
                    else:
                        self._rewriting, taken = True, dict(waiting)
            except OSError as e:
                log.error("the decision journal %s cannot be emptied: %s", self.path, e)
        if content is not None:
            try:
                self._rewrite(content, taken)
            except OSError as e:
                log.error("the decision journal %s cannot be rewritten: %s", self.path, e)
            finally:
                self._rewriting = False

    def _rewrite(self, content: bytes, taken: dict[str, bytes]) -> None:
        """Replace the journal by one holding ``content`` (the lines of ``taken``, by decision
        id), written (and with ``fsync`` forced to the disk) outside the lock, then given under
        it the lines appended meanwhile (an `amend` of a decision taken included): it takes the
        old one's place only once it holds every line still needed."""
        fd, partial = self._begin_file(content)
        with self._lock:
            if self._closed:
                os.close(fd)
                partial.unlink(missing_ok=True)
                return
            later = b"".join(
                line for id_, line in self._waiting.items() if taken.get(id_) is not line
            )
            try:
                if later:
                    os.write(fd, later)
            except BaseException:
                os.close(fd)
                partial.unlink(missing_ok=True)
                raise
            self._place(fd, partial, self.path)
            old_fd, self._fd, self._size = self._fd, fd, len(content) + len(later)
            self._synced = len(content) if self.fsync else 0
            self._named = True
            self._epoch += 1
            os.close(old_fd)

    @property
    def unsynced(self) -> bool:
        """With ``fsync``: whether anything was appended (or a file named) since the last
        `sync`."""
        return self.fsync and (self._size > self._synced or self._named)

    def sync(self) -> None:
        """With ``fsync``, force what was appended since the last sync to the disk, and the
        journal's name in its directory if it is new: run by the record writer at each flush,
        off the event loop and outside the lock `append` takes, on a duplicate of the file's
        descriptor (a rewrite meanwhile closes the journal's own). A failure is logged, at the
        first of an outage and when it ends, and tried again at the next flush."""
        if not self.fsync:
            return
        with self._lock:
            if self._closed or not self.unsynced:
                return
            size, epoch, named = self._size, self._epoch, self._named
            try:
                fd = os.dup(self._fd)
            except OSError as e:
                self._sync_failed(e)
                return
        try:
            os.fsync(fd)
            if named:
                folder = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(folder)
                finally:
                    os.close(folder)
        except OSError as e:
            self._sync_failed(e)
            return
        finally:
            os.close(fd)
        self._sync_outage.ended("the decision journal %s is forced to the disk again", self.path)
        with self._lock:
            if self._epoch == epoch:  # neither emptied nor replaced meanwhile
                self._synced = max(self._synced, size)
                self._named = False

    def _sync_failed(self, error: OSError) -> None:
        self._sync_outage.failed(
            "the decision journal %s cannot be forced to the disk (%s): a power loss or an"
            " operating system crash now may lose the decisions in it",
            self.path,
            error,
            level=logging.ERROR,
        )

    @property
    def waiting(self) -> int:
        """Decisions journalled whose records are not stored yet."""
        return len(self._waiting)

    def close(self) -> None:
        """On a clean stop, after the last flush: the journal is removed if every decision in
        it is stored; else it is left for the next start to recover, and the log says so (with
        ``fsync``, forced to the disk first)."""
        if self._waiting:
            self.sync()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._waiting:
                log.warning(
                    "%d decisions have no stored record at stop; their journal %s is left for"
                    " the next start to recover",
                    len(self._waiting),
                    self.path,
                )
            else:
                self.path.unlink(missing_ok=True)
            os.close(self._fd)


def open_journal(records: BufferedWriter, directory: str | os.PathLike, fsync: bool) -> None:
    """Give ``records`` (whose kind is its ``journalled``) this process's journal, before any
    decision it records is taken; then recover the journals of dead processes (`sweep`). Run
    off the event loop."""
    assert records.journalled is not None
    database = database_identity(records.db.url)
    records.journal = DecisionJournal(directory, database, fsync, records.journalled)
    sweep(records)


def sweep(records: BufferedWriter) -> None:
    """Recover the journals of the processes that died beside this one (`recover_journals`);
    a failure (the database away) is logged, and the next sweep tries again."""
    journal = records.journal
    assert journal is not None
    try:
        recover_journals(journal.directory, records, journal.database, journal)
    except Exception:
        log.exception(
            "recovering the journals of %s of dead processes failed; will retry", records.noun
        )


def recover_journals(
    directory: str | os.PathLike,
    records: BufferedWriter,
    database: str,
    own: DecisionJournal | None = None,
) -> int:
    """Write the decisions of every journal of ``records``' kind (its ``journalled``) in
    ``directory`` left by a process that died (no longer locked) and missing from the
    database (`Journalled.restore`: the gateway's marked ``recovered``); remove each journal
    once they are stored. ``own``: this process's, never touched. Returns how many records
    were recovered. Two processes never recover the same journal: each holds the lock of the
    journal it recovers."""
    folder = Path(directory)
    if not folder.is_dir():
        return 0
    kind = records.journalled
    assert kind is not None
    recovered = 0
    _remove_abandoned(folder)
    for path in sorted(folder.glob(f"*{kind.suffix}")):
        if own is not None and path == own.path:
            continue
        try:
            recovered += _recover(path, records, kind, database)
        except FileNotFoundError:
            continue  # recovered meanwhile by another process, or rewritten by its owner
    return recovered


def _remove_abandoned(folder: Path) -> None:
    """Remove the journals a process began and never put in place (`DecisionJournal._new_file`:
    it died in between): unlocked, and older than a sweep, so never one being made now."""
    for path in folder.glob(".*.new"):
        try:
            if os.stat(path).st_mtime > time.time() - SWEEP_SECONDS:
                continue
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink(missing_ok=True)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)


def _recover(path: Path, records: BufferedWriter, kind: Journalled, database: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # its process lives
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            return 0  # replaced by its owner's rewrite since it was opened: not this file
        with os.fdopen(os.dup(fd), "rb") as file:
            content = file.read()
        lines = content.split(b"\n")
        torn = lines.pop()  # after the last line break: empty, or a line cut off mid-write
        if not lines:
            path.unlink()  # died before its header was whole: no decision in it
            return 0
        names = _names(lines[0], database, kind.table)
        if names is None:
            if path.name in _LEFT_ALONE:
                return 0
            _LEFT_ALONE.add(path.name)
            log.warning(
                "decision journal %s is not one of this database's (%s): left alone",
                path,
                lines[0][:300].decode("utf-8", "replace"),
            )
            return 0
        entries, unreadable = _entries(names, lines[1:])
        missing = _missing(records.db, kind.table, [entry["id"] for entry in entries])
        recovered = [kind.restore(entry) for entry in entries if entry["id"] in missing]
        for record in recovered:
            records.restore(record)
        if recovered:
            records.flush()  # raises if they cannot be stored: the journal stays for next time
        if recovered or unreadable or torn:
            _report(path, len(recovered), len(entries), unreadable, bool(torn), records)
        else:
            log.info("decision journal %s removed: its %d decisions are stored", path, len(entries))
        path.unlink()  # only now: a process killed before this point leaves it to the next
        return len(recovered)
    finally:
        os.close(fd)


def _names(header: bytes, database: str, table: str) -> list[str] | None:
    """The names of the values of a journal's lines, from its header; None if it is not a
    journal of ``database`` whose records go to ``table``."""
    try:
        fields = json.loads(header)
    except ValueError:
        return None
    if not isinstance(fields, dict) or fields.get("database") != database:
        return None
    if fields.get("table", GATEWAY.table) != table:
        return None
    names = fields.get("fields")
    if not isinstance(names, list) or "id" not in names:
        return None
    return [str(name) for name in names]


def _entries(names: list[str], lines: list[bytes]) -> tuple[list[dict[str, Any]], int]:
    """The decisions of a journal's lines, each once, as its last line says it (`amend`); and
    how many lines could not be read."""
    entries: dict[str, dict[str, Any]] = {}
    unreadable = 0
    for line in lines:
        try:
            values = json.loads(line)
            if not isinstance(values, list) or len(values) != len(names):
                raise ValueError("not a journal line")
            entry = dict(zip(names, values, strict=True))
            if not isinstance(entry["id"], str):
                raise ValueError("no decision id")
        except ValueError:
            unreadable += 1
            continue
        entries[entry["id"]] = entry
    return list(entries.values()), unreadable


def _missing(db: Database, table: str, ids: list[str]) -> set[str]:
    """The ``ids`` with no record in ``table``."""
    missing = set(ids)
    for start in range(0, len(ids), LOOKUP_BATCH):
        batch = ids[start : start + LOOKUP_BATCH]
        marks = ", ".join("?" * len(batch))
        rows = db.execute(f"SELECT id FROM {table} WHERE id IN ({marks})", batch)
        missing.difference_update(row[0] for row in rows)
    return missing


def _report(
    path: Path,
    recovered: int,
    entries: int,
    unreadable: int,
    torn: bool,
    records: BufferedWriter,
) -> None:
    """The log line and audit event (``decisions.recovered``) of a journal recovered."""
    assert records.journalled is not None
    log.warning(
        "recovered %d %s from the journal %s of a process that died before writing them"
        " (%d decisions in it, the others stored already; %d lines unreadable%s): %s",
        recovered,
        records.noun,
        path.name,
        entries,
        unreadable,
        ", the last cut off mid-write" if torn else "",
        records.journalled.outcome,
    )
    from bastion.audit.log import AuditLog

    AuditLog(records.db).record(
        "decisions.recovered",
        journal=path.name,
        recovered=recovered,
        decisions=entries,
        unreadable=unreadable,
        torn=torn,
    )
