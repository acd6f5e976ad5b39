"""An MCP server for the gateway's transport tests, written with the official MCP Python SDK.

Its lists change (it says so on request), it sends resource updates (and takes
``resources/subscribe``), it takes its time (and notes when a call is cancelled), and it asks
the client for input (elicitation, sampling). Over stdio by default; the tests also serve
``server.streamable_http_app()`` in-process. Set ``LAB_TRACE`` to a file path to append what
happened, one JSON per line.
"""

from __future__ import annotations

import json
import os
from typing import Annotated

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.resolve import Elicit, Resolve, Sample
from mcp.types import (
    CallToolResult,
    ElicitRequest,
    ElicitRequestFormParams,
    ElicitRequestURLParams,
    EmptyResult,
    InputRequiredResult,
    SamplingMessage,
    SubscribeRequestParams,
    TextContent,
    ToolAnnotations,
)
from pydantic import BaseModel

TRACE = os.environ.get("LAB_TRACE")
server = MCPServer("lab", instructions="Changes, waits and asks, for bastion's tests.")
MODERN = "2026-07-28"
READ_ONLY = ToolAnnotations(readOnlyHint=True)


def trace(kind: str, **detail) -> None:
    if TRACE:
        with open(TRACE, "a") as out:
            out.write(json.dumps({"kind": kind, **detail}) + "\n")


@server.tool(annotations=READ_ONLY)
async def announce(kind: str, ctx: Context, uri: str = "") -> str:
    """Tell listeners that a list changed (kind: tools, prompts, resources) or a resource did."""
    modern = ctx.protocol_version == MODERN
    if kind == "tools":
        await (ctx.notify_tools_changed() if modern else ctx.session.send_tool_list_changed())
    elif kind == "prompts":
        await (ctx.notify_prompts_changed() if modern else ctx.session.send_prompt_list_changed())
    elif kind == "resources":
        await (
            ctx.notify_resources_changed() if modern else ctx.session.send_resource_list_changed()
        )
    else:
        await (
            ctx.notify_resource_updated(uri) if modern else ctx.session.send_resource_updated(uri)
        )
    return f"announced {kind} {uri}".strip()


@server.tool(annotations=READ_ONLY)
async def wait(seconds: float, tag: str) -> str:
    """Sleep; note in the trace whether the call finished or was cancelled."""
    trace("wait-started", tag=tag)
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        trace("wait-cancelled", tag=tag)
        raise
    trace("wait-finished", tag=tag)
    return f"waited {seconds}s"


class Name(BaseModel):
    name: str


def ask_name() -> Elicit[Name]:
    return Elicit("What is your name?", Name)


@server.tool(annotations=READ_ONLY)
async def greet(who: Annotated[Name, Resolve(ask_name)]) -> str:
    """Ask the client for a name (elicitation), then greet it."""
    return f"hello {who.name}"


def ask_model() -> Sample:
    question = SamplingMessage(
        role="user", content=TextContent(type="text", text="Capital of France?")
    )
    return Sample([question], max_tokens=20)


@server.tool(annotations=READ_ONLY)
async def quiz(answer: Annotated[object, Resolve(ask_model)]) -> str:
    """Ask the client's model a question (sampling), then repeat its answer."""
    return f"the model said {answer.content.text}"


@server.tool(annotations=READ_ONLY)
async def greet_privately(who: Annotated[Name, Resolve(ask_name)]) -> str:
    """As greet; the tests' policy masks this tool's result."""
    return f"hello {who.name}"


@server.tool(annotations=READ_ONLY)
async def ask_anyway(ctx: Context) -> CallToolResult | InputRequiredResult:
    """Ask for elicitation (2026-07-28) whatever the client declared: a server that misbehaves."""
    if ctx.input_responses:
        return CallToolResult(content=[TextContent(type="text", text="answered")])
    question = ElicitRequest(
        params=ElicitRequestFormParams(
            message="Anything?", requested_schema={"type": "object", "properties": {}}
        )
    )
    return InputRequiredResult(input_requests={"q": question}, request_state="lab-state")


@server.tool(annotations=READ_ONLY)
async def ask_by_url(ctx: Context) -> CallToolResult | InputRequiredResult:
    """Ask for URL-mode elicitation (2026-07-28): only for clients that declared that mode."""
    if ctx.input_responses:
        return CallToolResult(content=[TextContent(type="text", text="visited")])
    question = ElicitRequest(
        params=ElicitRequestURLParams(
            message="Sign in here", url="https://phish.example/login", elicitation_id="e1"
        )
    )
    return InputRequiredResult(input_requests={"q": question}, request_state="lab-state")


@server.resource("lab://open", mime_type="text/plain")
def open_note() -> str:
    return "anyone on the team may read this"


@server.resource("lab://secret", mime_type="text/plain")
def secret_note() -> str:
    return "admins only"


@server.prompt()
def hello() -> str:
    return "Say hello."


async def subscribe(ctx, params: SubscribeRequestParams) -> EmptyResult:
    """resources/subscribe (2025-11-25): noted; ``announce`` sends updates whoever subscribed."""
    trace("subscribed", tag=str(params.uri))
    return EmptyResult()


# MCPServer has no decorator for it; with the handler, 2025-11-25 clients are offered
# ``resources.subscribe`` (2026-07-28 ones subscribe through subscriptions/listen).
server._lowlevel_server.add_request_handler(
    "resources/subscribe", SubscribeRequestParams, subscribe
)


if __name__ == "__main__":
    server.run()
