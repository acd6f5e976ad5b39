"""Users' connections to upstream MCP servers (scope ``connections``): list them, revoke one
(docs/identity.md, "Per-user credentials toward upstream servers"). Tokens are never shown."""

from __future__ import annotations

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.server.auth import require
from bastion.server.problems import Problem, bad_request

SCOPE = "connections"
MAX_NAME = 256


def _service(request: Request):
    connections = request.app.state.connections
    if connections is None:
        raise Problem(404, "No connections", 'no upstream is configured with auth = "per_user"')
    return connections


def _name(value: str | None, what: str) -> str | None:
    if value is not None and not (0 < len(value) <= MAX_NAME):
        raise bad_request(f"{what} must be 1 to {MAX_NAME} characters")
    return value


async def list_all(request: Request) -> JSONResponse:
    await require(request, SCOPE)
    subject = _name(request.query_params.get("subject"), "subject")
    upstream = _name(request.query_params.get("upstream"), "upstream")
    connections = request.app.state.connections
    found = (
        await anyio.to_thread.run_sync(lambda: connections.listed(subject, upstream))
        if connections is not None
        else []
    )
    return JSONResponse({"connections": [c.to_json() for c in found]})


async def revoke(request: Request) -> JSONResponse:
    """Revoke a user's connection here, and at the upstream's server where it can (404: none)."""
    key = await require(request, SCOPE)
    subject = _name(request.path_params["subject"], "subject")
    upstream = _name(request.path_params["upstream"], "upstream")
    if not await _service(request).revoke(subject, upstream, actor=f"key:{key.id}"):
        raise Problem(404, "Not connected", f"{subject!r} has no connection to {upstream!r}")
    return JSONResponse({"revoked": {"subject": subject, "upstream": upstream}})


routes = [
    Route("/v1/connections", list_all, methods=["GET"]),
    Route("/v1/connections/{subject}/{upstream}", revoke, methods=["DELETE"]),
]
