"""Oso Cloud's HTTP API under ``/api``, as the official ``oso-cloud`` SDK (2.x) calls it.

Point ``Oso(url=<bastion>, api_key=<bastion API key>)`` at ``bastion serve``: ``authorize``,
``list``, ``actions``, ``get``/``insert``/``delete``/``batch`` of facts, ``policy``,
``get_policy_metadata`` and ``build_query(...).evaluate(...)`` are answered by the same decision
point, fact store and policy store as ``/v1``. The paths and JSON are those the SDK sends
(``oso_cloud/api.py``); answers hold exactly the fields the SDK's dataclasses take, and errors are
``{"message": ...}`` with the HTTP status, which the SDK raises as ``OsoException``. Writes answer
the ``OsoOffset`` header (their change-log sequence), which the SDK sends back on later requests:
a read then waits (bounded) until this replica has applied that write. See docs/oso-cloud.md.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion.decide import Authorizer
from bastion.facts.model import Entity, FactError, check_fact, matches
from bastion.facts.store import FactStore, StoredFact, WriteResult, check_entity_size, fact_key
from bastion.pdp.oso_cloud import VALUE_TYPES, value_of, value_to_oso
from bastion.pdp.oso_cloud import authorize as decide_authorize
from bastion.policy.errors import EvaluationLimit, PolicyError
from bastion.policy.parser import parse
from bastion.server.api.decisions import (
    OSO_CLOUD,
    compiled_first,
    fresh,
    known_type,
    observe_decision,
    record_decision,
    require_compiled,
)
from bastion.server.api.policy import (
    await_applied,
    log_policy_warnings,
    policy_problem,
    policy_warnings,
)
from bastion.server.auth import require, require_for_facts
from bastion.server.keys import ApiKey
from bastion.server.problems import (
    NOT_A_PAGE,
    Problem,
    bad_request,
    entity_type,
    parse_json,
    read_body,
    read_json,
    unprocessable,
)
from bastion.server.problems import action as action_field
from bastion.server.problems import field as get_field
from bastion.signals.suspensions import apply_facts, asks_allow
from bastion.untrusted_json import MAX_INTEGER
from bastion.whole_numbers import count_in

# API key scopes (bastion keys create --scope ...): decisions and reads of facts and policy;
# fact and policy writes. A key may hold both, as an Oso Cloud read-write key does.
READ = "oso:read"
WRITE = "oso:write"
OFFSET_HEADER = "OsoOffset"
# Set on an answer that is a refusal (allowed false, or no results) because the evaluation spent
# its budget, or because the kill switch holds the actor (`SUSPENDED`, docs/signals.md): the
# SDK's answers have no field for it.
REFUSAL_HEADER = "Bastion-Refusal"
SUSPENDED = "suspended"

Handler = Callable[[Request], Awaitable[Response]]
# Every path of Oso Cloud's API (this module's and `bastion.server.api.oso_agents`'s).
PREFIX = "/api/"


def serves(path: str) -> bool:
    """Whether ``path`` is Oso Cloud's API: its refusals, those made before a handler runs
    included (no such route, a body too large), are in Oso Cloud's form (`error`)."""
    return path.startswith(PREFIX)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Oso Cloud's error, ``{"message": ...}`` with the status: the SDK raises it as
    ``OsoException``, whose text carries it. It may quote what it was sent: never sniffed as
    a page (`NOT_A_PAGE`), as no other route family's error is."""
    headers = {**NOT_A_PAGE, **(headers or {})}
    return JSONResponse({"message": message}, status_code=status, headers=headers)


def refusal(status: int, detail: str) -> tuple[str, bytes]:
    """A refused request (`bastion.server.request_limits`) in Oso Cloud's form."""
    return "application/json", json.dumps({"message": detail}).encode()


def oso_errors(handler: Handler) -> Handler:
    """Errors as Oso Cloud gives them, ``{"message": ...}``, so the SDK's ``OsoException``
    carries the message (the status is the one ``/v1`` would answer)."""

    @functools.wraps(handler)
    async def answer(request: Request) -> Response:
        try:
            return await handler(request)
        except Problem as p:
            headers = {"WWW-Authenticate": "Bearer"} if p.status == 401 else None
            return error(p.status, p.detail, headers)

    return answer


# -- values ------------------------------------------------------------------------------------


def value_from_oso(obj: Any, where: str) -> Any:
    """A concrete value ``{"type": T, "id": str}``: a string, integer or boolean for the value
    types, an entity otherwise."""
    if not isinstance(obj, dict) or set(obj) != {"type", "id"}:
        raise bad_request(f'{where} must be {{"type": str, "id": str}}, got {obj!r}')
    type_, id_ = obj["type"], obj["id"]
    if not isinstance(type_, str) or not type_ or not isinstance(id_, str):
        raise bad_request(f'{where} must be {{"type": str, "id": str}}, got {obj!r}')
    return _typed(type_, id_, where)


def _typed(type_: str, id_: str, where: str) -> Any:
    """The value ``type_`` and ``id_`` name (`value_of`); 422 naming ``where`` if none."""
    try:
        return value_of(type_, id_)
    except ValueError as e:
        raise unprocessable(f"{where}: {e}") from None


def _oso_id(value: Any) -> str:
    return value_to_oso(value)["id"]


def _of_type(value: Any, type_: str | None) -> bool:
    if type_ is None:
        return True
    kind = VALUE_TYPES.get(type_)
    if kind is None:
        return isinstance(value, Entity) and value.type == type_
    return type(value) is kind


def _fact_from_oso(authz: Authorizer, obj: Any, where: str) -> tuple:
    """A concrete fact ``{"predicate", "args": [value...]}``, checked against the policy."""
    if not isinstance(obj, dict) or not isinstance(obj.get("args"), list):
        raise bad_request(f'{where} must be {{"predicate": str, "args": [...]}}')
    predicate = obj.get("predicate")
    if not isinstance(predicate, str):
        raise bad_request(f"{where}: the predicate must be a string")
    args = [value_from_oso(a, f"{where}.args[{i}]") for i, a in enumerate(obj["args"])]
    try:
        return authz.facts.validate((predicate, *args))
    except FactError as e:
        raise unprocessable(f"{where}: {e}") from None


class Pattern:
    """A fact pattern as the SDK sends it: per argument a value, a type (``ValueOfType``) or
    anything (``None``). The store matches values; types are checked on what it returns."""

    __slots__ = ("fact", "types", "where")

    def __init__(self, fact: tuple, types: tuple[str | None, ...], where: str) -> None:
        self.fact = fact
        self.types = types
        self.where = where

    @classmethod
    def parse(cls, predicate: Any, args: list[tuple[Any, Any]], where: str) -> Pattern:
        if not isinstance(predicate, str) or not predicate.isidentifier():
            raise unprocessable(f"{where}: the predicate must be an identifier, got {predicate!r}")
        values, types = [], []
        for i, (type_, id_) in enumerate(args):
            at = f"{where}.args[{i}]"
            if type_ is not None and (not isinstance(type_, str) or not type_):
                raise bad_request(f"{at}: the type must be a non-empty string or null")
            if id_ is not None and not isinstance(id_, str):
                raise bad_request(f"{at}: the id must be a string or null")
            if id_ is not None and type_ is None:
                raise unprocessable(f"{at}: an id needs its type")
            values.append(None if id_ is None else _typed(type_, id_, at))
            types.append(type_ if id_ is None else None)
        try:
            fact = check_fact((predicate, *values), pattern=True)
        except FactError as e:
            raise unprocessable(f"{where}: {e}") from None
        return cls(fact, tuple(types), where)

    def fits(self, fact: tuple) -> bool:
        return all(_of_type(v, t) for v, t in zip(fact[1:], self.types, strict=True))

    @property
    def typed(self) -> bool:
        return any(t is not None for t in self.types)


def _uses(authz: Authorizer) -> str:
    """The facts the policy in force uses, for a refusal that names what it does not."""
    uses = sorted(f"{n}/{a}" for n, a in authz.policy.program.fact_signatures)
    return f"it uses {', '.join(uses) or 'no facts'}"


def _unused(authz: Authorizer, store: FactStore, pattern: Pattern) -> Problem | None:
    """The refusal of a delete that no fact the policy uses could match (a predicate and arity
    it has no use for, as a misspelt predicate or arguments left off as ``get`` allows but a
    delete does not; an entity type it does not declare) and that matches no stored fact: it
    would answer success and delete nothing. One that matches stored facts (of an earlier
    policy, or the kill switch's, kept whatever the policy says) is let through. Does I/O: call
    from a worker thread."""
    name, arity = pattern.fact[0], len(pattern.fact) - 1
    declared = authz.entity_types
    if (name, arity) not in authz.policy.program.fact_signatures:
        why = f"the policy has no use for {name}/{arity} facts"
        fix = f"{_uses(authz)}; a delete names every argument, None for any"
    else:
        types = {v.type for v in pattern.fact[1:] if isinstance(v, Entity)}
        types |= {t for t in pattern.types if t is not None and t not in VALUE_TYPES}
        unknown = sorted(t for t in types if declared and t not in declared)
        if not unknown:
            return None
        why = f"the policy declares no entity type {', '.join(map(repr, unknown))}"
        fix = f"declared types: {', '.join(sorted(declared))}"
    if next(_stored(store, pattern), None) is not None:
        return None
    return unprocessable(f"{pattern.where}: {why} and no stored fact matches ({fix})")


def _matching(store: FactStore, pattern: Pattern, limit: int) -> list[StoredFact]:
    """Stored facts that fit ``pattern``; `Problem` 422 past ``limit`` (never a silent cut).
    Does I/O: call from a worker thread."""
    found: list[StoredFact] = []
    for fact in _stored(store, pattern):
        found.append(fact)
        if len(found) > limit:
            raise unprocessable(
                f"more than {limit} {pattern.fact[0]} facts match (oso_api_max_results); give"
                " more of the arguments"
            )
    return found


def _stored(store: FactStore, pattern: Pattern) -> Iterator[StoredFact]:
    """Stored facts that fit ``pattern``, read a page at a time. Does I/O."""
    after = ""
    while True:
        page = store.get(pattern.fact, after=after, limit=1000)
        yield from (f for f in page if pattern.fits(f.fact))
        if len(page) < 1000:
            return
        after = fact_key(page[-1].fact)


# -- requests ----------------------------------------------------------------------------------


async def _replica(request: Request) -> Any:
    """The replica, at least as fresh as the write the SDK's ``OsoOffset`` names."""
    offset = request.headers.get(OFFSET_HEADER)
    body: dict = {}
    if offset is not None:
        sequence = count_in(offset, MAX_INTEGER, least=0)
        if sequence is None:
            raise bad_request(f"the {OFFSET_HEADER} header must be a sequence a write returned")
        body["at_least"] = sequence
    return await fresh(request, body)


def _context_facts(request: Request, authz: Authorizer, body: dict) -> list[tuple]:
    raw = get_field(body, "context_facts", list, required=False) or []
    most = request.app.state.config.oso_api_max_context_facts
    if len(raw) > most:
        raise unprocessable(
            f"at most {most} context facts per request (oso_api_max_context_facts), got {len(raw)}"
        )
    return [_fact_from_oso(authz, f, f"context_facts[{i}]") for i, f in enumerate(raw)]


def _entity(body: dict, type_field: str, id_field: str) -> Any:
    type_ = get_field(body, type_field, str)
    id_ = get_field(body, id_field, str)
    if not type_:
        raise bad_request(f"the field {type_field!r} must not be empty")
    # The decision log keeps the actor and resource whole: none that no fact could hold.
    where = f"{type_field}/{id_field}"
    try:
        check_entity_size(type_, id_)
    except FactError as e:
        raise bad_request(f"{where}: {e}") from None
    return _typed(type_, id_, where)


def _checked(authz: Authorizer, value: Any, name: str) -> None:
    if isinstance(value, Entity):
        known_type(authz, value, name)


def _json(body: Any, *, refused: str | None = None, offset: int | None = None) -> JSONResponse:
    headers = {}
    if refused:
        headers[REFUSAL_HEADER] = refused
    if offset is not None:
        headers[OFFSET_HEADER] = str(offset)
    return JSONResponse(body, headers=headers or None)


def _behavior(request: Request, actor: Any, resource: Any) -> dict | None:
    """``context.behavior`` for the actor (its user and agent figures, and those of the
    resource's id as its tool), as `bastion.server.api.oso_agents` counts them."""
    behavior = request.app.state.behavior
    if behavior is None:
        return None
    actor_id = _oso_id(actor)
    return {"behavior": behavior.view(actor_id, actor_id, _oso_id(resource))}


# -- decisions ---------------------------------------------------------------------------------


def _record(
    request: Request, key: ApiKey, kind: str, req: dict, result: Any, refused: str | None
) -> None:
    """Keep a decision of Oso Cloud's API (`record_decision`), with why it was refused
    otherwise than by the policy, if it was."""
    record_decision(
        request,
        key,
        kind,
        req,
        result,
        refusal={"reason": refused} if refused else None,
        api=OSO_CLOUD,
    )


@oso_errors
async def authorize(request: Request) -> Response:
    key = await require(request, READ)
    body = await read_json(request)
    replica = await _replica(request)
    authz: Authorizer = replica.authz
    actor = _entity(body, "actor_type", "actor_id")
    action = action_field(body)
    resource = _entity(body, "resource_type", "resource_id")
    _checked(authz, actor, "actor_type")
    _checked(authz, resource, "resource_type")
    facts = _context_facts(request, authz, body)
    context = _behavior(request, actor, resource)
    if context is not None:
        await request.app.state.behavior.prepare(context["behavior"])
    started = time.perf_counter()
    refused = None
    if replica.suspensions.holds(actor):
        allowed, refused = False, SUSPENDED  # the kill switch, before the policy
    else:
        allowed, refused = decide_authorize(authz, actor, action, resource, context, facts)
    observe_decision(request, "authorize", started, "allow" if allowed else "deny")
    req = {"actor": value_to_oso(actor), "action": action, "resource": value_to_oso(resource)}
    if facts:
        req["context_facts"] = len(facts)
    _record(request, key, "authorize", req, allowed, refused)
    return _json({"allowed": allowed}, refused=refused)


@oso_errors
async def list_resources(request: Request) -> Response:
    key = await require(request, READ)
    body = await read_json(request)
    replica = await _replica(request)
    authz: Authorizer = replica.authz
    actor = _entity(body, "actor_type", "actor_id")
    _checked(authz, actor, "actor_type")
    action = action_field(body)
    resource_type = entity_type(body, "resource_type")
    known_type(authz, resource_type, "resource_type")
    most = request.app.state.config.oso_api_max_results
    page_size = get_field(body, "page_size", int, required=False)
    page_size = most if page_size is None else page_size
    if page_size < 1:
        raise bad_request(f"page_size must be 1 or more, got {page_size}")
    page_size = min(page_size, most)
    token = get_field(body, "page_token", str, required=False) or ""
    facts = _context_facts(request, authz, body)
    started = time.perf_counter()
    refused = None
    if replica.suspensions.holds(actor):
        ids, refused = [], SUSPENDED
    else:
        try:
            ids = authz.list(actor, action, resource_type, facts=facts)
        except EvaluationLimit as over:
            ids, refused = [], over.reason
    observe_decision(request, "list", started, "allow" if ids else "deny")
    start = bisect.bisect_right(ids, token) if token else 0
    page = ids[start : start + page_size]
    more = bool(page) and page[-1] != ids[-1]
    req = {"actor": value_to_oso(actor), "action": action, "resource_type": resource_type}
    _record(request, key, "list", req, {"count": len(ids)}, refused)
    return _json({"results": page, "next_page_token": page[-1] if more else None}, refused=refused)


@oso_errors
async def actions(request: Request) -> Response:
    key = await require(request, READ)
    body = await read_json(request)
    replica = await _replica(request)
    authz: Authorizer = replica.authz
    actor = _entity(body, "actor_type", "actor_id")
    resource = _entity(body, "resource_type", "resource_id")
    _checked(authz, actor, "actor_type")
    _checked(authz, resource, "resource_type")
    facts = _context_facts(request, authz, body)
    started = time.perf_counter()
    refused = None
    if replica.suspensions.holds(actor):
        found, refused = [], SUSPENDED
    else:
        try:
            found = sorted(authz.actions(actor, resource, facts=facts))
        except EvaluationLimit as over:
            found, refused = [], over.reason
    observe_decision(request, "actions", started, "allow" if found else "deny")
    req = {"actor": value_to_oso(actor), "resource": value_to_oso(resource)}
    _record(request, key, "actions", req, found, refused)
    return _json({"results": found}, refused=refused)


@oso_errors
async def evaluate_query(request: Request) -> Response:
    """``build_query(...).and_(...).in_(...).evaluate(...)``: a conjunction of calls over typed
    variables, answered as one row per solution (variable id -> value id)."""
    key = await require(request, READ)
    body = await read_json(request)
    return await compiled_first(
        functools.partial(_replica, request), functools.partial(_query, request, key, body)
    )


def _query(request: Request, key: ApiKey, body: dict, replica: Any) -> Response:
    authz: Authorizer = replica.authz
    calls = [_call(get_field(body, "predicate", list), "predicate")]
    for i, call in enumerate(get_field(body, "calls", list, required=False) or []):
        calls.append(_call(call, f"calls[{i}]"))
    constraints = _constraints(get_field(body, "constraints", dict, required=False) or {})
    for name, args in calls:
        if not authz.defines(name, len(args)):
            raise unprocessable(f"the policy defines no {name}/{len(args)}")
        for var in args:
            if var not in constraints:
                raise unprocessable(f"{name}: the variable {var!r} has no entry in 'constraints'")
    facts = _context_facts(request, authz, body)
    most = request.app.state.config.oso_api_max_results
    started = time.perf_counter()
    refused = None
    suspensions = replica.suspensions
    # The actor of every allow/3 call: given and held, no answer; left open, its held values out.
    actors = [args[0] for name, args in calls if asks_allow(name, len(args))]
    given = [v for var in actors if _single(v := constraints[var][1])]
    try:
        if any(suspensions.holds_value(next(iter(v))) for v in given):
            rows, refused = [], SUSPENDED  # the kill switch, before the policy
        else:
            require_compiled(authz, _shapes(calls, constraints))
            with authz.session(None, facts=facts) as session:
                rows = _solve(session, calls, constraints, most)
            rows = [r for r in rows if not any(suspensions.holds_value(r[v]) for v in actors)]
    except EvaluationLimit as over:
        rows, refused = [], over.reason
    except PolicyError as e:
        raise policy_problem(e, "the policy in force cannot answer this query") from None
    observe_decision(request, "query", started, "allow" if rows else "deny")
    req = {"predicate": calls[0][0], "calls": len(calls)}
    _record(request, key, "query", req, len(rows), refused)
    out = [{var: _oso_id(row[var]) for var in constraints if var in row} for row in rows]
    return _json({"results": out}, refused=refused)


def _call(obj: Any, where: str) -> tuple[str, list[str]]:
    if (
        not isinstance(obj, list)
        or len(obj) != 2
        or not isinstance(obj[0], str)
        or not isinstance(obj[1], list)
        or not all(isinstance(v, str) for v in obj[1])
    ):
        raise bad_request(f"{where} must be [predicate, [variable ids]]")
    return obj[0], obj[1]


def _constraints(raw: dict) -> dict[str, tuple[str, frozenset | None]]:
    """variable id -> (type, the values it may take or None). The values are a set: each row
    of the join is checked against them, and a list of tens of thousands of ids searched once
    per row held the event loop for seconds. (One type per variable: no ``True`` beside
    ``1`` in a set.)"""
    out = {}
    for var, c in raw.items():
        where = f"constraints.{var}"
        if not isinstance(c, dict) or not isinstance(c.get("type"), str) or not c["type"]:
            raise bad_request(f'{where} must be {{"type": str, "ids": [str] | null}}')
        ids = c.get("ids")
        if ids is not None and (
            not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)
        ):
            raise bad_request(f"{where}.ids must be a list of strings or null")
        values = None if ids is None else frozenset(_typed(c["type"], i, where) for i in ids)
        out[var] = (c["type"], values)
    return out


def _shapes(calls: list, constraints: dict) -> list[tuple[str, str]]:
    """The shape of question (`Session.rows`) of each call as `_solve` asks it: a variable that
    an earlier call binds, or that has exactly one allowed value, is given; the others open."""
    shapes, known = [], set()
    for name, args in calls:
        mask = "".join("b" if var in known or _single(constraints[var][1]) else "f" for var in args)
        shapes.append((name, mask))
        known.update(args)
    return shapes


def _single(values: frozenset | None) -> bool:
    return values is not None and len(values) == 1


def _solve(session: Any, calls: list, constraints: dict, most: int) -> list[dict]:
    """Join the calls left to right: each binds what earlier ones left open (`_shapes`)."""
    rows: list[dict] = [{}]
    for (name, args), (_, mask) in zip(calls, _shapes(calls, constraints), strict=True):
        grown = []
        for row in rows:
            bound = [
                row[var] if var in row else next(iter(constraints[var][1]))
                for var, m in zip(args, mask, strict=True)
                if m == "b"
            ]
            open_vars = [v for v, m in zip(args, mask, strict=True) if m == "f"]
            for hit in session.rows(name, mask, *bound):
                values_ = (hit,) if len(open_vars) == 1 else hit
                new = dict(row)
                for var, m, given in zip(args, mask, _given(mask, bound), strict=True):
                    if m == "b" and var not in new:
                        new[var] = given
                ok = True
                for var, value in zip(open_vars, values_, strict=True):
                    type_, allowed = constraints[var]
                    if (
                        (var in new and new[var] != value)
                        or not _of_type(value, type_)
                        or (allowed is not None and value not in allowed)
                    ):
                        ok = False
                        break
                    new[var] = value
                if ok:
                    grown.append(new)
            if len(grown) > most:
                raise unprocessable(
                    f"the query has more than {most} results (oso_api_max_results); constrain"
                    " it further"
                )
        rows = grown
    # Distinct solutions, in a stable order.
    seen: dict[tuple, dict] = {}
    for row in rows:
        seen.setdefault(tuple(sorted((k, repr(v)) for k, v in row.items())), row)
    return [seen[k] for k in sorted(seen)]


def _given(mask: str, bound: list) -> list:
    """``bound`` spread over the positions of ``mask`` (None where open)."""
    it = iter(bound)
    return [next(it) if m == "b" else None for m in mask]


# -- facts -------------------------------------------------------------------------------------


@oso_errors
async def get_facts(request: Request) -> Response:
    """``oso.get((predicate, ...))``: ``predicate`` and ``args.<i>.type`` / ``args.<i>.id`` in
    the query string; arguments past the last one given are anything, so every arity the
    policy uses for the predicate is searched."""
    await require(request, READ)
    replica = await _replica(request)
    params = request.query_params
    predicate = params.get("predicate")
    given: dict[int, list] = {}
    for key, value in params.multi_items():
        parts = key.split(".")
        if key == "predicate" or key == "version":
            continue
        if len(parts) != 3 or parts[0] != "args" or parts[2] not in ("type", "id"):
            raise bad_request(f"unknown query parameter {key!r}")
        position = count_in(parts[1], 32, least=0)
        if position is None:
            raise bad_request(f"{key!r}: the argument number must be 0 to 32")
        if parts[2] == "type" and not value:
            raise bad_request(f"{key!r}: a type is not empty")
        given.setdefault(position, [None, None])[parts[2] == "id"] = value
    if predicate is None:
        raise bad_request("the query parameter 'predicate' is required")
    authz: Authorizer = replica.authz
    arities = sorted(
        n
        for (name, n) in authz.policy.program.fact_signatures
        if name == predicate and n > max(given, default=-1)
    )
    if not arities:
        # Answered [] before, which an application reads as "no such fact".
        least = max(given, default=-1) + 1
        raise unprocessable(
            f"the policy has no use for {predicate} facts of {least} or more arguments"
            f" ({_uses(authz)})"
        )
    patterns = [
        Pattern.parse(predicate, [tuple(given.get(i, (None, None))) for i in range(n)], "fact")
        for n in arities
    ]
    store: FactStore = request.app.state.store
    most = request.app.state.config.oso_api_max_results

    def read() -> list[StoredFact]:
        found: list[StoredFact] = []
        for p in patterns:
            found += _matching(store, p, most - len(found))
        return found

    found = await anyio.to_thread.run_sync(read)
    return _json(
        [{"predicate": f.fact[0], "args": [value_to_oso(a) for a in f.fact[1:]]} for f in found]
    )


@oso_errors
async def batch(request: Request) -> Response:
    """``insert``, ``delete`` and ``with oso.batch()``: changesets applied in order, as one
    transaction (a delete after an insert takes that insert back)."""
    key = await require(request, WRITE)
    raw = await _json_array(request)
    # As /v1 writes: checked against the policy in force, whatever the replica's freshness.
    authz: Authorizer = request.app.state.replica.authz
    # In a worker thread: a body's deletes are matched against its inserts so far, which a
    # body of wildcard deletes after many inserts makes long.
    inserts, patterns = await anyio.to_thread.run_sync(_changesets, authz, raw)
    if not inserts and not patterns:
        return _json({"message": "success"})  # nothing to change: no write
    store: FactStore = request.app.state.store
    most = request.app.state.config.oso_api_max_results

    def write() -> WriteResult:
        # In the worker thread: a batch may hold many facts.
        require_for_facts(key, itertools.chain(inserts, (p.fact for p in patterns)))
        for p in patterns:
            if (refused := _unused(authz, store, p)) is not None:
                raise refused
        typed = [p for p in patterns if p.typed]

        def found() -> list[tuple]:
            # The store matches values only: a typed wildcard deletes the facts found, looked
            # for under the write's lock, so that none committed before the batch is missed.
            return [f.fact for p in typed for f in _matching(store, p, most)]

        deletes = [p.fact for p in patterns if not p.typed]
        return apply_facts(
            store, list(inserts.values()), deletes, key.principal, found if typed else None
        )

    try:
        result = await anyio.to_thread.run_sync(write)
    except FactError as e:  # a fact too large to store (`bastion.facts.store.MAX_FACT_KEY`)
        raise unprocessable(str(e)) from None
    request.app.state.metrics.writes.labels("facts").inc()
    await await_applied(request, result.seq)
    return _json({"message": "success"}, offset=result.seq)


def _changesets(authz: Authorizer, raw: list) -> tuple[dict[tuple, StoredFact], list[Pattern]]:
    """The facts a batch inserts (less those its later deletes take back) and the patterns it
    deletes; `Problem` 400 or 422 naming the first changeset that cannot be read."""
    inserts: dict[tuple, StoredFact] = {}
    patterns: list[Pattern] = []
    for i, changeset in enumerate(raw):
        if not isinstance(changeset, dict) or len(changeset) != 1:
            raise bad_request(f'[{i}] must be {{"inserts": [...]}} or {{"deletes": [...]}}')
        if "inserts" in changeset and isinstance(changeset["inserts"], list):
            for j, obj in enumerate(changeset["inserts"]):
                fact = _fact_from_oso(authz, obj, f"[{i}].inserts[{j}]")
                inserts[fact] = StoredFact(fact)
        elif "deletes" in changeset and isinstance(changeset["deletes"], list):
            for j, obj in enumerate(changeset["deletes"]):
                pattern = _pattern_from_json(obj, f"[{i}].deletes[{j}]")
                patterns.append(pattern)
                if None not in pattern.fact:  # one fact, named whole: no need to look further
                    named = inserts.get(pattern.fact)
                    # (True and 1 are one key of a dict, and not one value of a fact.)
                    if named is not None and _fits(named.fact, pattern):
                        del inserts[pattern.fact]
                    continue
                for fact in [f for f in inserts if _fits(f, pattern)]:
                    del inserts[fact]
        else:
            raise bad_request(f'[{i}] must be {{"inserts": [...]}} or {{"deletes": [...]}}')
    return inserts, patterns


def _fits(fact: tuple, pattern: Pattern) -> bool:
    return matches(fact, pattern.fact) and pattern.fits(fact)


def _pattern_from_json(obj: Any, where: str) -> Pattern:
    if not isinstance(obj, dict) or not isinstance(obj.get("args"), list):
        raise bad_request(f'{where} must be {{"predicate": str, "args": [...]}}')
    args = []
    for i, a in enumerate(obj["args"]):
        if not isinstance(a, dict) or not set(a) <= {"type", "id"}:
            raise bad_request(f'{where}.args[{i}] must be {{"type": str|null, "id": str|null}}')
        args.append((a.get("type"), a.get("id")))
    return Pattern.parse(obj.get("predicate"), args, where)


async def _json_array(request: Request) -> list:
    body = await read_body(request)
    request.state.body_size = len(body)
    value = parse_json(body or b"null", request.app.state.config.max_json_depth)
    if not isinstance(value, list):
        raise bad_request("the body must be a JSON array of changesets")
    return value


# -- policy ------------------------------------------------------------------------------------


@oso_errors
async def get_policy(request: Request) -> Response:
    await require(request, READ)
    store: FactStore = request.app.state.store
    current = await anyio.to_thread.run_sync(store.policy)
    if current is None:
        return _json({"policy": None})
    return _json({"policy": {"filename": current.source, "src": current.text}})


@oso_errors
async def post_policy(request: Request) -> Response:
    key = await require(request, WRITE)
    body = await read_json(request)
    text = get_field(body, "src", str)
    source = get_field(body, "filename", str, required=False) or "policy.polar"
    warnings = await policy_warnings(request, text, source, writing=True)
    store: FactStore = request.app.state.store
    version, seq = await anyio.to_thread.run_sync(
        lambda: store.put_policy(text, source=source, actor=key.principal, note="oso-cloud SDK")
    )
    request.app.state.metrics.writes.labels("policy").inc()
    await await_applied(request, seq)
    # The SDK reads the answer as {"message"} alone (a field more fails it): the warnings, which
    # `PUT /v1/policy` answers as a list, are told in the message, and logged as at start.
    message = f"policy version {version} in force"
    if warnings:
        log_policy_warnings(f"policy version {version} (oso-cloud SDK)", warnings)
        message += f" with {len(warnings)} warning(s):\n" + "\n".join(warnings)
    return _json({"message": message}, offset=seq)


@oso_errors
async def policy_metadata(request: Request) -> Response:
    """Roles, permissions and relations of each resource block of the policy in force."""
    await require(request, READ)
    if request.query_params.get("version"):
        # The SDK sends none: metadata is of the policy in force only.
        raise bad_request("only the policy in force has metadata: leave 'version' out")
    replica = await _replica(request)
    sources = replica.authz.policy.sources
    resources = await anyio.to_thread.run_sync(_metadata, sources)
    return _json({"metadata": {"resources": resources}})


def _metadata(sources: list[tuple[str, str]]) -> dict:
    resources: dict[str, dict] = {}
    for name, text in sources:
        for block in parse(text, name).blocks:
            if block.kind == "global" or block.name is None:
                continue
            resources[block.name] = {
                "roles": sorted(block.roles),
                "permissions": sorted(block.permissions),
                "relations": {r: t for r, (t, _) in sorted(block.relations.items())},
            }
    return resources


# -- what bastion does not serve ---------------------------------------------------------------


@oso_errors
async def local_only(request: Request) -> Response:
    """Local authorization turns a question into SQL over the application's own database,
    which bastion cannot see: refused with a message (404: bastion has no such operation),
    never a silent wrong answer."""
    await require(request, READ)
    raise Problem(
        404,
        "Not served",
        f"{request.url.path}: local authorization (the *_local methods, data bindings) is not"
        " served by bastion; use authorize, list, actions or build_query(...).evaluate()",
    )


routes = [
    Route("/api/authorize", authorize, methods=["POST"]),
    Route("/api/list", list_resources, methods=["POST"]),
    Route("/api/actions", actions, methods=["POST"]),
    Route("/api/evaluate_query", evaluate_query, methods=["POST"]),
    Route("/api/facts", get_facts, methods=["GET"]),
    Route("/api/batch", batch, methods=["POST"]),
    Route("/api/policy", get_policy, methods=["GET"]),
    Route("/api/policy", post_policy, methods=["POST"]),
    Route("/api/policy_metadata", policy_metadata, methods=["GET"]),
    *(
        Route(f"/api/{name}", local_only, methods=["POST"])
        for name in ("authorize_query", "list_query", "actions_query", "evaluate_query_local")
    ),
]
