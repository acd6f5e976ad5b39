"""Policy routes: get, validate without applying, put (atomic swap), versions (each with its
text), roll back.

Checking a policy compiles it, which can take a second for a large one: it runs in a worker
thread, one validation at a time per process and one write (put, rollback) besides, so the
event loop (health checks, decisions, the gateway, OAuth) keeps answering meanwhile, and
validations queued by a read-only key never hold up a write.
"""

from __future__ import annotations

import contextlib
import logging

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.decide import Authorizer
from bastion.facts.store import FactStore
from bastion.policy.errors import PolicyError
from bastion.policy.limits import DEFAULT_LIMITS, PolicyLimits
from bastion.server.auth import require
from bastion.server.problems import Problem, bad_request, read_json, unprocessable
from bastion.server.problems import field as get_field
from bastion.server.replica import ConsistencyTimeout, Replica
from bastion.whole_numbers import count_in

log = logging.getLogger("bastion.policy")


def policy_problem(e: PolicyError, what: str = "the policy does not load") -> Problem:
    """A policy that does not load (or a question it cannot answer, ``what``): every
    diagnostic with its place."""
    diagnostics = [
        {
            "source": d.location.source,
            "line": d.location.line,
            "column": d.location.column,
            "message": d.message,
            "severity": d.severity,
        }
        for d in e.diagnostics
    ]
    return unprocessable(f"{what}; fix these: {e}", diagnostics=diagnostics)


def validate_policy(
    text: str, source: str, limits: PolicyLimits = DEFAULT_LIMITS, strict: bool = False
) -> list[str]:
    """Warnings of a policy that loads; `PolicyError` otherwise (with ``strict``, for a
    warning too). Checked on a fresh engine."""
    authz = Authorizer("", limits=limits)
    return [str(w) for w in authz.check_policy(text, source=source, strict=strict)]


def log_policy_warnings(what: str, warnings: list[str]) -> None:
    """Warn in the server's log of a policy stored by a way that answers no list of warnings
    (`policy_file` at start, Oso Cloud's `POST /api/policy`)."""
    for warning in warnings:
        log.warning("%s: %s", what, warning)


async def policy_warnings(
    request: Request, text: str, source: str, *, writing: bool = False, strict: bool = False
) -> list[str]:
    """`validate_policy` in a worker thread, one at a time (and one policy being written
    besides); a policy that does not load is a 422 listing every diagnostic. Strict when
    asked, or always with the setting ``policy_strict``, which a request cannot turn off."""
    state = request.app.state
    strict = strict or state.config.policy_strict
    # One compile at a time: a flood of large policies queues here, not in the thread pool that
    # the other routes need for their database calls. A write (put, rollback) has a turn of its
    # own, so that validations queued by a key that may only read cannot hold it up.
    name = "policy_write_compiles" if writing else "policy_compiles"
    compiling = getattr(state, name, None)
    if compiling is None:
        compiling = anyio.CapacityLimiter(1)
        setattr(state, name, compiling)
    limits = state.config.policy_limits()
    try:
        return await anyio.to_thread.run_sync(
            validate_policy, text, source, limits, strict, limiter=compiling
        )
    except PolicyError as e:
        raise policy_problem(e) from None


async def await_applied(request: Request, seq: int) -> None:
    replica: Replica = request.app.state.replica
    with contextlib.suppress(ConsistencyTimeout):
        await replica.wait_for(seq, request.app.state.config.consistency_timeout)


async def get_policy(request: Request) -> JSONResponse:
    await require(request, "policy:read")
    replica: Replica = request.app.state.replica
    store: FactStore = request.app.state.store
    current = await anyio.to_thread.run_sync(store.policy)
    if current is None:
        return JSONResponse({"version": None, "text": "", "source": None})
    return JSONResponse(
        {**current.summary(), "text": current.text, "applied": replica.policy_version}
    )


async def validate(request: Request) -> JSONResponse:
    await require(request, "policy:read")
    body = await read_json(request)
    text = get_field(body, "text", str)
    source = get_field(body, "source", str, required=False) or "policy.polar"
    strict = get_field(body, "strict", bool, required=False) or False
    warnings = await policy_warnings(request, text, source, strict=strict)
    return JSONResponse({"valid": True, "warnings": warnings})


async def put_policy(request: Request) -> JSONResponse:
    key = await require(request, "policy:write")
    body = await read_json(request)
    text = get_field(body, "text", str)
    source = get_field(body, "source", str, required=False) or "policy.polar"
    note = get_field(body, "note", str, required=False) or ""
    strict = get_field(body, "strict", bool, required=False) or False
    warnings = await policy_warnings(request, text, source, writing=True, strict=strict)
    store: FactStore = request.app.state.store
    version, seq = await anyio.to_thread.run_sync(
        lambda: store.put_policy(text, source=source, actor=key.principal, note=note)
    )
    request.app.state.metrics.writes.labels("policy").inc()
    await await_applied(request, seq)
    return JSONResponse({"version": version, "sequence": seq, "warnings": warnings})


async def versions(request: Request) -> JSONResponse:
    await require(request, "policy:read")
    store: FactStore = request.app.state.store
    found = await anyio.to_thread.run_sync(store.policy_versions)
    return JSONResponse({"versions": [v.summary() for v in found]})


# Policy versions are a PostgreSQL INTEGER: no stored one is larger.
_LAST_VERSION = 2**31 - 1


async def get_version(request: Request) -> JSONResponse:
    """A stored policy version with its text: what a decision record's ``policy_version``
    names, to read its rules against months later (versions are never deleted)."""
    await require(request, "policy:read")
    spelled = request.path_params["version"]
    store: FactStore = request.app.state.store
    found = None
    # Any other spelling (not digits, 0, past the largest) names no stored version either.
    version = count_in(spelled, _LAST_VERSION)
    if version is not None:
        found = await anyio.to_thread.run_sync(store.policy, version)
    if found is None:
        raise Problem(
            404,
            "Unknown policy version",
            f"there is no policy version {spelled!r}: versions are whole numbers from 1,"
            " listed by GET /v1/policy/versions",
        )
    return JSONResponse({**found.summary(), "text": found.text})


async def rollback(request: Request) -> JSONResponse:
    key = await require(request, "policy:write")
    body = await read_json(request)
    version = get_field(body, "version", int)
    if version < 1:
        raise bad_request(f"version must be a policy version (1 or more), got {version}")
    store: FactStore = request.app.state.store
    old = await anyio.to_thread.run_sync(store.policy, version)
    if old is None:
        raise Problem(404, "Unknown policy version", f"there is no policy version {version}")
    await policy_warnings(request, old.text, old.source, writing=True)
    new_version, seq = await anyio.to_thread.run_sync(
        lambda: store.rollback_policy(version, actor=key.principal)
    )
    request.app.state.metrics.writes.labels("policy").inc()
    await await_applied(request, seq)
    return JSONResponse({"version": new_version, "sequence": seq, "rolled_back_to": version})


routes = [
    Route("/v1/policy", get_policy, methods=["GET"]),
    Route("/v1/policy", put_policy, methods=["PUT"]),
    Route("/v1/policy/validate", validate, methods=["POST"]),
    Route("/v1/policy/versions", versions, methods=["GET"]),
    Route("/v1/policy/versions/{version}", get_version, methods=["GET"]),
    Route("/v1/policy/rollback", rollback, methods=["POST"]),
]
