"""A stateful MCP server (official SDK, Streamable HTTP, sessions) for the tests of upstream
sessions: it says which of its sessions each call came on, and asks its client for input on
its standing stream (the session's GET stream) or on the call's own stream."""

from __future__ import annotations

import json

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from mcp.types import SamplingMessage, TextContent

server = MCPServer("sessions", instructions="Tells its sessions apart, for bastion's tests.")
# Tags of the calls of `hold` now waiting, and of those let go (the test reads and writes them:
# the server runs in the test's process).
HELD: set[str] = set()
RELEASED: set[str] = set()
_FORM = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "secret": {"type": "string"}},
}


@server.tool()
async def whoami(ctx: Context) -> str:
    """The upstream session this call came on (its Mcp-Session-Id)."""
    return (ctx.headers or {}).get("mcp-session-id", "none")


async def _ask(ctx: Context, kind: str, related: str | None, about: str = "") -> str:
    """Ask the client; the question names ``about`` when given (what a call knows)."""
    session = ctx.session
    more = f" About {about}." if about else ""
    try:
        # Without an answer (a request nobody relays) the call still ends.
        with anyio.fail_after(20):
            if kind == "elicit":
                answer = await session.elicit_form(
                    "Who are you?" + more, _FORM, related_request_id=related
                )
                return "answer: " + json.dumps(answer.content, sort_keys=True)
            if kind == "sample":
                question = SamplingMessage(
                    role="user", content=TextContent(type="text", text="Which model?" + more)
                )
                result = await session.create_message(
                    [question], max_tokens=10, related_request_id=related
                )
                return "answer: " + result.content.text
            if kind == "roots":
                if related is None:
                    result = await session.list_roots()
                else:
                    from mcp.shared.message import ServerMessageMetadata
                    from mcp.types import ListRootsRequest, ListRootsResult

                    result = await session.send_request(
                        ListRootsRequest(),
                        ListRootsResult,
                        metadata=ServerMessageMetadata(related_request_id=related),
                    )
                return "answer: " + " ".join(str(r.uri) for r in result.roots)
    except MCPError as e:
        return f"refused: {e}"
    except TimeoutError:
        return "no answer"
    return f"unknown kind {kind}"


@server.tool()
async def ask(kind: str, ctx: Context, about: str = "") -> str:
    """Ask the client (kind: elicit, sample, roots) on the session's standing stream."""
    return await _ask(ctx, kind, None, about)


@server.tool()
async def ask_in_call(kind: str, ctx: Context, about: str = "") -> str:
    """Ask the client (kind: elicit, sample, roots) on this call's own stream."""
    return await _ask(ctx, kind, ctx.request_id, about)


@server.tool()
async def hold(tag: str) -> str:
    """Wait until the test lets ``tag`` go."""
    HELD.add(tag)
    while tag not in RELEASED:
        await anyio.sleep(0.01)
    return f"released {tag}"


@server.tool()
async def nudge(tokens: list[str], message: str, ctx: Context) -> str:
    """Send progress for each of ``tokens`` (tokens of other requests than this one's) on this
    call's own stream, saying ``message``: what an upstream could try to reach other clients."""
    for token in tokens:
        await ctx.session.send_progress_notification(
            token, 1, 2, message, related_request_id=ctx.request_id
        )
    return f"nudged {len(tokens)}"
