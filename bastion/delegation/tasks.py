"""Just-in-time, task-scoped access: a task lets one agent act for one user, for a stated purpose,
until an expiry, with the grants (facts) it needs and nothing more.

A task's facts are written with the task's expiry, so every replica stops counting them at that
moment whatever else happens. Ending a task, or its expiry (noticed by `Tasks.sweep`), deletes
those facts, revokes every OAuth grant bound to the task (`Tasks.bind`; through
``OAuthStore.revoke_grant``, which tells the gateways and ends the grant's streams) and calls the
`Tasks.on_end` subscribers. Ending is idempotent: whichever process finishes the clean-up first
records the ``task.ended`` audit event, once. docs/delegation.md, "Just-in-time tasks".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from bastion.audit import AuditLog
from bastion.audit.actor import SERVER
from bastion.db import Database, prune_rows, round_failed
from bastion.facts.model import Entity, FactError, fact_from_json, fact_to_json
from bastion.facts.store import FactStore, StoredFact, check_storable
from bastion.oauth.store import Grant, OAuthStore
from bastion.retries import Outage

log = logging.getLogger("bastion.delegation.tasks")

_MIGRATIONS = [
    """
    CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        subject TEXT NOT NULL,
        agent TEXT NOT NULL,
        purpose TEXT NOT NULL,
        facts TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        ended_at DOUBLE PRECISION,
        ended_by TEXT,
        end_reason TEXT,
        cleaned_at DOUBLE PRECISION
    );
    CREATE INDEX tasks_unclean ON tasks (cleaned_at, expires_at);
    CREATE INDEX tasks_created ON tasks (created_at);
    CREATE TABLE task_grants (
        task_id TEXT NOT NULL REFERENCES tasks (id),
        grant_id TEXT NOT NULL,
        bound_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (task_id, grant_id)
    );
    """,
]

OPEN, ENDED, EXPIRED = "open", "ended", "expired"
STATUSES = (OPEN, ENDED, EXPIRED)
# A user or agent id, a purpose: printable, bounded, never a pattern.
MAX_ID_LENGTH = 512
# The most tasks one listing returns, through the API or the command line.
MAX_LIST = 500
MAX_PURPOSE_LENGTH = 1000
MAX_REASON_LENGTH = 500
_PRINTABLE = re.compile(r"[\x21-\x7e][\x20-\x7e]*")
_TASK_ID = re.compile(r"task_[A-Za-z0-9_-]{24}")


class TaskError(ValueError):
    """A task that cannot be opened, bound or ended as asked; the message says what to fix."""


class TaskUnprocessable(TaskError):
    """Well formed, but not possible: an expiry past the cap or gone, a fact the policy cannot
    hold or that the store holds already, too many facts."""


class TaskForbidden(TaskError):
    """A fact a task may not write: about someone else than the task's agent, or of a predicate
    tasks may not grant ([tasks].predicates)."""


class UnknownTask(TaskError):
    """No task has this id."""


class TaskClosed(TaskError):
    """The task is ended or expired: it grants nothing and nothing more binds to it."""


@dataclass(frozen=True, slots=True)
class TaskSettings:
    """The ``[tasks]`` table of bastion.toml (docs/operations.md, docs/delegation.md)."""

    # The longest a task may last: its expiry is required, and refused past this.
    max_seconds: float = 24 * 3600
    # Facts one task may grant.
    max_facts: int = 100
    # The predicates a task's facts may use; each fact names the task's agent first.
    predicates: tuple[str, ...] = ("has_role", "has_permission")
    # How often a replica looks for tasks that expired (it also wakes at the next expiry it
    # knows of), to delete their facts and revoke their grants.
    sweep_seconds: float = 5.0

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any] | None) -> TaskSettings:
        table = dict(table or {})
        unknown = sorted(set(table) - {"max_seconds", "max_facts", "predicates", "sweep_seconds"})
        if unknown:
            raise TaskError(
                f"unknown key [tasks].{unknown[0]}; known: max_seconds, max_facts, predicates,"
                " sweep_seconds"
            )
        settings = cls()
        values: dict[str, Any] = {}
        for name in ("max_seconds", "sweep_seconds"):
            if name in table:
                value = table[name]
                if (
                    isinstance(value, bool)
                    or not isinstance(value, (int, float))
                    or not math.isfinite(value)
                    or value <= 0
                ):
                    raise TaskError(f"[tasks].{name} must be a positive number of seconds")
                values[name] = float(value)
        if "max_facts" in table:
            value = table["max_facts"]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000:
                raise TaskError("[tasks].max_facts must be an integer from 1 to 10000")
            values["max_facts"] = value
        if "predicates" in table:
            value = table["predicates"]
            if (
                not isinstance(value, list)
                or not value
                or not all(isinstance(p, str) and p.isidentifier() for p in value)
            ):
                raise TaskError("[tasks].predicates must be a non-empty list of predicate names")
            if "suspended" in value:
                raise TaskError("[tasks].predicates cannot hold suspended (the kill switch's)")
            values["predicates"] = tuple(value)
        return cls(**{**{f: getattr(settings, f) for f in cls.__slots__}, **values})


@dataclass(frozen=True, slots=True)
class Task:
    id: str
    user: str
    agent: str  # the OAuth client id the task lets act
    purpose: str
    facts: tuple[tuple, ...]  # each written with ``expires_at``
    created_by: str
    created_at: float
    expires_at: float
    ended_at: float | None = None
    ended_by: str | None = None
    end_reason: str | None = None
    cleaned_at: float | None = None  # when its facts were deleted and its grants revoked
    grants: tuple[str, ...] = ()  # the OAuth grants bound to it

    def status(self, now: float) -> str:
        """``open`` until ended or expired; an expired task is ``expired`` at once, before any
        sweep has noticed it."""
        if self.ended_at is not None:
            return EXPIRED if self.end_reason == EXPIRED else ENDED
        return OPEN if now < self.expires_at else EXPIRED

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "agent": self.agent,
            "purpose": self.purpose,
            "status": self.status(now),
            "facts": [fact_to_json(f) for f in self.facts],
            "created_by": self.created_by,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "ended_at": self.ended_at,
            "ended_by": self.ended_by,
            "end_reason": self.end_reason,
            "grants": len(self.grants),
        }


def new_task_id() -> str:
    """``task_`` and 144 random bits, URL-safe."""
    return "task_" + secrets.token_urlsafe(18)


def _check_id(what: str, value: object) -> str:
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_ID_LENGTH
        or not _PRINTABLE.fullmatch(value)
    ):
        raise TaskError(
            f"{what} must be 1 to {MAX_ID_LENGTH} printable ASCII characters, not starting with"
            " a space"
        )
    return value


def _check_text(what: str, value: object, most: int) -> str:
    if not isinstance(value, str) or len(value) > most:
        raise TaskError(f"{what} must be text of 1 to {most} characters")
    if not value.strip() or not value.isprintable():
        raise TaskUnprocessable(
            f"{what} must say something, in printable characters (no line breaks or controls)"
        )
    return value


def prune_tasks(db: Database, before: float) -> dict[str, int]:
    """Delete the tasks that ended and were cleaned up (facts deleted, grants revoked) before
    ``before``, with their grants' bindings (the audit retention, `bastion.audit.retention`).
    A task not cleaned up yet stays for the sweep, whatever its age."""
    return prune_rows(
        db,
        "tasks",
        "tasks",
        "id",
        "cleaned_at < ? AND ended_at < ?",
        (before, before),
        children=[("task_grants", "task_id")],
    )


class TaskStore:
    """The ``tasks`` and ``task_grants`` tables."""

    _COLUMNS = (
        "id, subject, agent, purpose, facts, created_by, created_at, expires_at, ended_at,"
        " ended_by, end_reason, cleaned_at"
    )

    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate("tasks", _MIGRATIONS)

    def _task(self, row: tuple, grants: tuple[str, ...]) -> Task:
        facts = tuple(fact_from_json(f) for f in json.loads(row[4]))
        return Task(row[0], row[1], row[2], row[3], facts, *row[5:], grants=grants)

    def insert(self, task: Task) -> None:
        self.db.execute(
            f"INSERT INTO tasks ({self._COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                task.id,
                task.user,
                task.agent,
                task.purpose,
                json.dumps([fact_to_json(f) for f in task.facts]),
                task.created_by,
                task.created_at,
                task.expires_at,
                None,
                None,
                None,
                None,
            ),
        )

    def get(self, task_id: str) -> Task | None:
        rows = self.db.execute(f"SELECT {self._COLUMNS} FROM tasks WHERE id = ?", (task_id,))
        if not rows:
            return None
        return self._task(rows[0], self.grants(task_id))

    def task_of(self, grant_id: str) -> str | None:
        rows = self.db.execute("SELECT task_id FROM task_grants WHERE grant_id = ?", (grant_id,))
        return rows[0][0] if rows else None

    def grants(self, task_id: str) -> tuple[str, ...]:
        rows = self.db.execute(
            "SELECT grant_id FROM task_grants WHERE task_id = ? ORDER BY bound_at, grant_id",
            (task_id,),
        )
        return tuple(r[0] for r in rows)

    def list(
        self, *, created_by: str | None = None, open_at: float | None = None, limit: int = 100
    ) -> list[Task]:
        """The newest tasks first; of one creator; only those open at ``open_at``."""
        where, params = ["1 = 1"], []
        if created_by is not None:
            where.append("created_by = ?")
            params.append(created_by)
        if open_at is not None:
            where.append("ended_at IS NULL AND expires_at > ?")
            params.append(open_at)
        rows = self.db.execute(
            f"SELECT {self._COLUMNS} FROM tasks WHERE {' AND '.join(where)}"
            f" ORDER BY created_at DESC, id LIMIT {int(limit)}",
            params,
        )
        return [self._task(r, self.grants(r[0])) for r in rows]

    def mark_ended(self, task_id: str, now: float, by: str, reason: str) -> bool:
        """End the task if nobody did; False if it was ended already. An expired task is
        recorded as ended at its expiry."""
        rows = self.db.execute(
            "UPDATE tasks SET ended_at = CASE WHEN expires_at < ? THEN expires_at ELSE ? END,"
            " ended_by = ?, end_reason = CASE WHEN expires_at <= ? THEN 'expired' ELSE ? END"
            " WHERE id = ? AND ended_at IS NULL RETURNING id",
            (now, now, by, now, reason, task_id),
        )
        return bool(rows)

    def mark_cleaned(self, task_id: str, now: float) -> bool:
        rows = self.db.execute(
            "UPDATE tasks SET cleaned_at = ? WHERE id = ? AND cleaned_at IS NULL RETURNING id",
            (now, task_id),
        )
        return bool(rows)

    def unclean(self, now: float) -> list[str]:
        """Tasks ended or expired whose facts and grants may still be there."""
        rows = self.db.execute(
            "SELECT id FROM tasks WHERE cleaned_at IS NULL AND (ended_at IS NOT NULL OR"
            " expires_at <= ?) ORDER BY expires_at LIMIT 500",
            (now,),
        )
        return [r[0] for r in rows]

    def next_expiry(self) -> float | None:
        rows = self.db.execute(
            "SELECT MIN(expires_at) FROM tasks WHERE cleaned_at IS NULL AND ended_at IS NULL"
        )
        return rows[0][0] if rows and rows[0][0] is not None else None

    def lock(self, task_id: str) -> None:
        """Inside a transaction on PostgreSQL: hold the task's row until it commits, so that
        `mark_ended` waits for it."""
        if self.db.is_postgres:
            self.db.execute("SELECT id FROM tasks WHERE id = ? FOR UPDATE", (task_id,))

    def add_grant(self, task_id: str, grant_id: str, now: float) -> None:
        self.db.execute(
            "INSERT INTO task_grants (task_id, grant_id, bound_at) VALUES (?, ?, ?)"
            " ON CONFLICT (task_id, grant_id) DO NOTHING",
            (task_id, grant_id, now),
        )


class Tasks:
    """Opening, binding, ending and sweeping tasks, on one database.

    ``facts`` is the deployment's fact store (a task's facts go through its change log);
    ``grants`` the authorization server's store (None without ``[oauth]``: nothing can bind);
    ``validate`` checks a fact against the policy in force (raises `FactError`).
    """

    def __init__(
        self,
        facts: FactStore,
        grants: OAuthStore | None,
        audit: AuditLog,
        settings: TaskSettings | None = None,
        validate: Callable[[tuple], tuple] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = TaskStore(facts.db)
        self.facts = facts
        self.grants = grants
        self.audit = audit
        self.settings = settings or TaskSettings()
        self.validate = validate
        self.clock = clock
        self._ended: list[Callable[[str], None]] = []
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def on_end(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(task_id)`` once when a task ends or expires, in the process that
        cleans it up (after its facts are deleted and its grants revoked)."""
        self._ended.append(callback)

    # -- opening -------------------------------------------------------------------------------

    def _fact(self, obj: object, agent: Entity, index: int) -> tuple:
        where = f"facts[{index}]"
        if not isinstance(obj, dict):
            raise TaskError(f'{where}: a fact is {{"predicate": str, "args": [...]}}')
        if obj.get("expires_at") is not None:
            raise TaskError(f"{where}: a task's facts expire with the task; leave expires_at out")
        try:
            fact = fact_from_json(obj)
            check_storable(fact)
        except FactError as e:
            raise TaskUnprocessable(f"{where}: {e}") from None
        if fact[0] not in self.settings.predicates:
            raise TaskForbidden(
                f"{where}: a task grants only {', '.join(self.settings.predicates)} facts"
                " ([tasks].predicates); write other facts with the facts:write scope"
            )
        if len(fact) < 2 or fact[1] != agent:
            raise TaskForbidden(
                f"{where}: a task's fact must name the task's agent {agent} as its first"
                " argument: a task grants its agent, never anyone else"
            )
        if self.validate is not None:
            try:
                fact = self.validate(fact)
            except FactError as e:
                raise TaskUnprocessable(f"{where}: {e}") from None
        return fact

    def open(
        self,
        user: str,
        agent: str,
        purpose: str,
        expires_at: float,
        facts: Sequence[object],
        created_by: str,
    ) -> Task:
        """Open a task and write its facts (with its expiry), together or not at all."""
        user = _check_id("user", user)
        agent = _check_id("agent", agent)
        purpose = _check_text("purpose", purpose, MAX_PURPOSE_LENGTH)
        now = self.clock()
        if (
            isinstance(expires_at, bool)
            or not isinstance(expires_at, (int, float))
            or not math.isfinite(expires_at)
        ):
            raise TaskError("expires_at must be epoch seconds")
        if expires_at <= now:
            raise TaskUnprocessable("expires_at must be in the future")
        if expires_at - now > self.settings.max_seconds + 1:
            raise TaskUnprocessable(
                f"a task lasts at most {self.settings.max_seconds:g} seconds ([tasks].max_seconds);"
                " open a shorter one"
            )
        if not isinstance(facts, (list, tuple)) or not facts:
            raise TaskError("facts must be a non-empty list of facts: the grants the task needs")
        if len(facts) > self.settings.max_facts:
            raise TaskUnprocessable(
                f"a task grants at most {self.settings.max_facts} facts ([tasks].max_facts)"
            )
        entity = Entity("Agent", agent)
        checked = list(dict.fromkeys(self._fact(f, entity, i) for i, f in enumerate(facts)))
        task = Task(
            new_task_id(), user, agent, purpose, tuple(checked), created_by, now, float(expires_at)
        )
        with self.facts.db.transaction():
            # Two tasks opened at once must not both take the same fact.
            self.facts.db.lock("bastion:tasks")
            for fact in checked:
                # Ending the task deletes its facts: one the store holds already (a standing
                # grant, another task's) would be deleted with it.
                if self.facts.get(fact):
                    raise TaskUnprocessable(
                        f"the store holds {fact_to_json(fact)} already (a standing grant or another"
                        " task's); a task grants only what its agent does not have"
                    )
            self.store.insert(task)
            self.facts.apply(
                [StoredFact(f, task.expires_at) for f in checked], actor=f"task:{task.id}"
            )
        self.audit.record(
            "task.opened",
            subject=user,
            client_id=agent,
            task_id=task.id,
            purpose=purpose,
            expires_at=task.expires_at,
            facts=[fact_to_json(f) for f in checked],
            by=created_by,
        )
        if self._loop is not None and self._wake is not None:
            # Opened on a worker thread: wake the sweeper for this expiry, on its loop.
            self._loop.call_soon_threadsafe(self._wake.set)
        return task

    # -- reading -------------------------------------------------------------------------------

    def get(self, task_id: str) -> Task | None:
        if not isinstance(task_id, str) or not _TASK_ID.fullmatch(task_id):
            return None
        return self.store.get(task_id)

    def list(
        self, *, created_by: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[Task]:
        now = self.clock()
        if status == OPEN:
            return self.store.list(created_by=created_by, open_at=now, limit=limit)
        found = self.store.list(created_by=created_by, limit=limit if status is None else 10_000)
        if status is not None:
            found = [t for t in found if t.status(now) == status][:limit]
        return found

    # -- binding -------------------------------------------------------------------------------

    def bind(
        self, task_id: str, user: str, agent: str, grant_id: str, *, chain: Iterable[str] = ()
    ) -> float:
        """Bind an OAuth grant to the task, so that ending the task revokes it; returns when
        the task expires (no token of the grant may outlive it).

        The token exchange calls this before it issues a token bound to the task. ``agent`` is
        the client the grant is for; ``chain`` the agents it acts through, the first the user let
        act (empty for a direct grant). The task's own agent binds; so does a sub-agent whose
        chain passes through it. `TaskError` (a `ValueError`) says why a bind is refused.
        """
        with self.store.db.transaction():
            # Held until the binding commits: an ending that races it waits, then revokes this
            # grant too (SQLite's write lock does the same).
            self.store.lock(task_id)
            task = self.get(task_id)
            if task is None:
                raise UnknownTask(f"no task has the id {task_id!r}")
            status = task.status(self.clock())
            if status != OPEN:
                raise TaskClosed(f"task {task_id} is {status}: it grants nothing any more")
            if user != task.user:
                raise TaskError(f"task {task_id} is not on behalf of user {user!r}")
            if agent != task.agent and task.agent not in tuple(chain):
                raise TaskError(
                    f"agent {agent!r} is neither task {task_id}'s agent nor delegated from it"
                )
            if self.grants is not None:
                grant = self.grants.grant(grant_id)
                if grant is None or grant.revoked_at is not None:
                    raise TaskError(f"grant {grant_id!r} is unknown or revoked")
                if grant.client_id != agent or self._user_of(grant) != user:
                    raise TaskError(f"grant {grant_id!r} is not {agent!r}'s for user {user!r}")
            self.store.add_grant(task_id, grant_id, self.clock())
            self.audit.record(
                "task.bound", subject=user, client_id=agent, task_id=task_id, grant_id=grant_id
            )
        return task.expires_at

    def _user_of(self, grant: Grant) -> str:
        """Whom a grant acts for: its user; a client acting as itself (client_credentials) is
        its own user, and so the user of what it delegated (a delegated grant of no user: the
        client of the grant at the root of its chain, found through the parent grants)."""
        assert self.grants is not None
        while grant.username is None and grant.parent_grant_id is not None:
            parent = self.grants.grant(grant.parent_grant_id)
            if parent is None:
                break  # forgotten: then nobody's, and refused
            grant = parent
        return grant.username or grant.client_id

    def bound_task(self, grant_id: str) -> tuple[str, float] | None:
        """The task a grant is bound to and when it expires (or ended), if any: every token
        issued for the grant carries the task and does not outlive it."""
        task_id = self.store.task_of(grant_id)
        task = None if task_id is None else self.get(task_id)
        if task is None:
            return None
        status = task.status(self.clock())
        return task.id, (task.expires_at if status == OPEN else 0.0)

    # -- ending --------------------------------------------------------------------------------

    def end(self, task_id: str, by: str, reason: str = ENDED) -> tuple[Task, bool]:
        """End the task: its facts are deleted, its grants revoked, `on_end` subscribers told.
        Returns the task as it is now and whether this call ended it (False: it had ended, or
        expired, already; what was left to clean up is cleaned up anyway)."""
        reason = _check_text("reason", reason, MAX_REASON_LENGTH)
        if reason == EXPIRED:
            raise TaskUnprocessable(
                "'expired' is the reason bastion records when a task reaches its expiry; give"
                " another"
            )
        task = self.get(task_id)
        if task is None:
            raise UnknownTask(f"no task has the id {task_id!r}")
        ended = self.store.mark_ended(task_id, self.clock(), by, reason)
        self._clean(task_id)
        found = self.store.get(task_id)
        assert found is not None
        return found, ended and found.end_reason != EXPIRED

    def sweep(self) -> int:
        """End every task that expired, and finish any ending left half done (a process that
        stopped mid-way); return how many were cleaned up here."""
        cleaned = 0
        for task_id in self.store.unclean(self.clock()):
            self.store.mark_ended(task_id, self.clock(), "expiry", EXPIRED)
            cleaned += self._clean(task_id)
        return cleaned

    def _revoke(self, grant_id: str, task_id: str, actor: str) -> bool:
        if self.grants is None:
            return False
        return self.grants.revoke_grant(
            grant_id, self.clock(), f"task {task_id} ended", actor=actor
        )

    def _clean(self, task_id: str) -> int:
        """Delete the task's facts and revoke its grants (each idempotent); the first process to
        finish records the event and tells the subscribers."""
        task = self.store.get(task_id)
        if task is None or task.cleaned_at is not None:
            return 0
        deleted = (
            self.facts.apply([], list(task.facts), actor=f"task:{task_id}").deleted
            if task.facts
            else 0
        )
        # Who ended the task revoked its grants (`expiry` for one that expired).
        ender = task.ended_by or SERVER
        revoked = sum(self._revoke(g, task_id, ender) for g in task.grants)
        if not self.store.mark_cleaned(task_id, self.clock()):
            return 0
        self.audit.record(
            "task.ended",
            subject=task.user,
            client_id=task.agent,
            task_id=task_id,
            by=task.ended_by,
            reason=task.end_reason,
            facts_deleted=deleted,
            grants_revoked=revoked,
        )
        for callback in list(self._ended):
            try:
                callback(task_id)
            except Exception:
                log.exception("a task's on_end subscriber failed for %s", task_id)
        return 1

    async def sweep_forever(self) -> None:
        """On a replica: sweep every ``sweep_seconds``, and at the next expiry it knows of. A
        failure is logged once for as long as it stays the same (`round_failed`), and once that
        tasks are swept again."""
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        outage = Outage(log)
        while True:
            try:
                await anyio.to_thread.run_sync(self.sweep)
                nearest = await anyio.to_thread.run_sync(self.store.next_expiry)
            except Exception as e:
                round_failed(outage, e, "sweeping expired tasks failed")
                nearest = None
            else:
                outage.ended("expired tasks are swept again")
            wait = self.settings.sweep_seconds
            if nearest is not None:
                wait = min(wait, max(0.0, nearest - self.clock()) + 0.01)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
