"""The facts that make an OAuth client an agent the policy and the alerts can reason about:
``has_relation(Agent{"<client_id>"}, "owner", User{"<user>"})`` and
``has_relation(Agent{"<client_id>"}, "parent", Agent{"<parent client_id>"})``.

They are written through the `FactStore`, so the change log carries them to every replica and
says who wrote them. An agent has at most one owner and at most one parent: setting one replaces
the one before, in the same change. The first person to consent to a client becomes its owner
when it has none (`record_first_owner`); an administrator names or changes it.
"""

from __future__ import annotations

from bastion.facts.model import Entity
from bastion.facts.store import FactStore, WriteResult
from bastion.names import plain

RELATION = "has_relation"
OWNER = "owner"
PARENT = "parent"
AGENT = "Agent"
USER = "User"


class AgentError(ValueError):
    """An identity change that cannot be made as asked; the message says what to fix."""


def agent(client_id: str) -> Entity:
    return Entity(AGENT, client_id)


def owner_fact(client_id: str, username: str) -> tuple:
    return (RELATION, agent(client_id), OWNER, Entity(USER, username))


def parent_fact(client_id: str, parent_id: str) -> tuple:
    return (RELATION, agent(client_id), PARENT, agent(parent_id))


def _related(store: FactStore, client_id: str, relation: str, kind: str) -> list[str]:
    found = store.get((RELATION, agent(client_id), relation, None))
    return sorted(
        f.fact[3].id for f in found if isinstance(f.fact[3], Entity) and f.fact[3].type == kind
    )


def owners(store: FactStore, client_id: str) -> list[str]:
    """The user names that own the agent (one, unless facts were written by hand)."""
    return _related(store, client_id, OWNER, USER)


def owned(store: FactStore, username: str) -> list[str]:
    """The client ids of the agents ``username`` owns."""
    found = store.get((RELATION, None, OWNER, Entity(USER, username)))
    return sorted(
        f.fact[1].id for f in found if isinstance(f.fact[1], Entity) and f.fact[1].type == AGENT
    )


def parents(store: FactStore, client_id: str) -> list[str]:
    """The client ids of the agent's parent (one at most, unless written by hand)."""
    return _related(store, client_id, PARENT, AGENT)


def owner_of(store: FactStore, principal: Entity) -> Entity | None:
    """Whom to tell about ``principal``: an agent's owner (the first by name), or None. The
    alerts ask this (`bastion.signals.alerts`); it is read from the store, so it holds whatever
    the policy in force declares."""
    if principal.type != AGENT:
        return None
    found = owners(store, principal.id)
    return Entity(USER, found[0]) if found else None


def set_owner(store: FactStore, client_id: str, username: str, actor: str) -> WriteResult:
    """Make ``username`` the agent's owner, replacing any other."""
    _check_name("owner", username)
    return store.apply(
        [owner_fact(client_id, username)],
        [(RELATION, agent(client_id), OWNER, None)],
        actor=actor,
    )


def set_parent(store: FactStore, client_id: str, parent_id: str | None, actor: str) -> WriteResult:
    """Make ``parent_id`` the agent's parent (None: no parent), replacing any other."""
    if parent_id is not None:
        _check_name("parent", parent_id)
        if parent_id == client_id:
            raise AgentError("an agent cannot be its own parent")
        if client_id in ancestors(store, parent_id):
            raise AgentError(f"{parent_id!r} descends from {client_id!r}: a parent cannot loop")
    inserts = [parent_fact(client_id, parent_id)] if parent_id is not None else []
    return store.apply(inserts, [(RELATION, agent(client_id), PARENT, None)], actor=actor)


def ancestors(store: FactStore, client_id: str, most: int = 64) -> list[str]:
    """The agent's parent, its parent's parent, ...; stops at a loop or after ``most``."""
    chain: list[str] = []
    current = client_id
    while len(chain) < most:
        found = parents(store, current)
        if not found or found[0] in chain or found[0] == client_id:
            break
        chain.append(found[0])
        current = found[0]
    return chain


def record_first_owner(store: FactStore, client_id: str, username: str, actor: str) -> bool:
    """At a consent: make ``username`` the owner unless the agent has one already. True when
    it did. Two first consents at once record one owner (checked and written as one step)."""
    db = store.db
    with db.transaction():
        db.lock(f"bastion:owner:{client_id}")
        if owners(store, client_id):
            return False
        store.apply([owner_fact(client_id, username)], actor=actor)
        return True


def _check_name(what: str, value: object) -> None:
    if not isinstance(value, str) or not value or len(value) > 512 or not plain(value):
        raise AgentError(f"{what} must be 1 to 512 printable characters, none invisible")
