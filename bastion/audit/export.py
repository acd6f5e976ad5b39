"""An exported copy of the audit trail's hash chains (`bastion.audit.chain`): a chained table as
JSON lines, a row a line with every stored column, its ``prev_hash`` and ``hash``, so that each
line's hash is computed again from the line alone. Kept where the database's administrators
cannot write (a SIEM, write-once storage), a copy is checked on its own (`read_copy`) and the
database against it (`compare`): a row altered, deleted, or cut from the chain's end since the
copy was made is named; rows pruned by retention since (only ever the oldest) are said so."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from bastion.audit import decision_log, decisions, log
from bastion.audit.chain import PAGE, Chain, link
from bastion.db import Database
from bastion.names import readable

CHAINS = {chain.table: chain for chain in (decisions.CHAIN, log.CHAIN, decision_log.CHAIN)}
# The mark of a row written before the chain began (no hash; an event's and a stored decision of
# the decision service's seq 0).
BEFORE_CHAIN = "before_chain"
# Rows of the copy looked up by id per statement (those from before the chain).
_ID_QUERY = 500


def line(chain: Chain, row: Sequence[Any]) -> str:
    """A stored row (its columns in the table's order, then ``prev_hash`` and ``hash``) as an
    export line: a JSON object, ``table`` first, then the columns as stored. A float is written
    as the hash reads it (Python's `repr`: always with a ``.`` or an exponent), an integer
    without, so the line's text of each value is the text its field holds."""
    values: dict[str, Any] = {"table": chain.table}
    values.update(zip((*chain.columns, "prev_hash", "hash"), row, strict=True))
    if row[-1] is None and row[-2] is None:
        values[BEFORE_CHAIN] = True
    return json.dumps(values, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n"


def export(
    db: Database,
    chain: Chain,
    after: int,
    write: Callable[[list[str]], None],
    *,
    before_chain: bool,
) -> int:
    """Hand ``write`` the lines of ``chain``'s rows numbered after ``after``, oldest first, a
    page at a time, all from one read-only snapshot; first, if ``before_chain``, the events
    recorded before the chain began (seq 0, in the order they were made). Events not chained
    yet have no seq: a running server chains them within a second, and a later export has them.
    Returns the last seq written (``after`` if none was)."""
    columns = ", ".join((*chain.columns, "prev_hash", "hash"))
    with db.transaction(read_only=True):
        if before_chain:
            at, key = float("-inf"), ""
            while True:
                page = db.execute(
                    f"SELECT {columns} FROM {chain.table}"
                    " WHERE seq = 0 AND (at > ? OR (at = ? AND id > ?)) ORDER BY at, id LIMIT ?",
                    (at, at, key, PAGE),
                )
                if page:
                    write([line(chain, row) for row in page])
                    at, key = page[-1][2], page[-1][1]
                if len(page) < PAGE:
                    break
        while True:
            page = db.execute(
                f"SELECT {columns} FROM {chain.table} WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, PAGE),
            )
            if page:
                write([line(chain, row) for row in page])
                after = page[-1][0]
            if len(page) < PAGE:
                return after


class CopyRefused(ValueError):
    """Files that are not an export (bad input): the message names the file and line."""


@dataclass(frozen=True)
class Row:
    """One line of a copy, read: where it is, and the row it holds."""

    file: str
    number: int  # of the line in its file, from 1
    values: tuple[Any, ...]  # the chain's columns, seq first
    prev_hash: str | None
    hash: str | None
    before_chain: bool

    @property
    def seq(self) -> int:
        return self.values[0]

    @property
    def where(self) -> str:
        return f"{self.file}:{self.number}"


@dataclass
class Copy:
    """The rows of one table that a copy's files hold, as checked on their own."""

    chain: Chain
    files: list[str] = field(default_factory=list)
    rows: int = 0
    before: int = 0  # rows from before the chain
    first: int | None = None  # the first numbered row (seq > 0)
    chained: int | None = None  # the first chained row
    anchor: str = ""  # its prev_hash
    last: int | None = None
    last_hash: str = ""
    last_file: str = ""
    broken_at: str = ""  # FILE:LINE
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem


def read_copy(paths: Sequence[str]) -> tuple[dict[str, Copy], list[str]]:
    """The copies the files hold, per table, each checked on its own: every line's hash computed
    again, each row following the one before it, file after file in the order given (each made
    with ``--after`` the last seq of the one before). Returns them and the files that hold no
    row. `CopyRefused` for a line that is not an export line, or files that do not go on from
    one another."""
    copies: dict[str, Copy] = {}
    empty = []
    for path in paths:
        tables = set()
        for row, chain in rows_of(path):
            tables.add(chain.table)
            copy = copies.setdefault(chain.table, Copy(chain))
            if path not in copy.files:
                copy.files.append(path)
            if copy.ok:
                _check(copy, row)
        if not tables:
            empty.append(path)
    return copies, empty


def rows_of(path: str) -> Iterator[tuple[Row, Chain]]:
    """The rows of an export file, one line at a time."""
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CopyRefused(f"{path}:{number}: not UTF-8 text ({e.reason})") from None
            yield _row(path, number, text)


def _check(copy: Copy, row: Row) -> None:
    """``row`` against the copy so far: the problem said (`Copy.problem`) if it breaks it."""
    seq = row.seq
    if seq > 0 and copy.last is not None and seq != copy.last + 1:
        if copy.last_file != row.file:
            raise CopyRefused(
                f"{row.file} begins at seq {seq}, and {copy.last_file} ends at seq {copy.last}:"
                " the exports do not go on from one another; give them in the order they were"
                " made, each made with --after the last seq of the one before"
            )
        gap = (
            f"seqs {copy.last + 1} to {seq - 1} missing"
            if seq > copy.last + 1
            else f"seq {seq} comes again after seq {copy.last}"
        )
        _broken(copy, row, f"{gap}: lines were taken out of the copy, or moved")
        return
    if row.before_chain:
        if copy.chained is not None:
            _broken(copy, row, f"seq {seq} is marked {BEFORE_CHAIN}, after the chain began")
            return
        copy.before += 1
    elif row.hash is None or row.prev_hash is None:
        _broken(copy, row, f"seq {seq} has no hash: written outside the chain, or its hash removed")
        return
    elif link(row.prev_hash, row.values) != row.hash:
        _broken(
            copy,
            row,
            f"seq {seq}'s columns do not hash to its hash: the line was altered (in the copy, or"
            " in the database before it was exported)",
        )
        return
    elif copy.chained is None:
        copy.chained, copy.anchor = seq, row.prev_hash
    elif row.prev_hash != copy.last_hash:
        _broken(
            copy,
            row,
            f"seq {seq}'s previous hash is not seq {copy.last}'s hash: one of them was rewritten"
            " with its hash computed again",
        )
        return
    if seq > 0:
        if copy.first is None:
            copy.first = seq
        copy.last, copy.last_hash, copy.last_file = seq, row.hash or "", row.file
    copy.rows += 1


def _broken(copy: Copy, row: Row, problem: str) -> None:
    copy.broken_at, copy.problem = row.where, problem


_KEYS = ("table",)
_HASHES = ("prev_hash", "hash")


def _row(path: str, number: int, text: str) -> tuple[Row, Chain]:
    """One line read, or `CopyRefused` naming its file and line and what is wrong with it."""

    def refused(why: str) -> CopyRefused:
        return CopyRefused(f"{path}:{number}: {why}")

    if not text.endswith("\n"):
        raise refused("the last line is cut short (no line end): an export interrupted?")
    try:
        values = json.loads(text, object_pairs_hook=_unique, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise refused(f"not a JSON object ({e})") from None
    if not isinstance(values, dict):
        raise refused("not a JSON object")
    chain = CHAINS.get(values.get("table"))  # type: ignore[arg-type]
    if chain is None:
        raise refused(f"table must be one of {', '.join(CHAINS)}")
    keys = (*_KEYS, *chain.columns, *_HASHES)
    marked = values.pop(BEFORE_CHAIN, False)
    if marked is not True and marked is not False:
        raise refused(f"{BEFORE_CHAIN} must be true when present")
    if set(values) != set(keys):
        missing, extra = set(keys) - set(values), set(values) - set(keys)
        said = [f"no {', '.join(sorted(missing))}"] if missing else []
        said += [f"unknown {', '.join(sorted(extra))}"] if extra else []
        raise refused(f"not a line of {chain.table}: {'; '.join(said)}")
    row = tuple(values[c] for c in chain.columns)
    for name, value in zip(chain.columns, row, strict=True):
        if value is not None and type(value) not in (str, int, float):
            raise refused(f"{name} holds a {type(value).__name__}, which no column stores")
    if type(row[0]) is not int or row[0] < 0:
        raise refused("seq must be a whole number")
    if row[0] == 0 and not marked:
        raise refused(f"seq 0 is a row from before the chain, and is marked {BEFORE_CHAIN}")
    prev_hash, digest = values["prev_hash"], values["hash"]
    for name, value in (("prev_hash", prev_hash), ("hash", digest)):
        if value is not None and not isinstance(value, str):
            raise refused(f"{name} must be text or null")
    if marked and (prev_hash is not None or digest is not None):
        raise refused(f"a row marked {BEFORE_CHAIN} has no hashes")
    return Row(path, number, row, prev_hash, digest, marked), chain


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two of one key: one reader takes the first, another the last; a hash covers only one.
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key in values:
            raise ValueError(f"the key {key!r} comes twice")
        values[key] = value
    return values


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@dataclass
class Comparison:
    """What the database holds of a copy (`compare`)."""

    copy: Copy
    oldest: int | None = None  # the database's oldest numbered row
    head: int | None = None  # and its newest
    pruned: int = 0  # rows of the copy older than the oldest kept
    pruned_last: int | None = None
    pruned_newest_at: float | None = None  # the newest time among them
    matched: int = 0  # rows found as they were exported
    matched_first: int | None = None
    matched_last: int | None = None
    before_matched: int = 0  # rows from before the chain found as they were exported
    gone: int = 0  # rows from before the chain no longer there (never chained)
    broken_at: int | None = None
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem


class _Stored:
    """A table's numbered rows from a seq on, oldest first, a page at a time."""

    def __init__(self, db: Database, chain: Chain, start: int) -> None:
        self.db, self.chain = db, chain
        self.after = start - 1
        self.page: deque[tuple[Any, ...]] = deque()
        self.done = False

    def next_at_or_after(self, seq: int) -> tuple[Any, ...] | None:
        """The stored row at ``seq``, or the first after it; None if there is none."""
        while True:
            while self.page and self.page[0][0] < seq:
                self.page.popleft()
            if self.page or self.done:
                return self.page[0] if self.page else None
            columns = ", ".join((*self.chain.columns, "prev_hash", "hash"))
            rows = self.db.execute(
                f"SELECT {columns} FROM {self.chain.table} WHERE seq > ? ORDER BY seq LIMIT ?",
                (self.after, PAGE),
            )
            self.done = len(rows) < PAGE
            if rows:
                self.after = rows[-1][0]
                self.page.extend(rows)


def compare(db: Database, copy: Copy) -> Comparison:
    """The database against a copy (checked on its own first: `read_copy`), in one read-only
    snapshot: each row of the copy must be stored as it was exported, unless pruned since
    (older than the oldest numbered row kept: retention deletes the oldest only), and the chain
    must go on from the copy's last row. Stops at the first row where that is not so."""
    found = Comparison(copy)
    chain = copy.chain
    with db.transaction(read_only=True):
        found.oldest, found.head = db.execute(
            f"SELECT MIN(seq), MAX(seq) FROM {chain.table} WHERE seq > 0"
        )[0]
        stored = _Stored(db, chain, max(copy.first or 1, found.oldest or 1))
        unnumbered: list[Row] = []
        for row, _ in _rows(copy):
            if row.seq == 0:
                unnumbered.append(row)
                if len(unnumbered) == _ID_QUERY:
                    _by_id(db, found, unnumbered)
                    unnumbered = []
            elif not _numbered(found, stored, row):
                return found
        _by_id(db, found, unnumbered)
        if found.ok and copy.chained is not None:
            _goes_on(db, found)
    return found


def _rows(copy: Copy) -> Iterator[tuple[Row, Chain]]:
    for path in copy.files:
        yield from (r for r in rows_of(path) if r[1] is copy.chain)


def _numbered(found: Comparison, stored: _Stored, row: Row) -> bool:
    """One numbered row of the copy against the database; False (the problem said) if it is
    not there as it was."""
    seq = row.seq
    if found.oldest is None or seq < found.oldest:
        if found.oldest is None and not row.before_chain:
            return _broken_at(
                found,
                seq,
                "the table holds no numbered row now: every row was deleted (retention never"
                " deletes the newest)",
            )
        found.pruned += 1
        found.pruned_last = seq
        at = row.values[2]
        if isinstance(at, float | int) and (found.pruned_newest_at or at) <= at:
            found.pruned_newest_at = at
        return True
    there = stored.next_at_or_after(seq)
    if there is None:
        if row.before_chain:
            found.gone += 1
            return True
        return _broken_at(
            found,
            seq,
            f"cut: seqs {seq} to {found.copy.last} were deleted from the end of the chain since"
            f" the export (the database's newest row is now seq {found.head})",
        )
    if there[0] != seq:
        if row.before_chain:
            found.gone += 1
            return True
        end = min(there[0] - 1, found.copy.last or seq)
        gone = f"seq {seq} is" if end == seq else f"seqs {seq} to {end} are"
        return _broken_at(found, seq, f"{gone} missing: deleted from the middle since the export")
    differs = _differences(found.copy.chain, row, there)
    if differs:
        return _broken_at(found, seq, f"altered since the export: {differs}")
    found.matched += 1
    found.before_matched += row.before_chain
    if found.matched_first is None:
        found.matched_first = seq
    found.matched_last = seq
    return True


def _by_id(db: Database, found: Comparison, rows: list[Row]) -> None:
    """Rows of the copy from before the chain (events of seq 0), looked up by id: each must be
    as exported, or gone (pruned, or deleted: never chained, nothing tells which)."""
    if not rows or not found.ok:
        return
    chain = found.copy.chain
    columns = ", ".join((*chain.columns, "prev_hash", "hash"))
    marks = ", ".join("?" * len(rows))
    there = {
        r[1]: r
        for r in db.execute(
            f"SELECT {columns} FROM {chain.table} WHERE id IN ({marks})",
            [r.values[1] for r in rows],
        )
    }
    for row in rows:
        stored = there.get(row.values[1])
        if stored is None:
            found.gone += 1
        elif differs := _differences(chain, row, stored):
            _broken_at(
                found, row.seq, f"id {row.values[1]}, from before the chain, altered: {differs}"
            )
            return
        else:
            found.matched += 1
            found.before_matched += 1


def _goes_on(db: Database, found: Comparison) -> None:
    """The database's chain goes on from the copy's last row: the row after it (the oldest kept,
    if all of the copy was pruned) names its hash as its previous hash."""
    copy = found.copy
    after = copy.last + 1  # type: ignore[operator]
    if found.oldest is not None and found.oldest > after:
        return  # pruned past the copy's end: nothing of it left to link to
    rows = db.execute(f"SELECT prev_hash FROM {copy.chain.table} WHERE seq = ?", (after,))
    if rows and rows[0][0] != copy.last_hash:
        _broken_at(
            found,
            after,
            f"the chain does not go on from the copy's last row: seq {after}'s previous hash is"
            f" {rows[0][0]}, and seq {copy.last} was exported with the hash {copy.last_hash}: the"
            " chain was rewritten since the export",
        )


def _differences(chain: Chain, row: Row, stored: Sequence[Any]) -> str:
    """What differs between a row as exported and as stored: the columns named, the first one's
    two values shown; "" when nothing does."""
    exported = (*row.values, row.prev_hash, row.hash)
    names = (*chain.columns, "prev_hash", "hash")
    changed = [
        (name, a, b)
        for name, a, b in zip(names, exported, stored, strict=True)
        if type(a) is not type(b) or a != b
    ]
    if not changed:
        return ""
    name, a, b = changed[0]
    which = ", ".join(n for n, _, _ in changed)
    a_text, b_text = _values(a, b)
    return (
        f"{which} differ{'s' if len(changed) == 1 else ''} ({name}: {a_text} in the copy,"
        f" {b_text} in the database)"
    )


def _values(a: Any, b: Any) -> tuple[str, str]:
    """Two values of a column, as a person compares them: two texts from a little before the
    first character where they differ (a record is long, and a change may be near its end)."""
    if not (isinstance(a, str) and isinstance(b, str)):
        return json.dumps(a), json.dumps(b)
    same = next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
    start = max(0, same - 30)
    cut = "…" if start else ""
    return cut + readable(a[start:], 100), cut + readable(b[start:], 100)


def _broken_at(found: Comparison, seq: int, problem: str) -> bool:
    found.broken_at, found.problem = seq, problem
    return False
