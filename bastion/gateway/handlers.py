"""One handler per JSON-RPC method family: lifecycle, lists, tools, resources, prompts.

Each handler decides before it forwards and applies obligations before it answers. A handler
returns the ``result`` object or raises `RpcError` / `StepUp`; the transport frames the answer.
Holds for human approval (a later issue) slot in at `Enforcer.decide`, before forwarding.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bastion.facts.model import Entity
from bastion.gateway.enforce import Caller
from bastion.gateway.jsonrpc import INVALID_PARAMS, METHOD_NOT_FOUND, Message, RpcError
from bastion.gateway.masks import compile_paths, mask_result

if TYPE_CHECKING:
    from bastion.gateway.gateway import Gateway, UpstreamState

Progress = Callable[[dict[str, Any]], Awaitable[None]]
_tokens = itertools.count(1)
# The 2026-07-28 per-request envelope; bastion speaks the 2025-11-25 era upstream.
_ENVELOPE_PREFIX = "io.modelcontextprotocol/"
MODERN_VERSIONS = ("2026-07-28",)
LEGACY_VERSIONS = ("2025-11-25", "2025-06-18")


@dataclass
class Exchange:
    """One request being handled: who sent it, to which upstream, and where progress goes."""

    gateway: Gateway
    upstream: UpstreamState
    caller: Caller
    message: Message
    progress: Progress | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    _context: dict[str, Any] | None = None

    @property
    def server(self) -> str:
        return self.upstream.name

    def context(self, **extra: Any) -> dict[str, Any]:
        """The ``context`` the policy sees for this message, with ``extra`` (built once: every
        decision about one message sees the same time)."""
        if self._context is None:
            self._context = self.gateway.enforcer.context(
                self.caller, self.server, self.message.method or ""
            )
        return {**self._context, **extra} if extra else self._context

    async def forward(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send this request upstream (bastion's own connection) and return its result."""
        params = dict(self.message.params if params is None else params)
        meta = params.get("_meta")
        route = None
        if isinstance(meta, dict):
            meta = {k: v for k, v in meta.items() if not k.startswith(_ENVELOPE_PREFIX)}
            token = meta.get("progressToken")
            if token is not None and self.progress is not None:
                # Tokens are the client's; upstream they must be unique across all clients.
                route = f"bastion-{next(_tokens)}"
                meta["progressToken"] = route
                self.gateway.progress_routes[route] = (self.progress, token)
            elif token is not None:
                meta.pop("progressToken")
            if meta:
                params["_meta"] = meta
            else:
                params.pop("_meta")
        try:
            response = await self.upstream.upstream.request(self.message.method, params)
        finally:
            if route is not None:
                self.gateway.progress_routes.pop(route, None)
        if "error" in response:
            error = response["error"] if isinstance(response["error"], dict) else {}
            raise RpcError(
                int(error.get("code", -32603)),
                str(error.get("message", "upstream error")),
                error.get("data"),
            )
        result = response.get("result")
        return result if isinstance(result, dict) else {}


def _name(params: dict[str, Any], key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value:
        raise RpcError(INVALID_PARAMS, f"params.{key} must be a non-empty string", http_status=400)
    return value


def server_capabilities(ex: Exchange) -> dict[str, Any]:
    """The upstream's capabilities, less what bastion does not relay."""
    upstream = ex.upstream.upstream.init_result.get("capabilities") or {}
    passes = ex.gateway.config.pass_methods
    caps: dict[str, Any] = {}
    for key in ("tools", "prompts", "resources"):
        if key in upstream:
            caps[key] = dict(upstream[key] or {})
    if "resources" in caps and "resources/subscribe" not in passes:
        caps["resources"].pop("subscribe", None)
    if "completions" in upstream and "completion/complete" in passes:
        caps["completions"] = upstream["completions"]
    if "logging" in upstream and "logging/setLevel" in passes:
        caps["logging"] = upstream["logging"]
    return caps


# -- lifecycle ---------------------------------------------------------------------------------


async def initialize(ex: Exchange) -> dict[str, Any]:
    await ex.upstream.upstream.ensure_started()
    await ex.gateway.admit(ex, record=True)
    info = ex.upstream.upstream.init_result
    requested = ex.message.params.get("protocolVersion")
    version = requested if requested in LEGACY_VERSIONS else LEGACY_VERSIONS[0]
    result = {
        "protocolVersion": version,
        "capabilities": server_capabilities(ex),
        "serverInfo": info.get("serverInfo") or {"name": ex.server, "version": ""},
    }
    if info.get("instructions"):
        result["instructions"] = info["instructions"]
    ex.notes["protocol_version"] = version
    return result


async def discover(ex: Exchange) -> dict[str, Any]:
    await ex.upstream.upstream.ensure_started()
    await ex.gateway.admit(ex, record=True)
    info = ex.upstream.upstream.init_result
    result: dict[str, Any] = {
        "supportedVersions": list(MODERN_VERSIONS),
        "capabilities": server_capabilities(ex),
        "resultType": "complete",
        "_meta": {
            "io.modelcontextprotocol/serverInfo": info.get("serverInfo")
            or {"name": ex.server, "version": ""}
        },
    }
    if info.get("instructions"):
        result["instructions"] = info["instructions"]
    return result


async def ping(ex: Exchange) -> dict[str, Any]:
    return {}


# -- lists -------------------------------------------------------------------------------------

# method -> (key of the items, entity type, field naming the item)
LISTS = {
    "tools/list": ("tools", "Tool", "name"),
    "resources/list": ("resources", "McpResource", "uri"),
    "resources/templates/list": ("resourceTemplates", "McpResource", "uriTemplate"),
    "prompts/list": ("prompts", "Prompt", "name"),
}


async def list_items(ex: Exchange) -> dict[str, Any]:
    await ex.gateway.admit(ex)
    key, kind, field_name = LISTS[ex.message.method]
    result = await ex.forward()
    items = [i for i in result.get(key) or () if isinstance(i, dict)]
    if key == "tools":
        ex.upstream.learn_tools(items)
    entities = [Entity(kind, f"{ex.server}/{i.get(field_name, '')}") for i in items]
    shown = ex.gateway.enforcer.visible(ex.caller, entities, ex.context())
    result[key] = [item for item, ok in zip(items, shown, strict=True) if ok]
    return result


# -- tools, resources, prompts -----------------------------------------------------------------


async def _decide_and_forward(
    ex: Exchange, action: str, resource: Entity, extra: dict[str, Any], arguments: Any
) -> dict[str, Any]:
    enforcer = ex.gateway.enforcer
    await ex.gateway.admit(ex)
    verdict = await enforcer.decide(
        ex.caller, ex.server, ex.message.method, action, resource, ex.context(**extra), arguments
    )
    try:
        result = await ex.forward()
    except RpcError as e:
        enforcer.write(verdict.record, reason=f"upstream error {e.code}")
        raise
    except asyncio.CancelledError:
        enforcer.write(verdict.record, reason="cancelled by the client")
        raise
    masked = mask_result(result, compile_paths(verdict.obligations.masks))
    obligations = dict(verdict.record["obligations"])
    obligations["masked_fields"] = masked
    enforcer.write(verdict.record, obligations=obligations)
    return result


async def call_tool(ex: Exchange) -> dict[str, Any]:
    params = ex.message.params
    name = _name(params, "name")
    arguments = params.get("arguments") or {}
    if not isinstance(arguments, dict):
        raise RpcError(INVALID_PARAMS, "params.arguments must be an object", http_status=400)
    annotations = await ex.upstream.annotations(name)
    return await _decide_and_forward(
        ex,
        "call",
        Entity("Tool", f"{ex.server}/{name}"),
        {"tool": name, "arguments": arguments, "annotations": annotations},
        arguments,
    )


async def read_resource(ex: Exchange) -> dict[str, Any]:
    uri = _name(ex.message.params, "uri")
    return await _decide_and_forward(
        ex, "read", Entity("McpResource", f"{ex.server}/{uri}"), {"uri": uri}, None
    )


async def get_prompt(ex: Exchange) -> dict[str, Any]:
    params = ex.message.params
    name = _name(params, "name")
    arguments = params.get("arguments") or {}
    if not isinstance(arguments, dict):
        raise RpcError(INVALID_PARAMS, "params.arguments must be an object", http_status=400)
    return await _decide_and_forward(
        ex,
        "get",
        Entity("Prompt", f"{ex.server}/{name}"),
        {"prompt": name, "arguments": arguments},
        arguments,
    )


async def pass_through(ex: Exchange) -> dict[str, Any]:
    """Methods configured in ``gateway.pass_methods``: forwarded after the connect check."""
    await ex.gateway.admit(ex)
    return await ex.forward()


async def unknown(ex: Exchange) -> dict[str, Any]:
    raise RpcError(
        METHOD_NOT_FOUND,
        f"bastion does not forward {ex.message.method!r}; an administrator may list it in"
        " gateway.pass_methods",
    )


HANDLERS: dict[str, Callable[[Exchange], Awaitable[dict[str, Any]]]] = {
    "initialize": initialize,
    "server/discover": discover,
    "ping": ping,
    **dict.fromkeys(LISTS, list_items),
    "tools/call": call_tool,
    "resources/read": read_resource,
    "prompts/get": get_prompt,
}


def handler_for(method: str, pass_methods: tuple[str, ...]):
    if method in HANDLERS:
        return HANDLERS[method]
    return pass_through if method in pass_methods else unknown
