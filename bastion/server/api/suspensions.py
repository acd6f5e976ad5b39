"""Kill-switch routes (scope ``suspensions``): suspend an agent, a user or an MCP session, list
the suspensions, resume (docs/signals.md, `bastion.signals.suspensions`).

A suspension is stored durably and takes effect on every replica through the change log; the
answer comes once this replica applies it (bounded by ``consistency_timeout``), so a call this
replica serves after the answer is refused.
"""

from __future__ import annotations

import contextlib

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.facts.store import FactStore
from bastion.server.auth import require
from bastion.server.problems import Problem, bad_request, read_json, unprocessable
from bastion.server.problems import field as get_field
from bastion.server.replica import ConsistencyTimeout, Replica
from bastion.signals.suspensions import (
    MAX_ID_LENGTH,
    SCOPE,
    AlreadyOver,
    Suspension,
    SuspensionError,
    TooLong,
    resume,
    stored,
    suspend,
    suspension,
)

# The id as the OpenAPI document states it (`bastion.signals.suspensions.suspension` checks it).
ID_PATTERN = "^[!-~][ -~]*$"
__all__ = ["ID_PATTERN", "MAX_ID_LENGTH", "SCOPE", "routes"]


def _checked(kind: object, id: object, expires_at: object = None) -> Suspension:
    try:
        return suspension(kind, id, expires_at)  # type: ignore[arg-type]
    except (AlreadyOver, TooLong) as e:  # as of now: the document can state neither bound
        raise unprocessable(str(e)) from None
    except SuspensionError as e:
        raise bad_request(str(e)) from None


async def _applied(request: Request, seq: int) -> None:
    replica: Replica = request.app.state.replica
    # Committed either way; on a timeout the other replicas still apply it from the log.
    with contextlib.suppress(ConsistencyTimeout):
        await replica.wait_for(seq, request.app.state.config.consistency_timeout)


async def create(request: Request) -> JSONResponse:
    """Suspend: every gateway call of the agent, user or session is refused, its streams end,
    and the token endpoint issues it nothing (docs/signals.md says what else it covers)."""
    key = await require(request, SCOPE)
    body = await read_json(request)
    s = _checked(
        get_field(body, "kind", str),
        get_field(body, "id", str),
        get_field(body, "expires_at", (int, float), required=False),
    )
    store: FactStore = request.app.state.store
    result = await anyio.to_thread.run_sync(lambda: suspend(store, s, f"key:{key.id}"))
    await _applied(request, result.seq)
    return JSONResponse({"suspension": s.to_json(), "sequence": result.seq}, status_code=201)


async def list_all(request: Request) -> JSONResponse:
    await require(request, SCOPE)
    store: FactStore = request.app.state.store
    found = await anyio.to_thread.run_sync(lambda: stored(store))
    return JSONResponse({"suspensions": [s.to_json() for s in found]})


async def delete(request: Request) -> JSONResponse:
    """Resume: lift the suspension (404 when there is none)."""
    key = await require(request, SCOPE)
    s = _checked(request.path_params["kind"], request.path_params["id"])
    store: FactStore = request.app.state.store
    result = await anyio.to_thread.run_sync(lambda: resume(store, s, f"key:{key.id}"))
    if not result.deleted:
        raise Problem(404, "Not suspended", f"{s.kind} {s.id!r} is not suspended")
    await _applied(request, result.seq)
    return JSONResponse({"resumed": s.to_json(), "sequence": result.seq})


routes = [
    Route("/v1/suspensions", create, methods=["POST"]),
    Route("/v1/suspensions", list_all, methods=["GET"]),
    Route("/v1/suspensions/{kind}/{id:path}", delete, methods=["DELETE"]),
]
