"""An MCP server (the official SDK's) with typed tool arguments, over stdio: each call appends
the arguments its function received, as Python read them, to the file ``TYPED_TRACE`` names."""

from __future__ import annotations

import json
import os

from mcp.server.mcpserver import MCPServer

server = MCPServer("typed")


@server.tool()
def transfer(to: str, amount: int, confirm: bool = False, cc: list[str] | None = None) -> str:
    """Send ``amount`` to ``to`` (and copy ``cc``); ``confirm`` skips the bank's own check."""
    with open(os.environ["TYPED_TRACE"], "a") as out:
        received = {"to": to, "amount": amount, "confirm": confirm, "cc": cc}
        out.write(json.dumps(received) + "\n")
    return f"sent {amount} to {to}"


if __name__ == "__main__":
    server.run("stdio")
