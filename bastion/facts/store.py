"""The durable fact store: facts, policy versions and the change log, on SQLite or PostgreSQL.

Every write is one transaction that also appends a row to the change log with the next sequence
number. Writers are serialised (SQLite's write lock; a PostgreSQL advisory lock), so sequence
order is commit order and a replica that has applied sequence N has seen every earlier write.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from json.encoder import encode_basestring_ascii
from typing import Any

from bastion.db import PRUNE_BATCH, Database, ensure_listener_marks
from bastion.facts.model import (
    Entity,
    FactError,
    arg_to_json,
    check_fact,
    fact_from_json,
    fact_to_json,
    format_fact,
    matches,
)
from bastion.json_encoding import encoder
from bastion.turns import Turns, full_passes_held, loads_in_turns
from bastion.untrusted_json import MAX_INTEGER, MIN_INTEGER, is_text, writable

# Arguments 1..INDEXED_ARGS get a column of their own, so patterns on them are matched by SQL.
INDEXED_ARGS = 4
# The most characters of a fact's key (`fact_key`: ASCII, a character beyond it escaped as 6 or
# 12). The key is the facts table's primary key, and PostgreSQL indexes no entry over 2,704
# bytes: a longer one was a failed write there (a 500), and SQLite took it.
MAX_FACT_KEY = 2600
# The longest type and id of an entity any fact can hold: in the shortest fact that names one,
# a one-letter predicate and the entity alone, `["p", "E:T:id"]` (12 characters besides the
# type and id), with the other part as short as it can be (a type of one character, an id of
# none). The decision APIs refuse a longer one (`check_entity_size`): no fact could match it.
MAX_ENTITY_TYPE = MAX_FACT_KEY - 12
MAX_ENTITY_ID = MAX_FACT_KEY - 12 - 1
# The longest string (an action, a query's argument) the decision APIs take
# (`check_string_size`): a string in a fact has no more room than an entity's id. Without a
# bound, the decision log kept a megabyte-long action whole in each of its records.
MAX_STRING = MAX_ENTITY_ID
CHANGES_CHANNEL = "bastion_changes"
# The writers' lock (`Database.lock`): every write of facts, policies or the log takes it.
WRITERS_LOCK = "bastion:changes"
# Batches at least this large go through a scratch table (`FactStore._upsert`).
_SCRATCH_THRESHOLD = 500
_FACT_COLUMNS = ("key", "predicate", "arity", "a1", "a2", "a3", "a4", "args", "expires_at")
_PLACES = ", ".join("?" * len(_FACT_COLUMNS))

_MIGRATIONS = [
    """
    CREATE TABLE facts (
        key TEXT PRIMARY KEY,
        predicate TEXT NOT NULL,
        arity INTEGER NOT NULL,
        a1 TEXT, a2 TEXT, a3 TEXT, a4 TEXT,
        args TEXT NOT NULL,
        expires_at DOUBLE PRECISION
    );
    CREATE INDEX facts_p_a1 ON facts (predicate, a1);
    CREATE INDEX facts_p_a3 ON facts (predicate, a3);
    CREATE TABLE changes (
        seq BIGINT PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        actor TEXT NOT NULL,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL
    );
    CREATE TABLE policies (
        version INTEGER PRIMARY KEY,
        text TEXT NOT NULL,
        source TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        created_by TEXT NOT NULL,
        note TEXT NOT NULL
    );
    """,
    # Who this store is: a fact snapshot taken from another store is never used with this one.
    """
    CREATE TABLE facts_identity (
        one INTEGER PRIMARY KEY,
        id TEXT NOT NULL
    );
    """,
    # Expired rows are found and deleted by their expiry (`FactStore.purge_expired`); most facts
    # have none, and are left out of the index.
    """
    CREATE INDEX facts_expires_at ON facts (expires_at) WHERE expires_at IS NOT NULL;
    """,
    # The key every fact snapshot of this store is signed with (`FactStore.snapshot_key`): a
    # secret of the database, which every replica reads, and the snapshots' folder never holds.
    """
    CREATE TABLE facts_snapshot_key (
        one INTEGER PRIMARY KEY,
        secret TEXT NOT NULL
    );
    """,
]
# The schema version of the facts tables, written in every fact snapshot.
SCHEMA_VERSION = len(_MIGRATIONS)
# The schema versions whose snapshots this code reads: those that hold facts as this one does
# (version 3 only added an index, version 4 the snapshot key's table), so an upgrade does not
# throw every replica's snapshot away on their account (format 2, signed, does: `snapshot.FORMAT`).
SNAPSHOT_SCHEMAS = frozenset({2, 3, 4})
# The bytes of the fact snapshots' key.
_SNAPSHOT_KEY_BYTES = 32


def _arg_key(arg: Any) -> str:
    """One canonical text per argument value, cheap to make: ``E:User:alice``, ``s:admin``,
    ``i:3``, ``b:true``. An entity type is an identifier, so the first ``:`` after it ends it.
    """
    if arg.__class__ is Entity:
        return f"E:{arg[0]}:{arg[1]}"
    if arg.__class__ is str:
        return "s:" + arg
    if arg.__class__ is bool:
        return "b:true" if arg else "b:false"
    return f"i:{arg}"


# `json.dumps`, its encoder made once (`bastion.json_encoding`): the same text, byte for byte.
_dumps = encoder()


def fact_key(fact: tuple) -> str:
    """The canonical text of a fact: its identity in the store, and the order of pages."""
    return _key(fact[0], map(_arg_key, fact[1:]))


def _key(predicate: str, keys: Iterable[str]) -> str:
    """`fact_key` of a fact from its predicate and its arguments' keys (`_arg_key`)."""
    return _dumps([predicate, *keys])


def _rows(facts: Iterable[StoredFact]) -> list[tuple]:
    """The ``facts`` table rows of these facts (columns as in `_FACT_COLUMNS`)."""
    rows = []
    pad = [None] * INDEXED_ARGS
    for f in facts:
        fact = f.fact
        args = fact[1:]
        keys = [*map(_arg_key, args)]  # once, for the key and the indexed columns
        key = _storable_key(fact, keys)
        rows.append(
            (
                key,
                fact[0],
                len(args),
                *(keys + pad)[:INDEXED_ARGS],
                _dumps([arg_to_json(a) for a in args]),
                f.expires_at,
            )
        )
    return rows


def check_storable(fact: tuple) -> None:
    """`FactError` if the store cannot hold ``fact`` (checked): for a writer that must know
    before it writes anything else."""
    _storable_key(fact, [*map(_arg_key, fact[1:])])


def check_entity_size(type_: str, id_: str = "") -> None:
    """`FactError` if no fact can hold an entity of this type and id: a type longer than
    `MAX_ENTITY_TYPE` characters or an id longer than `MAX_ENTITY_ID`. For a decision API, which
    must refuse such an entity before it decides or keeps anything of it: no fact could match
    it, and the decision log would keep it whole."""
    if len(type_) > MAX_ENTITY_TYPE or len(id_) > MAX_ENTITY_ID:
        which, most, size = (
            ("type", MAX_ENTITY_TYPE, len(type_))
            if len(type_) > MAX_ENTITY_TYPE
            else ("id", MAX_ENTITY_ID, len(id_))
        )
        raise FactError(
            f"an entity's {which} is at most {most} characters, the longest any fact can hold"
            f" (a fact's key is at most {MAX_FACT_KEY}); got {size}"
        )


def check_string_size(value: str, what: str = "an action") -> None:
    """`FactError` if ``value`` is longer than `MAX_STRING`: for a decision API, as
    `check_entity_size` is for an entity."""
    if len(value) > MAX_STRING:
        raise FactError(
            f"{what} is at most {MAX_STRING} characters, the longest any fact can hold"
            f" (a fact's key is at most {MAX_FACT_KEY}); got {len(value)}"
        )


def _storable_key(fact: tuple, keys: list[str]) -> str:
    """`fact_key` of ``fact`` from its arguments' ``keys`` (`_arg_key`); `FactError` if the
    store cannot hold it: a key past `MAX_FACT_KEY`, a NUL (PostgreSQL stores none in text) or
    half of a surrogate pair (not Unicode: no database writes it as UTF-8). The API refuses both
    before; this is for every other writer: a sign-in's claims, the CLI, the library."""
    key = _key(fact[0], keys)
    if len(key) > MAX_FACT_KEY:
        raise FactError(
            f"{_shown(fact)} is too large to store: its key is {len(key)} characters, at most"
            f" {MAX_FACT_KEY} (the predicate and the arguments as JSON text, a character beyond"
            " ASCII counted as its escape, 6 or 12)"
        )
    # A NUL and a surrogate are escaped in the key; the prefilter's text may also be a
    # backslash's, or a whole pair's (text beyond the Basic Multilingual Plane).
    if "\\u0000" in key or "\\ud" in key:
        for part in (fact[0], *keys):
            if "\x00" in part:
                raise FactError(f"{_shown(fact)} holds the character U+0000 (NUL)")
            if not is_text(part):
                raise FactError(f"{_shown(fact)} holds half of a UTF-16 surrogate pair")
    return key


def _shown(fact: tuple) -> str:
    """``fact`` in a message: its Polar text (a NUL or a lone surrogate written as its escape),
    cut after 100 characters."""
    text = writable(format_fact(fact))
    return text if len(text) <= 120 else f"{text[:100]}... ({len(text)} characters)"


def _facts_payload(rows: Iterable[tuple], deletes: list[tuple]) -> str:
    """The change-log entry of a facts write, reusing the rows' encoded arguments: its parts
    joined once (an import's entry is tens of megabytes, made in one C call that holds the GIL:
    joining the inserts first, then the whole, took twice as long)."""
    parts = ['{"insert":[']
    for r in rows:
        parts.append(
            f'{{"predicate":{encode_basestring_ascii(r[1])},"args":{r[7]}'
            + (f',"expires_at":{float(r[8])!r}}},' if r[8] is not None else "},")
        )
    if len(parts) > 1:
        parts[-1] = parts[-1][:-1]  # no comma after the last
    parts.append(f'],"delete":{json.dumps([fact_to_json(p) for p in deletes])}}}')
    return "".join(parts)


_tuple_new = tuple.__new__


def _args_from_json(args: list) -> tuple:
    # Rows were checked when they were written; only rebuild the entities (as `Entity(type, id)`
    # makes them, without its Python `__new__`: a change of the log can hold a million).
    return tuple(
        [_tuple_new(Entity, (a["type"], a["id"])) if a.__class__ is dict else a for a in args]
    )


def epoch(expires_at: datetime | float | int | None) -> float | None:
    """An expiry as epoch seconds (``None`` for a fact that never expires)."""
    if expires_at is None:
        return None
    if isinstance(expires_at, datetime):
        if expires_at.tzinfo is None:
            raise FactError("expires_at must carry a time zone (for example UTC)")
        return expires_at.timestamp()
    if (
        isinstance(expires_at, bool)
        or not isinstance(expires_at, (int, float))
        or not math.isfinite(expires_at)
        # The range every number of the API has (bastion.untrusted_json).
        or not MIN_INTEGER <= expires_at <= MAX_INTEGER
    ):
        raise FactError(f"expires_at must be a datetime or epoch seconds, got {expires_at!r}")
    return float(expires_at)


@dataclass(frozen=True)
class StoredFact:
    fact: tuple
    expires_at: float | None = None

    def to_json(self) -> dict:
        out = fact_to_json(self.fact)
        if self.expires_at is not None:
            out["expires_at"] = self.expires_at
        return out

    @classmethod
    def from_json(cls, obj: Any) -> StoredFact:
        fact = fact_from_json(obj, also=("expires_at",))
        return cls(fact, epoch(obj.get("expires_at")))


@dataclass(frozen=True)
class Change:
    """One entry of the change log. ``kind`` is ``facts`` or ``policy``."""

    seq: int
    at: float
    actor: str
    kind: str
    inserts: tuple[StoredFact, ...] = ()
    deletes: tuple[tuple, ...] = ()
    policy_version: int | None = None

    def let_go(self, turns: Turns) -> None:
        """Let go of this change's facts a part at a time (`Turns.empty`), once it is applied,
        on a worker thread: freed whole, wherever the change goes, 200,000 decoded facts hold
        the GIL for a tenth of a second. It holds no facts afterwards."""
        held = list(self.inserts)
        object.__setattr__(self, "inserts", ())  # frozen: only this change's own doing
        turns.empty(held)


@dataclass(frozen=True)
class PolicyVersion:
    version: int
    text: str
    source: str
    created_at: float
    created_by: str
    note: str

    def summary(self) -> dict:
        return {
            "version": self.version,
            "source": self.source,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "note": self.note,
        }


@dataclass(frozen=True)
class WriteResult:
    seq: int
    inserted: int = 0
    deleted: int = 0


class FactStore:
    """Facts, policy versions and the change log in one `Database`."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate("facts", _MIGRATIONS)
        ensure_listener_marks(db)
        self._identity: str | None = None
        # Where the changes of facts written here are handed over, by sequence, with their
        # entry in the log (`Replica.handed`): put there before the commit, as a reader can read
        # the entry before COMMIT returns here (SQLite checkpoints inside it), and taken back if
        # the write fails here. `changes_since` takes one only where the log holds its entry.
        self.handed: dict[int, tuple[str, Change]] | None = None

    def identity(self) -> str:
        """This store's random identity, made by the first process that asks; a restored copy
        of the database keeps it (the change log tells those apart: `change_at`)."""
        if self._identity is None:
            self._identity = self._made_once("facts_identity", "id", 16)
        return self._identity

    def snapshot_key(self) -> bytes:
        """The HMAC key of this store's fact snapshots (`bastion.facts.snapshot`): 32 random
        bytes, made by the first process that asks and kept in the database, so every replica
        of it has the same and nothing has to be configured. Read at each snapshot read and
        written, not kept: a key deleted from the table (to throw every snapshot away) is made
        anew by the next one. Never logged, never in a snapshot."""
        try:
            key = bytes.fromhex(
                self._made_once("facts_snapshot_key", "secret", _SNAPSHOT_KEY_BYTES)
            )
        except ValueError:
            key = b""
        if len(key) < _SNAPSHOT_KEY_BYTES:
            raise ValueError(
                "the facts_snapshot_key table holds no key of 32 bytes: delete its row to have"
                " a new one made (every fact snapshot written before is then ignored once)"
            )
        return key

    def _made_once(self, table: str, column: str, size: int) -> str:
        """The text in ``column`` of the one row of ``table``: ``size`` random bytes in hex,
        made by the first process that asks (another's made meanwhile wins: each reads the
        stored one)."""
        rows = self.db.execute(f"SELECT {column} FROM {table} WHERE one = 1")
        if not rows:
            with self.db.transaction():
                self.db.execute(
                    f"INSERT INTO {table} (one, {column}) VALUES (1, ?) ON CONFLICT (one) DO NOTHING",
                    (secrets.token_hex(size),),
                )
            rows = self.db.execute(f"SELECT {column} FROM {table} WHERE one = 1")
        return rows[0][0]

    @classmethod
    def open(cls, url: str, *, role: str = "bastion") -> FactStore:
        return cls(Database(url, role=role))

    def close(self) -> None:
        self.db.close()

    # -- writes ----------------------------------------------------------------------------

    def _begin_write(self) -> int:
        """Inside a transaction: take the writers' lock and return the next sequence number."""
        self.db.lock(WRITERS_LOCK)
        return self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM changes")[0][0]

    def _log(self, seq: int, actor: str, kind: str, payload: str) -> float:
        """Add the change to the log; return its time, as written."""
        at = time.time()
        self.db.execute(
            "INSERT INTO changes (seq, at, actor, kind, payload) VALUES (?, ?, ?, ?, ?)",
            (seq, at, actor, kind, payload),
        )
        # Delivered at commit (PostgreSQL); listeners then catch up by sequence, and the commit
        # returns once every replica has heard of it.
        self.db.notify(CHANGES_CHANNEL, str(seq))
        self.db.confirm_after_commit(CHANGES_CHANNEL)
        return at

    def apply(
        self,
        inserts: Iterable[StoredFact | tuple] = (),
        deletes: Iterable[tuple] = (),
        *,
        actor: str = "system",
        found: Callable[[], Iterable[tuple]] | None = None,
    ) -> WriteResult:
        """Delete every fact matching the patterns, then insert the facts: all or nothing.

        Inserting a fact that is already stored replaces its expiry. Returns the sequence of the
        change (the consistency token) and the counts. A write that inserts nothing and whose
        patterns match nothing changes nothing: it adds no entry to the change log, and its
        sequence is the latest one's.

        ``found``: more facts (or patterns) to delete, looked for in this store by the caller
        once the write holds the writers' lock, in its transaction, so that a fact another
        write commits first is among them (as Oso Cloud's typed wildcards, which the store
        cannot match by value); what it raises rolls the write back.
        """
        # Checked and encoded before taking the writers' lock, so that it is held only for the
        # database work; in turns, since an import's hundreds of thousands of facts are written
        # beside the event loop that decides (`bastion.turns`).
        turns = Turns()
        ins = [
            StoredFact(check_fact(f.fact), None if f.expires_at is None else float(f.expires_at))
            if isinstance(f, StoredFact)
            else StoredFact(check_fact(f))
            for f in turns.each(inserts)
        ]
        dels = [check_fact(p, pattern=True) for p in deletes]
        rows = _rows(turns.each(ins))
        payload = None if found is not None else _facts_payload(turns.each(rows), dels)
        handed, seq = self.handed, None
        try:
            with self.db.transaction():
                seq = self._begin_write()
                if found is not None:
                    dels += [check_fact(p, pattern=True) for p in found()]
                    payload = _facts_payload(turns.each(rows), dels)
                deleted = sum(self._delete_matching(p) for p in dels)
                if not ins and not deleted:
                    return WriteResult(seq - 1, inserted=0, deleted=0)
                self._upsert(rows)
                at = self._log(seq, actor, "facts", payload)
                if handed is not None:
                    handed[seq] = (
                        payload,
                        Change(seq, at, actor, "facts", tuple(ins), tuple(dels)),
                    )
        except BaseException:
            if handed is not None and seq is not None:
                handed.pop(seq, None)
            raise
        result = WriteResult(seq, inserted=len(ins), deleted=deleted)
        # Let go of in turns too: freed whole as this returns, the rows of 200,000 facts held
        # the GIL for about 40 ms.
        turns.empty(rows)
        turns.empty(ins)
        return result

    def _upsert(self, rows: list[tuple]) -> None:
        if not rows:
            return
        columns = ", ".join(_FACT_COLUMNS)
        upsert = " ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at"
        if len(rows) < _SCRATCH_THRESHOLD:
            self.db.executemany(f"INSERT INTO facts ({columns}) VALUES ({_PLACES})" + upsert, rows)
            return
        # Many rows go to a scratch table first, then into the facts in one statement.
        if self.db.is_postgres:
            # COPY, many times faster than row inserts. The same fact twice in one batch would
            # trip the upsert (a row changed twice by one command); the last copy wins.
            rows = list({row[0]: row for row in rows}.values())
            self.db.execute(
                "CREATE TEMP TABLE IF NOT EXISTS facts_incoming"
                " (LIKE facts INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            self.db.copy_rows("facts_incoming", _FACT_COLUMNS, rows)
            self.db.execute(
                f"INSERT INTO facts ({columns}) SELECT {columns} FROM facts_incoming" + upsert
            )
            return
        # SQLite: the rows in key order reach the key's index and (predicate, a1)'s in order,
        # not scattered over their pages: 200,000 facts into 400,000 upserted in 2.0-2.1 s, not
        # 3.4-3.7. SQLite sorts them itself, without Python's GIL (a sort in Python would hold
        # it for 0.1 s, beside the event loop). In the order given where a fact comes twice
        # (rowid), so the last copy wins, as row by row; emptied in the transaction, or with it.
        self.db.execute(
            "CREATE TEMP TABLE IF NOT EXISTS facts_incoming (key TEXT, predicate TEXT,"
            " arity INTEGER, a1 TEXT, a2 TEXT, a3 TEXT, a4 TEXT, args TEXT, expires_at REAL)"
        )
        self.db.executemany(f"INSERT INTO facts_incoming ({columns}) VALUES ({_PLACES})", rows)
        self.db.execute(
            f"INSERT INTO facts ({columns}) SELECT {columns} FROM facts_incoming"
            " WHERE true ORDER BY key, rowid" + upsert  # WHERE: SQLite's parser needs it here
        )
        self.db.execute("DELETE FROM facts_incoming")

    def _where(self, pattern: tuple) -> tuple[str, list]:
        sql = ["predicate = ?", "arity = ?"]
        params: list = [pattern[0], len(pattern) - 1]
        for i, arg in enumerate(pattern[1 : INDEXED_ARGS + 1], start=1):
            if arg is not None:
                sql.append(f"a{i} = ?")
                params.append(_arg_key(arg))
        return " AND ".join(sql), params

    def _delete_matching(self, pattern: tuple) -> int:
        where, params = self._where(pattern)
        rest = pattern[INDEXED_ARGS + 1 :]
        if all(a is None for a in rest):
            return len(self.db.execute(f"DELETE FROM facts WHERE {where} RETURNING key", params))
        keys = [(fact_key(f.fact),) for f in self._select(pattern)]
        self.db.executemany("DELETE FROM facts WHERE key = ?", keys)
        return len(keys)

    # -- reads -----------------------------------------------------------------------------

    def _select(
        self, pattern: tuple | None, *, after: str = "", limit: int | None = None
    ) -> list[StoredFact]:
        if pattern is None:
            where, params = "1 = 1", []
        else:
            where, params = self._where(pattern)
        sql = f"SELECT key, predicate, args, expires_at FROM facts WHERE {where} AND key > ?"
        params = [*params, after]
        sql += " ORDER BY key"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        out = []
        for _key, predicate, args, expires_at in self.db.execute(sql, params):
            fact = (predicate, *_args_from_json(json.loads(args)))
            if pattern is None or matches(fact, pattern):
                out.append(StoredFact(fact, expires_at))
        return out

    def get(
        self,
        pattern: tuple | None = None,
        *,
        after: str = "",
        limit: int | None = None,
        include_expired: bool = False,
    ) -> list[StoredFact]:
        """Stored facts matching ``pattern`` (``None`` for all) in key order, from ``after`` on.

        Use `fact_key` of the last fact returned as ``after`` to read the next page.
        """
        if pattern is not None:
            pattern = check_fact(pattern, pattern=True)
        now = time.time()
        facts = self._select(pattern, after=after, limit=limit)
        if include_expired:
            return facts
        return [f for f in facts if f.expires_at is None or f.expires_at > now]

    def iter_all(self, *, batch: int = 5000, include_expired: bool = False) -> Iterator[StoredFact]:
        """Every stored fact, read a page at a time."""
        after = ""
        while True:
            page = self._select(None, after=after, limit=batch)
            if not page:
                return
            now = time.time()
            for f in page:
                if include_expired or f.expires_at is None or f.expires_at > now:
                    yield f
            after = fact_key(page[-1].fact)

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM facts")[0][0]

    # -- retention -------------------------------------------------------------------------

    def purge_expired(self, grace: float, *, batch: int = PRUNE_BATCH) -> int:
        """Delete the rows of facts that expired more than ``grace`` seconds ago, by the
        database's clock on PostgreSQL (this machine's on SQLite), ``batch`` per transaction
        under the writers' lock; return how many went.

        No reader sees them (every read and every replica leaves an expired fact out), so this
        writes no change-log entry and moves no sequence. A row written again meanwhile with a
        later expiry, or none, is kept: the expiry is checked by the DELETE itself, after the
        lock is had, never from an earlier read.
        """
        if self.db.is_postgres:
            now = self.db.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8")[0][0]
        else:
            now = time.time()
        before = now - grace
        # Asked first without the lock: most rounds find none, and take no write lock for it.
        if not self.db.execute(
            "SELECT 1 FROM facts WHERE expires_at IS NOT NULL AND expires_at < ? LIMIT 1",
            (before,),
        ):
            return 0
        purged = 0
        while True:
            with self.db.transaction():
                self.db.lock(WRITERS_LOCK)
                gone = len(
                    self.db.execute(
                        "DELETE FROM facts WHERE key IN (SELECT key FROM facts"
                        " WHERE expires_at IS NOT NULL AND expires_at < ? ORDER BY expires_at"
                        " LIMIT ?) AND expires_at < ? RETURNING key",
                        (before, batch, before),
                    )
                )
            purged += gone
            if gone < batch:
                return purged

    def snapshot(
        self, turns: Turns | None = None
    ) -> tuple[int, list[StoredFact], PolicyVersion | None]:
        """The head sequence, all live facts and the policy in force, as of one moment. With
        ``turns``, on a worker thread beside an event loop: read in smaller pages, a tick after
        each fact."""
        with self.db.transaction(read_only=True):
            seq = self.head()
            if turns is None:
                facts = list(self.iter_all(batch=50_000))
            else:
                facts = list(turns.each(self.iter_all()))
            policy = self.policy()
        return seq, facts, policy

    # -- change log ------------------------------------------------------------------------

    def head(self) -> int:
        """The sequence of the latest committed change (0 for an empty store)."""
        return self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes")[0][0]

    def changes_since(
        self, seq: int, *, limit: int = 100, handed: dict[int, tuple[str, Change]] | None = None
    ) -> list[Change]:
        """The changes after ``seq``, oldest first. Decoded in turns (`bastion.turns`): a replica
        reads them on a worker thread beside the event loop that decides, and one change (an
        import) can hold hundreds of thousands of facts. ``handed``: changes handed over by the
        stores that wrote them (`FactStore.handed`); one whose entry the log holds at its
        sequence, the same text, time, writer and kind, is taken as it is, not decoded."""
        rows = self.db.execute(
            "SELECT seq, at, actor, kind, payload FROM changes WHERE seq > ? ORDER BY seq"
            f" LIMIT {int(limit)}",
            (seq,),
        )
        with full_passes_held():
            return self._changes(rows, handed or {})

    @staticmethod
    def _changes(rows: list[tuple], handed: dict[int, tuple[str, Change]]) -> list[Change]:
        out = []
        turns = Turns()
        for seq_, at, actor, kind, payload in rows:
            if (mine := handed.get(seq_)) is not None:
                text, change = mine
                if (change.at, change.actor, change.kind) == (at, actor, kind) and text == payload:
                    out.append(change)
                    continue
            body = loads_in_turns(payload, turns)
            if kind == "facts":
                out.append(
                    Change(
                        seq_,
                        at,
                        actor,
                        kind,
                        inserts=tuple(
                            StoredFact(
                                (f["predicate"], *_args_from_json(f["args"])), f.get("expires_at")
                            )
                            for f in turns.each(body["insert"])
                        ),
                        deletes=tuple(
                            (p["predicate"], *_args_from_json(p["args"])) for p in body["delete"]
                        ),
                    )
                )
                turns.empty(body["insert"])  # the decoded JSON: freed whole, a tenth of a second
            else:
                out.append(Change(seq_, at, actor, kind, policy_version=body["version"]))
        return out

    def change_at(self, seq: int) -> float | None:
        """When the change at ``seq`` was committed; None if the log no longer holds it."""
        rows = self.db.execute("SELECT at FROM changes WHERE seq = ?", (seq,))
        return rows[0][0] if rows else None

    def prune_changes(self, keep: int) -> int:
        """Delete all but the latest ``keep`` change-log entries; return how many went.

        The latest entry always stays, so sequences go on from it. A replica that needed a pruned
        entry notices the gap and reloads a snapshot.
        """
        keep = max(1, keep)
        with self.db.transaction():
            self._begin_write()
            rows = self.db.execute(
                "DELETE FROM changes WHERE seq <= (SELECT MAX(seq) FROM changes) - ? RETURNING seq",
                (keep,),
            )
        return len(rows)

    # -- policy versions -------------------------------------------------------------------

    def put_policy(
        self,
        text: str,
        *,
        source: str = "policy.polar",
        actor: str = "system",
        note: str = "",
        only_if_none: bool = False,
    ) -> tuple[int, int] | None:
        """Store a new policy version and make it the one in force. Returns (version, seq).

        The caller validates the text first; the store keeps whatever it is given. With
        ``only_if_none`` it stores nothing (and returns None) if the store has a policy already,
        checked under the writers' lock, so replicas starting together store it once.
        """
        with self.db.transaction():
            seq = self._begin_write()
            version = self.db.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM policies")[0][0]
            if only_if_none and version > 1:
                return None
            self.db.execute(
                "INSERT INTO policies (version, text, source, created_at, created_by, note)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (version, text, source, time.time(), actor, note),
            )
            self._log(seq, actor, "policy", json.dumps({"version": version}))
        return version, seq

    def policy(self, version: int | None = None) -> PolicyVersion | None:
        """A policy version (the one in force, the latest, when ``version`` is None)."""
        sql = "SELECT version, text, source, created_at, created_by, note FROM policies"
        if version is None:
            rows = self.db.execute(sql + " ORDER BY version DESC LIMIT 1")
        else:
            rows = self.db.execute(sql + " WHERE version = ?", (version,))
        return PolicyVersion(*rows[0]) if rows else None

    def policy_versions(self) -> list[PolicyVersion]:
        rows = self.db.execute(
            "SELECT version, text, source, created_at, created_by, note FROM policies"
            " ORDER BY version"
        )
        return [PolicyVersion(*r) for r in rows]

    def rollback_policy(self, version: int, *, actor: str = "system") -> tuple[int, int]:
        """Put an earlier version's text back in force as a new version. Returns (version, seq)."""
        old = self.policy(version)
        if old is None:
            raise LookupError(f"there is no policy version {version}")
        return self.put_policy(
            old.text, source=old.source, actor=actor, note=f"rollback to version {version}"
        )


def prune_changes_before(db: Database, before: float, batch: int = PRUNE_BATCH) -> dict[str, int]:
    """The audit retention's part here (`bastion.audit.retention`): the change-log entries
    committed before ``before``, the record of who wrote which facts, oldest first, ``batch``
    per transaction under the writers' lock; the latest entry always stays, so sequences go on
    from it. Only ever the log's beginning goes, up to the first entry kept (an entry stamped
    later by a writer's clock ahead of the others' keeps those after it): a replica needing a
    pruned entry sees the log start past it and reloads, where a hole in the log would go
    unnoticed. Nothing while the facts tables were never made in ``db``."""
    if not db.execute("SELECT 1 FROM schema_migrations WHERE component = 'facts'"):
        return {}
    # Asked first without the lock: most rounds find the oldest entry newer than the cutoff.
    oldest = db.execute("SELECT at FROM changes ORDER BY seq LIMIT 1")
    if not oldest or oldest[0][0] >= before:
        return {}
    pruned = 0
    while True:
        with db.transaction():
            db.lock(WRITERS_LOCK)
            old = 0
            rows = db.execute(
                "SELECT seq, at FROM changes WHERE seq < (SELECT MAX(seq) FROM changes)"
                " ORDER BY seq LIMIT ?",
                (batch,),
            )
            for _, at in rows:
                if at >= before:
                    break
                old += 1
            if old:
                old = len(
                    db.execute(
                        "DELETE FROM changes WHERE seq <= ? RETURNING seq", (rows[old - 1][0],)
                    )
                )
        pruned += old
        if old < batch:
            return {"changes": pruned} if pruned else {}
