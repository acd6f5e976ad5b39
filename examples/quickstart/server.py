"""The quickstart's MCP server: a small customer desk, written with the official MCP Python SDK.

It knows nothing of bastion. Over stdio (the default) bastion starts it as an upstream; with
``--http PORT`` it serves Streamable HTTP on 127.0.0.1 instead (the tests and the benchmark use
that). Set ``DEMO_TRACE`` to a file path to append every message it receives, one JSON per line:
the tests read it to show what reached the upstream and what did not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import ToolAnnotations

CUSTOMERS = [
    {"id": "c-100", "name": "Ada Lovelace", "email": "ada@example.com", "plan": "enterprise"},
    {"id": "c-101", "name": "Alan Turing", "email": "alan@example.com", "plan": "team"},
    {"id": "c-102", "name": "Grace Hopper", "email": "grace@example.com", "plan": "team"},
]

server = MCPServer("customer-desk", instructions="Customer records and email for the support team.")


def trace(kind: str, **detail) -> None:
    path = os.environ.get("DEMO_TRACE")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"kind": kind, **detail}) + "\n")


@server.tool(annotations=ToolAnnotations(readOnlyHint=True))
def search_customers(query: str = "", field: Literal["name", "email"] = "name") -> dict:
    """Find customers whose name (or, with field "email", whose email) contains the query."""
    trace("search_customers", query=query, field=field)
    q = query.lower()
    found = [c for c in CUSTOMERS if q in c[field].lower()]
    return {"customers": found}


@server.tool(annotations=ToolAnnotations(destructiveHint=True))
def delete_customer(customer_id: str) -> str:
    """Delete a customer record."""
    trace("delete_customer", customer_id=customer_id)
    return f"deleted {customer_id}"


@server.tool(annotations=ToolAnnotations(openWorldHint=True))
async def send_email(to: str, subject: str, body: str, ctx: Context) -> str:
    """Send an email to a customer."""
    trace("send_email", to=to)
    await ctx.report_progress(1, 2, "queued")
    await ctx.report_progress(2, 2, "sent")
    return f"sent {subject!r} to {to}"


@server.resource("customers://plans", mime_type="application/json")
def plans() -> str:
    """The plans customers can be on."""
    return json.dumps({"plans": ["team", "enterprise"]})


@server.resource("customers://directory", mime_type="application/json")
def directory() -> str:
    """Every customer, with their email."""
    return json.dumps({"customers": CUSTOMERS})


@server.resource("customers://audit-notes", mime_type="text/plain")
def audit_notes() -> str:
    """Internal notes for administrators."""
    return "2026-01-12: exported customer list for the yearly review."


@server.prompt()
def apology(customer_name: str) -> str:
    """Draft an apology to a customer."""
    return f"Write a short, sincere apology to {customer_name} for the delay."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--http", type=int, help="serve Streamable HTTP on this loopback port")
    args = parser.parse_args()
    if args.http:
        server.run("streamable-http", host="127.0.0.1", port=args.http)
    else:
        server.run("stdio")


if __name__ == "__main__":
    sys.exit(main())
