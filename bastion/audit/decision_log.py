"""The decision service's decisions kept in the database (``[server] decision_log =
"database"``), so that any process on it explains one later, and after a restart.

Each decision the process's `DecisionLog` records is made into its row (its JSON encoded once)
and journalled (`bastion.audit.journal`, `JOURNALLED`: a line of the row's values) before its
answer leaves the process, then buffered and written to the ``decision_log`` table in batches,
off the event loop (`bastion.audit.buffered`): bounded by ``decision_records_buffer`` while the
database is away (the oldest dropped, counted, logged), every 0.2 s, and at a clean stop. A
process killed outright leaves its journal, whose decisions the next process on the database to
start or sweep writes, each once (ids are the table's key). A row holds what the in-memory
record holds, the request's context included only where the log keeps it
(``KEEP_CONTEXT_BYTES``), and the API it was asked through (``api``: ``v1``, ``authzen`` or
``oso_cloud``; NULL in a row written before rows named it). The rows are a hash chain
(`bastion.audit.chain`, `CHAIN`), as the gateway's records are: each batch numbered and linked by
the writer, at its flush (journal recovery's too), under the chain's lock; a row stored before
the chain (an older version's) has seq 0 and no hashes, outside it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from operator import itemgetter
from typing import Any

from bastion.audit.buffered import BufferedWriter
from bastion.audit.chain import Chain, append, prune_oldest
from bastion.audit.journal import Journalled
from bastion.db import PRUNE_BATCH, Database, prune_rows
from bastion.json_encoding import encoder

COMPONENT = "decision_log"
_MIGRATIONS = [
    """
    CREATE TABLE decision_log (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        request TEXT NOT NULL,
        result TEXT NOT NULL,
        sequence BIGINT NOT NULL,
        policy_version BIGINT,
        at DOUBLE PRECISION NOT NULL,
        explanation TEXT,
        refusal TEXT,
        asked_by TEXT
    );
    CREATE INDEX decision_log_at ON decision_log (at);
    """,
    # The API a decision was asked through: /v1, AuthZEN and Oso Cloud's decide by contracts of
    # their own, and a row is replayed by its API's (`bastion.audit.replay`). NULL in the rows
    # written before.
    "ALTER TABLE decision_log ADD COLUMN api TEXT",
    # The hash chain (`bastion.audit.chain`). Rows stored before it take seq 0: outside the
    # chain (the default, so that no row is rewritten; and an older version's replica, until it
    # stops at the migration, writes them so); a row is written numbered and linked (`CHAIN`).
    """
    ALTER TABLE decision_log ADD COLUMN seq BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE decision_log ADD COLUMN prev_hash TEXT;
    ALTER TABLE decision_log ADD COLUMN hash TEXT;
    CREATE UNIQUE INDEX decision_log_seq ON decision_log (seq) WHERE seq > 0;
    """,
]
# The version whose rows are chained.
_CHAINED = 3
CHAIN = Chain(
    "decision_log",
    (
        "seq",
        "id",
        "at",
        "kind",
        "request",
        "result",
        "sequence",
        "policy_version",
        "explanation",
        "refusal",
        "asked_by",
        "api",
    ),
    "decisions of the decision service",
    "bastion:decision_log",
)
_COLUMNS = (
    "id, kind, request, result, sequence, policy_version, at, explanation, refusal, asked_by, api"
)
# ASCII JSON: every character escaped that a database text column could refuse (NUL, lone
# surrogates). Used on the event loop (`DecisionStore.add`), as the journal's line is.
_encode = encoder(separators=(",", ":"))
# A row's columns, as a journal line names its values.
_FIELDS = _COLUMNS.split(", ")
# A journal line (ASCII JSON: no line break stands in it): the array of a row's values.
_encode_line = encoder(separators=(",", ":"), check_circular=False)


def _line(row: tuple) -> bytes:
    return (_encode_line(row) + "\n").encode()


def _restored(entry: dict[str, Any]) -> tuple:
    """A row from its journal line (its values by name), as it was answered."""
    return tuple(entry.get(name) for name in _FIELDS)


JOURNALLED = Journalled(
    table="decision_log",
    suffix=".decision-log",
    fields=tuple(_FIELDS),
    line=_line,
    decision_id=itemgetter(0),
    restore=_restored,
    outcome="each as it was answered, which its caller may not have received",
)


def _row(fields: tuple) -> tuple:
    """A row of ``decision_log`` from the fields of a `bastion.server.api.decisions.DecisionRecord`, as `DecisionLog` keeps
    them: the request, result, explanation and refusal as JSON text."""
    id_, kind, request, result, seq, policy_version, at, explanation, refusal, asked_by, api = (
        fields
    )
    return (
        id_,
        kind,
        _encode(request),
        _encode(result),
        seq,
        policy_version,
        at,
        None if explanation is None else _encode(explanation),
        None if refusal is None else _encode(refusal),
        asked_by,
        api,
    )


def _chained(row: tuple) -> tuple:
    """A row's columns in `CHAIN`'s order (without its seq); the time as the column stores it (a
    float), so that its hash is the hash of what is read back."""
    id_, kind, request, result, sequence, policy_version, at, *rest = row
    return (id_, float(at), kind, request, result, sequence, policy_version, *rest)


def _fields(row: tuple) -> tuple:
    """The fields of a `DecisionRecord` from its row (the JSON read back)."""
    id_, kind, request, result, seq, policy_version, at, explanation, refusal, asked_by, api = row
    return (
        id_,
        kind,
        json.loads(request),
        json.loads(result),
        seq,
        policy_version,
        at,
        None if explanation is None else json.loads(explanation),
        None if refusal is None else json.loads(refusal),
        asked_by,
        api,
    )


class DecisionStore(BufferedWriter[tuple, tuple]):
    """The ``decision_log`` table: `add` buffers a record's row, `flush` writes them, `get`
    reads one back (on a worker thread: it waits on the database). Its ``journal``, once
    opened (`bastion.audit.journal.open_journal`), takes each row first."""

    noun = "/v1 decision records"
    setting = "decision_records_buffer"
    journalled = JOURNALLED

    def __init__(self, db: Database, max_buffer: int = 100_000) -> None:
        super().__init__(max_buffer)
        self.db = db
        db.migrate(COMPONENT, _MIGRATIONS)

    def add(self, fields: tuple) -> None:
        """Buffer a decision (the fields of its `DecisionRecord`, in order) as its row, and
        journal it first: before its answer leaves the process. Its JSON is encoded once, here,
        for both."""
        row = _row(fields)
        if (journal := self.journal) is not None:
            journal.append(row)
        self._add(row)

    def add_many(self, many: list[tuple]) -> None:
        """`add` each of ``many`` (a batch's decisions), journalled with one write."""
        rows = list(map(_row, many))
        if (journal := self.journal) is not None:
            journal.append_many(rows)
        self._add_many(rows)

    def _write(self, batch: list[tuple]) -> None:
        # Numbered and linked here, on the writer's thread (journal recovery's rows too): one
        # chain with every other writer's on the database (`bastion.audit.chain.append`).
        append(self.db, CHAIN, list(map(_chained, batch)), unsure=self._unsure)

    def _decision_id(self, row: tuple) -> str:
        return row[0]

    def _named(self, row: tuple) -> str:
        return f"/v1 decision record {row[0]} ({row[1]})"

    def get(self, decision_id: str) -> tuple | None:
        """The fields of the `DecisionRecord` stored under ``decision_id``, whichever process
        made it; None if none."""
        return stored(self.db, decision_id)


def kept_in(db: Database) -> bool:
    """Whether a process ever kept its decisions in ``db`` (``decision_log = "database"``
    made the table): where none did, a /v1 decision was only ever in its process's memory."""
    return _version(db) is not None


def chained(db: Database) -> bool:
    """Whether ``decision_log`` in ``db`` is a hash chain (`CHAIN`): made, and brought to the
    chain's version, by a process of this version that kept its decisions there."""
    version = _version(db)
    return version is not None and version >= _CHAINED


def open_chain(db: Database) -> bool:
    """Bring ``decision_log`` to this version's columns where a process ever kept its
    decisions in ``db`` (as ``bastion audit verify`` does the other chained tables; on a
    read-only `Database`, checked: `bastion.db.DatabaseSettingError` if it is not); whether it
    is there."""
    if not kept_in(db):
        return False
    db.migrate(COMPONENT, _MIGRATIONS)
    return True


def _version(db: Database) -> int | None:
    """The schema version of ``decision_log`` in ``db``; None where the table was never made."""
    rows = db.execute(
        "SELECT MAX(version) FROM schema_migrations WHERE component = ?", (COMPONENT,)
    )
    return rows[0][0] if rows else None


def _selected(db: Database) -> str | None:
    """The columns ``decision_log``'s rows are read by in ``db``; None where the table was never
    made (`kept_in`). A table an older bastion made, which no server of this version has
    brought to the ``api`` column yet, is read with none (NULL): a read (``bastion audit show``,
    ``replay``) never changes the schema, which a replica of the older version still running on
    the database would then refuse at its next start."""
    version = _version(db)
    if version is None:
        return None
    return _COLUMNS if version >= 2 else _COLUMNS.replace(", api", ", NULL")


def stored(db: Database, decision_id: str) -> tuple | None:
    """The fields of the `DecisionRecord` stored under ``decision_id`` in ``db``, whichever
    process made it; None if none. Read by a server's `DecisionStore` and by ``bastion audit
    show``, which opens the database without migrating it (`_selected`)."""
    columns = _selected(db)
    if columns is None:
        return None
    rows = db.execute(f"SELECT {columns} FROM decision_log WHERE id = ?", (decision_id,))
    return _fields(rows[0]) if rows else None


def prune_decision_log(db: Database, before: float) -> dict[str, int]:
    """Delete the stored decisions made before ``before`` (the audit retention,
    `bastion.audit.retention`); nothing where the log was never kept in ``db``. Of the chain,
    only the oldest rows, up to the first made at or after ``before``, so that what is left is a
    whole chain (`bastion.audit.chain.prune_oldest`); the rows from before it, by age."""
    version = _version(db)
    if version is None or version < _CHAINED:  # not brought to the chain yet: none is chained
        return prune_rows(db, COMPONENT, "decision_log", "id", "at < ?", (before,))
    removed = prune_rows(db, COMPONENT, "decision_log", "id", "seq = 0 AND at < ?", (before,))
    chained = prune_oldest(db, CHAIN, before, PRUNE_BATCH)
    if chained:
        removed["decision_log"] = removed.get("decision_log", 0) + chained
    return removed


def window(db: Database, since: float, until: float, page: int = 1000) -> Iterator[tuple]:
    """The fields of the decisions stored from ``since`` up to (not at) ``until`` (epoch
    seconds), oldest first, read ``page`` at a time (``bastion audit replay``); none where the
    log was never kept in ``db`` (`kept_in`)."""
    columns = _selected(db)
    if columns is None:
        return
    at, last = since, ""
    while True:
        rows = db.execute(
            f"SELECT {columns} FROM decision_log WHERE ((at = ? AND id > ?) OR at > ?)"
            " AND at < ? ORDER BY at, id LIMIT ?",
            (at, last, at, until, page),
        )
        for row in rows:
            yield _fields(row)
        if len(rows) < page:
            return
        last, at = rows[-1][0], rows[-1][6]
