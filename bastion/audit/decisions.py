"""Decision records: one row per decision the gateway enforced, enough to explain it later.

A record holds the decision id, the time, the principals, the MCP method, action and target, a
SHA-256 digest of the arguments (never the arguments: they may hold personal data), the context
the policy saw, the result, the rules that decided, the obligations applied, the latency, the
policy version and change-log sequence decided on, and the caller's grant, task and session.
Records are buffered in memory and written in batches off the request path. While the database
cannot take them they stay buffered, up to a bound; beyond it the oldest are dropped, counted
and logged.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field, fields, replace
from operator import itemgetter
from typing import Any

from bastion.audit.buffered import BufferedWriter
from bastion.audit.chain import Chain, append, prune_oldest
from bastion.audit.journal import GATEWAY
from bastion.db import Database
from bastion.json_encoding import compact, encoder, kept
from bastion.turns import in_turns

log = logging.getLogger("bastion.audit")

_MIGRATIONS = [
    """
    CREATE TABLE audit_decisions (
        seq BIGINT PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        at DOUBLE PRECISION NOT NULL,
        server TEXT NOT NULL,
        method TEXT NOT NULL,
        target TEXT NOT NULL,
        principals TEXT NOT NULL,
        result TEXT NOT NULL,
        arguments_digest TEXT NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX audit_decisions_at ON audit_decisions (at);
    """,
    # The hash chain (`bastion.audit.chain`): records written before it have neither.
    """
    ALTER TABLE audit_decisions ADD COLUMN prev_hash TEXT;
    ALTER TABLE audit_decisions ADD COLUMN hash TEXT;
    """,
]
CHAIN = Chain(
    "audit_decisions",
    (
        "seq",
        "id",
        "at",
        "server",
        "method",
        "target",
        "principals",
        "result",
        "arguments_digest",
        "record",
    ),
    "decision records",
    "bastion:audit_decisions",
    # Every record is numbered as it is written, those from before the chain too.
    zero_before_chain=False,
)
# Records kept in memory while they cannot be written (`[server] decision_records_buffer`).
BUFFER_RECORDS = 100_000
# Records deleted per statement when pruning, so other writers wait little for the connection.
PRUNE_BATCH = 5000
# How the `result` column reads: allow, deny, step_up, rate_limited, held, error.
RESULTS = ("allow", "deny", "step_up", "rate_limited", "held", "error")


# A UUID version 7 (RFC 9562, section 5.7): 48 bits of Unix time in milliseconds, the version
# (7), 12 random bits, the variant (0b10), 62 random bits: the 80 bits after the time are drawn
# at random, and all but the version's and the variant's places are kept.
_RANDOM = ((1 << 80) - 1) ^ (0xF << 76) ^ (0x3 << 62)
_VERSION_7 = (7 << 76) | (0x2 << 62)


def new_decision_id() -> str:
    """A UUID version 7 (RFC 9562) as 32 hex digits: the time in milliseconds, then 74 random
    bits. An id made in a later millisecond sorts after, so a record's id goes at the end of
    the table's unique index on ids, not on a random page of it: a batch of records writes a
    page or two of that index instead of one per record, however large the table grows. Made
    without a `uuid.UUID` (its checks cost more than the rest: one is made per decision)."""
    drawn = int.from_bytes(os.urandom(10), "big")
    millisecond = time.time_ns() // 1_000_000
    return "%032x" % ((millisecond << 80) | (drawn & _RANDOM) | _VERSION_7)


@dataclass(frozen=True)
class DecisionRecord:
    id: str
    at: float
    server: str
    method: str
    target: str
    principals: tuple[str, ...]
    result: str
    arguments_digest: str = ""
    context: dict[str, Any] = field(default_factory=dict)
    # The principal the decision turned on (the one refused, or the last one allowed).
    deciding_principal: str = ""
    rules: tuple[str, ...] = ()
    obligations: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    latency_us: int = 0
    # Why ``rules`` is empty where it should not be: working them out at write time failed.
    unexplained: str = ""
    # What it was decided on: the policy version in force and the sequence of the change log
    # the facts were applied up to (as ``/v1``'s records name them); None in records written
    # before they were recorded, or by a gateway without a replica.
    policy_version: int | None = None
    sequence: int | None = None
    # The caller's grant (what revoking it ends), the task its token is bound to, and its
    # client session (Mcp-Session-Id, 2025-11-25); "" when it has none.
    grant_id: str = ""
    task: str = ""
    session: str = ""
    # Written at a later start from the decision journal (`bastion.audit.journal`): the process
    # died before the record was; the call may have reached its upstream, its outcome unknown,
    # and the context, rules and obligations were never recorded.
    recovered: bool = False
    # The action the policy was asked about (``call``, ``read``, ``connect``...): with the
    # principals and target, the question a record asked (`bastion.audit.replay`); "" in records
    # written before it was recorded.
    action: str = ""

    def to_dict(self) -> dict[str, Any]:
        # Field by field, not `dataclasses.asdict`: that deep-copies the context and obligations,
        # which costs more than the rest of writing a record.
        data = {f: getattr(self, f) for f in _FIELDS}
        data["principals"] = list(self.principals)
        data["rules"] = list(self.rules)
        if len(self.__dict__) > len(_FIELDS):  # fields a later version wrote (`from_dict`)
            data.update((k, v) for k, v in self.__dict__.items() if k not in _NAMES)
        return data

    def later_fields(self) -> tuple[str, ...]:
        """The fields a later version wrote that this one does not know (`from_dict`)."""
        if len(self.__dict__) == len(_FIELDS):
            return ()
        return tuple(k for k in self.__dict__ if k not in _NAMES)

    @classmethod
    def of(cls, given: dict[str, Any]) -> DecisionRecord:
        """``DecisionRecord(**given)``, made for every decision the gateway records: a frozen
        dataclass's ``__init__`` sets each field with a call of ``object.__setattr__``, which
        costs more than the rest of buffering a record; this fills the fields at once."""
        if not _REQUIRED <= given.keys() <= _NAMES:
            return cls(**given)  # the TypeError that names the field missing or unknown
        record = object.__new__(cls)
        values = record.__dict__
        if len(given) < len(_NAMES):  # some fields take their defaults
            values.update(_DEFAULTS)
            for name, make in _FACTORIES:
                if name not in given:
                    values[name] = make()
        values.update(given)
        return record

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecisionRecord:
        """A record as stored, by this version or another. Fields an earlier version did not
        write take their defaults; fields a later one wrote (read after a downgrade) are kept
        beside the known ones, and `to_dict` gives them back: an auditor loses nothing, and
        one record never stops ``audit tail`` (a name the class has already is left out, so
        that no field stands in for one of its methods)."""
        known = {k: v for k, v in data.items() if k in _NAMES}
        known["principals"] = tuple(known.get("principals", ()))
        known["rules"] = tuple(known.get("rules", ()))
        record = cls(**known)
        record.__dict__.update(
            (k, v) for k, v in data.items() if k not in _NAMES and not hasattr(cls, k)
        )
        return record


_FIELDS = tuple(f.name for f in fields(DecisionRecord))
_NAMES = frozenset(_FIELDS)
_REQUIRED = frozenset(
    f.name for f in fields(DecisionRecord) if f.default is MISSING and f.default_factory is MISSING
)
_DEFAULTS = {f.name: f.default for f in fields(DecisionRecord) if f.default is not MISSING}
_FACTORIES = tuple(
    (f.name, f.default_factory) for f in fields(DecisionRecord) if f.default_factory is not MISSING
)


# Canonical JSON (sorted keys, no spaces; times and other non-JSON values as text): a record as
# stored, and the arguments a decision digests (`bastion.gateway.enforce.ArgumentDigest`). One
# encoder per thread (`bastion.json_encoding`): these for the event loop (a tool's pin, the
# arguments digested, in bytes), the others for the record writer's thread. Those made by
# `compact` write the same text by orjson, where it writes the same.
_CANONICAL = {"sort_keys": True, "separators": (",", ":"), "default": str}
canonical_json = encoder(**_CANONICAL)
canonical_bytes = compact(sort_keys=True, default=str)
_encode = encoder(**_CANONICAL)
_own = compact(sort_keys=True, default=str)  # a record's own fields


def _explained(pending: tuple[DecisionRecord, Callable | None]) -> DecisionRecord:
    """A buffered record with its deciding rules, if they were left to be worked out now. If
    that fails, the record is written all the same, saying why its rules are missing: a
    decision is never left unrecorded for want of its explanation."""
    record, rules = pending
    if rules is None:
        return record
    try:
        return replace(record, rules=rules())
    except Exception as e:
        return replace(record, unexplained=f"{type(e).__name__}: {e}"[:500])


def _row(r: DecisionRecord) -> tuple:
    """A record's row of ``audit_decisions``, without its seq and hashes; the time as the column
    stores it (a float), so that its hash is the hash of what is read back. Its ``record`` is
    the canonical JSON of its fields (``vars``, encoded as `to_dict` gives them: a tuple is a
    JSON array), joined from the runs of them in sorted order: those of the record itself,
    encoded each time, and those the records of one answer share (its principals, rules,
    target...), kept (an eighth less to encode)."""
    values = vars(r)
    if len(values) == len(_FIELDS):
        own = _own(
            {
                "action": r.action,
                "arguments_digest": r.arguments_digest,
                "at": r.at,
                "context": r.context,
            }
        )
        own_too = _own(
            {
                "id": r.id,
                "latency_us": r.latency_us,
                "method": r.method,
                "obligations": r.obligations,
            }
        )
        shared = _shared_head((r.deciding_principal, r.grant_id))
        # The numbers' types in the key: a sequence of 1 is not one of True.
        shared_too = _shared_tail(
            (*_tail(values), type(r.policy_version), type(r.recovered), type(r.sequence))
        )
        # ASCII (json's text escapes the rest), as bytes.
        own, own_too = own.decode("ascii"), own_too.decode("ascii")
        record = f"{own[:-1]},{shared[1:-1]},{own_too[1:-1]},{shared_too[1:]}"
    else:  # fields a later version wrote (`from_dict`)
        record = _encode(values)
    return (
        r.id,
        float(r.at),
        r.server,
        r.method,
        r.target,
        _principals(r.principals),
        r.result,
        r.arguments_digest,
        record,
    )


# The fields the records of one answer share, in the two runs of them in sorted order.
_HEAD = ("deciding_principal", "grant_id")
_TAIL = (
    "policy_version",
    "principals",
    "reason",
    "recovered",
    "result",
    "rules",
    "sequence",
    "server",
    "session",
    "target",
    "task",
    "unexplained",
)
_tail = itemgetter(*_TAIL)
_shared_head = kept(lambda values: _encode(dict(zip(_HEAD, values, strict=True))))
# ``values`` ends with the types of three of them (`_row`), which are not encoded.
_shared_tail = kept(lambda values: _encode(dict(zip(_TAIL, values[: len(_TAIL)], strict=True))))
_principals = kept(_encode)


class DecisionRecords(BufferedWriter[tuple[DecisionRecord, Callable | None], DecisionRecord]):
    """Appends and reads decision records. `add` only buffers; `flush` writes
    (`bastion.audit.buffered.BufferedWriter`).

    A flush that fails (the database is unavailable) puts its records back, in order, to be
    written by the next one; those its lost COMMIT did store are not stored again. At most
    ``max_buffer`` records wait; past that the oldest are dropped, and `dropped` counts them.
    """

    noun = "decision records"
    setting = "decision_records_buffer"
    # Each decision journalled before its call goes upstream (`bastion.gateway.enforce`).
    journalled = GATEWAY

    def __init__(self, db: Database, max_buffer: int = BUFFER_RECORDS) -> None:
        super().__init__(max_buffer)
        self.db = db
        db.migrate("audit_decisions", _MIGRATIONS)

    def add(
        self, record: DecisionRecord, rules: Callable[[], tuple[str, ...]] | None = None
    ) -> None:
        """Buffer a record. ``rules``, if given, computes its deciding rules at write time,
        keeping explanations off the request path."""
        self._add((record, rules))

    def _prepare(self, pending: list[tuple[DecisionRecord, Callable | None]]) -> list:
        # In turns (`bastion.turns`): a call arriving meanwhile waits little for the GIL.
        batch = in_turns(_explained, pending)
        self._report_unexplained(batch)
        return batch

    def _again(self, record: DecisionRecord) -> tuple[DecisionRecord, None]:
        return (record, None)  # explained already

    def _decision_id(self, record: tuple[DecisionRecord, Callable | None]) -> str:
        return record[0].id

    def _named(self, record: DecisionRecord) -> str:
        # Quoted as Python writes a str: what could not be stored, escaped, in the log.
        return f"decision record {record.id} ({record.method!r} on {record.target!r})"

    @staticmethod
    def _report_unexplained(batch: list[DecisionRecord]) -> None:
        failed = [r for r in batch if r.unexplained]
        if failed:
            log.error(
                "%d decision records written without their rules: working them out failed"
                " (the first: decision %s, %s)",
                len(failed),
                failed[0].id,
                failed[0].unexplained,
            )

    def _write(self, batch: list[DecisionRecord]) -> None:
        # Sequences give `audit tail` a total order and the hash chain its links: writers
        # (every replica's) are serialised to assign them, and to chain each row to the last.
        append(self.db, CHAIN, in_turns(_row, batch), unsure=self._unsure)

    def prune(self, before: float, batch: int = PRUNE_BATCH) -> int:
        """Delete the oldest records, up to the first made at or after ``before`` (epoch
        seconds), a batch per statement; return how many went. The newest record always stays,
        so sequences go on from it and a follower (`audit tail -f`) misses nothing; the oldest
        kept one anchors the hash chain (`bastion.audit.chain.prune_oldest`)."""
        return prune_oldest(self.db, CHAIN, before, batch)

    def after(self, seq: int = 0, limit: int = 1000) -> list[tuple[int, DecisionRecord]]:
        """Records written after sequence ``seq``, oldest first, with their sequence."""
        rows = self.db.execute(
            "SELECT seq, record FROM audit_decisions WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        )
        return [(s, DecisionRecord.from_dict(json.loads(text))) for s, text in rows]

    def window(
        self, since: float, until: float, server: str | None = None, page: int = 1000
    ) -> Iterator[DecisionRecord]:
        """Records made from ``since`` up to (not at) ``until`` (epoch seconds), of ``server``
        if given, oldest first: read a page of ``page`` at a time, so that a week of them is
        never held at once."""
        at, seq = since, -1
        where = "((at = ? AND seq > ?) OR at > ?) AND at < ?"
        if server is not None:
            where += " AND server = ?"
        while True:
            given = (at, seq, at, until, *((server,) if server is not None else ()), page)
            rows = self.db.execute(
                f"SELECT at, seq, record FROM audit_decisions WHERE {where}"
                " ORDER BY at, seq LIMIT ?",
                given,
            )
            for at, seq, text in rows:  # noqa: B007 - the last one's carry on
                yield DecisionRecord.from_dict(json.loads(text))
            if len(rows) < page:
                return

    def last_seq(self, back: int = 0) -> int:
        """The sequence ``back`` records before the newest one (0: the newest)."""
        rows = self.db.execute(
            "SELECT seq FROM audit_decisions ORDER BY seq DESC LIMIT 1 OFFSET ?", (back,)
        )
        return rows[0][0] if rows else 0

    def get(self, decision_id: str) -> DecisionRecord | None:
        rows = self.db.execute("SELECT record FROM audit_decisions WHERE id = ?", (decision_id,))
        return DecisionRecord.from_dict(json.loads(rows[0][0])) if rows else None

    def follow(self, seq: int, poll: float = 0.5) -> Iterator[tuple[int, DecisionRecord]]:
        """Yield records after ``seq`` as they are written, forever."""
        while True:
            batch = self.after(seq)
            for seq, record in batch:  # noqa: B007 - the last seq carries on
                yield seq, record
            if not batch:
                time.sleep(poll)
