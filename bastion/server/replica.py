"""One server process's in-memory `Authorizer`, kept current by following the change log.

At start the replica loads a snapshot (facts, policy, head sequence), then applies each change
after it in sequence order. On PostgreSQL a LISTEN connection wakes it on every commit; it also
polls, so a lost notification or a reconnect only delays it. On SQLite it polls the log.
All changes are put in force on the event loop thread, the same thread that makes decisions, so
a decision never sees half of a batch; a new policy is compiled in a worker thread first, and a
large change checked there (and, as large as half the facts held, built there into the next
`Authorizer`), then put in force between two decisions.

A replica knows when it last confirmed it was current: a read of the log that reached its end.
While it cannot read the log (the database is down, the connection hangs) that moment recedes;
past ``max_staleness`` seconds the replica is `stale` and its facts are not used for decisions.
It is `stale` at once, too, while the policy in force does not load here (stored by a replica
with larger policy limits, or a different engine): it does not decide under the previous one.

With ``snapshot_path`` set, the replica starts from the fact snapshot there when it is signed
with the database's snapshot key (`FactStore.snapshot_key`) and fits the database
(`bastion.facts.snapshot.check_origin`), replays the log after it, and only then says it
is ready; it writes a new one every ``snapshot_interval`` seconds while the facts change, and when
it stops. A snapshot that does not fit is ignored, with a log line, and the facts loaded from the
database.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from functools import partial

import anyio

from bastion.db import Database, Listener, first_line, schema_and_clock
from bastion.decide import Authorizer
from bastion.facts import snapshot
from bastion.facts.model import matches
from bastion.facts.store import (
    CHANGES_CHANNEL,
    SCHEMA_VERSION,
    Change,
    FactStore,
    PolicyVersion,
    StoredFact,
)
from bastion.policy.errors import PolicyError
from bastion.policy.limits import DEFAULT_LIMITS, PolicyLimits
from bastion.retries import Backoff
from bastion.signals.suspensions import Suspensions, kept, kept_rows
from bastion.turns import Turns, collector_paused, full_passes_held
from bastion.whole_numbers import count_in

log = logging.getLogger("bastion.replica")

# The change log is read this many entries at a time.
_PAGE = 200
# On PostgreSQL notifications drive the replica; polling is only the safety net, and what
# confirms, when nothing is written, that the replica is still current.
_PG_POLL_INTERVAL = 1.0
# How often a replica asks whether a newer bastion has migrated the database, and how far its
# clock is from the database's (`_watch_database`): a replica of the version before stops
# deciding within this long of the newer one's start, a replica whose clock jumps within this
# long of the jump.
_SCHEMA_CHECK_INTERVAL = 1.0
# After a failed read of the change log, try again this soon: while the database cannot be
# reached the read fails at once (`Database` itself connects again at most every 0.5 s).
_RETRY_INTERVAL = 0.25
# After a failure to put the log in force (a reload of every fact, a change applied), the wait
# starts at `_RETRY_INTERVAL` and doubles with each further failure in a row, up to this: a
# reload that fails every time (the policy in force does not load here, a statement_timeout
# shorter than the load) would otherwise read every fact four times a second.
_RETRY_LONGEST = 30.0
# A fact snapshot not written is tried again after `snapshot_interval`, doubled at each further
# failure in a row up to this (or the interval, if longer).
_SNAPSHOT_RETRY_LONGEST = 3600.0
# `_given_up`'s notice when what ran out was the wait for the listener itself (`Listener.behind`).
_BEHIND = -1.0
# A change with more facts is checked against the policy on a worker thread (`_load_change`).
_CHECKED_ON_LOOP = 1000
# A change with at least this many facts, and half as many as the replica holds, is built aside.
_BUILT_ASIDE = 10_000
# More facts than this expiring by one time are dropped on a worker thread (`_purge_crowded`),
# starting this many seconds before that time; fewer are dropped by the decision after their
# expiry, on the event loop, as in any `Authorizer`.
_PURGED_ON_LOOP = 1000
_PURGE_AHEAD = 0.02


async def _pause(seconds: float) -> None:
    """The wait after a failure, of the follower and of the snapshot writer (the one place a
    test's clock replaces)."""
    await asyncio.sleep(seconds)


def _small(inserts: int, deletes: list[tuple]) -> bool:
    """Whether a change is put in force on the event loop: few facts, and deletes that each
    name one fact whole (looked up; a wildcard may match every fact held)."""
    return (
        inserts <= _CHECKED_ON_LOOP
        and len(deletes) <= _CHECKED_ON_LOOP
        and all(None not in pattern for pattern in deletes)
    )


def _built_aside(inserts: int, held: int) -> bool:
    """Whether a change of ``inserts`` facts, to a replica that holds ``held``, is put in force by
    building the next `Authorizer` on a worker thread (the facts held copied, then the change),
    rather than by adding its facts to the indexes on the event loop: the loop never waits for
    it, but the worker copies every fact held (about 4 µs a fact), so only where that is less
    than the change's own work there (about 8 µs a fact: read, checked, shared)."""
    return inserts >= _BUILT_ASIDE and 2 * inserts >= held


class ConsistencyTimeout(Exception):
    """This replica did not reach the requested sequence in time."""


def load_facts(
    authz: Authorizer, facts: list[StoredFact], deletes: Iterable[tuple] = ()
) -> list[StoredFact]:
    """Apply ``deletes``, then put stored facts into ``authz``, as one atomic change; return
    those the policy in force cannot use.

    A stored fact can outlive the policy that used it (a rollback, say). It stays in the store
    and is offered again after every policy change.
    """
    refused = authz.facts.load([(f.fact, f.expires_at) for f in facts], deletes)
    return [StoredFact(fact, expires_at) for fact, expires_at in refused]


def _from_store(
    store: FactStore, limits: PolicyLimits, first: bool
) -> tuple[int, PolicyVersion | None, Authorizer, list[StoredFact], list[StoredFact]]:
    """Every stored fact read and an `Authorizer` built of them, on a worker thread. Except at
    the start (``first``), beside an event loop that decides meanwhile: in turns, with the
    collector's full passes held (`_bulk_load`), and the facts read let go of here a part at a
    time. Returns the sequence read at, the policy in force, the `Authorizer`, the facts it
    cannot use, and the facts of the suspensions view (`Suspensions.reset`: the suspensions and
    the agents' owners)."""
    with _bulk_load(first):
        turns = None if first else Turns()
        seq, facts, policy = store.snapshot(turns)
        authz = Authorizer("", limits=limits)
        if policy is not None:
            authz.load_policy(policy.text, source=policy.source or "policy.polar")
        pairs = [(f.fact, f.expires_at) for f in facts]
        checked, refused = authz.facts.check(pairs, turns)
        if turns is None:
            authz.facts.load_checked(checked)
        else:
            authz.facts.fill(authz.facts.shared(checked, turns), turns)
        suspended = [f for f in facts if kept(f.fact)]
        if turns is not None:
            for each in (checked, pairs, facts):
                turns.empty(each)
    return seq, policy, authz, [StoredFact(f, at) for f, at in refused], suspended


@contextlib.contextmanager
def _bulk_load(first: bool) -> Iterator[None]:
    """Around the building of a replica's facts: millions of new tuples would start the cyclic
    garbage collector's full passes over and over (each longer than the last) while nothing they
    make can be garbage, so they are held (`full_passes_held`; at the ``first`` load, the
    start's, with nothing to decide meanwhile, the collector is paused altogether, which costs
    less); and the C allocator is then asked to give back the pages that the load's temporary
    lists freed (about 30 bytes a fact at 1 M facts, which glibc would otherwise keep).

    Once built, what the load made is moved out of the collector's sight (`gc.freeze`): its
    first pass would otherwise walk every fact (0.7–0.9 s at 1 M facts), and every full pass
    after it too, to find nothing. Frozen objects are still freed by reference counting when
    nothing refers to them, and an `Authorizer` and a replaced policy hold no cycle (see
    `Authorizer.__del__`), so what a replica lets go of is freed without the collector (see
    `_freeze` for the cycles that are garbage then)."""
    try:
        with collector_paused() if first else full_passes_held():
            yield
            if first:
                gc.freeze()  # its young generations hold the whole load: not collected first
            else:
                _freeze()
    finally:
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)


def _freeze() -> None:
    """Move what is in the collector's sight out of it (`gc.freeze`), its young generations
    collected first: a cycle that is garbage then is kept for good, so only one that lived long
    before it became garbage is (a full pass, which would find those too, walks every object not
    frozen: a large change's own, while it is read)."""
    gc.collect(1)
    gc.freeze()


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _malloc_trim()


def _thaw() -> None:
    """Give what a replica's loads froze (`_bulk_load`) back to the collector, which then walks
    it in its next full pass and frees whatever of it has become garbage. Unconditionally: the
    unfreeze is one splice of two lists, where `gc.get_freeze_count` walks every frozen object
    (26 ms at 3 M, on the event loop)."""
    gc.unfreeze()


def _let_go(held: list[Authorizer]) -> None:
    """Free the `Authorizer` that ``held`` alone holds (one that a reload, or a change built
    aside, replaced) on a worker thread, its facts a part at a time (`Authorizer.let_go`), if nothing else refers to it: no
    decision runs on it then, nor can one start. If something does (a decision still under way),
    it is freed, whole, when that lets go of it."""
    authz = held.pop()
    if sys.getrefcount(authz) == 2:  # ``authz`` here, and getrefcount's argument
        authz.let_go(Turns())


def _let_go_of_changes(changes: list[Change], spent: list[list[tuple]]) -> None:
    """`Change.let_go` of each, and the facts as checked of those added in place emptied, on a
    worker thread: not at the end of the read, on the loop."""
    turns = Turns()
    for change in changes:
        change.let_go(turns)
    for checked in spent:
        turns.empty(checked)


def _from_snapshot(
    path: str, store: FactStore, limits: PolicyLimits, first: bool
) -> tuple[snapshot.Snapshot, PolicyVersion | None, Authorizer, list[StoredFact]]:
    """Read the snapshot at ``path``, check it fits ``store``, and build an `Authorizer` of its
    facts under the policy it was taken with. The snapshot comes back with the rows of the
    facts of the suspensions view only (`kept_rows`; the others are in the `Authorizer`)."""
    try:
        key = store.snapshot_key()
    except ValueError as e:  # a damaged key: the facts are loaded from the database
        raise snapshot.SnapshotRefused(str(e)) from None
    with _bulk_load(first):
        snap = snapshot.read(path, key)
        policy = snapshot.check_origin(store, snap.origin)
        authz = Authorizer("", limits=limits)
        if policy is not None:
            authz.load_policy(policy.text, source=policy.source or "policy.polar")
        unusable = []
        for g in snap.groups:
            refused = authz.facts.load_rows(g.name, g.arity, g.rows, g.expiries)
            unusable += [StoredFact(fact, at) for fact, at in refused]
            # The rest is in the index now: freed before the allocator gives pages back.
            g.rows = [r[1:] for r in kept_rows(g.name, g.arity, g.rows)]
    return snap, policy, authz, unusable


async def _refused() -> bool:
    return False


def _undeleted(facts: list[StoredFact], deletes: Iterable[tuple]) -> list[StoredFact]:
    """``facts`` less those ``deletes`` remove: a pattern that names a whole fact is looked up,
    and a wildcard is tried against the facts of its own predicate and arity only. (Each fact
    tried against every pattern made a change of many deletes cost as many passes over every
    unused fact a replica keeps.)"""
    whole: set[tuple] = set()
    wildcards: dict[tuple[str, int], list[tuple]] = {}
    for pattern in deletes:
        if any(value is None for value in pattern[1:]):
            wildcards.setdefault((pattern[0], len(pattern)), []).append(pattern)
        else:
            whole.add(_fact_key(pattern))
    return [
        f
        for f in facts
        if _fact_key(f.fact) not in whole
        and not any(matches(f.fact, p) for p in wildcards.get((f.fact[0], len(f.fact)), ()))
    ]


def _fact_key(fact: tuple) -> tuple:
    """A fact as a set compares it by `same_value`: a boolean is no integer (``True == 1``)."""
    return tuple((value.__class__ is bool, value) for value in fact)


class Replica:
    """The decision state of this process: an `Authorizer`, the policy version, the sequence."""

    def __init__(
        self,
        database: str,
        *,
        poll_interval: float = 0.05,
        max_staleness: float = 5.0,
        limits: PolicyLimits = DEFAULT_LIMITS,
        snapshot_path: str = "",
        snapshot_interval: float = 300.0,
        max_clock_skew: float = 2.0,
    ) -> None:
        self.database = database
        self.snapshot_path = snapshot_path
        self.snapshot_interval = snapshot_interval
        # The sequence of the last snapshot written or read here (None: none yet).
        self.snapshot_seq: int | None = None
        self._snapshots: asyncio.Task | None = None
        self._writing = asyncio.Lock()
        self._file_lock = threading.Lock()
        self.limits = limits
        self.store = FactStore.open(database, role="bastion-replica")
        self.is_postgres = self.store.db.is_postgres
        # SQLite: a connection of its own that only asks whether anything was committed since a
        # read of the log began (`_version`), on the event loop, never waiting for a lock.
        self._probe = (
            None
            if self.is_postgres
            else Database(database, role="bastion-replica-probe", busy_timeout=0)
        )
        # Its `data_version` as the last read that reached the end of the log began.
        self._read_at_version: int | None = None
        self.max_staleness = max_staleness
        # Polled often enough that an idle log is confirmed current well within the bound.
        interval = _PG_POLL_INTERVAL if self.is_postgres else poll_interval
        self.poll_interval = min(interval, max_staleness / 4)
        # When (monotonic) this replica last knew it had applied everything committed.
        self.confirmed_at = 0.0
        # When (monotonic) it last heard of a commit (a notice on PostgreSQL, its own write).
        self.noticed = 0.0
        # The notice a wait (`heard_not_applied`) gave up on, and the task that waited: that
        # task's next asks about it, while it is still not read, are refused at once.
        self._given_up: tuple[float, asyncio.Task | None] = (0.0, None)
        # Why the last read of the change log failed (None while it is being followed).
        self.follow_error: str | None = None
        # Whether `_catch_up` has read the log and is putting what it read in force (a reload,
        # changes): a failure then did that work for nothing, and is tried again after
        # `_retries`' wait, not `_RETRY_INTERVAL`'s.
        self._putting_in_force = False
        self._retries = Backoff(_RETRY_INTERVAL, _RETRY_LONGEST)
        # Why the policy in force does not load here (None while the one in force is loaded).
        self.policy_refused: str | None = None
        # Why this process's code must no longer use the database: a newer bastion migrated it
        # (`schema_and_clock`). Set once, for good: a restart refuses to start (`SchemaNewer`).
        self.schema_refused: str | None = None
        self._schema_watch: asyncio.Task | None = None
        # Why this process's clock must not be used: further from the database's than
        # ``max_clock_skew`` seconds (PostgreSQL; `_clock_checked`). Cleared once it is back.
        self.max_clock_skew = max_clock_skew
        self.clock_refused: str | None = None
        # The change being applied and when that began: said in a 503 while it takes long.
        self.applying: tuple[Change, float] | None = None
        self.authz: Authorizer = Authorizer("", limits=limits)
        # Done once the change being added to `authz` on a worker thread is in force (None
        # while none is): see `in_force`.
        self._changing: asyncio.Future[None] | None = None
        # The facts as checked of the changes added in place, to let go of in turns (`_catch_up`).
        self._spent: list[list[tuple]] = []
        # Changes this process's writers committed, handed over with their log entries
        # (`FactStore.handed`): read from the log, each is taken as written, not decoded again
        # (1.3 s at 200,000 facts). Let go of once applied.
        self.handed: dict[int, tuple[str, Change]] = {}
        self.applied = 0
        self.head_seen = 0
        self.policy_version: int | None = None
        # The version of the policy in force as of `applied`, loaded here or not (`policy_refused`):
        # what a snapshot of `applied` says it was taken under (`write_snapshot`), so that a
        # replica started from it never decides under the policy that was in force before.
        self.policy_in_force: int | None = None
        # Stored facts the policy in force has no use for; offered again on a policy change.
        self.unusable: list[StoredFact] = []
        # The kill switch's view, fed with every fact change whatever the policy uses.
        self.suspensions = Suspensions()
        self.ready = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._advanced: asyncio.Condition | None = None
        self._task: asyncio.Task | None = None
        self._listener: Listener | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._advanced = asyncio.Condition()
        if not (self.snapshot_path and await self._load_snapshot()):
            await self._resync()
        # The clock is compared before the first decision (a failed read: at the next turn).
        with contextlib.suppress(Exception):
            self._clock_checked(
                (await anyio.to_thread.run_sync(schema_and_clock, self.store.db))[1]
            )
        if self.is_postgres:
            self._listener = Listener(
                self.database,
                CHANGES_CHANNEL,
                on_notify=self._notified,
                # Catch up on whatever was written while not listening, before the next decision
                # (heard of: `heard_not_applied`), as for a notice: the listener confirms writes.
                on_listening=partial(self._notified, ""),
                name="bastion-listen",
                confirms=True,
            )
            self._listener.start()
        self._task = asyncio.create_task(self._follow())
        self._schema_watch = asyncio.create_task(self._watch_database())
        if self.snapshot_path:
            self._snapshots = asyncio.create_task(self._write_snapshots())
        self.ready = True

    async def _load_snapshot(self) -> bool:
        """Start from the snapshot at `snapshot_path` and replay the log after it; False (with
        a log line) if there is none or it does not fit this database."""
        path = self.snapshot_path
        started = time.perf_counter()
        try:
            snap, policy, authz, unusable = await anyio.to_thread.run_sync(
                _from_snapshot, path, self.store, self.limits, not self.ready
            )
        except FileNotFoundError:
            log.info("no fact snapshot at %s yet; loading the facts from the database", path)
            return False
        except (snapshot.SnapshotRefused, OSError) as e:
            log.warning(
                "fact snapshot %s not used: %s; loading the facts from the database", path, e
            )
            return False
        if unusable:
            log.warning("%d stored facts are not used by the policy in force", len(unusable))
        self.authz, self.unusable = authz, unusable
        self.suspensions.reset(
            StoredFact((g.name, *v), g.expiries.get(v)) for g in snap.groups for v in g.rows
        )
        self.policy_version = self.policy_in_force = policy.version if policy else None
        self.applied = self.snapshot_seq = snap.origin.seq
        self.head_seen = max(self.head_seen, self.applied)
        loaded, count = time.perf_counter() - started, len(authz.facts)
        # Ready only once current: the changes after the snapshot are applied first.
        while await self._catch_up():
            pass
        log.info(
            "loaded %d facts from the snapshot at sequence %d in %.2fs, then the change log up"
            " to sequence %d in %.2fs",
            count,
            snap.origin.seq,
            loaded,
            self.applied,
            time.perf_counter() - started - loaded,
        )
        return True

    async def write_snapshot(self) -> int | None:
        """Write this replica's facts to `snapshot_path` as of the sequence applied, under the
        policy in force then (`policy_in_force`, which a replica with smaller limits may not have
        loaded: its facts are those held and those unusable, checked again by the reader); return the
        file's size (None when there is nothing to write, or the log no longer holds that
        sequence). Only the copy of the facts runs on the event loop (a C call per predicate,
        and one for the expiries)."""
        async with self._writing:
            # A change being added on a worker thread holds the fact lock: wait for it here,
            # or `rows` would wait for the lock on the event loop.
            while (changing := self.in_force()) is not None:
                await changing
            seq, version = self.applied, self.policy_in_force
            rows = self.authz.facts.rows()
            unusable = list(self.unusable)
            started = time.perf_counter()

            def write() -> int | None:
                # One at a time, in order: a write whose wait was cancelled (at stop) still
                # runs to its end, and must not rename its older file over the next one.
                with self._file_lock:
                    return write_file()

            def write_file() -> int | None:
                change_at = self.store.change_at(seq) if seq else None
                if seq and change_at is None:
                    return None
                origin = snapshot.SnapshotOrigin(
                    self.store.identity(), SCHEMA_VERSION, seq, change_at, version
                )
                groups = [snapshot.PredicateRows(*r) for r in rows.grouped()]
                groups += snapshot.from_facts(unusable)
                return snapshot.write(self.snapshot_path, origin, groups, self.store.snapshot_key())

            size = await anyio.to_thread.run_sync(write)
            if size is None:
                log.warning("no fact snapshot written: the change log no longer holds %d", seq)
                return None
            self.snapshot_seq = seq
            log.info(
                "wrote the fact snapshot %s at sequence %d (%d bytes) in %.2fs",
                self.snapshot_path,
                seq,
                size,
                time.perf_counter() - started,
            )
            return size

    async def _write_snapshots(self) -> None:
        """A snapshot now if none fits the facts loaded, then one per interval while the facts
        change. One not written (a full disk, a folder not writable, the log pruned past the
        facts held) copied every fact for nothing: the next attempt waits the interval, then
        twice as long at each further failure in a row, up to `_SNAPSHOT_RETRY_LONGEST`."""
        retries = Backoff(
            self.snapshot_interval, max(self.snapshot_interval, _SNAPSHOT_RETRY_LONGEST)
        )
        while True:
            wait = self.snapshot_interval
            if self.snapshot_seq != self.applied:
                written = None
                try:
                    written = await self.write_snapshot()
                except Exception as e:  # a full disk must not stop the replica
                    log.warning("cannot write the fact snapshot %s: %s", self.snapshot_path, e)
                if written is None:
                    wait = retries.after_failure()
                else:
                    retries.succeeded()
            await _pause(wait)

    async def _resync(self) -> None:
        """Load a snapshot into a new `Authorizer`, then swap it in (decisions go on meanwhile)."""
        asked_at = time.monotonic()
        started = time.perf_counter()
        first = not self.ready  # the start's load: nothing to replace
        seq, policy, authz, unusable, suspended = await anyio.to_thread.run_sync(
            _from_store, self.store, self.limits, first
        )
        if unusable:
            log.warning("%d stored facts are not used by the policy in force", len(unusable))
        if first:
            self.authz = authz  # replaces an empty one
        else:
            self._replace(authz)
        self.unusable = unusable
        self.suspensions.reset(suspended)
        self.policy_version = self.policy_in_force = policy.version if policy else None
        # Loaded (`_from_store` raises when it does not): one refused before no longer counts.
        self.policy_refused = None
        self.applied = seq
        self.head_seen = max(self.head_seen, seq)
        self.confirmed_at = asked_at
        log.info(
            "loaded %d facts and policy version %s at sequence %d in %.2fs",
            len(authz.facts),
            self.policy_version,
            seq,
            time.perf_counter() - started,
        )

    @property
    def listening(self) -> bool:
        """Whether this replica hears of every commit as it happens (always true on SQLite)."""
        return not self.is_postgres or (self._listener is not None and self._listener.healthy)

    @property
    def staleness(self) -> float:
        """Seconds since this replica last confirmed it had applied every committed change."""
        return time.monotonic() - self.confirmed_at

    @property
    def stale(self) -> bool:
        """Too long without confirming it is current, without the policy in force, or with a
        clock too far from the database's (`clock_refused`): what it
        holds must not decide anything."""
        return (
            self.policy_refused is not None
            or self.schema_refused is not None
            or self.clock_refused is not None
            or time.monotonic() - self.confirmed_at > self.max_staleness
        )

    def stale_reason(self) -> str:
        """Why this replica is stale, for the person reading a 503."""
        if self.schema_refused is not None:
            return self.schema_refused
        if self.clock_refused is not None:
            return self.clock_refused
        if self.policy_refused is not None:
            return self.policy_refused
        why = f": {self.follow_error}" if self.follow_error else ""
        if self.applying is not None:
            change, since = self.applying
            what = (
                f"policy version {change.policy_version} compiling"
                if change.kind == "policy"
                else f"{len(change.inserts)} facts added, {len(change.deletes)} deletes"
            )
            why += (
                f": change {change.seq} ({what}) has been going in force for"
                f" {time.monotonic() - since:.1f} s, and the changes after it wait"
            )
        return (
            f"this replica has not confirmed it is current with the database for"
            f" {self.staleness:.1f} s (max_staleness_seconds is {self.max_staleness:g})"
            f"{why}; retry, or ask another replica"
        )

    def unready_reason(self) -> str | None:
        """Why this replica should get no traffic now, or None if it is ready."""
        if not self.ready:
            return "loading: the facts and the policy are not loaded yet"
        if self.schema_refused is not None:
            return "schema_newer: " + self.schema_refused
        if self.clock_refused is not None:
            return "clock_skew: " + self.clock_refused
        if self.policy_refused is not None:
            return "policy_unloadable: " + self.policy_refused
        if self.stale:
            return "facts_stale: " + self.stale_reason()
        if self.follow_error is not None:
            return f"change_log_unreadable: {self.follow_error}"
        if not self.listening:
            return "not_listening: the change log's notification connection is down; reconnecting"
        return None

    async def stop(self) -> None:
        # Each step waits a bounded time: a task that does not end (a bug) is logged, and the
        # replica still stops (its listener, its store).
        if self._snapshots:
            await _cancelled(self._snapshots, "the fact snapshot writer")
            if self.ready and self.snapshot_seq != self.applied:
                try:
                    async with asyncio.timeout(_STOP_WAIT):
                        await self.write_snapshot()
                except Exception as e:
                    log.warning("cannot write the fact snapshot %s: %s", self.snapshot_path, e)
        if self._task:
            await _cancelled(self._task, "the change-log follower")
        if self._schema_watch:
            await _cancelled(self._schema_watch, "the schema and clock watch")
        if self._listener:
            await anyio.to_thread.run_sync(self._listener.stop)
        self.store.close()
        if self._probe is not None:
            self._probe.close()
        _thaw()

    # -- following the log -----------------------------------------------------------------

    def kick(self) -> None:
        """Wake the follower now (thread-safe)."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _notified(self, payload: str) -> None:
        seq = count_in(payload, 2**63 - 1, least=0)
        if seq is not None:
            self.head_seen = max(self.head_seen, seq)
        self.noticed = time.monotonic()
        self.kick()

    def in_force(self) -> Awaitable[None] | None:
        """None unless a change is being added to `authz` on a worker thread (`_load_change`);
        else an awaitable that ends once it is in force. That thread holds the fact lock, so a
        decision taken meanwhile would wait for the lock, and hold the event loop while it
        does: await this first (the decision service, the gateway, token exchange do). No
        bound: the wait is for work in hand, which ends."""
        changing = self._changing
        return None if changing is None else asyncio.shield(changing)

    async def _in_force_then_heard(self, changing: asyncio.Future[None], timeout: float) -> bool:
        await asyncio.shield(changing)
        waiting = self.heard_not_applied(timeout)
        return True if waiting is None else await waiting

    def heard_not_applied(self, timeout: float) -> Awaitable[bool] | None:
        """None when every commit this replica has heard of is applied (the usual case, asked
        on every gateway message); else an awaitable of whether it is within ``timeout``
        seconds. A commit is heard of before it is read: a message decided in between would be
        decided on facts this replica knows to be out of date. Compared by time, not by
        sequence, so a notice of another deployment's log (sharing the database) clears with
        the next read that finds nothing more. Once a task's wait for a notice has run out, its
        next asks about that notice say False at once: a gateway message, which asks twice (its
        ``connect``, then its own decision), is refused after one wait, not two; any other task
        waits as ever. A notice can reach this process before the listener's thread has handled
        it (`Listener.behind`): then the listener is waited for first. While the listener is
        not healthy, every message waits for a read begun after it, unless the log cannot be
        read. A change being put in force (`in_force`) is waited for before all of that,
        without a bound."""
        if (changing := self._changing) is not None:
            return self._in_force_then_heard(changing, timeout)
        listener = self._listener
        if listener is not None:
            if listener.healthy:
                if listener.behind():
                    if self._given_up == (_BEHIND, asyncio.current_task()):
                        return _refused()
                    return self._caught_up_then_heard(listener, timeout)
            elif self.follow_error is None:
                # Deaf (starting, reconnecting, silent): a commit may have gone unheard, so the
                # message waits for a read of the log begun after it, as a token is read while
                # the revocation listener is down. Not while the log cannot be read (the
                # database away): then the facts held decide, up to `max_staleness`.
                self.noticed = time.monotonic()
        return self._heard_of(timeout)

    def heard_all(self) -> bool:
        """Whether `heard_not_applied` would have nothing to wait for, asked without waiting and
        without noting anything (the decision service's answer in the protocol, `direct`): no
        change being put in force, a listener that hears every commit and has handled what
        reached it, and every commit heard of applied."""
        if self._changing is not None:
            return False
        listener = self._listener
        if listener is not None and (not listener.healthy or listener.behind()):
            return False
        return self.noticed <= self.confirmed_at

    def _heard_of(self, timeout: float) -> Awaitable[bool] | None:
        noticed = self.noticed
        if noticed <= self.confirmed_at:
            return None
        if self._given_up == (noticed, asyncio.current_task()):
            return _refused()
        return self._heard(noticed, timeout)

    async def _caught_up_then_heard(self, listener: Listener, timeout: float) -> bool:
        started = time.monotonic()
        if not await anyio.to_thread.run_sync(listener.caught_up, timeout):
            self._given_up = (_BEHIND, asyncio.current_task())
            return False
        waiting = self._heard_of(max(0.0, timeout - (time.monotonic() - started)))
        return True if waiting is None else await waiting

    async def _heard(self, noticed: float, timeout: float) -> bool:
        if await self._until(lambda: self.confirmed_at >= noticed, timeout):
            return True
        self._given_up = (noticed, asyncio.current_task())
        return False

    async def _until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wake the follower and wait until ``done()`` after one of its reads; False if that
        takes longer than ``timeout`` seconds."""
        assert self._advanced is not None
        self.kick()
        try:
            async with asyncio.timeout(timeout):
                async with self._advanced:
                    await self._advanced.wait_for(done)
        except TimeoutError:
            return False
        return True

    async def _follow(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            try:
                more = await self._catch_up()
            except Exception as e:  # the database is down or the connection lost: try again
                if self.follow_error is None:
                    log.warning("cannot read the change log (%s); retrying", first_line(e))
                self.follow_error = first_line(e)
                # A read that failed cost next to nothing, and is tried again soon: the
                # database back, the replica follows it again within `_RETRY_INTERVAL`. One
                # that failed putting what it read in force (every fact loaded again, say) may
                # fail alike the next time, and backs off.
                costly = self._putting_in_force
                await _pause(self._retries.after_failure() if costly else _RETRY_INTERVAL)
                continue
            self._retries.succeeded()
            if self.follow_error is not None:
                log.warning("following the change log again from sequence %d", self.applied)
                self.follow_error = None
            if more:
                continue
            crowded = self._crowded_expiry()
            if crowded - time.time() <= _PURGE_AHEAD:
                await self._purge_crowded(crowded)
                continue
            wait = min(self.poll_interval, crowded - _PURGE_AHEAD - time.time())
            # Woken by `kick`, after `poll_interval` (a timer, not `wait_for`'s task each time),
            # or just before many facts expire.
            timer = self._loop.call_later(wait, self._wake.set)  # type: ignore[union-attr]
            try:
                await self._wake.wait()
            finally:
                timer.cancel()

    async def _watch_database(self) -> None:
        """Every `_SCHEMA_CHECK_INTERVAL` seconds, on a worker thread, in one statement
        (`schema_and_clock`): ask whether a newer bastion has migrated the database past this
        process's code (a rolling upgrade), then stop deciding for good (`stale`): the gateway,
        `/v1` and the token endpoint refuse with the versions, rather than go on under rules
        the newer schema may have changed (a revocation this code does not read, say); and
        compare this process's clock with the database's (`_clock_checked`). A failed read is
        tried again at the next turn."""
        while self.schema_refused is None:
            await asyncio.sleep(_SCHEMA_CHECK_INTERVAL)
            try:
                newer, skew = await anyio.to_thread.run_sync(schema_and_clock, self.store.db)
            except Exception as e:
                log.debug("cannot read the schema's versions (%s); asking again", first_line(e))
                continue
            self._clock_checked(skew)
            if newer is not None:
                log.error("%s; this process decides nothing more", newer)
                self.schema_refused = newer

    def _clock_checked(self, skew: float | None) -> None:
        """Past ``max_clock_skew`` seconds between this process's clock and the database's
        (``skew``; None: SQLite, one machine), the replica is `stale` until a check finds it
        back within: the expiries replicas write in shared rows (approvals, spent DPoP proofs,
        codes, tokens' iat and exp, throttles, claims) are each compared with another
        replica's clock, and bear a difference of clocks up to the token leeway at most, some
        none (docs/operations.md, "Clocks")."""
        if skew is None or abs(skew) <= self.max_clock_skew:
            if self.clock_refused is not None:
                log.warning(
                    "this process's clock is back within %gs of the database's; deciding again",
                    self.max_clock_skew,
                )
            self.clock_refused = None
            return
        refused = (
            f"this process's clock is {abs(skew):.1f} s {'ahead of' if skew > 0 else 'behind'}"
            f" the database's (PostgreSQL's clock_timestamp()), more than max_clock_skew_seconds"
            f" ({self.max_clock_skew:g}): the expiries replicas share (tokens, DPoP proofs, codes,"
            " approvals) would be read differently here than elsewhere, so this replica decides"
            " nothing, issues no token, until its clock is set right (NTP); ask another replica"
        )
        if self.clock_refused is None:
            log.error("%s", refused)
        self.clock_refused = refused

    async def _catch_up(self) -> bool:
        """Read the next page of the change log after `applied` and apply it; True if there may
        be more, or it took long to apply. A page that ends the log confirms the replica current
        as of the read's start: sequence order is commit order, so it holds every change
        committed before then."""
        assert self._advanced is not None
        self._putting_in_force = False
        if self.handed:
            # Those applied are let go of (the keys taken whole: a writer's thread may add one
            # meanwhile). A large one taken was let go of once applied; one not taken (written
            # in a transaction that then rolled back) holds its facts: in turns, on a worker
            # thread, if they are many.
            done = [self.handed.pop(seq)[1] for seq in list(self.handed) if seq <= self.applied]
            if sum(len(change.inserts) for change in done) > _CHECKED_ON_LOOP:
                await anyio.to_thread.run_sync(_let_go_of_changes, done, [])
        asked_at = time.monotonic()
        version = self._version()
        if version is not None and version == self._read_at_version:
            # SQLite: nothing committed since the last read that reached the end of the log
            # began, so that end is still the end: current as of now, without reading again.
            await self._confirmed(asked_at)
            return False
        self._read_at_version = None
        # A large change's objects reach the collector's oldest generation a few thousand at a
        # time as they are made, and are frozen once in force (`_freeze`): a full pass before
        # that would walk them all (half a second at 200,000 facts), holding the event loop.
        with full_passes_held():
            changes = await anyio.to_thread.run_sync(
                lambda: self.store.changes_since(self.applied, limit=_PAGE, handed=self.handed)
            )
            self._putting_in_force = True
            if changes and changes[0].seq != self.applied + 1:
                # The entries this replica needs were pruned: start again from a snapshot.
                log.warning(
                    "change log pruned past sequence %d (next is %d); reloading a snapshot",
                    self.applied,
                    changes[0].seq,
                )
                await self._resync()
                async with self._advanced:
                    self._advanced.notify_all()
                return True
            if changes:
                # `applied` moves with each change, so a failure part way resumes after the last.
                for change in changes:
                    await self._apply(change)
                self.head_seen = max(self.head_seen, self.applied)
                async with self._advanced:
                    self._advanced.notify_all()
                large = [c for c in changes if len(c.inserts) > _CHECKED_ON_LOOP]
                spent, self._spent = self._spent, []
                if large or spent:
                    await anyio.to_thread.run_sync(_let_go_of_changes, large, spent)
                if len(changes) == _PAGE:
                    return True
        self._read_at_version = version
        await self._confirmed(asked_at)
        # Long in force (a compile, an import): current only as of the read's start, so look
        # again at once rather than after the poll interval.
        return bool(changes) and time.monotonic() - asked_at > self.poll_interval

    async def _confirmed(self, asked_at: float) -> None:
        """Everything committed before ``asked_at`` is applied."""
        assert self._advanced is not None
        self.confirmed_at = asked_at
        if self.noticed > 0.0:
            async with self._advanced:
                self._advanced.notify_all()  # for a message waiting on a commit it heard of

    def _version(self) -> int | None:
        """The probe's ``PRAGMA data_version`` (SQLite), or None: on PostgreSQL, or when it
        cannot be read at once (a lock held, say): then the log is read."""
        if self._probe is None:
            return None
        try:
            return self._probe.data_version()
        except sqlite3.Error:
            return None

    async def _load_change(
        self, inserts: list[StoredFact], deletes: Iterable[tuple]
    ) -> list[StoredFact]:
        """`load_facts` of one change of the log. A large one (an import) is checked against the
        policy, and its values shared with the index's, on a worker thread in turns; then, if
        it holds at least half as many facts as the replica (`_built_aside`), the next
        `Authorizer` is built there too (the facts held, the change's deletes, its facts) and
        takes over; otherwise its facts are added to the `Authorizer` in force there, under its
        fact lock, while decisions wait for it (`in_force`) and the event loop goes on. So are
        deletes that are many, or match by wildcard (`_small`)."""
        authz = self.authz
        deletes = list(deletes)
        if _small(len(inserts), deletes):
            return load_facts(authz, inserts, deletes)
        policy = authz.policy
        # `held`, not `len`: that drops every expired fact first, under the fact lock, here on
        # the event loop (many, when the follower has not dropped them yet on a worker thread).
        aside = _built_aside(len(inserts), authz.facts.held)

        def check(turns: Turns) -> tuple[list[tuple], list[tuple]]:
            pairs = [(f.fact, f.expires_at) for f in inserts]
            checked, refused = authz.facts.check(pairs, turns)
            shared = authz.facts.shared(checked, turns)
            for each in (checked, pairs):
                turns.empty(each)  # the facts as checked, then as read: not in one go
            return shared, refused

        def build() -> tuple[Authorizer, list[tuple]]:
            with _bulk_load(first=False):
                turns = Turns()
                checked, refused = check(turns)
                built = authz.copy(turns)
                built.facts.fill(checked, turns, deletes)
                turns.empty(checked)
            return built, refused

        if aside:
            built, refused = await anyio.to_thread.run_sync(build)
            if authz is not self.authz or authz.policy is not policy:
                return load_facts(self.authz, inserts, deletes)  # built under another policy
            authz = None  # held by nothing here (nor by `check` and `build`): see `_let_go`
            self._replace(built)
        else:
            checked, refused = await anyio.to_thread.run_sync(check, Turns())
            if authz is not self.authz or authz.policy is not policy:
                return load_facts(self.authz, inserts, deletes)  # checked under another policy

            def add() -> None:
                authz.facts.fill(checked, Turns(), deletes)
                _freeze()

            await self._put_in_force(add)
            # Let go of once `applied` has moved (`_catch_up`), not while decisions wait for
            # the change, nor between its being in force and `applied` moving.
            self._spent.append(checked)
        return [StoredFact(fact, expires_at) for fact, expires_at in refused]

    async def _put_in_force(self, add: Callable[[], None]) -> None:
        """Run ``add`` (a change added to `authz` under its fact lock) on a worker thread; until
        it returns, `in_force` gives what to wait for."""
        assert self._loop is not None
        self._changing = changing = self._loop.create_future()
        try:
            await anyio.to_thread.run_sync(add)
        finally:
            self._changing = None
            changing.set_result(None)

    def _crowded_expiry(self) -> float:
        """When more than `_PURGED_ON_LOOP` facts will have expired (`FactSet.crowded_expiry`);
        infinity while the fact lock is held elsewhere: the event loop does not wait for it
        here, and looks again at the next turn of `_follow`, within `poll_interval`."""
        crowded = self.authz.facts.crowded_expiry(_PURGED_ON_LOOP)
        return float("inf") if crowded is None else crowded

    async def _purge_crowded(self, at: float) -> None:
        """Drop the facts expired by ``at``, more than `_PURGED_ON_LOOP`, on a worker thread in
        turns (`FactSet.purge_at`), rather than in the first decision after ``at``, on the event
        loop (200,000 held it for 1.8 s). Decisions wait for it from now on (`in_force`), and
        the changes after it, like a change put in force."""
        authz = self.authz
        await self._put_in_force(lambda: authz.facts.purge_at(at, Turns()))

    def _replace(self, authz: Authorizer) -> None:
        """Put ``authz`` in force (between two decisions, on the event loop) and let go of the
        one it replaces on a thread of its own (`_let_go`): at once, a million facts would hold
        the loop for a third of a second."""
        replaced = [self.authz]
        self.authz = authz
        threading.Thread(
            target=_let_go, args=(replaced,), name="bastion-let-go", daemon=True
        ).start()

    async def _apply(self, change: Change) -> None:
        """Put ``change`` in force. Until it is (a large import, a policy that takes long to
        compile), the changes after it wait, and `confirmed_at` does not move: past
        ``max_staleness`` the replica is stale, rather than decide on what it held before."""
        self.applying = (change, time.monotonic())
        try:
            await self._put_change(change)
        finally:
            self.applying = None
        self.applied = change.seq

    async def _put_change(self, change: Change) -> None:
        if change.kind == "facts":
            if self.unusable and change.deletes:
                unusable, deletes = self.unusable, change.deletes
                self.unusable = await anyio.to_thread.run_sync(_undeleted, unusable, deletes)
            self.unusable += await self._load_change(list(change.inserts), change.deletes)
            self.suspensions.apply(change.inserts, change.deletes)
        elif change.kind == "policy":
            policy = await anyio.to_thread.run_sync(self.store.policy, change.policy_version)
            if policy is not None:
                try:
                    # Compiled in a worker thread while decisions go on under the old policy.
                    await anyio.to_thread.run_sync(
                        partial(self.authz.load_policy, policy.text, source=policy.source)
                    )
                    self.policy_version = policy.version
                    self.policy_refused = None
                    # The replaced policy is closed (`CompiledPolicy.close`), freed without the
                    # collector: the facts stay out of its sight.
                except PolicyError as e:
                    # Validated where it was stored, so by other limits or another engine. The
                    # old policy is no longer in force: nothing is decided until one loads.
                    self.policy_refused = (
                        f"policy version {policy.version}, in force, does not load on this"
                        f" replica ({first_line(e)}); it decides nothing until a policy that"
                        " loads here is put in force: compare the policy_* settings of the"
                        " replicas"
                    )
                    log.error("%s", self.policy_refused)
                self.policy_in_force = policy.version
                if self.unusable:
                    self.unusable = await self._load_change(self.unusable, ())

    async def wait_for(self, seq: int, timeout: float) -> None:
        """Return once every change up to ``seq`` is applied; raise `ConsistencyTimeout`."""
        if self.applied >= seq:
            return
        if not await self._until(lambda: self.applied >= seq, timeout):
            raise ConsistencyTimeout(
                f"this replica has applied changes up to {self.applied}, not yet {seq};"
                " retry, or ask another replica"
            )

    @property
    def lag(self) -> int:
        return max(0, self.head_seen - self.applied)


# How long `Replica.stop` waits for each of its tasks to end.
_STOP_WAIT = 10.0


async def _cancelled(task: asyncio.Task, what: str) -> None:
    """Cancel ``task`` and wait for it to end, at most `_STOP_WAIT` seconds."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=_STOP_WAIT)
    if not done:
        log.error(
            "%s did not end within %gs of being cancelled; stopping without it", what, _STOP_WAIT
        )
    elif not task.cancelled() and task.exception() is not None:
        log.error("%s ended with %r", what, task.exception())
