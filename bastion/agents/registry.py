"""The agent registry as the CLI (``bastion agents``) and the /v1 API (``/v1/agents``) show it:
each OAuth client with its owner and parent (facts, `bastion.agents.identity`), its name and
purpose (kept with the client) and its status: ``revoked`` (the client is), ``suspended`` (the
kill switch holds it, `bastion.signals.suspensions`), ``stopped`` (its owner is suspended or
disabled, so it cannot act as itself: ``stopped`` says which owner and why) or ``active``."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from types import EllipsisType
from typing import Any

from bastion.agents import identity
from bastion.agents.identity import AgentError
from bastion.facts.model import Entity
from bastion.facts.store import FactStore
from bastion.names import visible
from bastion.oauth.store import Client, OAuthStore
from bastion.signals.suspensions import stored, until

MAX_PURPOSE_CHARS = 500
STATUSES = ("active", "stopped", "suspended", "revoked")


class UnknownAgent(AgentError):
    """No OAuth client has this id."""


@dataclass(frozen=True)
class AgentIdentity:
    client_id: str
    name: str
    purpose: str
    owner: str | None
    parent: str | None
    status: str
    source: str
    auth_method: str
    created_at: float
    suspended_until: float | None = None
    # Why an agent is ``stopped``: "owner 'pat' is suspended until resumed", "... is disabled".
    stopped: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "name": self.name,
            "purpose": self.purpose,
            "owner": self.owner,
            "parent": self.parent,
            "status": self.status,
            "source": self.source,
            "token_endpoint_auth_method": self.auth_method,
            "created_at": self.created_at,
            "suspended_until": self.suspended_until,
            "stopped": self.stopped,
        }


@dataclass(frozen=True)
class _Standing:
    """The suspensions in force (agents' and users'), and which owners are disabled."""

    agents: dict[str, float | None]
    users: dict[str, float | None]
    disabled: frozenset[str]

    def stopped(self, owners: list[str]) -> str | None:
        """Why an agent of these owners cannot act as itself, or None: an agent never outlasts
        its owner (`bastion.signals.suspensions.Suspensions.first`, the token endpoint)."""
        for owner in owners:
            if owner in self.users:
                return f"owner {owner!r} is suspended {until(self.users[owner])}"
        for owner in owners:
            if owner in self.disabled:
                return f"owner {owner!r} is disabled"
        return None


def _standing(clients: OAuthStore, facts: FactStore, owners: list[str] | None) -> _Standing:
    """What the status needs, for every agent (``owners`` None) or for these owners."""
    in_force = stored(facts)
    if owners is None:
        disabled = {u for u, _, disabled_at in clients.users() if disabled_at is not None}
    else:
        disabled = {o for o in owners if clients.user_state(o) == "disabled"}
    return _Standing(
        {s.id: s.expires_at for s in in_force if s.kind == "agent"},
        {s.id: s.expires_at for s in in_force if s.kind == "user"},
        frozenset(disabled),
    )


def _relations(facts: FactStore, relation: str, kind: str) -> dict[str, list[str]]:
    """Every agent's ``relation`` (owner or parent), read in one query: client_id -> ids."""
    found: dict[str, list[str]] = defaultdict(list)
    for f in facts.get((identity.RELATION, None, relation, None)):
        subject, other = f.fact[1], f.fact[3]
        if (
            isinstance(subject, Entity)
            and subject.type == identity.AGENT
            and isinstance(other, Entity)
            and other.type == kind
        ):
            found[subject.id].append(other.id)
    return {k: sorted(v) for k, v in found.items()}


def _identity(
    client: Client,
    standing: _Standing,
    owners: list[str],
    parents: list[str],
) -> AgentIdentity:
    suspended = standing.agents
    stopped = standing.stopped(owners)
    if client.revoked_at is not None:
        status = "revoked"
    elif client.client_id in suspended:
        status = "suspended"
    elif stopped is not None:
        status = "stopped"
    else:
        status = "active"
    return AgentIdentity(
        client_id=client.client_id,
        name=client.client_name,
        purpose=str(client.metadata.get("purpose", "")),
        owner=owners[0] if owners else None,
        parent=parents[0] if parents else None,
        status=status,
        source=client.source,
        auth_method=client.token_endpoint_auth_method,
        created_at=client.created_at,
        suspended_until=suspended.get(client.client_id),
        stopped=stopped if status == "stopped" else None,
    )


def list_agents(
    clients: OAuthStore, facts: FactStore, status: str | None = None
) -> list[AgentIdentity]:
    """Every agent (oldest first), or those of one status."""
    standing = _standing(clients, facts, None)
    owners = _relations(facts, identity.OWNER, identity.USER)
    parents = _relations(facts, identity.PARENT, identity.AGENT)
    found = [
        _identity(c, standing, owners.get(c.client_id, []), parents.get(c.client_id, []))
        for c in clients.clients()
    ]
    return [a for a in found if status is None or a.status == status]


def show_agent(clients: OAuthStore, facts: FactStore, client_id: str) -> AgentIdentity:
    client = clients.client(client_id)
    if client is None:
        raise UnknownAgent(f"no agent (OAuth client) {client_id!r}")
    owners = identity.owners(facts, client_id)
    return _identity(
        client, _standing(clients, facts, owners), owners, identity.parents(facts, client_id)
    )


def purpose_problem(purpose: object) -> str | None:
    if not isinstance(purpose, str) or len(purpose) > MAX_PURPOSE_CHARS:
        return f"purpose must be a string of at most {MAX_PURPOSE_CHARS} characters"
    if not all(map(visible, purpose)):
        return (
            "purpose must be printable text: no control, format, zero-width or other invisible"
            " characters"
        )
    return None


def update_agent(
    clients: OAuthStore,
    facts: FactStore,
    client_id: str,
    actor: str,
    *,
    name: str | None = None,
    purpose: str | None = None,
    owner: str | None = None,
    parent: str | None | EllipsisType = ...,
) -> tuple[AgentIdentity, int | None]:
    """Change what is given (``parent=None`` removes the parent); return the agent as it is now
    and the sequence of the fact change, if facts changed. Everything is checked first."""
    from bastion.oauth.registration import client_name_problem

    client = clients.client(client_id)
    if client is None:
        raise UnknownAgent(f"no agent (OAuth client) {client_id!r}")
    if name is not None and client_name_problem(name):
        raise AgentError(client_name_problem(name))
    if purpose is not None and purpose_problem(purpose):
        raise AgentError(purpose_problem(purpose))
    if parent is not ... and parent is not None and clients.client(parent) is None:
        raise UnknownAgent(f"no agent (OAuth client) {parent!r} to be the parent")
    seq = None
    with clients.db.transaction():
        if name is not None or purpose is not None:
            clients.describe_client(client_id, name=name, purpose=purpose, actor=actor)
        if owner is not None:
            seq = identity.set_owner(facts, client_id, owner, actor).seq
        if parent is not ...:
            seq = identity.set_parent(facts, client_id, parent, actor).seq
    return show_agent(clients, facts, client_id), seq
