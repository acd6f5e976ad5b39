"""Raw Streamable HTTP for the transport tests: requests in either era, and SSE read line by
line (what an SDK client hides: the exact frames bastion sends)."""

from __future__ import annotations

import json

ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


def modern_headers(token: str, method: str, name: str | None = None) -> dict[str, str]:
    headers = {
        "authorization": f"Bearer {token}",
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": method,
    }
    if name is not None:
        headers["mcp-name"] = name
    return headers


def modern_request(request_id, method: str, params: dict, capabilities: dict | None = None):
    envelope = {**ENVELOPE, "io.modelcontextprotocol/clientCapabilities": capabilities or {}}
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": method,
        "params": {**params, "_meta": envelope},
    }


def call_tool(bastion, token: str, server: str, tool: str, arguments: dict, request_id=1):
    """tools/call in 2026-07-28; the JSON-RPC response."""
    response = bastion.http.post(
        bastion.mcp_url(server),
        json=modern_request(request_id, "tools/call", {"name": tool, "arguments": arguments}),
        headers=modern_headers(token, "tools/call", tool),
    )
    assert response.status_code == 200, response.text
    return response.json()


def events(response):
    """The JSON-RPC messages of an SSE response, as they arrive (comments skipped)."""
    data: list[str] = []
    for line in response.iter_lines():
        if line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            yield json.loads("\n".join(data))
            data = []
