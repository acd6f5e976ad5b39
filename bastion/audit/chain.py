"""Tamper evidence for the audit trail: a hash chain over the rows of a table.

Each chained row (of ``audit_decisions``, ``audit_events``, ``decision_log``) stores ``prev_hash``, the ``hash``
of the row before it, and its own ``hash``: the SHA-256, in hex, of ``prev_hash`` followed by
its stored columns in the table's order, each written as a field that says its type and, for
text, its length (`link`). A row altered, deleted from the
middle or moved no longer hashes to what it stores, or no longer follows the row before it;
`verify` walks a chain and names the first place where that is so. Retention deletes the oldest
rows only: the oldest kept row's ``prev_hash`` anchors what is left. A chain kept in the same
database proves nothing against someone who rewrites all of it: its head (seq and hash), logged
by the server at intervals (`bastion.audit.checkpoints`), is what `verify` checks it against.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bastion.db import Database
from bastion.turns import Turns
from bastion.whole_numbers import count_in

# The previous hash of a chain's first row when nothing came before it.
GENESIS = "0" * 64
# Rows read per statement while verifying, so a chain of any length is walked in bounded memory.
PAGE = 1000
# Ids looked up per statement when a batch is checked for rows stored already (`append`).
_ID_QUERY = 500


def _field(value: Any) -> str:
    """A column as the hash reads it: text as ``s<length in UTF-8 bytes>:<the text>``, an
    integer as ``i<decimal>;``, a float as ``f<shortest text that reads back as it>;``
    (Python's `repr`, as JSON writes it), NULL as ``n;``; the whole in UTF-8. Self-delimiting,
    so no two rows read the same; and text goes in as it is, where a JSON array escaped every
    quote of a record (itself JSON) again, which cost more than the hash."""
    if isinstance(value, str):
        size = len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
        return f"s{size}:{value}"
    if value is None:
        return "n;"
    if isinstance(value, bool):
        raise TypeError("a chained column holds no boolean")
    if isinstance(value, int):
        return f"i{value};"
    if isinstance(value, float):
        return f"f{value!r};"
    raise TypeError(f"a chained column holds no {type(value).__name__}")


def link(prev_hash: str, row: Sequence[Any]) -> str:
    """The hash of a row whose stored columns, in the table's order (``seq`` first), are
    ``row`` and whose previous row's hash is ``prev_hash``."""
    text = prev_hash + "".join(map(_field, row))
    # Unstorable text (a lone surrogate) hashes here and fails at its INSERT, as before.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def link_rows(rows: Iterable[Sequence[Any]], seq: int, prev_hash: str) -> list[tuple[Any, ...]]:
    """``rows`` (stored columns without ``seq``) numbered on from ``seq`` and chained on from
    ``prev_hash``: each as ``(seq, *row, prev_hash, hash)``. In turns (`bastion.turns`)."""
    chained = []
    for row in Turns().each(rows):
        seq += 1
        values = (seq, *row)
        digest = link(prev_hash, values)
        chained.append((*values, prev_hash, digest))
        prev_hash = digest
    return chained


@dataclass(frozen=True)
class Chain:
    """A chained table: its name, the stored columns hashed (``seq`` first, then ``id``, its
    key, and ``at``, when the row was made, in epoch seconds), what its rows are called
    (``noun``), and the lock its writers take turns under. Where its writers put a row outside
    the chain: at seq 0, written before the chain began (``zero_before_chain``: an event, a
    decision of the decision service; a decision record of then kept its number), and with no
    seq, to be chained by a running server (``chained_later``: an event). A row anywhere else
    outside the walk (a seq below 0, say) was put there by hand: `verify` refuses it."""

    table: str
    columns: tuple[str, ...]
    noun: str
    lock: str
    zero_before_chain: bool = True
    chained_later: bool = False


def head(db: Database, chain: Chain) -> tuple[int, str | None] | None:
    """The newest row's seq and hash (None for a row written before the chain); None if the
    table holds no numbered row."""
    rows = db.execute(
        f"SELECT seq, hash FROM {chain.table} WHERE seq > 0 ORDER BY seq DESC LIMIT 1"
    )
    return (rows[0][0], rows[0][1]) if rows else None


def next_link(db: Database, chain: Chain) -> tuple[int, str]:
    """Under the chain's lock: the seq and hash the next row written follows."""
    last = head(db, chain)
    if last is None:
        return 0, GENESIS
    return last[0], last[1] or GENESIS


def append(db: Database, chain: Chain, rows: list[tuple[Any, ...]], *, unsure: bool) -> None:
    """Write ``rows`` (stored columns without ``seq``, the id first) at the end of ``chain``,
    numbered and linked, in one transaction under the chain's lock: every writer's turn (every
    replica's) in one chain. A row whose id comes twice in ``rows`` is written once. ``unsure``:
    written again after a failed flush, whose failure may have been the answer to a COMMIT that
    took effect: the rows stored already are left out, before anything is numbered or chained,
    so no row is written twice, no sequence number is skipped, and the chain goes on from the
    row truly stored last."""
    columns = ", ".join((*chain.columns, "prev_hash", "hash"))
    marks = ", ".join("?" * (len(chain.columns) + 2))
    with db.transaction():
        db.lock(chain.lock)
        rows = _unstored(db, chain, rows, stored=unsure)
        seq, prev_hash = next_link(db, chain)
        db.executemany(
            f"INSERT INTO {chain.table} ({columns}) VALUES ({marks})",
            link_rows(rows, seq, prev_hash),
        )


def _unstored(
    db: Database, chain: Chain, rows: list[tuple[Any, ...]], *, stored: bool
) -> list[tuple[Any, ...]]:
    """``rows`` less those whose id comes twice and, if ``stored``, those whose id is stored
    already (looked up only then: after a failed flush)."""
    seen: set[str] = set()
    for start in range(0, len(rows), _ID_QUERY) if stored else ():
        ids = [row[0] for row in rows[start : start + _ID_QUERY]]
        marks = ", ".join("?" * len(ids))
        found = db.execute(f"SELECT id FROM {chain.table} WHERE id IN ({marks})", ids)
        seen.update(i for (i,) in found)
    kept = []
    for row in rows:
        if row[0] not in seen:
            seen.add(row[0])
            kept.append(row)
    return kept


def prune_oldest(db: Database, chain: Chain, before: float, batch: int) -> int:
    """Delete the oldest numbered rows up to the first made at or after ``before`` (epoch
    seconds), never the newest, a batch per statement; return how many went. Only ever the
    oldest: a row made before the cutoff but numbered after one made since (a replica's
    records written late) stays with it, so what is left is a whole chain."""
    rows = db.execute(
        f"SELECT seq FROM {chain.table} WHERE seq > 0 AND at >= ? ORDER BY seq LIMIT 1",
        (before,),
    )
    last = head(db, chain)
    if last is None:
        return 0
    cut = min(rows[0][0], last[0]) if rows else last[0]
    removed = 0
    while True:
        deleted = db.execute(
            f"DELETE FROM {chain.table} WHERE seq IN (SELECT seq FROM {chain.table}"
            " WHERE seq > 0 AND seq < ? ORDER BY seq LIMIT ?) RETURNING seq",
            (cut, batch),
        )
        removed += len(deleted)
        if len(deleted) < batch:
            return removed


@dataclass(frozen=True)
class Checkpoint:
    """A chain's head as a server logged it: ``SEQ:HASH``."""

    seq: int
    hash: str

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        seq, _, digest = text.partition(":")
        number = count_in(seq, 2**63 - 1)
        if not (number and len(digest) == 64) or digest.strip("0123456789abcdef"):
            raise ValueError(
                f"a checkpoint is SEQ:HASH as the server logs it (audit checkpoint: ...), a"
                f" sequence number and 64 lower-case hex digits; got {text!r}"
            )
        return cls(number, digest)

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"


@dataclass
class Verdict:
    """What `verify` found in one chain."""

    chain: Chain
    rows: int = 0  # chained rows checked
    first: int | None = None  # the oldest kept chained row
    first_at: float | None = None
    anchor: str = ""  # its prev_hash
    last: int | None = None  # the head
    last_hash: str = ""
    before: int = 0  # rows written before the chain began (not covered)
    waiting: int = 0  # rows not chained yet (events, chained by a running server)
    broken_at: int | None = None  # None where that row has no seq (see `problem`)
    problem: str = ""
    checked: list[Checkpoint] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problem


def verify(db: Database, chain: Chain, checkpoints: Sequence[Checkpoint] = ()) -> Verdict:
    """Walk ``chain`` oldest first, a page at a time, in one snapshot of the database; stop at
    the first row that is not where the chain says it should be. Each checkpoint must be a
    row of the chain as it is now: older than the oldest kept row (pruned) or newer than the
    head (rows deleted from its end) it cannot be confirmed, and is a failure too."""
    found = Verdict(chain)
    columns = ", ".join(chain.columns)
    wanted = {c.seq: c for c in checkpoints}
    with db.transaction(read_only=True):
        if chain.zero_before_chain:
            found.before = db.execute(f"SELECT COUNT(*) FROM {chain.table} WHERE seq = 0")[0][0]
        if chain.chained_later:
            found.waiting = db.execute(f"SELECT COUNT(*) FROM {chain.table} WHERE seq IS NULL")[0][
                0
            ]
        after = 0
        while not found.problem:
            page = db.execute(
                f"SELECT {columns}, prev_hash, hash FROM {chain.table}"
                " WHERE seq > 0 AND seq > ? ORDER BY seq LIMIT ?",
                (after, PAGE),
            )
            for *values, prev_hash, stored in page:
                if not _step(db, found, values, prev_hash, stored, wanted):
                    break
            if len(page) < PAGE:
                break
            after = page[-1][0]
        if not found.problem:
            _outside(db, found)
        if not found.problem:
            _beyond(found, wanted)
    return found


def _outside(db: Database, found: Verdict) -> None:
    """Rows where the chain's writers never put one (`Chain`): read as records by everything
    but the walk, so a row inserted there would pass for one, unchained and uncounted."""
    chain = found.chain
    where = ["seq < 0"]
    if not chain.zero_before_chain:
        where.append("seq = 0")
    if not chain.chained_later:
        where.append("seq IS NULL")
    condition = " OR ".join(where)
    count = db.execute(f"SELECT COUNT(*) FROM {chain.table} WHERE {condition}")[0][0]
    if not count:
        return
    seq, row_id = db.execute(
        f"SELECT seq, id FROM {chain.table} WHERE {condition} ORDER BY seq LIMIT 1"
    )[0]
    more = f" and {count - 1} more" if count > 1 else ""
    _broken(
        found,
        seq,
        f"a row outside the chain, seq {'NULL' if seq is None else seq} (id {row_id!r}){more}:"
        f" no bastion numbers {chain.noun} so; it was inserted by hand",
    )


def _step(
    db: Database,
    found: Verdict,
    values: list[Any],
    prev_hash: str | None,
    stored: str | None,
    wanted: dict[int, Checkpoint],
) -> bool:
    """Check one row against the chain so far; False (and the problem said) if it breaks it."""
    seq = values[0]
    if found.first is None:
        if stored is None and prev_hash is None and not found.chain.zero_before_chain:
            found.before += 1  # a decision record written before the chain began
            return True
        if stored is None and prev_hash is None:
            return _broken(
                found, seq, f"it has no hash: {found.chain.noun} from before the chain have seq 0"
            )
        if stored is None:
            return _broken(found, seq, "its hash was removed (its previous hash is still there)")
        if found.before and prev_hash != GENESIS:
            return _broken(
                found,
                seq,
                f"rows written before the chain began precede it, yet it names a previous row"
                f" ({prev_hash}): the rows before it had their hashes removed",
            )
        found.first, found.first_at, found.anchor = seq, values[2], prev_hash or ""
    elif seq != found.last + 1:  # type: ignore[operator]
        missing = found.last + 1  # type: ignore[operator]
        gone = f"seq {missing}" if seq == missing + 1 else f"seqs {missing} to {seq - 1}"
        return _broken(found, missing, f"{gone} missing: deleted from the middle of the chain")
    elif stored is None:
        return _broken(found, seq, "it has no hash: written outside the chain, or its hash removed")
    if prev_hash is None or link(prev_hash, values) != stored:
        return _broken(found, seq, _altered(db, found, seq, prev_hash))
    if found.rows and prev_hash != found.last_hash:
        return _broken(
            found,
            seq,
            f"its previous hash is not seq {found.last}'s hash: seq {found.last} (or this row)"
            " was rewritten with its hash computed again",
        )
    checkpoint = wanted.get(seq)
    if checkpoint is not None:
        if checkpoint.hash != stored:
            return _broken(
                found,
                seq,
                f"checkpoint {checkpoint} does not match: seq {seq}'s hash is now {stored}: the"
                " chain was rewritten since the checkpoint was logged",
            )
        found.checked.append(checkpoint)
    found.rows += 1
    found.last, found.last_hash = seq, stored
    return True


def _altered(db: Database, found: Verdict, seq: int, prev_hash: str | None) -> str:
    """Why a row does not hash to its stored hash: moved, if its previous hash is the hash of a
    row that does not stand just before it; else altered (its columns or its hash)."""
    if prev_hash is not None:
        rows = db.execute(
            f"SELECT seq FROM {found.chain.table} WHERE hash = ? AND seq > 0 LIMIT 1",
            (prev_hash,),
        )
        if rows and rows[0][0] != seq - 1:
            return (
                f"reordered: its previous hash is the hash of the row now at seq {rows[0][0]},"
                " not of the row before it"
            )
    return "altered: its stored columns do not hash to its stored hash (the row or its hash was changed)"


def _beyond(found: Verdict, wanted: dict[int, Checkpoint]) -> None:
    """Checkpoints the walk did not reach."""
    for seq, checkpoint in sorted(wanted.items()):
        if checkpoint in found.checked:
            continue
        if found.first is None:
            _broken(found, seq, f"checkpoint {checkpoint}: the table holds no chained row")
        elif seq < found.first:
            _broken(
                found,
                seq,
                f"checkpoint {checkpoint} is older than the oldest kept row (seq {found.first}):"
                " it was pruned, or deleted; check a newer checkpoint",
            )
        else:
            _broken(
                found,
                seq,
                f"checkpoint {checkpoint} is past the head (seq {found.last}): rows were deleted"
                " from the end of the chain, or the checkpoint is another database's",
            )
        return


def _broken(found: Verdict, seq: int | None, problem: str) -> bool:
    found.broken_at, found.problem = seq, problem
    return False
