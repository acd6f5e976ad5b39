"""The quickstart's customer desk for tests/security/test_request_authority.py: its one read-only
tool, ``search_customers``, notes each query it is asked in the trace file (its first argument,
one JSON per line), so that a test sees what reached the upstream; a search for ``hold:<tag>``
is answered only once the test writes a ``release`` of that query there (at most 30 s), so that
the call is still at its upstream meanwhile."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations

TRACE = Path(sys.argv[1])
server = MCPServer("customer-desk")


def trace(kind: str, query: str) -> None:
    with TRACE.open("a") as out:
        out.write(json.dumps({"kind": kind, "query": query}) + "\n")


def traced(kind: str, query: str) -> bool:
    if not TRACE.exists():
        return False
    entries = [json.loads(line) for line in TRACE.read_text().splitlines() if line]
    return {"kind": kind, "query": query} in entries


@server.tool(annotations=ToolAnnotations(readOnlyHint=True))
async def search_customers(query: str = "", field: Literal["name", "email"] = "name") -> dict:
    """Find customers (there are none here); a query ``hold:<tag>`` waits for its release."""
    trace("search", query)
    if query.startswith("hold:"):
        with anyio.fail_after(30):
            while not traced("release", query):
                await anyio.sleep(0.02)
    return {"customers": [], "query": query}


if __name__ == "__main__":
    server.run("stdio")
