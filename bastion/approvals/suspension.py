"""What a suspension (the kill switch, `bastion.signals.suspensions`) takes back of people's
answers: a suspension is an incident response, and what was approved before it does not come
back to life when it is lifted or lapses.

In the transaction that stores the suspension of a user or an agent (`suspend`, or a fact
written through the fact APIs, `apply_facts`), every approval request it covers that is still
live (pending, approved and not yet used, a result released and not yet delivered) is closed
as ``void``, its held result deleted, with an ``approval.void`` or ``review.void`` audit event
(reason ``suspended``); and every approval for minutes it covers (an ``approval_grant`` fact)
is deleted. It covers:

- a call of the suspended user, or through a chain the suspended agent is in
  (`token_principals`), or, where no person stands behind the call (an agent acting as itself,
  and what it delegates), through an agent the suspended user owns: the calls the kill switch
  itself refuses (`Suspensions.first`);
- what the suspended user approved or released: their answer goes with the request, and an
  approval for minutes they gave with its grant.

The call sent again after the resume is held anew, and the people are asked again. What a
replica that has not heard of the suspension yet would write after it (a request, an answer) is
refused where it is written (`Approvals.hold`, `Approvals.answer`: `stored_hold`); the
suspension's write and theirs take the kill switch's lock (`lock_suspensions`), so that the
later of the two sees the earlier.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from bastion.agents.identity import AGENT, USER, owned, owner_fact
from bastion.approvals.service import GRANT
from bastion.approvals.store import keeps_requests, resolve_request
from bastion.audit.log import AuditLog
from bastion.decide.contract import approval_grant_agent
from bastion.facts.model import Entity
from bastion.facts.store import FactStore, StoredFact
from bastion.signals.suspensions import PREDICATE, Suspensions, token_principals

# What a suspension closes: waiting for people, or answered yes and not used yet.
_LIVE = ("pending", "approved", "released")


def take_back(store: FactStore, suspended: Entity, actor: str) -> int:
    """Inside the transaction that stores the suspension of ``suspended`` (a user or an agent;
    a session's holds no approval): close the approval requests it covers, delete the
    approvals for minutes it covers, and return how many requests were closed. ``actor``:
    who suspended, kept with the grants' deletion in the change log."""
    if suspended.type not in (USER, AGENT):
        return 0
    db = store.db
    # What it covers is what the kill switch refuses, asked as it asks (one question, not two):
    # of a view that holds this suspension and, for a user, the agents they own.
    agents_owned = owned(store, suspended.id) if suspended.type == USER else ()
    view = Suspensions()
    view.reset(
        [
            StoredFact((PREDICATE, suspended)),
            *(StoredFact(owner_fact(agent, suspended.id)) for agent in agents_owned),
        ]
    )

    def covers(subject: str, chain: Sequence[str]) -> bool:
        return view.first(token_principals(subject, chain)) is not None

    grants = [
        f.fact
        for f in store.get((GRANT, None, None, None, None))
        if isinstance(f.fact[1], Entity) and covers(f.fact[1].id, _grant_chain(f.fact[2]))
    ]
    closed = 0
    if keeps_requests(db):
        now = time.time()
        approved: set[str] = set()
        if suspended.type == USER:
            rows = db.execute(
                "SELECT a.request_id, a.minutes, a.at, r.subject, r.client_id, r.agents,"
                " r.action, r.target, r.task FROM approval_answers a JOIN approval_requests r"
                " ON r.id = a.request_id WHERE a.approver = ? AND a.answer = 'approve'",
                (suspended.id,),
            )
            for request_id, minutes, at, subject, client_id, agents, action, target, task in rows:
                approved.add(request_id)
                if minutes and at + minutes * 60 > now:  # the grant they gave may still hold
                    chain = tuple(json.loads(agents)) or (client_id,)
                    grants.append(
                        (
                            GRANT,
                            Entity(USER, subject),
                            approval_grant_agent(chain, task),
                            action,
                            Entity.parse(target),
                        )
                    )
        audit = AuditLog(db)
        rows = db.execute(
            "SELECT id, kind, status, subject, client_id, agents, server, method, target,"
            " decision_id, task FROM approval_requests WHERE status IN (?, ?, ?)"
            " AND expires_at > ?",
            (*_LIVE, now),
        )
        for (
            request_id,
            kind,
            status,
            subject,
            client_id,
            agents,
            server,
            method,
            target,
            decision,
            task,
        ) in rows:
            chain = tuple(json.loads(agents))
            if request_id not in approved and not covers(subject, chain or (client_id,)):
                continue
            if not resolve_request(db, request_id, "void", from_status=status, at=now):
                continue
            closed += 1
            audit.record(
                f"{kind}.void",
                subject=subject,
                client_id=client_id,
                **({"agents": list(chain)} if chain else {}),
                **({"task": task} if task else {}),
                request_id=request_id,
                server=server,
                method=method,
                target=target,
                decision_id=decision,
                reason="suspended",
                suspended=repr(suspended),
                was=status,
            )
    if grants:
        store.apply([], list(dict.fromkeys(grants)), actor=actor)
    return closed


def _grant_chain(agent: object) -> tuple[str, ...]:
    """The chain of agents an ``approval_grant``'s agent names (`approval_grant_agent`), under
    a task or none."""
    if not isinstance(agent, Entity):
        return ()
    if agent.id.startswith(("[", "{")):
        try:
            chain = json.loads(agent.id)
        except ValueError:
            return (agent.id,)
        if isinstance(chain, dict):  # a grant given under a task
            chain = chain.get("agents")
        return tuple(a for a in chain if isinstance(a, str)) if isinstance(chain, list) else ()
    return (agent.id,)
