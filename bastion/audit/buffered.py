"""Records buffered in memory and written to the database in batches, off the request path.

`add` only buffers; `flush` (on a worker thread: `flush_forever`, and at a clean stop) writes.
A flush that fails (the database is unavailable) puts its records back, in order, for the
next one; at most ``max_buffer`` wait, and past that the oldest are dropped, counted and
logged. A record that alone cannot be stored (`bastion.db.unstorable`) is let go of, counted
and logged, so that it holds back none after it. The gateway's decision records
(`bastion.audit.decisions`) and the decision service's durable log
(`bastion.audit.decision_log`) are written so, each with a journal (`bastion.audit.journal`):
told of what no longer waits, forced to the disk at each flush, and the journals of dead
processes recovered every `SWEEP_SECONDS`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

from bastion.audit import journal as journals
from bastion.db import Database, DatabaseUnavailable, first_line, unstorable
from bastion.retries import Outage, kind_of

if TYPE_CHECKING:
    from bastion.audit.journal import DecisionJournal, Journalled

log = logging.getLogger("bastion.audit")

# What waits in the buffer, and what a flush writes once it is prepared (`_prepare`).
Waiting = TypeVar("Waiting")
Prepared = TypeVar("Prepared")
# How often `flush_forever` writes what is buffered.
FLUSH_SECONDS = 0.2


class Unwritten(Exception):  # noqa: N818 - internal, raised on as its cause
    """The records of a batch not yet written when the database failed under `_write_around`."""

    def __init__(self, records: list) -> None:
        super().__init__(f"{len(records)} records not written")
        self.records = records


class BufferedWriter(ABC, Generic[Waiting, Prepared]):
    """A bounded buffer of records and the flush that writes them (see the module).

    A subclass says how a batch is written (`_write`) to its database ``db``, and may prepare
    what waits before it is (`_prepare`, with `_again` for what goes back after a failure), be
    told of what is let go of (`_let_go`: stored, dropped or unstorable) and name a record in
    the log (`_named`). ``noun`` and ``setting`` name the records and the bound in the log
    lines. One whose decisions are journalled says the journal's kind (``journalled``) and
    the id of what waits (`_decision_id`); its ``journal`` is given by
    `bastion.audit.journal.open_journal`.
    """

    noun = "records"
    setting = ""
    journalled: ClassVar[Journalled | None] = None
    db: Database

    def __init__(self, max_buffer: int) -> None:
        self.max_buffer = max_buffer
        # This process's journal of the decisions recorded, told of those let go of.
        self.journal: DecisionJournal | None = None
        self._buffer: deque[Waiting] = deque()
        self._lock = threading.Lock()
        # Held through a whole flush: a flush that finds another under way waits for it, so that
        # what was buffered before a flush began is written (or back in the buffer) when it returns.
        self._flushing = threading.Lock()
        self.dropped = 0
        self._dropped_logged = 0
        # Records that no write could store (`_write_around`), let go of so as to hold back none.
        self.unstorable = 0
        # Since a flush failed, until one succeeds: records put back may be stored already.
        self._unsure = False

    # -- what a subclass says ------------------------------------------------------------------

    def _prepare(self, pending: list[Waiting]) -> list[Prepared]:
        return pending  # type: ignore[return-value]

    def _again(self, record: Prepared) -> Waiting:
        """A prepared record as it waits again, after a failed flush."""
        return record  # type: ignore[return-value]

    @abstractmethod
    def _write(self, batch: list[Prepared]) -> None:
        """Write one batch to the subclass's table; raise if the database does not take it (the
        batch then waits for the next flush, `_flush`)."""

    def _let_go(self, records: Iterable[Waiting]) -> None:
        """Told of records that no longer wait: stored, dropped, or found unstorable. The
        journal needs them no more."""
        if self.journal is not None:
            self.journal.settled(map(self._decision_id, records))

    @abstractmethod
    def _decision_id(self, record: Waiting) -> str:
        """The id a waiting record's decision is journalled under (its table's key)."""

    def _named(self, record: Prepared) -> str:
        return f"a {self.noun[:-1]}"

    # -- the buffer ----------------------------------------------------------------------------

    def _add(self, record: Waiting) -> None:
        with self._lock:
            self._buffer.append(record)
            if len(self._buffer) > self.max_buffer:
                self._drop_oldest()

    def _add_many(self, records: list[Waiting]) -> None:
        with self._lock:
            self._buffer.extend(records)
            while len(self._buffer) > self.max_buffer:
                self._drop_oldest()

    def restore(self, record: Waiting) -> None:
        """Buffer a record as it waits, recovered from a journal (its line is there already)."""
        self._add(record)

    def _drop_oldest(self) -> None:
        """Let go of the oldest buffered record (counted, logged by the next flush). Called
        with ``_lock`` held."""
        record = self._buffer.popleft()
        self.dropped += 1
        self._let_go((record,))

    @property
    def waiting(self) -> int:
        """Records buffered, not yet written."""
        return len(self._buffer)

    def flush(self) -> int:
        """Write every buffered record; on failure keep them for the next flush, and raise. A
        flush under way in another thread is waited for first. Then, stored or not, the journal
        is forced to the disk if it is to be (`DecisionJournal.sync`): the lines of decisions
        whose records are not stored yet (or, at the gateway, not made yet: the call is at its
        upstream)."""
        try:
            with self._flushing:
                return self._flush()
        finally:
            if self.journal is not None:
                self.journal.sync()

    def _flush(self) -> int:
        with self._lock:
            pending, self._buffer = list(self._buffer), deque()
        self._report_dropped()
        if not pending:
            return 0
        batch = None
        try:
            batch = self._prepare(pending)
            try:
                self._write(batch)
            except Exception as e:
                if not unstorable(e):
                    raise
                batch = self._write_around(batch, e)
        except BaseException as e:
            # Older than anything buffered meanwhile: back at the front (prepared, if they were).
            if isinstance(e, Unwritten):
                back = [self._again(record) for record in e.records]
            else:
                back = pending if batch is None else [self._again(record) for record in batch]
            with self._lock:
                self._buffer.extendleft(reversed(back))
                while len(self._buffer) > self.max_buffer:
                    self._drop_oldest()
            self._unsure = True
            if isinstance(e, Unwritten):
                raise e.__cause__  # noqa: B904 - what the database said (DatabaseUnavailable, say)
            raise
        self._unsure = False
        self._let_go(pending)  # stored, or let go of as unstorable (counted, logged)
        return len(batch)

    def _write_around(self, batch: list[Prepared], error: Exception) -> list[Prepared]:
        """Write ``batch``, which failed with ``error`` on values that cannot be stored, in
        halves, down to the records that alone cannot be: those are let go of (counted in
        `unstorable`, logged), so that they hold back no record after them, which otherwise
        waited for ever. Returns what was written; `Unwritten` (the rest, in order) if the
        database fails meanwhile."""
        written: list[Prepared] = []
        ranges: list[tuple[int, int]] = []  # a stack, in order from its top

        def failed(lo: int, hi: int, error: Exception) -> None:
            if hi - lo > 1:  # its halves, to be tried in turn
                mid = (lo + hi) // 2
                ranges.extend([(mid, hi), (lo, mid)])
                return
            self.unstorable += 1
            log.error(
                "%s cannot be stored, and is dropped: %s", self._named(batch[lo]), first_line(error)
            )

        failed(0, len(batch), error)
        while ranges:
            lo, hi = ranges.pop()
            try:
                self._write(batch[lo:hi])
            except Exception as e:
                if not unstorable(e):
                    rest = [r for a, b in [(lo, hi), *reversed(ranges)] for r in batch[a:b]]
                    raise Unwritten(rest) from e
                failed(lo, hi, e)
                continue
            written += batch[lo:hi]
        return written

    def _report_dropped(self) -> None:
        dropped = self.dropped
        if dropped > self._dropped_logged:
            log.error(
                "%d %s dropped (%d in all): more than %d waited to be written"
                " while the database was unavailable (%s)",
                dropped - self._dropped_logged,
                self.noun,
                dropped,
                self.max_buffer,
                self.setting,
            )
            self._dropped_logged = dropped


async def flush_forever(
    writer: BufferedWriter,
    every: float = FLUSH_SECONDS,
    each_round: Callable[[], None] | None = None,
) -> None:
    """Write ``writer``'s buffered records every ``every`` seconds on a worker thread. While
    the database is unavailable they stay buffered (bounded) and every round tries again. With
    a journal, every `SWEEP_SECONDS` the journals of processes that died meanwhile (replicas
    sharing its directory) are recovered. ``each_round``: run on the event loop first. A
    failure is logged once for as long as it stays the same (a database outage, or an error
    with its traceback), and once that records are written again."""
    outage = Outage(log)
    loop = asyncio.get_running_loop()
    sweep = loop.time() + journals.SWEEP_SECONDS
    while True:
        await asyncio.sleep(every)
        if each_round is not None:
            each_round()
        journal = writer.journal
        if journal is not None and loop.time() > sweep:
            sweep = loop.time() + journals.SWEEP_SECONDS
            await asyncio.to_thread(journals.sweep, writer)
        if not writer.waiting and not (journal is not None and journal.unsynced):
            # Idle: no thread woken for nothing (a drop is only made while full). The lines of
            # gateway calls still at their upstreams, with no record to write yet, are forced to
            # the disk all the same (`[server] decision_journal_fsync`).
            continue
        try:
            await asyncio.to_thread(writer.flush)
        except DatabaseUnavailable as e:
            outage.failed("%s wait in memory (%s); will retry", writer.noun, e, kind="unavailable")
        except Exception as e:
            outage.failed(
                "writing %s failed; will retry",
                writer.noun,
                kind=kind_of(e),
                level=logging.ERROR,
                exc_info=True,
            )
        else:
            outage.ended("%s are written again", writer.noun)


async def flush_at_stop(writer: BufferedWriter) -> None:
    """Write what is buffered, at a clean stop; what cannot be written is logged as lost."""
    try:
        await asyncio.to_thread(writer.flush)
    except Exception as e:
        log.error("%d %s could not be written before stopping: %s", writer.waiting, writer.noun, e)
