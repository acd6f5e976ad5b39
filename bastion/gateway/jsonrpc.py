"""JSON-RPC 2.0 messages as the gateway reads and writes them (the MCP base protocol).

Messages stay plain dicts end to end (no model round trip on the hot path); this module checks
their shape once, on the way in, and builds the error responses the gateway sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bastion.json_encoding import compact

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Implementation-defined server errors (-32000..-32099).
UPSTREAM_UNAVAILABLE = -32000
REFUSED_BY_POLICY = -32003
RATE_LIMITED = -32004
SESSION_NOT_FOUND = -32005
# A rate limit applies but its shared counters (Redis) cannot be reached: refused.
RATE_LIMIT_UNAVAILABLE = -32006
# The facts have not been confirmed current within max_staleness_seconds: refused.
FACTS_STALE = -32007
# The call, or its result, waits for people (docs/approvals.md): retry once it is answered.
APPROVAL_PENDING = -32008
# MCP 2025-11-25: the request needs the URL elicitation in ``data.elicitations`` completed first.
URL_ELICITATION_REQUIRED = -32042
# The MCP protocol versions bastion speaks to clients: the stateless era, and the session era.
MODERN_VERSIONS = ("2026-07-28",)
LEGACY_VERSIONS = ("2025-11-25", "2025-06-18")
# MCP 2026-07-28.
HEADER_MISMATCH = -32020
UNSUPPORTED_PROTOCOL_VERSION = -32022

RequestId = str | int

# MCP's log levels (RFC 5424 severities), least severe first.
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")

# Compact JSON, in bytes, for every message bastion writes: json's text, by orjson (`compact`).
encode = compact()


@dataclass(slots=True, eq=False)
class RpcError(Exception):
    """A JSON-RPC error to send back; ``http_status`` is the status of the HTTP response.

    Not frozen, as no exception dataclass of the gateway is: Python sets attributes of an
    exception as it travels (``__traceback__`` when it passes through a ``with`` of a generator's
    context manager, ``__notes__``), and a frozen dataclass with slots turned each of those into
    a TypeError that replaced the error. ``eq=False``: compared and hashed as itself."""

    code: int
    message: str
    data: dict[str, Any] | None = None
    http_status: int = 200

    def body(self, request_id: RequestId | None) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return {"jsonrpc": "2.0", "id": request_id, "error": error}


def error_parts(error: Any, code: int, message: str) -> tuple[int, str, Any]:
    """The code, message and data of an error object someone else wrote (any JSON): its code
    where it is an integer and its message where it is text, else ``code`` and ``message``."""
    fields = error if isinstance(error, dict) else {}
    given, text = fields.get("code"), fields.get("message")
    return (
        given if isinstance(given, int) and not isinstance(given, bool) else code,
        text if isinstance(text, str) and text else message,
        fields.get("data"),
    )


@dataclass(frozen=True, slots=True)
class Message:
    """One inbound JSON-RPC message: a request (has an id), a notification, or a response."""

    raw: dict[str, Any]
    method: str | None
    id: RequestId | None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def is_request(self) -> bool:
        return self.method is not None and "id" in self.raw

    @property
    def is_notification(self) -> bool:
        return self.method is not None and "id" not in self.raw


def parse_message(value: Any) -> Message:
    """Check one decoded message; raise `RpcError` naming what is wrong with it."""
    if not isinstance(value, dict):
        raise RpcError(INVALID_REQUEST, "a JSON-RPC message must be a JSON object", http_status=400)
    if value.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, 'the message must carry "jsonrpc": "2.0"', http_status=400)
    request_id = value.get("id")
    if "id" in value and (
        isinstance(request_id, bool) or not isinstance(request_id, RequestId) or request_id is None
    ):
        raise RpcError(INVALID_REQUEST, "id must be a string or an integer", http_status=400)
    method = value.get("method")
    if method is None:
        if "id" in value and ("result" in value or "error" in value):
            return Message(value, None, request_id)
        raise RpcError(INVALID_REQUEST, "the message has no method", http_status=400)
    if not isinstance(method, str) or not method:
        raise RpcError(INVALID_REQUEST, "method must be a non-empty string", http_status=400)
    if "id" in value and method.startswith("notifications/"):
        # A notification's method with an id is a request no MCP revision defines: forwarded as
        # one, an upstream reading the method alone would act on it (cancel its request
        # ``requestId``, bastion's id there, perhaps another user's call).
        raise RpcError(
            INVALID_REQUEST,
            f"{method} is a notification: send it without an id",
            http_status=400,
        )
    params = value.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RpcError(INVALID_PARAMS, "params must be an object", http_status=400)
    meta = params.get("_meta")
    if meta is not None and not isinstance(meta, dict):
        # MCP's _meta is an object in every era; bastion reads and extends it as one.
        raise RpcError(INVALID_PARAMS, "params._meta must be an object", http_status=400)
    return Message(value, method, request_id, params)


def result(request_id: RequestId | None, body: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": body}


def notification(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        message["params"] = params
    return message
