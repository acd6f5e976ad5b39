"""Tool pins (scope ``tools``): the definitions of the tools of upstreams with ``pin_tools``,
what waits for review with a short diff, and accepting a definition (docs/gateway.md, "Tool
pins"; `bastion.gateway.tool_pins`)."""

from __future__ import annotations

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.gateway.tool_pins import PinError, ToolPins
from bastion.server.auth import require
from bastion.server.problems import Problem, bad_request, read_json
from bastion.server.problems import field as get_field

SCOPE = "tools"
MAX_NAME = 2048  # a tool's name, as gateway.max_name_chars allows by default
DIGEST_PATTERN = "^sha256:[0-9a-f]{64}$"


def _pins(request: Request) -> ToolPins:
    gateway = request.app.state.gateway
    if gateway is None or gateway.tool_pins is None:
        raise Problem(404, "No tool pins", "no upstream is configured with pin_tools")
    return gateway.tool_pins


def _name(value: str | None, what: str) -> str | None:
    if value is not None and not (0 < len(value) <= MAX_NAME):
        raise bad_request(f"{what} must be 1 to {MAX_NAME} characters")
    return value


async def list_all(request: Request) -> JSONResponse:
    """Every pinned or held tool (of one ``server``; only those waiting with ``pending=true``),
    each with its accepted definition and what waits for review, with a short diff."""
    await require(request, SCOPE)
    server = _name(request.query_params.get("server"), "server")
    pending = request.query_params.get("pending", "false")
    if pending not in ("true", "false"):
        raise bad_request("pending must be true or false")
    pins = _pins(request)
    found = await anyio.to_thread.run_sync(lambda: pins.listed(server, pending == "true"))
    return JSONResponse({"tools": [p.to_json() for p in found]})


async def accept(request: Request) -> JSONResponse:
    """Accept the definition of a tool that waits for review, named by its ``digest`` (the one
    the reviewer saw: one the upstream changed again since is refused, 409)."""
    key = await require(request, SCOPE)
    server = _name(request.path_params["server"], "server")
    tool = _name(request.path_params["tool"], "tool")
    body = await read_json(request)
    digest = get_field(body, "digest", str)
    pins = _pins(request)
    try:
        pin = await anyio.to_thread.run_sync(
            lambda: pins.accept(server, tool, digest, f"key:{key.id}")
        )
    except PinError as e:
        found = await anyio.to_thread.run_sync(lambda: pins.get(server, tool))
        raise Problem(404 if found is None else 409, "Not accepted", str(e)) from None
    request.app.state.gateway.tool_accepted(server, tool, pin.digest)
    return JSONResponse({"accepted": pin.to_json()})


routes = [
    Route("/v1/tools", list_all, methods=["GET"]),
    Route("/v1/tools/{server}/{tool:path}/accept", accept, methods=["POST"]),
]
