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
approvals and the sign-in pages of every person, the decision API of every principal it decides
for, and the gateway again of every upstream session when a suspension comes. `token_principals`
names a token's user and agents the one way all of them use.

An agent never outlasts its owner: where no person is among the principals (an agent acting as
itself, by client credentials, and what it delegates; or an agent the decision API is asked
about), a suspended owner (``has_relation(Agent{..}, "owner", User{..})``, which the view also
keeps) answers for each agent it owns. Where a person is among them, that person bounds the
agents: the owner of a client that many people use (the first to consent to it) does not.

A query is a decision where it asks the decision contract's ``allow/3`` (`asks_allow`): an actor
given there that the view holds gets no answer, and an actor left open is answered without the
actors it holds (`Suspensions.holds_value`), as every other decision route is.

`suspend` and `resume` are the one write path (the API and the command line both use them); each
records ``suspension.created`` or ``suspension.lifted`` in the audit log, in the write's
transaction. A suspension also takes back, in that transaction, the approvals it covers
(`bastion.approvals.suspension`): they do not outlive it. The fact APIs write through
`apply_facts`, which does the same for the suspensions they insert. A replica that has not heard
of a suspension yet asks the database (`stored_hold`, under `lock_suspensions`) before it makes
an approval request or takes an answer, so that it writes none the suspension did not see.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from bastion.agents.identity import AGENT, OWNER, RELATION, USER
from bastion.audit.log import AuditLog
from bastion.db import Database
from bastion.facts.model import Entity, matches
from bastion.facts.store import FactStore, StoredFact, WriteResult
from bastion.turns import Turns

PREDICATE = "suspended"
# The API key scope of the kill switch's routes, and of a fact write that touches suspensions.
SCOPE = "suspensions"
# What the API and the command line call each kind, and its entity type.
KINDS = {"agent": "Agent", "user": "User", "session": "McpSession"}
# An id names one client, user or session: printable, bounded, never a pattern.
MAX_ID_LENGTH = 512
_PRINTABLE = re.compile(r"[\x21-\x7e][\x20-\x7e]*")
# The lock a write of suspensions takes before it stores them, and a write of the approvals
# that must not outlive one (`lock_suspensions`).
LOCK = "kill switch: suspensions"
# The longest a suspension may be given (10 years; `/v1/suspensions`' expires_at and `bastion
# agents suspend --minutes` alike); longer is until resumed, so leave the expiry out.
MAX_SUSPENSION_SECONDS = 10 * 365 * 86400


def names_suspensions(facts: Iterable[tuple]) -> bool:
    """Whether any of these facts, or fact patterns, is or matches a suspension (a pattern names
    its predicate): written through the fact APIs rather than `suspend` and `resume`, it needs
    the kill switch's own scope too (`bastion.server.auth.require_for_facts`), or the key of an
    application whose agents were suspended could lift the suspension."""
    return any(fact[0] == PREDICATE for fact in facts)


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


@dataclass(frozen=True, slots=True)
class Held:
    """A refusal of the kill switch: ``principal`` is refused because ``suspended`` is held,
    which is the principal itself, or the owner of an agent acting as itself."""

    principal: Entity
    suspended: Entity


def token_principals(user: str, agents: Sequence[str]) -> tuple[Entity, ...]:
    """A token's user and every agent of its chain, from the first one the user let act to the
    one it was issued to (for a token granted to an agent directly, that agent alone), as the
    policy names them and the kill switch checks them: suspending any one covers the token."""
    return (Entity("User", user), *(Entity("Agent", a) for a in agents))


def describe(entity: Entity) -> str:
    """A suspended principal as a refusal names it: ``agent 'desk-1'``, ``user 'sam'``."""
    kind = next((k for k, v in KINDS.items() if v == entity.type), entity.type)
    return f"{kind} {entity.id!r}"


def until(expires_at: float | None) -> str:
    """How long a suspension lasts, as people read it: ``until resumed`` or ``until
    2026-12-05T07:00:00Z``."""
    if expires_at is None:
        return "until resumed"
    try:
        return "until " + datetime.fromtimestamp(expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):  # past year 9999: stored before the bound
        return f"until {expires_at:.0f} (seconds since the epoch)"


def suspension(kind: str, id: str, expires_at: float | None = None) -> Suspension:
    """A checked `Suspension`; `SuspensionError` says what is wrong with ``kind`` or ``id``."""
    if kind not in KINDS:
        raise SuspensionError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(id, str) or not id or len(id) > MAX_ID_LENGTH or not _PRINTABLE.fullmatch(id):
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
        lock_suspensions(store.db)
        result = store.apply([StoredFact((PREDICATE, s.entity), s.expires_at)], actor=actor)
        _take_back(store, (s.entity,), actor)
        _record(store, "suspension.created", s, actor, result.seq)
    return result


def apply_facts(
    store: FactStore,
    inserts: Sequence[StoredFact],
    deletes: Sequence[tuple],
    actor: str,
    found: Callable[[], Iterable[tuple]] | None = None,
) -> WriteResult:
    """`FactStore.apply` for the fact APIs (``/v1/facts``, Oso Cloud's, ``bastion facts``): a
    write that inserts suspensions takes back, in its transaction, what `suspend` takes back
    (the approvals they cover), so that no way of suspending leaves them to outlive it.
    ``found``: more facts to delete, looked for under the write's locks (`FactStore.apply`)."""
    held = [  # in turns: an import writes hundreds of thousands of facts (`bastion.turns`)
        f.fact[1]
        for f in Turns().each(inserts)
        if f.fact[0] == PREDICATE and len(f.fact) == 2 and isinstance(f.fact[1], Entity)
    ]
    if not held:
        return store.apply(inserts, deletes, actor=actor, found=found)
    with store.db.transaction():
        lock_suspensions(store.db)
        result = store.apply(inserts, deletes, actor=actor, found=found)
        _take_back(store, held, actor)
    return result


def lock_suspensions(db: Database, *, shared: bool = False) -> None:
    """Inside a transaction, before anything of it is read or written: take the kill switch's
    lock to its end. A write of suspensions takes it alone, before it stores them (so before
    the fact store's writers' lock, as every holder takes the two); a write of the approvals
    that reads `stored_hold` takes it ``shared``. On PostgreSQL (READ COMMITTED) a suspension
    committing while a request is made would otherwise see no request, and the request no
    suspension: each waits for the other now, and the later one sees the earlier. SQLite lets
    one writer in at a time already (`Database.lock`)."""
    db.lock(LOCK, shared=shared)


def _take_back(store: FactStore, suspended: Iterable[Entity], actor: str) -> None:
    """What the suspension of each of ``suspended`` takes back of the approvals
    (`bastion.approvals.suspension`), in the caller's transaction."""
    # Imported here: the approvals import this module (`has_person`), and load what they
    # need of it before this runs.
    from bastion.approvals.suspension import take_back

    for entity in dict.fromkeys(suspended):
        take_back(store, entity, actor)


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


def stored_hold(store: FactStore, principals: Sequence[Entity]) -> Entity | None:
    """`Suspensions.first`, asked of the suspensions stored now rather than of this replica's
    view, which may not have heard of the latest yet (the change log reaches it within
    milliseconds): for a write that must not outlive a suspension it was not seen by (an
    approval request made, an answer taken), under `lock_suspensions`. Reads the suspensions
    (few), and the owners of the agents only where no person is among ``principals``."""
    suspensions = store.get((PREDICATE, None))
    if not suspensions:
        return None
    owners = (
        []
        if has_person(principals)
        else [
            f for p in principals if p.type == AGENT for f in store.get((RELATION, p, OWNER, None))
        ]
    )
    view = Suspensions()
    view.reset([*suspensions, *owners])
    return view.first(principals)


def is_owner_fact(fact: tuple) -> bool:
    """Whether ``fact`` names an agent's owner, ``has_relation(Agent{..}, "owner", User{..})``:
    the view keeps those too (an agent acting as itself stops while its owner is suspended)."""
    return (
        len(fact) == 4
        and fact[0] == RELATION
        and fact[2] == OWNER
        and isinstance(fact[1], Entity)
        and fact[1].type == AGENT
        and isinstance(fact[3], Entity)
        and fact[3].type == USER
    )


def kept(fact: tuple) -> bool:
    """Whether the `Suspensions` view keeps ``fact``: a suspension, or an agent's owner."""
    return (fact[0] == PREDICATE and len(fact) == 2) or is_owner_fact(fact)


def kept_rows(name: str, arity: int, rows: Iterable[tuple]) -> list[tuple]:
    """Of one predicate's rows (a snapshot's), the facts the view keeps: every suspension, and
    the ``has_relation`` rows that name an agent's owner."""
    if (name, arity) == (PREDICATE, 1):
        return [(name, *r) for r in rows]
    if (name, arity) == (RELATION, 3):
        return [(name, *r) for r in rows if r[1] == OWNER and is_owner_fact((name, *r))]
    return []


def asks_allow(predicate: str, arity: int) -> bool:
    """Whether a query of ``predicate/arity`` asks what an actor may do (its first argument)."""
    return predicate == "allow" and arity == 3


def has_person(principals: Sequence[Entity]) -> bool:
    """Whether a person is among ``principals``: a user that is not an agent acting as itself
    (a client credentials token's subject is its agent's own client id)."""
    return any(p[0] == USER and Entity(AGENT, p[1]) not in principals for p in principals)


class Suspensions:
    """This process's view of the suspensions in force, and of the agents' owners, fed by the
    replica with every change (`apply`) and every snapshot (`reset`). Read on the event loop; a
    suspension newly in force is announced to `on_suspend` subscribers (the gateway ends the
    streams it covers)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._until: dict[Entity, float | None] = {}
        # Agent -> its owners (one, unless facts were written by hand). An owner fact's own
        # expiry is not followed: an expired owner stays named until its fact is deleted, which
        # can only stop an agent, never let one go on.
        self._owners: dict[Entity, tuple[Entity, ...]] = {}
        self._subscribers: list[Callable[[], None]] = []

    def on_suspend(self, callback: Callable[[], None]) -> None:
        self._subscribers.append(callback)

    def reset(self, facts: Iterable[StoredFact]) -> None:
        self._until = {}
        self._owners = {}
        self.apply(facts, ())

    def apply(self, inserts: Iterable[StoredFact], deletes: Iterable[tuple]) -> None:
        """A change of the facts: deletes first, then inserts (as the store applies them). The
        view is built anew once per change (readers on the event loop see one or the other),
        without the suspensions that have expired: an expiry writes no delete to the log."""
        if not isinstance(inserts, (list, tuple)):
            inserts = list(inserts)  # read twice: the owners, then the suspensions
        self._apply_owners(inserts, deletes)
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

    def _apply_owners(self, inserts: Iterable[StoredFact], deletes: Iterable[tuple]) -> None:
        deletes = [
            p
            for p in deletes
            if p
            and p[0] == RELATION
            and (len(p) < 3 or p[2] is None or p[2] == OWNER)
            and (len(p) < 2 or p[1] is None or (isinstance(p[1], Entity) and p[1].type == AGENT))
        ]
        added = [f.fact for f in inserts if f.fact[0] == RELATION and is_owner_fact(f.fact)]
        if not deletes and not added:
            return
        owners = dict(self._owners)
        for p in deletes:
            # A delete naming its agent is looked up; only a wildcard walks every agent.
            agents = [p[1]] if len(p) > 1 and p[1] is not None else list(owners)
            for agent in agents:
                held = owners.get(agent)
                if held:
                    left = tuple(o for o in held if not matches((RELATION, agent, OWNER, o), p))
                    if left:
                        owners[agent] = left
                    else:
                        del owners[agent]
        for _, agent, _, owner in added:
            held = owners.get(agent, ())
            if owner not in held:
                owners[agent] = (*held, owner)
        self._owners = owners

    def held(self, principals: Sequence[Entity]) -> Held | None:
        """`first`, with the principal it refuses: the suspended one itself, or the agent whose
        owner is suspended (the decision API names both)."""
        suspended = self.first(principals)
        if suspended is None:
            return None
        if suspended in principals:
            return Held(suspended, suspended)
        owned = next(p for p in principals if suspended in self._owners.get(p, ()))
        return Held(owned, suspended)

    def owners(self, agent: Entity) -> tuple[Entity, ...]:
        """The agent's owners as this view holds them."""
        return self._owners.get(agent, ())

    def owner_names(self, client_id: str) -> list[str]:
        """The user names that own the agent ``client_id``, as this view holds them."""
        return [o.id for o in self._owners.get(Entity(AGENT, client_id), ())]

    def holds(self, entity: Entity) -> bool:
        return self.first((entity,)) is not None

    def holds_value(self, value: object) -> bool:
        """`holds` for a value a query bound: only an entity can be held."""
        return value.__class__ is Entity and self.first((value,)) is not None

    def first(self, principals: Sequence[Entity], session_id: str = "") -> Entity | None:
        """The first of the principals (or the session) that is suspended, or None; where no
        person is among the principals, an agent's suspended owner too (`has_person`).
        Dictionary lookups only, no I/O. Safe from worker threads (the token endpoint's): a
        change replaces the view whole, so one read of it is one consistent view."""
        until = self._until
        if not until:
            return None
        now: float | None = None
        candidates: Sequence[Entity] = principals
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
        owners = self._owners
        if not owners or has_person(principals):
            return None
        for p in principals:
            for owner in owners.get(p, ()):
                if owner in until:
                    ends = until[owner]
                    if ends is None or ends > self.clock():
                        return owner
        return None
