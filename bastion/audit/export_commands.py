"""CLI: ``bastion audit export`` writes the decision records, the audit events or the decision
service's stored decisions as JSON lines (`bastion.audit.export`), oldest first, after a seq
(``--after``) and on as they are written (``--follow``), for a SIEM or write-once storage; ``bastion audit verify --export`` checks such a
copy, and the database against it (`export_verdicts`). The database is opened read-only."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from bastion.atomic_files import replacing
from bastion.audit import decision_log, decisions, log
from bastion.audit.commands import _database, _when
from bastion.audit.decisions import DecisionRecords
from bastion.audit.export import Comparison, Copy, export
from bastion.audit.log import AuditLog
from bastion.cli import whole_number
from bastion.db import Database
from bastion.untrusted_json import MAX_INTEGER

# How often --follow asks for new rows (as `audit tail -f` does).
POLL = 0.5
_STOPS = {signal.SIGINT, signal.SIGTERM}


def cmd_export(args: argparse.Namespace) -> int:
    chain = decisions.CHAIN if args.decisions else log.CHAIN if args.events else decision_log.CHAIN
    db = Database(_database(args), role="bastion-export", read_only=True)
    try:
        # The table as this version reads it (checked, not migrated: read-only).
        if args.decision_log:
            if not decision_log.open_chain(db):
                print(
                    "bastion: no decision service ever kept its decisions in this database"
                    ' (decision_log = "database"): there is nothing to export',
                    file=sys.stderr,
                )
                return 2
        else:
            DecisionRecords(db) if args.decisions else AuditLog(db)
        with _terminate_interrupts():
            if args.follow:
                return _follow(db, chain, args)
            before_chain = args.after == 0
            if args.output is None:
                export(db, chain, args.after, _Stdout().write, before_chain=before_chain)
            else:
                # Put in place whole once written: interrupted, it leaves the file as it was.
                with replacing(args.output, text=True) as out:
                    export(db, chain, args.after, out.writelines, before_chain=before_chain)
    finally:
        db.close()
    return 0


def _follow(db: Database, chain: Any, args: argparse.Namespace) -> int:
    """Export, then export what is written after, every `POLL` seconds, until stopped (SIGINT,
    SIGTERM: exit 0). Each page is written whole (signals held meanwhile), so the output always
    ends with a whole line."""
    try:
        out: _Stdout | _NewFile = _NewFile(args.output) if args.output else _Stdout()
    except FileExistsError:
        print(
            f"bastion: {args.output} exists: --follow writes a new file, and never one over an"
            " export; resume in a new file with --after the seq of the last line of this one",
            file=sys.stderr,
        )
        return 2
    after, before_chain = args.after, args.after == 0
    try:
        while True:
            after = export(db, chain, after, out.write, before_chain=before_chain)
            before_chain = False
            time.sleep(POLL)
    except KeyboardInterrupt:
        return 0
    finally:
        out.close()


@contextmanager
def _terminate_interrupts() -> Iterator[None]:
    """SIGTERM stops the export as Ctrl-C does (`KeyboardInterrupt`): the draft of ``--output``
    is removed, a following export ends after its last whole line."""

    def interrupt(number: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (called from within a program): left as it is
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends (then stop the export, between pages)."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


class _Stdout:
    def write(self, lines: list[str]) -> None:
        with _signals_held():
            sys.stdout.writelines(lines)
            sys.stdout.flush()

    def close(self) -> None:
        pass


class _NewFile:
    """A file made for a following export (0600; never one that exists): each page written
    whole and fsynced, or, if the write fails (a full disk), taken back to its last whole line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.size = 0

    def write(self, lines: list[str]) -> None:
        data = "".join(lines).encode("utf-8")
        with _signals_held():
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view) :]
                os.fsync(self.fd)
            except OSError as e:
                os.ftruncate(self.fd, self.size)
                raise type(e)(e.errno, e.strerror, self.path) from None
            self.size += len(data)

    def close(self) -> None:
        os.close(self.fd)


def export_verdicts(
    copies: dict[str, Copy], empty: Sequence[str], found: dict[str, Comparison]
) -> list[tuple[bool, str]]:
    """What ``verify --export`` found, per table copied: (ok, lines to print)."""
    said = [(True, f"export {path}: no rows") for path in empty]
    for table, copy in copies.items():
        names = ", ".join(copy.files)
        if not copy.ok:
            said.append(
                (False, f"export {names} ({table}): BROKEN at {copy.broken_at}: {copy.problem}")
            )
            continue
        span = f"seq {copy.first} to {copy.last}" if copy.first is not None else "no numbered row"
        head = f"export {names} ({table}, {span})"
        compared = found[table]
        if not compared.ok:
            said.append((False, f"{head}: BROKEN at seq {compared.broken_at}: {compared.problem}"))
            continue
        said.append((True, "\n".join([head + ": OK", *_notes(copy, compared)])))
    return said


def _notes(copy: Copy, found: Comparison) -> list[str]:
    notes = []
    if found.matched_first is not None:
        newest = (
            "it is the database's newest row"
            if found.head == copy.last
            else f"the chain goes on from it to the database's newest row, seq {found.head}"
        )
        notes.append(
            f"  seq {found.matched_first} to {found.matched_last} stored as exported; {newest}"
        )
    if found.pruned:
        first = copy.first
        span = (
            f"seq {first}" if found.pruned_last == first else f"seqs {first} to {found.pruned_last}"
        )
        newest = _when(found.pruned_newest_at) if found.pruned_newest_at is not None else "?"
        notes.append(
            f"  {span} pruned since the export (the oldest rows only, the newest of them made"
            f" {newest}): compare with audit_retention_days"
        )
        if found.matched_first is None and copy.chained is not None:
            notes.append(
                f"  all of the copy was pruned: the database's oldest row is now seq"
                f" {found.oldest}"
                + (", which follows its last" if found.oldest == (copy.last or 0) + 1 else "")
            )
    if copy.before:
        notes.append(
            f"  {copy.before} rows from before the chain: {found.before_matched} stored as exported"
        )
    if found.gone:
        notes.append(
            f"  {found.gone} rows from before the chain gone since (pruned, or deleted: they"
            " were never chained, so nothing tells which)"
        )
    return notes


def add_export(commands: argparse._SubParsersAction) -> None:
    export_ = commands.add_parser(
        "export",
        help="write the decision records, the audit events or the decision service's stored"
        " decisions as JSON lines, oldest first, each with its hashes, for a SIEM or write-once"
        " storage (audit verify --export checks one)",
    )
    which = export_.add_mutually_exclusive_group(required=True)
    which.add_argument("--decisions", action="store_true", help="the gateway's decision records")
    which.add_argument("--events", action="store_true", help="the audit events")
    which.add_argument(
        "--decision-log",
        action="store_true",
        help='the decision service\'s stored decisions (decision_log = "database")',
    )
    export_.add_argument(
        "--after",
        type=whole_number(MAX_INTEGER, least=0),
        default=0,
        metavar="SEQ",
        help="only rows after this seq: the last line's of the export before (default 0: all)",
    )
    export_.add_argument(
        "-f", "--follow", action="store_true", help="keep writing new rows until stopped"
    )
    export_.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write to FILE (0600; put in place whole once written, or with --follow a new"
        " file that always ends with a whole line) instead of standard output",
    )
    export_.add_argument(
        "--database", help="SQLite path or postgresql:// URL (or BASTION_DATABASE)"
    )
    export_.add_argument("--config", help="bastion.toml to read the database from")
    export_.set_defaults(func=cmd_export)
