"""Decision routes: authorize (one or a batch), list, actions, query, and explain a decision.

``/v1/authorize`` and each check of a batch decide for one ``actor``, or for a chain of
``principals`` (the user, the agent acting for them, any sub-agent: the gateway's contract,
`bastion.decide.contract.decide_chain`): allowed only if every principal is; ``refused_by`` names
the first that is not, and the obligations of every principal come with an allowed answer.

An evaluation that spends its budget (`EvaluationLimit`) is a refusal, never an error: allowed
false (or no results) with ``"reason": "evaluation_limit"`` and the budget that ran out, and so
recorded in the decision log.

The kill switch holds here as at the gateway (`Suspensions.held`, a lookup in memory): a
suspended principal, or an agent asked about as itself whose owner is suspended, is refused
before the policy is asked, with ``"reason": "suspended"`` and ``suspended`` naming who is held;
a query of ``allow/3`` likewise (`asks_allow`), and one with its actor left open leaves the
held actors out of its rows.

A decision record is read (``/v1/decisions/{id}`` and its explanation) by the key that asked
for it, whichever API it asked through, and by an ``admin`` key; another key's record is
answered as an id no record holds (`_find`): services sharing one bastion do not read each
other's questions, nor their contexts.

An explanation (``"explain": true``, or ``/v1/decisions/{id}/explanation``) shows the stored facts
its proofs rest on (a role, a relation, a signal's value): data, which a key reads only with
``facts:read`` (as through ``/v1/facts`` and ``/v1/query``). A key with ``decide`` alone that asks
for one is refused 403 before anything is decided or recorded.
"""

from __future__ import annotations

import bisect
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.decide import Authorizer
from bastion.decide.authorizer import mask_of
from bastion.decide.contract import (
    ChainDecision,
    decide_chain,
    decide_chain_in,
    explained_principal,
)
from bastion.facts.model import Entity, arg_from_json, arg_to_json
from bastion.policy.errors import CompilerBusy, EvaluationLimit, PolicyError
from bastion.server.api.policy import policy_problem
from bastion.server.auth import lacking, require, require_scope
from bastion.server.keys import ApiKey
from bastion.server.metrics import Metrics
from bastion.server.problems import (
    Problem,
    bad_request,
    entity,
    entity_type,
    read_json,
    sized,
    unprocessable,
)
from bastion.server.problems import action as action_field
from bastion.server.problems import field as get_field
from bastion.server.replica import ConsistencyTimeout, Replica
from bastion.signals.suspensions import Held, asks_allow

if TYPE_CHECKING:
    from bastion.audit.decision_log import DecisionStore

T = TypeVar("T")
# Rounds of `compiled_first`: compiled, then asked, each round for the policy then in force.
_COMPILE_ROUNDS = 8

MAX_BATCH = 1000
# What a record keeps of its answer beyond ``allowed``: why it was refused (the scopes missing,
# the signals stale), and the obligations an allowed chain's caller was told to enforce.
_ANSWER_FIELDS = (
    "reason",
    "limit",
    "undecided",
    "suspended",
    "missing_scopes",
    "stale_signals",
    "obligations",
)
# Principals in one chain: a user, an agent and its sub-agents.
MAX_CHAIN = 8
MAX_PAGE = 1000
# Contexts of requests larger than this are not kept in the decision log.
KEEP_CONTEXT_BYTES = 64 * 1024
# What an explanation needs besides ``decide``, and why (said in the 403 of a key without it).
EXPLAIN_SCOPE = "facts:read"
_EXPLAINING = "an explanation shows the stored facts its proofs rest on, which this scope reads"
_ASKED_TO_EXPLAIN = f'{_EXPLAINING}; ask without "explain" for the decision alone'
# The APIs a decision is asked through (`DecisionRecord.api`), each deciding by a contract of
# its own: /v1's, AuthZEN's (`bastion.pdp.authzen`) and Oso Cloud's (`bastion.pdp.oso_cloud`).
V1, AUTHZEN, OSO_CLOUD = "v1", "authzen", "oso_cloud"


@dataclass(slots=True)
class DecisionRecord:
    """What was asked and answered, so the decision can be explained afterwards."""

    id: str
    kind: str
    request: dict
    result: Any
    seq: int
    policy_version: int | None
    at: float
    explanation: dict | None = field(default=None)
    # Why it was refused (reason, limit...), and an allowed chain's obligations.
    refusal: dict | None = field(default=None)
    # The id of the API key that asked: only it, and an admin key, read the record.
    asked_by: str | None = field(default=None)
    # The API it was asked through (`V1`, `AUTHZEN`, `OSO_CLOUD`); None in a record stored by a
    # bastion from before records named it (``decision_log = "database"``).
    api: str | None = field(default=None)

    def readable_by(self, key: ApiKey) -> bool:
        """Whether ``key`` may read this record: the key that asked for it, or an admin key
        (a record no key asked for, admin keys only)."""
        return "admin" in key.scopes or (self.asked_by is not None and self.asked_by == key.id)

    def to_json(self) -> dict:
        return {
            "decision_id": self.id,
            "kind": self.kind,
            "request": self.request,
            "result": self.result,
            "sequence": self.seq,
            "policy_version": self.policy_version,
            "at": self.at,
            "asked_by": self.asked_by,
            "api": self.api,
            **(self.refusal or {}),
        }


class DecisionLog:
    """The most recent decisions of this process, by id (bounded; oldest forgotten first).

    With a ``store`` (``decision_log = "database"``), every record is also buffered to be
    written to the database (`bastion.audit.decision_log`), whatever ``size`` is, and first
    journalled (once the store's journal is open): before its id, and so its answer, leaves.

    Ids are this process's prefix and a count, so the last ``size`` records sit in a ring,
    each at its count modulo ``size``: keeping one overwrites the oldest in place, without the
    insertions and evictions of a mapping, on every decision. Each is kept as the plain tuple of
    a `DecisionRecord`'s fields, made into one when it is asked for: most never are.
    """

    def __init__(self, size: int, store: DecisionStore | None = None) -> None:
        self.size = max(size, 0)
        # Where every record is also written, with ``decision_log = "database"``.
        self.store = store
        self._keeps = bool(self.size) or store is not None
        self._ring: list[tuple] = []
        # 64 random bits: ids stay unique across every process that writes to one database.
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count(1)

    def record(
        self,
        kind: str,
        req: dict,
        result: Any,
        seq: int,
        policy_version: int | None,
        explanation: dict | None = None,
        refusal: dict | None = None,
        asked_by: str | None = None,
        *,
        api: str,
        pending: list[tuple] | None = None,
    ) -> str:
        """Keep a decision made now, asked for by the key ``asked_by`` (its id) through ``api``
        (`V1`, `AUTHZEN`, `OSO_CLOUD`); its new id. With ``pending`` (a batch's), its record
        waits there for the store until `keep` is given the list: journalled with the batch's
        others in one write, before the batch's answer leaves."""
        n = next(self._counter)
        decision_id = f"{self._prefix}-{n}"
        if self._keeps:
            at = time.time()
            record = (
                decision_id,
                kind,
                req,
                result,
                seq,
                policy_version,
                at,
                explanation,
                refusal,
                asked_by,
                api,
            )
            if self.size:
                ring = self._ring
                if len(ring) < self.size:
                    ring.append(record)
                else:
                    ring[(n - 1) % self.size] = record
            if self.store is not None:
                if pending is None:
                    self.store.add(record)
                else:
                    pending.append(record)
        return decision_id

    def keep(self, pending: list[tuple]) -> None:
        """Store the records a batch left in ``pending`` (`record`)."""
        if pending and self.store is not None:
            self.store.add_many(pending)

    def get(self, decision_id: str) -> DecisionRecord | None:
        if not self.made_here(decision_id):
            return None
        try:
            n = int(decision_id[len(self._prefix) + 1 :])
        except ValueError:
            return None
        if not self.size or n < 1:
            return None
        slot = (n - 1) % self.size
        if slot >= len(self._ring):
            return None
        fields = self._ring[slot]
        # Not so for another spelling of the count ("007", "7_0"), or a record overwritten since.
        return DecisionRecord(*fields) if fields[0] == decision_id else None

    def made_here(self, decision_id: str) -> bool:
        return decision_id.startswith(self._prefix + "-")

    def stored(self, decision_id: str) -> DecisionRecord | None:
        """The record of ``decision_id`` in the database, made by any process (None without a
        store). It waits on the database: call it on a worker thread."""
        if self.store is None:
            return None
        fields = self.store.get(decision_id)
        return None if fields is None else DecisionRecord(*fields)


# -- helpers -----------------------------------------------------------------------------------


def _current(request: Request) -> Replica:
    """The replica, unless its facts are too old to decide on, or the policy in force does not
    load on it: then 503 (fail closed)."""
    replica: Replica = request.app.state.replica
    if replica.stale:
        raise Problem(
            503,
            "Facts are stale" if replica.policy_refused is None else "Policy not loaded",
            replica.stale_reason(),
            sequence=replica.applied,
            staleness_seconds=round(replica.staleness, 3),
        )
    return replica


async def fresh(request: Request, body: dict) -> Replica:
    """The replica, once it reflects ``at_least`` (if given), and only if its facts are not
    stale; and once a change it is putting in force is (`Replica.in_force`), and every change
    it has heard of is applied (`Replica.heard_not_applied`: a write another replica took
    returns once this one has heard of it, and is then decided on here, as the gateway and the
    token endpoint do), or 503 when that takes longer than ``consistency_timeout``."""
    replica = _current(request)
    timeout = request.app.state.config.consistency_timeout
    if (heard := replica.heard_not_applied(timeout)) is not None:
        if not await heard:
            _current(request)  # gone stale meanwhile (the database away): said so
            raise Problem(
                503,
                "Not yet consistent",
                f"this replica has heard of a change it has not applied within {timeout:g} s"
                f" (consistency_timeout; applied up to {replica.applied}), and decides nothing"
                " on the facts before it; retry, or ask another replica",
                sequence=replica.applied,
            )
        _current(request)  # it may have gone stale while it waited
    at_least = get_field(body, "at_least", int, required=False)
    if at_least is not None and at_least < 0:
        raise bad_request("at_least must be a sequence a write returned (0 or more)")
    if at_least:
        try:
            await replica.wait_for(at_least, timeout)
        except ConsistencyTimeout as e:
            store = request.app.state.store
            head = await anyio.to_thread.run_sync(store.head)
            if at_least > head:
                raise unprocessable(
                    f"at_least={at_least} is not the sequence of any write: the latest is {head};"
                    " pass the 'sequence' that a write returned"
                ) from None
            raise Problem(
                503, "Not yet consistent", str(e), sequence=replica.applied, at_least=at_least
            ) from None
        _current(request)  # it may have gone stale while it waited
    return replica


class Uncompiled(Exception):
    """Raised by `require_compiled` before a question whose shapes are not compiled yet."""

    def __init__(self, shapes: list[tuple[str, str]]) -> None:
        self.shapes = shapes
        super().__init__(f"not compiled yet: {shapes}")


def require_compiled(authz: Authorizer, shapes: list[tuple[str, str]]) -> None:
    """Raise `Uncompiled` unless each shape of question (``(predicate, mask)``) is compiled for
    the policy in force (or kept as the refusal compiling it raised: `Authorizer.prepare`)."""
    if not authz.prepared(shapes):
        raise Uncompiled(shapes)


async def compiled_first(
    replica_now: Callable[[], Awaitable[Replica]], answer: Callable[[Replica], T]
) -> T:
    """``answer(replica)`` on the event loop, the replica as ``replica_now`` gives it (`fresh`);
    where ``answer`` stops at a shape of question not compiled yet (`require_compiled`,
    `CompilerBusy`), it is compiled on a worker thread (`Authorizer.prepare`) and ``answer``
    runs again from the start on the replica as it then is: never compiled on the loop, where
    a new shape of a large policy would hold every other request for as long as it compiles."""
    for _ in range(_COMPILE_ROUNDS):
        replica = await replica_now()
        try:
            return answer(replica)
        except (Uncompiled, CompilerBusy) as stopped:
            shapes = stopped.shapes if isinstance(stopped, Uncompiled) else [stopped.shape]
        await anyio.to_thread.run_sync(replica.authz.prepare, shapes)
    # Each round but the first follows a policy put in force while the last one compiled.
    raise Problem(
        503,
        "Policy changing",
        f"the policy in force changed {_COMPILE_ROUNDS - 1} times while this question was being"
        " compiled for it; ask again",
    )


def answerable_now(replica: Replica, body: dict) -> bool:
    """Whether `fresh` would return at once, with nothing to wait for or refuse: the facts are
    not stale, no change is being put in force nor heard of and not applied
    (`Replica.heard_all`), and ``at_least`` (if given, and well formed) is applied already."""
    if replica.stale or not replica.heard_all():
        return False
    at_least = body.get("at_least")
    if at_least is None:
        return True
    return at_least.__class__ is int and 0 <= at_least <= replica.applied


def _context(body: dict) -> dict | None:
    return get_field(body, "context", dict, required=False)


def _context_or(body: dict, shared: dict | None) -> dict | None:
    """A check's own ``context`` (checked), or the batch's when it gives none or an empty one."""
    if body.get("context") is None:  # the common case, first: it is on every check's path
        return shared
    return _context(body) or shared


def known_type(authz: Authorizer, e: Entity | str, name: str) -> None:
    """Refuse an entity (or a type, as a list's ``resource_type``) of a type the policy does
    not declare: 422, as a check of it is, rather than an empty answer."""
    _known_type(authz.entity_types, e, name)


def _known_type(types: frozenset[str], e: Entity | str, name: str) -> None:
    # Only a policy that declares its types (actor and resource blocks) can refuse one.
    type_name = e if isinstance(e, str) else e.type
    if types and type_name not in types:
        raise unprocessable(
            f"the field {name!r} has the entity type {type_name!r}, which the policy does not"
            f" declare; declared types: {', '.join(sorted(types)) or 'none'}"
        )


def _check(types: frozenset[str], body: dict) -> tuple[Entity, str, Entity]:
    """The actor, action and resource of a check; ``types``: those the policy declares."""
    actor = entity(body, "actor")
    action = action_field(body)
    resource = entity(body, "resource")
    if types and (actor.type not in types or resource.type not in types):
        _known_type(types, actor, "actor")
        _known_type(types, resource, "resource")
    return actor, action, resource


def _chain(authz: Authorizer, body: dict) -> tuple[Entity, ...] | None:
    """The request's ``principals`` (checked), or None when it names one ``actor``."""
    if "principals" not in body:
        return None
    if "actor" in body:
        raise bad_request("give actor (one principal) or principals (a chain), not both")
    raw = body["principals"]
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_CHAIN:
        raise bad_request(
            f"principals must be a list of 1 to {MAX_CHAIN} entities, the user first, then"
            ' each agent acting for them: [{"type": "User", "id": "..."}, ...]'
        )
    chain = []
    for i, item in enumerate(raw):
        name = f"principals[{i}]"
        e = entity({name: item}, name)
        known_type(authz, e, name)
        chain.append(e)
    return tuple(chain)


def _check_chain(authz: Authorizer, body: dict) -> tuple[tuple[Entity, ...], str, Entity]:
    chain = _chain(authz, body)
    assert chain is not None
    action = action_field(body)
    resource = entity(body, "resource")
    known_type(authz, resource, "resource")
    return chain, action, resource


def _scopes(body: dict) -> list[str] | None:
    scopes = get_field(body, "scopes", list, required=False)
    if scopes is not None and not all(isinstance(s, str) for s in scopes):
        raise bad_request("scopes must be a list of strings (the caller's OAuth scopes)")
    return scopes


def _obligations_json(decision: ChainDecision) -> dict:
    o = decision.obligations
    return {
        "masks": list(o.masks),
        "rate_limits": [
            {"principal": _entity_json(r.principal), "max": r.max, "seconds": r.seconds}
            for r in o.rate_limits
        ],
        "required_scopes": list(o.required_scopes),
        "requires_approval": o.requires_approval and not o.approval_granted,
        "requires_review": o.requires_review,
        "read_only": o.read_only,
        "max_auth_age": o.max_auth_age,
        "alerts": [
            {"principal": _entity_json(p), "name": n, "severity": sev} for p, n, sev in o.alerts
        ],
    }


def _chain_answer(decision: ChainDecision) -> dict:
    """What an answer (and its record) says of a chain decision beyond ``allowed``."""
    out: dict[str, Any] = {
        "refused_by": _entity_json(decision.refused_by) if decision.refused_by else None
    }
    if decision.reason is not None:
        out["reason"] = decision.reason
    if decision.limit is not None:
        out["limit"] = decision.limit
    if decision.undecided is not None:
        out["undecided"] = decision.undecided
    if decision.stale_signals:
        out["stale_signals"] = list(decision.stale_signals)
    if decision.missing_scopes:
        out["reason"] = "insufficient_scope"
        out["missing_scopes"] = list(decision.missing_scopes)
    if decision.allowed:
        out["obligations"] = _obligations_json(decision)
    return out


def _held(held: Held) -> dict:
    """What a refusal by the kill switch says (and its record keeps)."""
    return {"reason": "suspended", "suspended": _entity_json(held.suspended)}


def _decide_or_held(
    decide: Callable[[], ChainDecision], chain: tuple[Entity, ...], held: Held | None
) -> tuple[ChainDecision, dict]:
    """The chain decided by ``decide``, or refused by the kill switch before the policy is
    asked; with what its answer says beyond ``allowed``."""
    if held is None:
        decision = decide()
        return decision, _chain_answer(decision)
    decision = ChainDecision(False, chain, refused_by=held.principal, reason="suspended")
    return decision, {**_chain_answer(decision), **_held(held)}


def _chain_request(
    chain: tuple[Entity, ...], action: str, resource: Entity, scopes: list[str] | None
) -> dict:
    """What a chain decision's record says was asked: with the caller's OAuth ``scopes`` when
    given (`requires_scope` is held to them)."""
    req = {
        "principals": [_entity_json(p) for p in chain],
        "action": action,
        "resource": _entity_json(resource),
    }
    if scopes is not None:
        req["scopes"] = scopes
    return req


def _authorize_chain(asked: Asked, body: dict, replica: Replica) -> dict:
    authz = replica.authz
    chain, action, resource = _check_chain(authz, body)
    context = _context(body)
    scopes = _scopes(body)
    explain = get_field(body, "explain", bool, required=False)
    if explain and not asked.explains:
        raise lacking(EXPLAIN_SCOPE, _ASKED_TO_EXPLAIN)
    started = time.perf_counter()
    held = replica.suspensions.held(chain)
    decision, answer = _decide_or_held(
        lambda: decide_chain(authz, chain, action, resource, context, scopes), chain, held
    )
    result = "allow" if decision.allowed else "deny"
    asked.metrics.decision("authorize", result, time.perf_counter() - started)
    explanation = None
    if explain and held is None:
        # Why the principal that refused was refused (or, allowed, why the last one was).
        explained = authz.decide(explained_principal(decision), action, resource, context)
        explanation = _explanation_json(explained)
    req = {**_chain_request(chain, action, resource, scopes), "refused_by": answer["refused_by"]}
    _keep_context(req, context, asked.keeps_context)
    refusal = {k: answer[k] for k in _ANSWER_FIELDS if k in answer} or None
    decision_id = _record(
        asked.log, replica, "authorize", req, decision.allowed, explanation, refusal, asked.by
    )
    out = {
        "allowed": decision.allowed,
        "decision_id": decision_id,
        "sequence": replica.applied,
        **answer,
    }
    if explanation is not None:
        out["explanation"] = explanation
    return out


def record_decision(
    request: Request,
    key: ApiKey,
    kind: str,
    req: dict,
    result: Any,
    explanation: dict | None = None,
    refusal: dict | None = None,
    *,
    api: str,
    pending: list[tuple] | None = None,
) -> str:
    """Keep a decision that ``key`` asked for through ``api`` (`V1`, `AUTHZEN`, `OSO_CLOUD`); its
    id (only ``key``, and admin keys, read it). ``pending``: a batch's (`DecisionLog.record`)."""
    state = request.app.state
    return _record(
        state.decisions,
        state.replica,
        kind,
        req,
        result,
        explanation,
        refusal,
        key.id,
        api,
        pending,
    )


def _record(
    log: DecisionLog,
    replica: Replica,
    kind: str,
    req: dict,
    result: Any,
    explanation: dict | None,
    refusal: dict | None,
    asked_by: str,
    api: str = V1,
    pending: list[tuple] | None = None,
) -> str:
    return log.record(
        kind,
        req,
        result,
        replica.applied,
        replica.policy_version,
        explanation,
        refusal,
        asked_by,
        api=api,
        pending=pending,
    )


@dataclass(frozen=True, slots=True)
class Asked:
    """What answering a decision request needs besides its body: where the process records and
    counts its decisions, the body's size (`keep_context`), the id of the key that asked
    (whose records they are), and whether that key may be given an explanation
    (`EXPLAIN_SCOPE`). Taken from the application's state by the routes, or given by
    `bastion.server.direct`."""

    log: DecisionLog
    metrics: Metrics
    body_size: int
    by: str
    explains: bool

    @classmethod
    def of(cls, request: Request, key: ApiKey) -> Asked:
        state = request.app.state
        size = getattr(request.state, "body_size", 0)
        return cls(state.decisions, state.metrics, size, key.id, key.allows(EXPLAIN_SCOPE))

    @property
    def keeps_context(self) -> bool:
        return self.body_size <= KEEP_CONTEXT_BYTES


def _refusal(limit: EvaluationLimit) -> dict:
    """What an answer and its record say of an evaluation that spent its budget."""
    return {"reason": limit.reason, "limit": limit.limit}


def keep_context(request: Request, req: dict, context: dict | None) -> None:
    """Remember the context with the decision, unless the request was large (bounded memory)."""
    _keep_context(req, context, getattr(request.state, "body_size", 0) <= KEEP_CONTEXT_BYTES)


def _keep_context(req: dict, context: dict | None, kept: bool) -> None:
    if context is None:
        return
    if kept:
        req["context"] = context
    else:
        req["context_omitted"] = True


def observe_decision(request: Request, kind: str, started: float, result: str) -> None:
    request.app.state.metrics.decision(kind, result, time.perf_counter() - started)


def _request_json(actor: Entity, action: str, resource: Entity) -> dict:
    """What a decision's record says was asked of one actor (`_entity_json` written out: on
    every decision's path a call costs as much as building a dictionary)."""
    return {
        "actor": {"type": actor.type, "id": actor.id},
        "action": action,
        "resource": {"type": resource.type, "id": resource.id},
    }


def _entity_json(e: Entity) -> dict:
    return {"type": e.type, "id": e.id}


# -- routes ------------------------------------------------------------------------------------


async def authorize(request: Request) -> JSONResponse:
    key = await require(request, "decide")
    body = await read_json(request)
    replica = await fresh(request, body)
    return JSONResponse(authorize_answer(Asked.of(request, key), body, replica))


def authorize_answer(asked: Asked, body: dict, replica: Replica) -> dict:
    """The answer to one ``/v1/authorize`` body, decided on ``replica`` and recorded.

    A body that does not check out raises `Problem` before anything is decided or recorded;
    the key and freshness were checked by the caller (the route, or `bastion.server.direct`).
    """
    if "principals" in body:
        return _authorize_chain(asked, body, replica)
    authz = replica.authz
    actor, action, resource = _check(authz.entity_types, body)
    # The fields left out, the common case, first: they are on every decision's path.
    context = None if body.get("context") is None else _context(body)
    explain = body.get("explain") is not None and get_field(body, "explain", bool)
    if explain and not asked.explains:
        raise lacking(EXPLAIN_SCOPE, _ASKED_TO_EXPLAIN)
    started = time.perf_counter()
    explanation = refusal = None
    held = replica.suspensions.held((actor,))
    if held is not None:
        allowed, refusal = False, _held(held)
    elif explain:
        decision = authz.decide(actor, action, resource, context)
        allowed = decision.allowed
        explanation = _explanation_json(decision)
        if decision.reason is not None:
            refusal = {"reason": decision.reason, "limit": decision.explanation.limit}
    else:
        try:
            allowed = authz.authorize(actor, action, resource, context)
        except EvaluationLimit as over:
            allowed, refusal = False, _refusal(over)
    asked.metrics.decision(
        "authorize", "allow" if allowed else "deny", time.perf_counter() - started
    )
    req = _request_json(actor, action, resource)
    if context is not None:
        _keep_context(req, context, asked.keeps_context)
    decision_id = asked.log.record(
        "authorize",
        req,
        allowed,
        replica.applied,
        replica.policy_version,
        explanation,
        refusal,
        asked.by,
        api=V1,
    )
    out = {"allowed": allowed, "decision_id": decision_id, "sequence": replica.applied}
    if refusal is not None:
        out.update(refusal)
    if explanation is not None:
        out["explanation"] = explanation
    return out


async def authorize_batch(request: Request) -> JSONResponse:
    key = await require(request, "decide")
    body = await read_json(request)
    replica = await fresh(request, body)
    return JSONResponse(authorize_batch_answer(Asked.of(request, key), body, replica))


def authorize_batch_answer(asked: Asked, body: dict, replica: Replica) -> dict:
    """The answer to one ``/v1/authorize/batch`` body, as `authorize_answer` for each check."""
    authz = replica.authz
    checks = get_field(body, "checks", list)
    if len(checks) > MAX_BATCH:
        raise bad_request(f"a batch holds at most {MAX_BATCH} checks, got {len(checks)}")
    shared_context = _context(body)
    types = authz.entity_types
    held_by = replica.suspensions.held
    parsed = []
    for i, check in enumerate(checks):
        if not isinstance(check, dict):
            raise bad_request(f"checks[{i}] must be an object")
        try:
            if "principals" in check:
                parsed.append(
                    (
                        *_check_chain(authz, check),
                        _context_or(check, shared_context),
                        _scopes(check),
                    )
                )
            else:
                parsed.append((*_check(types, check), _context_or(check, shared_context), None))
        except Problem as p:
            raise Problem(p.status, p.title, f"checks[{i}]: {p.detail}") from None
    results = []
    # Looked up once for the whole batch; the decisions are counted once, when it is done.
    record, kept, clock, by = asked.log.record, asked.keeps_context, time.perf_counter, asked.by
    seconds: list[float] = []
    allowed_count = 0
    # The batch's records, journalled in one write once every check is decided (`keep`, before
    # the answer leaves; a check that raised leaves those before it kept all the same).
    pending: list[tuple] = []
    try:
        # One session: one view of the facts, and one evaluation budget for the whole batch, as
        # for one decision. Each check with a budget of its own let one request of a thousand
        # checks hold the event loop for a thousand budgets (minutes); once it is spent, every
        # check left is refused with evaluation_limit at once.
        with authz.session(shared_context) as session:
            for actor, action, resource, context, scopes in parsed:
                started = clock()
                refusal = None
                if not isinstance(actor, Entity):  # a chain (an Entity is a tuple too)
                    decision, answer = _decide_or_held(
                        partial(decide_chain_in, session, actor, action, resource, context, scopes),
                        actor,
                        held_by(actor),
                    )
                    seconds.append(clock() - started)
                    allowed_count += decision.allowed
                    req = {
                        **_chain_request(actor, action, resource, scopes),
                        "refused_by": answer["refused_by"],
                    }
                    _keep_context(req, context, kept)
                    refusal = {k: answer[k] for k in _ANSWER_FIELDS if k in answer} or None
                    decision_id = _record(
                        asked.log,
                        replica,
                        "authorize",
                        req,
                        decision.allowed,
                        None,
                        refusal,
                        by,
                        pending=pending,
                    )
                    results.append(
                        {"allowed": decision.allowed, "decision_id": decision_id, **answer}
                    )
                    continue
                held = held_by((actor,))
                if held is not None:
                    allowed, refusal = False, _held(held)
                else:
                    try:
                        allowed = session.allowed(actor, action, resource, context)
                    except EvaluationLimit as over:
                        allowed, refusal = False, _refusal(over)
                seconds.append(clock() - started)
                allowed_count += allowed
                req = _request_json(actor, action, resource)
                if context is not None:
                    _keep_context(req, context, kept)
                decision_id = record(
                    "authorize",
                    req,
                    allowed,
                    replica.applied,
                    replica.policy_version,
                    None,
                    refusal,
                    by,
                    api=V1,
                    pending=pending,
                )
                result = {"allowed": allowed, "decision_id": decision_id}
                if refusal is not None:
                    result.update(refusal)
                results.append(result)
    finally:
        asked.log.keep(pending)
        asked.metrics.decisions("authorize", allowed_count, seconds)
    return {"results": results, "sequence": replica.applied}


async def list_resources(request: Request) -> JSONResponse:
    key = await require(request, "decide")
    body = await read_json(request)
    replica = await fresh(request, body)
    authz = replica.authz
    actor = entity(body, "actor")
    known_type(authz, actor, "actor")
    action = action_field(body)
    resource_type = entity_type(body, "resource_type")
    known_type(authz, resource_type, "resource_type")
    limit = get_field(body, "limit", int, required=False)
    limit = 100 if limit is None else limit
    if not 1 <= limit <= MAX_PAGE:
        raise bad_request(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
    cursor = get_field(body, "cursor", str, required=False) or ""
    context = _context(body)
    started = time.perf_counter()
    refusal = None
    held = replica.suspensions.held((actor,))
    if held is not None:
        ids, refusal = [], _held(held)
    else:
        try:
            ids = sorted(authz.list(actor, action, resource_type, context))
        except EvaluationLimit as over:
            ids, refusal = [], _refusal(over)
    observe_decision(request, "list", started, "allow" if ids else "deny")
    start = bisect.bisect_right(ids, cursor) if cursor else 0
    page = ids[start : start + limit]
    more = bool(page) and page[-1] != ids[-1]
    req = {"actor": _entity_json(actor), "action": action, "resource_type": resource_type}
    keep_context(request, req, context)
    decision_id = record_decision(
        request, key, "list", req, {"count": len(ids)}, refusal=refusal, api=V1
    )
    return JSONResponse(
        {
            "ids": page,
            "next_cursor": page[-1] if more else None,
            "decision_id": decision_id,
            "sequence": replica.applied,
            **(refusal or {}),
        }
    )


async def actions(request: Request) -> JSONResponse:
    key = await require(request, "decide")
    body = await read_json(request)
    replica = await fresh(request, body)
    authz = replica.authz
    actor = entity(body, "actor")
    resource = entity(body, "resource")
    known_type(authz, actor, "actor")
    known_type(authz, resource, "resource")
    context = _context(body)
    started = time.perf_counter()
    refusal = None
    held = replica.suspensions.held((actor,))
    if held is not None:
        result, refusal = [], _held(held)
    else:
        try:
            result = sorted(authz.actions(actor, resource, context))
        except EvaluationLimit as over:
            result, refusal = [], _refusal(over)
    observe_decision(request, "actions", started, "allow" if result else "deny")
    req = {"actor": _entity_json(actor), "resource": _entity_json(resource)}
    keep_context(request, req, context)
    decision_id = record_decision(request, key, "actions", req, result, refusal=refusal, api=V1)
    return JSONResponse(
        {
            "actions": result,
            "decision_id": decision_id,
            "sequence": replica.applied,
            **(refusal or {}),
        }
    )


async def query(request: Request) -> JSONResponse:
    key = await require(request, "decide")
    body = await read_json(request)
    return await compiled_first(partial(fresh, request, body), partial(_query, request, key, body))


def _query(request: Request, key: ApiKey, body: dict, replica: Replica) -> JSONResponse:
    from bastion.decide import Variable

    predicate = get_field(body, "predicate", str)
    raw_args = get_field(body, "args", list, required=False) or []
    if not key.allows("facts:read") and replica.authz.stores_facts(predicate, len(raw_args)):
        # A decision key asks what the rules conclude; the stored facts themselves are data.
        raise Problem(
            403,
            "Forbidden",
            f"{predicate}/{len(raw_args)} is a fact predicate: querying stored facts needs the"
            " scope 'facts:read'; a key with 'decide' alone may query predicates that rules"
            " define",
        )
    args = []
    for i, a in enumerate(raw_args):
        if isinstance(a, dict) and set(a) == {"var"} and isinstance(a["var"], str):
            args.append(Variable(a["var"]))
        else:
            try:
                arg = arg_from_json(a)
            except ValueError as e:
                raise bad_request(f'args[{i}]: {e}; a variable is {{"var": "name"}}') from None
            args.append(sized(arg, f"args[{i}]") if arg.__class__ in (Entity, str) else arg)
    context = _context(body)
    started = time.perf_counter()
    refusal = None
    suspensions = replica.suspensions
    held = None
    if asks_allow(predicate, len(args)) and args[0].__class__ is Entity:
        held = suspensions.held((args[0],))
    try:
        if held is not None:
            rows, refusal = [], _held(held)  # the kill switch, before the policy
        else:
            require_compiled(replica.authz, [(predicate, mask_of(args))])
            rows = replica.authz.query(predicate, *args, context=context)
            if asks_allow(predicate, len(args)):
                rows = [row for row in rows if not suspensions.holds_value(row[1])]
    except ValueError as e:
        # Well formed, but not something the policy in force defines.
        raise unprocessable(str(e)) from None
    except PolicyError as e:
        # A shape of question compiled on first use that the rules cannot answer (a variable
        # left open that nothing binds).
        raise policy_problem(e, "the policy in force cannot answer this question") from None
    except EvaluationLimit as over:
        rows, refusal = [], _refusal(over)
    observe_decision(request, "query", started, "allow" if rows else "deny")
    results = [[arg_to_json(v) for v in row] for row in rows]
    req = {"predicate": predicate, "args": raw_args}
    keep_context(request, req, context)
    decision_id = record_decision(request, key, "query", req, len(rows), refusal=refusal, api=V1)
    return JSONResponse(
        {
            "results": results,
            "decision_id": decision_id,
            "sequence": replica.applied,
            **(refusal or {}),
        }
    )


def _explanation_json(decision: Any) -> dict:
    explanation = decision.explanation
    to_dict = getattr(explanation, "to_dict", None)
    return {
        "allowed": decision.allowed,
        "text": str(explanation),
        "detail": to_dict() if to_dict else None,
    }


async def get_decision(request: Request) -> JSONResponse:
    key = await require(request, "decide")
    record = await _find(request, key)
    return JSONResponse(record.to_json())


async def explain(request: Request) -> JSONResponse:
    """The explanation of an authorize decision: kept if asked for, otherwise evaluated again."""
    key = await require(request, "decide")
    require_scope(key, EXPLAIN_SCOPE, _EXPLAINING)
    record = await _find(request, key)
    if record.kind != "authorize":
        raise Problem(
            409,
            "Not explainable",
            f"only authorize decisions are explained; this is a {record.kind}",
        )
    out = record.to_json()
    if record.explanation is not None:
        out["explanation"] = record.explanation
        out["exact"] = True
        return JSONResponse(out)
    r = record.request
    if "principals" in r:
        # A chain: explain the principal that refused, or (allowed, or refused by the call's
        # device, which is no principal) the last of the chain, as `explained_principal` does.
        refused = r.get("refused_by")
        who = refused if refused in r["principals"] else r["principals"][-1]
        r = {**r, "actor": who}
    if r.get("context_omitted"):
        raise Problem(
            409,
            "Not explainable",
            "the request was too large for its context to be kept; send it again with"
            ' "explain": true to get the explanation in the answer',
        )
    if r.get("context_facts"):
        # Oso Cloud's context facts held for that one question and are not kept: explained
        # without them, what rested on one would read otherwise, and be called exact.
        raise Problem(
            409,
            "Not explainable",
            f"it was decided with {r['context_facts']} context facts, which the record does not"
            " keep; explained without them it could read otherwise",
        )
    # Never on facts older than the decision's: a replica behind it (another process reading
    # a stored record, `decision_log = "database"`) explains once it has caught up, or says it
    # cannot, as a request asking `at_least` would be told.
    replica = await fresh(request, {"at_least": record.seq})
    decision = replica.authz.decide(
        Entity(**r["actor"]), r["action"], Entity(**r["resource"]), r.get("context")
    )
    out["explanation"] = _explanation_json(decision)
    # Evaluated again now: exact only if nothing changed since the decision was made (a new
    # policy is a change too); what it was explained against is named beside what it was decided on.
    out["exact"] = replica.applied == record.seq
    out["explained_at_sequence"] = replica.applied
    out["explained_policy_version"] = replica.policy_version
    return JSONResponse(out)


async def _find(request: Request, key: ApiKey) -> DecisionRecord:
    """The record ``key`` asks for, if it may read it (`DecisionRecord.readable_by`): from this
    process's memory, else (``decision_log = "database"``) from the database, on a worker
    thread. Another key's record is the 404 of an id no record holds, word for word, and is
    looked for in the database as an unknown id is: the ids are a count, so any other answer
    would tell a key which of them another key asked for."""
    log: DecisionLog = request.app.state.decisions
    decision_id = request.path_params["decision_id"]
    record = log.get(decision_id)
    if (record is None or not record.readable_by(key)) and log.store is not None:
        record = await anyio.to_thread.run_sync(log.stored, decision_id)
    if record is None or not record.readable_by(key):
        if log.store is not None:
            where = (
                "no process on this database recorded it (decision_log = database), or it"
                " was pruned (audit_retention_days), or not yet written (within 0.2 s), or"
                " another key asked for it; a key reads only its own decisions, an admin key all"
            )
        elif log.made_here(decision_id):
            where = (
                "it is not among the last decisions this server remembers (decision_log_size)"
                " that this key asked for; a key reads only its own decisions, an admin key all"
            )
        else:
            where = "it was not made by this server process; ask the replica that made it"
        raise Problem(404, "Unknown decision", f"no decision {decision_id!r}: {where}")
    return record


routes = [
    Route("/v1/authorize", authorize, methods=["POST"]),
    Route("/v1/authorize/batch", authorize_batch, methods=["POST"]),
    Route("/v1/list", list_resources, methods=["POST"]),
    Route("/v1/actions", actions, methods=["POST"]),
    Route("/v1/query", query, methods=["POST"]),
    Route("/v1/decisions/{decision_id}", get_decision, methods=["GET"]),
    Route("/v1/decisions/{decision_id}/explanation", explain, methods=["GET"]),
]
