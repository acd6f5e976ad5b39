"""Fact snapshots: every fact of a store as of one change-log sequence, in one file that a replica
reads at start instead of every row, before it replays the log after that sequence.

The file is a compact binary of arrays (`array`, `struct`), never code: reading it runs nothing
it holds. A string table and a value table (strings, entities, integers, booleans) are followed by
each predicate's facts as columns of value numbers, and an HMAC-SHA256 (RFC 2104) of everything
before it under the database's snapshot key (`FactStore.snapshot_key`), so a truncated, damaged
or forged file is refused whole: whoever can write the file but not read the database cannot make
one a replica accepts. The header says what the snapshot covers: the store it was taken from
(`FactStore.identity`), the schema and format versions, the sequence and the time of the change
at that sequence (so a store restored from a backup, or another history with the same numbers, is
told apart), and the policy version in force.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import sys
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import accumulate
from operator import itemgetter
from typing import Any

from bastion import atomic_files
from bastion.facts.model import Entity
from bastion.facts.store import (
    SCHEMA_VERSION,
    SNAPSHOT_SCHEMAS,
    FactStore,
    PolicyVersion,
    StoredFact,
)
from bastion.turns import Turns, collector_paused

MAGIC = b"bastion-facts\n"
# Bumped whenever the layout below changes: a file of another format is ignored. Format 1 ended in
# a plain SHA-256, which anyone who could write the file could compute again after changing it.
FORMAT = 2
_DIGEST = 32  # the HMAC-SHA256's length
_KIND_STR, _KIND_ENTITY, _KIND_INT, _KIND_BOOL = 0, 1, 2, 3
_U32 = "I" if array("I").itemsize == 4 else "L"
_LITTLE = sys.byteorder == "little"


class SnapshotRefused(Exception):
    """A snapshot that must not be used (damaged, of another store, schema or history); the
    replica then loads from the store."""


@dataclass(frozen=True)
class SnapshotOrigin:
    """What a snapshot covers, written in its header and checked against the store at start."""

    store_id: str
    schema: int
    seq: int
    # The `at` of the change at ``seq`` (None for sequence 0, an empty log).
    change_at: float | None
    policy_version: int | None

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "store_id": self.store_id,
            "schema": self.schema,
            "seq": self.seq,
            "change_at": self.change_at,
            "policy_version": self.policy_version,
        }


@dataclass
class PredicateRows:
    """The facts of one predicate: argument tuples, and the expiry of those that have one."""

    name: str
    arity: int
    rows: list[tuple] | set[tuple]
    expiries: dict[tuple, float] = field(default_factory=dict)


@dataclass
class Snapshot:
    origin: SnapshotOrigin
    groups: list[PredicateRows]

    @property
    def count(self) -> int:
        return sum(len(g.rows) for g in self.groups)


# -- writing -----------------------------------------------------------------------------------


# The tables of values and strings are kept in this many dictionaries, by hash: one dictionary
# of millions of entries grows in one C call of a second and more at 10 M facts, holding the GIL.
_SHARDS = 512


class _Values:
    """Numbers values and strings in the order first met."""

    def __init__(self, turns: Turns) -> None:
        self.turns = turns
        self.count = 0
        self.numbers: list[dict[Any, int]] = [{} for _ in range(_SHARDS)]
        self.strings: list[dict[str, int]] = [{} for _ in range(_SHARDS)]
        self.string_list: list[str] = []
        self.kinds = array("B")
        self.a = array(_U32)
        self.b = array(_U32)
        self.ints = array("q")

    def string(self, s: str) -> int:
        shard = self.strings[hash(s) % _SHARDS]
        n = shard.get(s)
        if n is None:
            n = shard[s] = len(self.string_list)
            self.string_list.append(s)
        return n

    def _new(self, value: Any) -> int:
        """The number of a value not met before (the next one)."""
        n = self.count
        self.count += 1
        cls = value.__class__
        if cls is Entity:
            self.kinds.append(_KIND_ENTITY)
            self.a.append(self.string(value[0]))
            self.b.append(self.string(value[1]))
        elif cls is str:
            self.kinds.append(_KIND_STR)
            self.a.append(self.string(value))
            self.b.append(0)
        elif cls is bool:
            self.kinds.append(_KIND_BOOL)
            self.a.append(int(value))
            self.b.append(0)
        else:
            self.kinds.append(_KIND_INT)
            self.a.append(len(self.ints))
            self.b.append(0)
            self.ints.append(value)
        return n

    def column(self, rows: list[tuple], i: int) -> array:
        """The value numbers of column ``i`` of ``rows``, a chunk at a time."""
        out = array(_U32)
        take, shards, tick = itemgetter(i), self.numbers, self.turns.tick
        for _, chunk in self.turns.slices(rows):
            values = list(map(take, chunk))
            # True == 1 in a dict: booleans are numbered under a key of their own.
            booleans = bool in set(map(type, values))
            if booleans:
                values = [(bool, v) if v.__class__ is bool else v for v in values]
            seen = {}
            for v in set(values):
                shard = shards[hash(v) % _SHARDS]
                n = shard.get(v)
                if n is None:
                    n = shard[v] = self._new(v[1] if booleans and v.__class__ is tuple else v)
                    tick()  # a new value is most of a step's work
                seen[v] = n
            out.extend(map(seen.__getitem__, values))
        return out

    def string_table(self) -> tuple[array, list[bytes]]:
        """Each string's length, and the strings' UTF-8 in pieces."""
        lengths, pieces = array(_U32), []
        for _, chunk in self.turns.slices(self.string_list):
            lengths.extend(map(len, chunk))
            pieces.append("".join(chunk).encode("utf-8", "surrogatepass"))
        return lengths, pieces

    def release(self) -> None:
        """Let go of the tables a piece at a time: freed whole, on return, millions of entries
        would hold the GIL for tens of milliseconds."""
        for shard in self.turns.each([*self.numbers, *self.strings]):
            shard.clear()
        self.turns.empty(self.string_list)


def _u32(n: int) -> bytes:
    return struct.pack("<I", n)


def _arr(a: array) -> bytes:
    if not _LITTLE:  # pragma: no cover
        a = array(a.typecode, a)
        a.byteswap()
    return a.tobytes()


def _parts(origin: SnapshotOrigin, groups: Iterable[PredicateRows]) -> list[bytes]:
    """The file's bytes for these facts but its digest, in parts. Worked out in turns
    (`bastion.turns`): a replica writes its snapshot beside the event loop that decides, and a
    million facts take seconds, in C calls that would each hold the GIL for milliseconds. The
    garbage collector is paused meanwhile: its passes would walk the tables, which are let go
    of before it runs again (`_Values.release`)."""
    with collector_paused():
        return _parts_of(origin, groups)


def _parts_of(origin: SnapshotOrigin, groups: Iterable[PredicateRows]) -> list[bytes]:
    turns = Turns()
    values = _Values(turns)
    names = array(_U32)
    body: list[bytes] = []
    for g in groups:
        rows: list[tuple] = []
        for chunk in turns.chunks(g.rows):
            rows += chunk
        names.append(values.string(g.name))
        body.append(struct.pack("<III", g.arity, len(rows), len(g.expiries)))
        for i in range(g.arity):
            body.append(_arr(values.column(rows, i)))
        if g.expiries:
            # Each expiry by its row's place (no table of every row's place: see `_SHARDS`).
            where, at, expiry = array(_U32), array("d"), g.expiries.get
            for start, chunk in turns.slices(rows):
                for n, t in enumerate(map(expiry, chunk), start):
                    if t is not None:
                        where.append(n)
                        at.append(t)
            body += [_arr(where), _arr(at)]
    lengths, text = values.string_table()
    header = json.dumps(origin.to_json(), separators=(",", ":")).encode()
    values.release()
    return [
        MAGIC,
        _u32(len(header)),
        header,
        _u32(len(lengths)),
        _u32(sum(map(len, text))),
        _arr(lengths),
        *text,
        _u32(len(values.kinds)),
        values.kinds.tobytes(),
        _arr(values.a),
        _arr(values.b),
        _u32(len(values.ints)),
        _arr(values.ints),
        _u32(len(names)),
        _arr(names),
        *body,
    ]


def _mac(key: bytes) -> hmac.HMAC:
    """The HMAC-SHA256 of a snapshot's bytes under ``key`` (OpenSSL's, as fast as a SHA-256 of
    the same bytes: two more blocks). An empty key is refused: it would sign for anyone."""
    if len(key) < _DIGEST:
        raise ValueError("a fact snapshot's key must be at least 32 bytes")
    return hmac.new(key, digestmod=hashlib.sha256)


def encode(origin: SnapshotOrigin, groups: Iterable[PredicateRows], key: bytes) -> bytes:
    """The file's bytes for these facts, signed with ``key``."""
    data = b"".join(_parts(origin, groups))
    mac = _mac(key)
    mac.update(data)
    return data + mac.digest()


def write(path: str, origin: SnapshotOrigin, groups: Iterable[PredicateRows], key: bytes) -> int:
    """Write the snapshot, signed with ``key``, to ``path`` atomically (a temporary file beside
    it, fsync, rename, fsync of the folder), readable by its owner only; return its size in bytes.
    The parts are written and signed one by one, never joined (both release the GIL on a large
    part)."""
    mac = _mac(key)
    parts = _parts(origin, groups)
    with atomic_files.replacing(path) as f:
        for part in parts:
            mac.update(part)
            f.write(part)
        f.write(mac.digest())
    return sum(map(len, parts)) + _DIGEST


# -- reading -----------------------------------------------------------------------------------


class _Reader:
    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.at + n > len(self.data):
            raise SnapshotRefused("the snapshot is truncated")
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def array(self, typecode: str, count: int) -> array:
        out = array(typecode)
        out.frombytes(self.take(count * out.itemsize))
        if not _LITTLE:  # pragma: no cover
            out.byteswap()
        return out


def read(path: str, key: bytes) -> Snapshot:
    """Read and check a snapshot file signed with ``key``; `SnapshotRefused` (or `OSError`) if
    it cannot be used."""
    with open(path, "rb") as f:
        data = f.read()
    return decode(data, key)


def decode(data: bytes, key: bytes) -> Snapshot:
    """The snapshot in ``data``, once its HMAC under ``key`` is checked: nothing of it but its
    magic is read before (its header neither)."""
    if len(data) < len(MAGIC) + _DIGEST or not data.startswith(MAGIC):
        raise SnapshotRefused("not a bastion fact snapshot")
    view = memoryview(data)
    mac = _mac(key)
    mac.update(view[:-_DIGEST])
    if not hmac.compare_digest(mac.digest(), data[-_DIGEST:]):
        raise SnapshotRefused(_unsigned(view))
    try:
        return _decode(_Reader(view[len(MAGIC) : -_DIGEST]))
    except SnapshotRefused:
        raise
    except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise SnapshotRefused(f"the snapshot is malformed ({e})") from None


def _unsigned(view: memoryview) -> str:
    """Why a snapshot whose HMAC does not match is refused. Worked out only then: a file that
    ends in the plain SHA-256 of format 1 (bastion before 2026-12-07) is told apart."""
    if hashlib.sha256(view[:-_DIGEST]).digest() == view[-_DIGEST:]:
        return (
            "it is not signed with this database's snapshot key (it ends in a plain SHA-256:"
            " written by a bastion before 2026-12-07, or forged)"
        )
    return (
        "its HMAC does not match this database's snapshot key: the snapshot is damaged or"
        " truncated, was taken from another database, or was forged"
    )


def _decode(r: _Reader) -> Snapshot:
    header = json.loads(bytes(r.take(r.u32())))
    if header.get("format") != FORMAT:
        raise SnapshotRefused(f"format {header.get('format')!r}, this version reads {FORMAT}")
    origin = SnapshotOrigin(
        store_id=str(header["store_id"]),
        schema=int(header["schema"]),
        seq=int(header["seq"]),
        change_at=header["change_at"],
        policy_version=header["policy_version"],
    )
    count, size = r.u32(), r.u32()
    lengths = r.array(_U32, count)
    text = bytes(r.take(size)).decode("utf-8", "surrogatepass")
    offsets = list(accumulate(lengths, initial=0))
    if offsets[-1] != len(text):
        raise SnapshotRefused("the snapshot's string table does not add up")
    strings = [text[i:j] for i, j in zip(offsets, offsets[1:], strict=False)]
    nvalues = r.u32()
    kinds, a, b = r.array("B", nvalues), r.array(_U32, nvalues), r.array(_U32, nvalues)
    ints = r.array("q", r.u32())
    intern = sys.intern
    values: list[Any] = []
    types: dict[str, str] = {}
    for kind, x, y in zip(kinds, a, b, strict=True):
        if kind == _KIND_ENTITY:
            type_ = strings[x]
            type_ = types.get(type_) or types.setdefault(type_, intern(type_))
            value = Entity(type_, strings[y])
        elif kind == _KIND_STR:
            value = intern(strings[x])
        elif kind == _KIND_INT:
            value = ints[x]
        elif kind == _KIND_BOOL:
            value = bool(x)
        else:
            raise SnapshotRefused(f"unknown value kind {kind}")
        values.append(value)
    names = r.array(_U32, r.u32())
    groups = []
    for n in names:
        name = strings[n]
        if not name.isidentifier():
            raise SnapshotRefused(f"bad predicate name {name!r}")
        arity, nrows, nexp = struct.unpack("<III", r.take(12))
        columns = [map(values.__getitem__, r.array(_U32, nrows)) for _ in range(arity)]
        rows = list(zip(*columns, strict=True)) if arity else [()] * min(nrows, 1)
        expiries = {}
        if nexp:
            where, at = r.array(_U32, nexp), r.array("d", nexp)
            expiries = {rows[i]: t for i, t in zip(where, at, strict=True)}
        groups.append(PredicateRows(intern(name), arity, rows, expiries))
    if r.at != len(r.data):
        raise SnapshotRefused("the snapshot has bytes after its last predicate")
    return Snapshot(origin, groups)


# -- against a store ---------------------------------------------------------------------------


def check_origin(store: FactStore, origin: SnapshotOrigin) -> PolicyVersion | None:
    """The policy version the snapshot was taken under, if the snapshot may be used with this
    store and its log replayed after it; `SnapshotRefused` saying why not otherwise."""
    if origin.schema not in SNAPSHOT_SCHEMAS:
        raise SnapshotRefused(
            f"it was written for schema version {origin.schema}, the database is at"
            f" {SCHEMA_VERSION}"
        )
    if origin.store_id != store.identity():
        raise SnapshotRefused("it was taken from another database")
    head = store.head()
    if origin.seq > head:
        raise SnapshotRefused(
            f"it covers the change log up to sequence {origin.seq}, but the database's log ends"
            f" at {head} (a database restored from a backup?)"
        )
    if origin.seq and store.change_at(origin.seq) != origin.change_at:
        raise SnapshotRefused(
            f"the database's change log no longer holds the change at sequence {origin.seq}, or"
            " holds another one (pruned, or another history)"
        )
    if origin.policy_version is None:
        return None
    policy = store.policy(origin.policy_version)
    if policy is None:
        raise SnapshotRefused(f"the database has no policy version {origin.policy_version}")
    return policy


def from_facts(facts: Iterable[StoredFact]) -> list[PredicateRows]:
    """Stored facts grouped by predicate, as a snapshot holds them."""
    groups: dict[tuple[str, int], PredicateRows] = {}
    for f in facts:
        key = (f.fact[0], len(f.fact) - 1)
        g = groups.get(key)
        if g is None:
            g = groups[key] = PredicateRows(key[0], key[1], [])
        values = f.fact[1:]
        g.rows.append(values)  # type: ignore[union-attr]
        if f.expires_at is not None:
            g.expiries[values] = f.expires_at
    return list(groups.values())


def take(store: FactStore, path: str) -> tuple[SnapshotOrigin, int, int]:
    """Write a snapshot of the store's facts, as of one moment, signed with its snapshot key, to
    ``path``; return what it covers, how many facts and how many bytes."""
    store_id, key = store.identity(), store.snapshot_key()
    with store.db.transaction(read_only=True):
        seq, facts, policy = store.snapshot()
        change_at = store.change_at(seq) if seq else None
    origin = SnapshotOrigin(
        store_id, SCHEMA_VERSION, seq, change_at, policy.version if policy else None
    )
    return origin, len(facts), write(path, origin, from_facts(facts), key)
