"""The kill switch: suspend an agent (OAuth client), a user or a 2025-11-25 MCP session.

A suspension is a fact, ``suspended(Agent{"<client id>"})``, ``suspended(User{"<subject>"})`` or
``suspended(McpSession{"<Mcp-Session-Id>"})``, written through the `FactStore`: it is durable,
its change-log entry says who suspended whom and when, and every replica hears of it through the
change log (PostgreSQL LISTEN/NOTIFY, or its poll) as it hears of any fact. Each replica keeps the
suspensions in a `Suspensions` view of its own, fed with every change whatever the policy says:
the kill switch holds even under a policy that never mentions ``suspended`` (the policy may read
the facts too, once it declares them). Resuming deletes the fact.

`Suspensions.first` is the kill switch's one question, "is any of these principals suspended":
the gateway asks it of every message (the token's user, every agent of its chain, its session),
the token endpoint of every token it would issue, introspection of every token it is shown, the
approvals of every person who answers, and the gateway again of every upstream session when a
suspension comes. `token_principals` names a token's user and agents the one way all of them use.

`suspend` and `resume` are the one write path (the API and the command line both use them); each
records ``suspension.created`` or ``suspension.lifted`` in the audit log, in the write's
transaction.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from bastion.audit.log import AuditLog
from bastion.facts.model import Entity, matches
from bastion.facts.store import FactStore, StoredFact, WriteResult

PREDICATE = "suspended"
# What the API and the command line call each kind, and its entity type.
KINDS = {"agent": "Agent", "user": "User", "session": "McpSession"}
# An id names one client, user or session: printable, bounded, never a pattern.
MAX_ID_LENGTH = 512
_PRINTABLE = re.compile(r"^[\x21-\x7e][\x20-\x7e]*$")
# The longest a suspension may be given (10 years; `/v1/suspensions`' expires_at and `bastion
# agents suspend --minutes` alike); longer is until resumed, so leave the expiry out.
MAX_SUSPENSION_SECONDS = 10 * 365 * 86400


class SuspensionError(ValueError):
    """A suspension that cannot be made as asked; the message says what to fix."""


class AlreadyOver(SuspensionError):
    """A suspension whose ``expires_at`` is not in the future: it would hold nothing."""


class TooLong(SuspensionError):
    """A suspension whose ``expires_at`` is more than `MAX_SUSPENSION_SECONDS` away. Like
    `AlreadyOver`, a bound that moves with the clock, so no fixed maximum in a schema."""


@dataclass(frozen=True, slots=True)
class Suspension:
    kind: str  # agent, user or session
    id: str
    expires_at: float | None = None

    @property
    def entity(self) -> Entity:
        return Entity(KINDS[self.kind], self.id)

    def to_json(self) -> dict:
        return {"kind": self.kind, "id": self.id, "expires_at": self.expires_at}


def token_principals(user: str, agents: Sequence[str]) -> tuple[Entity, ...]:
    """A token's user and every agent of its chain, from the first one the user let act to the
    one it was issued to (for a token granted to an agent directly, that agent alone), as the
    policy names them and the kill switch checks them: suspending any one covers the token."""
    return (Entity("User", user), *(Entity("Agent", a) for a in agents))


def describe(entity: Entity) -> str:
    """A suspended principal as a refusal names it: ``agent 'desk-1'``, ``user 'sam'``."""
    kind = next((k for k, v in KINDS.items() if v == entity.type), entity.type)
    return f"{kind} {entity.id!r}"


def suspension(kind: str, id: str, expires_at: float | None = None) -> Suspension:
    """A checked `Suspension`; `SuspensionError` says what is wrong with ``kind`` or ``id``."""
    if kind not in KINDS:
        raise SuspensionError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(id, str) or not id or len(id) > MAX_ID_LENGTH or not _PRINTABLE.match(id):
        raise SuspensionError(
            f"id must be 1 to {MAX_ID_LENGTH} printable ASCII characters (the {kind}'s id as"
            " bastion knows it), not starting with a space"
        )
    if expires_at is not None and (
        isinstance(expires_at, bool) or not isinstance(expires_at, (int, float))
    ):
        raise SuspensionError("expires_at must be a number (seconds since the epoch) or null")
    now = time.time()
    if expires_at is not None and not now < expires_at:
        raise AlreadyOver(
            "expires_at must be in the future (seconds since the epoch); leave it out for a"
            " suspension that lasts until it is resumed"
        )
    if expires_at is not None and expires_at > now + MAX_SUSPENSION_SECONDS:
        raise TooLong(
            f"expires_at must be at most {MAX_SUSPENSION_SECONDS} seconds (10 years) away;"
            " leave it out for a suspension that lasts until it is resumed"
        )
    return Suspension(kind, id, float(expires_at) if expires_at is not None else None)


def suspend(store: FactStore, s: Suspension, actor: str) -> WriteResult:
    """Store the suspension (durable; every replica applies it from the change log), recorded
    as ``suspension.created``."""
    with store.db.transaction():
        result = store.apply([StoredFact((PREDICATE, s.entity), s.expires_at)], actor=actor)
        _record(store, "suspension.created", s, actor, result.seq)
    return result


def resume(store: FactStore, s: Suspension, actor: str) -> WriteResult:
    """Lift the suspension, recorded as ``suspension.lifted``; ``deleted`` is 0 when there was
    none (nothing recorded then)."""
    with store.db.transaction():
        result = store.apply([], [(PREDICATE, s.entity)], actor=actor)
        if result.deleted:
            _record(store, "suspension.lifted", s, actor, result.seq)
    return result


def _record(store: FactStore, kind: str, s: Suspension, actor: str, seq: int) -> None:
    AuditLog(store.db).record(
        kind,
        subject=s.id if s.kind == "user" else None,
        client_id=s.id if s.kind == "agent" else None,
        suspended=s.kind,
        id=s.id,
        expires_at=s.expires_at,
        actor=actor,
        sequence=seq,
    )


def stored(store: FactStore) -> list[Suspension]:
    """Every suspension in force, as stored."""
    out = []
    kinds = {v: k for k, v in KINDS.items()}
    for f in store.get((PREDICATE, None)):
        entity = f.fact[1]
        if isinstance(entity, Entity) and entity.type in kinds:
            out.append(Suspension(kinds[entity.type], entity.id, f.expires_at))
    return out


class Suspensions:
    """This process's view of the suspensions in force, fed by the replica with every change
    (`apply`) and every snapshot (`reset`). Read on the event loop; a suspension newly in force
    is announced to `on_suspend` subscribers (the gateway ends the streams it covers)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._until: dict[Entity, float | None] = {}
        self._subscribers: list[Callable[[], None]] = []

    def on_suspend(self, callback: Callable[[], None]) -> None:
        self._subscribers.append(callback)

    def reset(self, facts: Iterable[StoredFact]) -> None:
        self._until = {}
        self.apply(facts, ())

    def apply(self, inserts: Iterable[StoredFact], deletes: Iterable[tuple]) -> None:
        """A change of the facts: deletes first, then inserts (as the store applies them). The
        view is built anew once per change (readers on the event loop see one or the other),
        without the suspensions that have expired: an expiry writes no delete to the log."""
        deletes = [p for p in deletes if p and p[0] == PREDICATE]
        added = [
            (f.fact[1], f.expires_at)
            for f in inserts
            if f.fact[0] == PREDICATE and len(f.fact) == 2 and isinstance(f.fact[1], Entity)
        ]
        if not deletes and not added:
            return
        now = self.clock()
        until = {
            e: t
            for e, t in self._until.items()
            if (t is None or t > now) and not any(matches((PREDICATE, e), p) for p in deletes)
        }
        until.update(added)
        self._until = until
        if added:
            for callback in list(self._subscribers):
                callback()

    def holds(self, entity: Entity) -> bool:
        return self.first((entity,)) is not None

    def first(self, principals: Iterable[Entity], session_id: str = "") -> Entity | None:
        """The first of the principals (or the session) that is suspended, or None: dictionary
        lookups only, no I/O. Safe from worker threads (the token endpoint's): a change
        replaces the view whole, so one read of it is one consistent view."""
        until = self._until
        if not until:
            return None
        now: float | None = None
        candidates: Iterable[Entity] = principals
        if session_id:
            candidates = (*principals, Entity(KINDS["session"], session_id))
        for p in candidates:
            if p in until:
                ends = until[p]
                if ends is None:
                    return p
                if now is None:
                    now = self.clock()
                if ends > now:
                    return p
        return None
