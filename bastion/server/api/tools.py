"""Tool pins (scope ``tools``): the definitions of the tools (prompts) of upstreams with
``pin_tools`` (``pin_prompts``), what waits for review with a short diff, and accepting a
definition (docs/gateway.md, "Tool pins"; `bastion.gateway.tool_pins`)."""

from __future__ import annotations

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.gateway.tool_pins import PROMPT, TOOL, PinError, ToolPins
from bastion.server.auth import require
from bastion.server.problems import Problem, bad_request, read_json
from bastion.server.problems import field as get_field

SCOPE = "tools"
# gateway.max_name_chars by default, as the OpenAPI document states it; the routes take the setting.
MAX_NAME = 2048
DIGEST_PATTERN = "^sha256:[0-9a-f]{64}$"


def _pins(request: Request) -> ToolPins:
    gateway = request.app.state.gateway
    if gateway is None or gateway.tool_pins is None:
        raise Problem(
            404, "No tool pins", "no upstream is configured with pin_tools or pin_prompts"
        )
    return gateway.tool_pins


def _name(request: Request, value: str | None, what: str) -> str | None:
    """A server's or a tool's (prompt's) name, as long as the gateway takes names
    (``gateway.max_name_chars``; asked once `_pins` found the gateway): one it could never have
    listed is malformed (400)."""
    most = request.app.state.gateway.config.max_name_chars
    if value is not None and not (0 < len(value) <= most):
        raise bad_request(f"{what} must be 1 to {most} characters")
    return value


def _list(kind: str):
    async def list_all(request: Request) -> JSONResponse:
        """Every pinned or held tool (prompt) (of one ``server``; only those waiting with
        ``pending=true``), each with its accepted definition and what waits for review, with a
        short diff."""
        await require(request, SCOPE)
        pins = _pins(request)
        server = _name(request, request.query_params.get("server"), "server")
        pending = request.query_params.get("pending", "false")
        if pending not in ("true", "false"):
            raise bad_request("pending must be true or false")
        found = await anyio.to_thread.run_sync(lambda: pins.listed(server, pending == "true", kind))
        return JSONResponse({f"{kind}s": [p.to_json() for p in found]})

    return list_all


def _accept(kind: str):
    async def accept(request: Request) -> JSONResponse:
        """Accept the definition of a tool (prompt) that waits for review, named by its
        ``digest`` (the one the reviewer saw: one the upstream changed again since is refused,
        409)."""
        key = await require(request, SCOPE)
        pins = _pins(request)
        server = _name(request, request.path_params["server"], "server")
        name = _name(request, request.path_params["name"], kind)
        body = await read_json(request)
        digest = get_field(body, "digest", str)
        try:
            pin = await anyio.to_thread.run_sync(
                lambda: pins.accept(server, kind, name, digest, f"key:{key.id}")
            )
        except PinError as e:
            found = await anyio.to_thread.run_sync(lambda: pins.get(server, kind, name))
            raise Problem(404 if found is None else 409, "Not accepted", str(e)) from None
        request.app.state.gateway.pin_accepted(server, kind, name, pin.digest)
        return JSONResponse({"accepted": pin.to_json()})

    return accept


routes = [
    route
    for kind in (TOOL, PROMPT)
    for route in (
        Route(f"/v1/{kind}s", _list(kind), methods=["GET"]),
        Route(f"/v1/{kind}s/{{server}}/{{name:path}}/accept", _accept(kind), methods=["POST"]),
    )
]
