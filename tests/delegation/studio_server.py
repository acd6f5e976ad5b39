"""The tests' MCP server for delegation: a design studio of folders and files, written with the
official MCP Python SDK (it knows nothing of bastion). ``written`` keeps every write that reached
it, so a test can show what a refused call did not do."""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations

server = MCPServer("studio", instructions="Folders of drawings and text.")
files: dict[tuple[str, str], str] = {("icons", "logo.svg"): "<svg/>"}
written: list[tuple[str, str, str]] = []


@server.tool(annotations=ToolAnnotations(readOnlyHint=True))
def read_file(folder: str, name: str) -> str:
    """Read a file of a folder."""
    return files.get((folder, name), "")


@server.tool()
def write_svg(folder: str, name: str, svg: str) -> str:
    """Write an SVG drawing into a folder."""
    files[(folder, name)] = svg
    written.append(("write_svg", folder, name))
    return f"wrote {folder}/{name}"


@server.tool()
def write_file(folder: str, name: str, text: str) -> str:
    """Write any file into a folder."""
    files[(folder, name)] = text
    written.append(("write_file", folder, name))
    return f"wrote {folder}/{name}"


@server.tool()
def publish(folder: str, name: str) -> str:
    """Publish a drawing to the public site."""
    written.append(("publish", folder, name))
    return f"published {folder}/{name}"
