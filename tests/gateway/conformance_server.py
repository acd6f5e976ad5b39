"""What the MCP conformance suite's server scenarios ask of a server, written with the official MCP
Python SDK: bastion's upstream when the suite runs through the gateway (test_conformance.py).

`@modelcontextprotocol/conformance` (npm) names the tools, resources and prompts each scenario
calls (`conformance list --server`; each scenario's description says what it expects). Its own
reference server lives only in its repository; this one is written from those descriptions.
Served over Streamable HTTP, with an event store so that a stream closed mid-call resumes
(SEP-1699), and the SDK's DNS rebinding protection on loopback:

    python tests/gateway/conformance_server.py --port 3001    # then http://127.0.0.1:3001/mcp
"""

# No `from __future__ import annotations`: the SDK reads the prompts' annotations when the
# module is loaded from a path (tests/gateway/support.py `fresh_module`), outside sys.modules.
import argparse
import base64
import io
import itertools
import json
import wave
from typing import Annotated, Literal, get_args

import anyio
from mcp.server.elicitation import AcceptedElicitation, ElicitationResult
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.prompts.base import UserMessage
from mcp.server.mcpserver.resolve import Elicit, Resolve, Sample
from mcp.server.mcpserver.tools.base import Tool
from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp.types import (
    AudioContent,
    CallToolResult,
    Completion,
    CompletionArgument,
    CompletionContext,
    CreateMessageResult,
    EmbeddedResource,
    EmptyResult,
    ImageContent,
    JSONRPCMessage,
    LoggingLevel,
    PromptReference,
    ResourceTemplateReference,
    SamplingMessage,
    SetLevelRequestParams,
    SubscribeRequestParams,
    TextContent,
    TextResourceContents,
    UnsubscribeRequestParams,
)
from pydantic import BaseModel, Field, WithJsonSchema

# A 1x1 red PNG, and a WAV of one silent sample: the smallest image and sound there are.
RED_PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="


def _silence() -> str:
    out = io.BytesIO()
    with wave.open(out, "wb") as sound:
        sound.setnchannels(1)
        sound.setsampwidth(1)
        sound.setframerate(8000)
        sound.writeframes(b"\x80")
    return base64.b64encode(out.getvalue()).decode()


SILENCE = _silence()
JSON_SCHEMA_2020_12 = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
        }
    },
    "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"}},
    "additionalProperties": False,
}


def json_schema_2020_12_tool(name: str = "", address: dict | None = None) -> str:
    """Tool with JSON Schema 2020-12 features"""
    return f"received {name or 'no name'}"


# The SDK derives a tool's schema from its signature; this one is declared as the scenario
# words it ($schema, $defs, additionalProperties), to see that nobody on the way strips it.
server = MCPServer(
    "bastion-conformance-upstream",
    version="1.0.0",
    instructions="The MCP conformance suite's server scenarios, for bastion's tests.",
    tools=[
        Tool.from_function(json_schema_2020_12_tool).model_copy(
            update={"parameters": JSON_SCHEMA_2020_12}
        )
    ],
)


# -- tools: content shapes -----------------------------------------------------------------------


@server.tool()
def test_simple_text() -> str:
    """Answers with one text item."""
    return "This is a simple text response for testing."


@server.tool()
def test_image_content() -> CallToolResult:
    """Answers with one image item (a red pixel)."""
    return CallToolResult(
        content=[ImageContent(type="image", data=RED_PIXEL, mime_type="image/png")]
    )


@server.tool()
def test_audio_content() -> CallToolResult:
    """Answers with one audio item (a silent WAV)."""
    return CallToolResult(content=[AudioContent(type="audio", data=SILENCE, mime_type="audio/wav")])


@server.tool()
def test_embedded_resource() -> CallToolResult:
    """Answers with one embedded text resource."""
    resource = TextResourceContents(
        uri="test://embedded-resource",
        mime_type="text/plain",
        text="This is an embedded resource content.",
    )
    return CallToolResult(content=[EmbeddedResource(type="resource", resource=resource)])


@server.tool()
def test_multiple_content_types() -> CallToolResult:
    """Answers with text, an image and an embedded JSON resource."""
    resource = TextResourceContents(
        uri="test://mixed-content-resource",
        mime_type="application/json",
        text=json.dumps({"test": "data", "value": 123}),
    )
    return CallToolResult(
        content=[
            TextContent(type="text", text="Multiple content types test:"),
            ImageContent(type="image", data=RED_PIXEL, mime_type="image/png"),
            EmbeddedResource(type="resource", resource=resource),
        ]
    )


@server.tool()
def test_error_handling() -> str:
    """Always fails: the answer is a result with isError, not a JSON-RPC error."""
    raise ToolError("This tool intentionally returns an error for testing")


# -- tools: notifications during a call ---------------------------------------------------------

# `logging/setLevel` (2025-11-25) per session: one client's level is not another's. On 2026-07-28
# each request carries its level in `_meta` and the SDK filters.
_levels: dict[str | None, str] = {}
LEVELS: tuple[LoggingLevel, ...] = get_args(LoggingLevel)  # least severe first


def _session_of(headers) -> str | None:
    return (headers or {}).get("mcp-session-id")


async def set_level(ctx, params: SetLevelRequestParams) -> EmptyResult:
    _levels[_session_of(getattr(ctx.request, "headers", None))] = params.level
    return EmptyResult()


@server.tool()
async def test_tool_with_logging(ctx: Context) -> str:
    """Sends three info log messages while it runs."""
    wanted = _levels.get(_session_of(ctx.headers), "debug")
    if LEVELS.index("info") >= LEVELS.index(wanted):
        for i, text in enumerate(
            ("Tool execution started", "Tool processing data", "Tool execution completed")
        ):
            if i:
                await anyio.sleep(0.05)
            await ctx.log("info", text)
    return "Logging test completed"


@server.tool()
async def test_tool_with_progress(ctx: Context) -> str:
    """Reports progress 0, 50 and 100 of 100 while it runs."""
    for step in (0, 50, 100):
        if step:
            await anyio.sleep(0.05)
        await ctx.report_progress(step, 100)
    return "Progress test completed"


@server.tool()
async def test_reconnection(ctx: Context) -> str:
    """Closes its event stream mid-call; the answer comes when the client reconnects."""
    await ctx.close_sse_stream()
    await anyio.sleep(0.1)
    return "Reconnection test completed successfully"


# -- tools: questions to the client -------------------------------------------------------------


def ask_the_model(prompt: str) -> Sample:
    question = SamplingMessage(role="user", content=TextContent(type="text", text=prompt))
    return Sample([question], max_tokens=100)


@server.tool()
async def test_sampling(
    prompt: str, answer: Annotated[CreateMessageResult, Resolve(ask_the_model)]
) -> str:
    """Asks the client's model the prompt (sampling) and repeats the answer."""
    content = answer.content
    return f"LLM response: {content.text if isinstance(content, TextContent) else content}"


class Contact(BaseModel):
    username: str = Field(description="User's response")
    email: str = Field(description="User's email address")


def ask_for_contact(message: str) -> Elicit[Contact]:
    return Elicit(message, Contact)


def _outcome(result: ElicitationResult) -> str:
    content = result.data.model_dump() if isinstance(result, AcceptedElicitation) else {}
    return f"action={result.action}, content={json.dumps(content)}"


@server.tool()
async def test_elicitation(
    message: str, answer: Annotated[ElicitationResult[Contact], Resolve(ask_for_contact)]
) -> str:
    """Asks the user for a username and an email (elicitation, form mode)."""
    return f"User response: {_outcome(answer)}"


class Defaults(BaseModel):
    name: str = Field("John Doe", description="User name")
    age: int = Field(30, description="User age")
    score: float = Field(95.5, description="User score")
    status: Literal["active", "inactive", "pending"] = Field("active", description="User status")
    verified: bool = Field(True, description="Verification status")


def ask_with_defaults() -> Elicit[Defaults]:
    return Elicit("Please review these values (defaults filled in)", Defaults)


@server.tool()
async def test_elicitation_sep1034_defaults(
    answer: Annotated[ElicitationResult[Defaults], Resolve(ask_with_defaults)],
) -> str:
    """Asks for five fields that each have a default (SEP-1034)."""
    return f"Elicitation completed: {_outcome(answer)}"


def _titled(values: dict[str, str]) -> list[dict[str, str]]:
    return [{"const": const, "title": title} for const, title in values.items()]


# The five enum forms of SEP-1330, each rendered exactly as the specification spells it.
class Choices(BaseModel):
    untitledSingle: Literal["option1", "option2", "option3"]
    titledSingle: Annotated[
        Literal["value1", "value2", "value3"],
        WithJsonSchema(
            {
                "type": "string",
                "oneOf": _titled(
                    {"value1": "First Option", "value2": "Second Option", "value3": "Third Option"}
                ),
            }
        ),
    ]
    legacyEnum: Annotated[
        Literal["opt1", "opt2", "opt3"],
        WithJsonSchema(
            {
                "type": "string",
                "enum": ["opt1", "opt2", "opt3"],
                "enumNames": ["Option One", "Option Two", "Option Three"],
            }
        ),
    ]
    untitledMulti: list[Literal["option1", "option2", "option3"]]
    titledMulti: Annotated[
        list[Literal["value1", "value2", "value3"]],
        WithJsonSchema(
            {
                "type": "array",
                "items": {
                    "anyOf": _titled(
                        {
                            "value1": "First Choice",
                            "value2": "Second Choice",
                            "value3": "Third Choice",
                        }
                    )
                },
            }
        ),
    ]


def ask_to_choose() -> Elicit[Choices]:
    return Elicit("Please choose", Choices)


@server.tool()
async def test_elicitation_sep1330_enums(
    answer: Annotated[ElicitationResult[Choices], Resolve(ask_to_choose)],
) -> str:
    """Asks to choose in each of the five enum forms (SEP-1330)."""
    return f"Elicitation completed: {_outcome(answer)}"


# -- resources ----------------------------------------------------------------------------------


@server.resource("test://static-text", mime_type="text/plain")
def static_text() -> str:
    """A text resource that never changes."""
    return "This is the content of the static text resource."


@server.resource("test://static-binary", mime_type="image/png")
def static_binary() -> bytes:
    """A binary resource (a red pixel)."""
    return base64.b64decode(RED_PIXEL)


@server.resource("test://template/{id}/data", mime_type="application/json")
def template_data(id: str) -> str:
    """Data for one id, from a resource template."""
    return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})


@server.resource("test://watched-resource", mime_type="text/plain")
def watched() -> str:
    """A resource clients subscribe to."""
    return "Watched resource content."


subscribed: set[str] = set()


async def subscribe(ctx, params: SubscribeRequestParams) -> EmptyResult:
    subscribed.add(str(params.uri))
    return EmptyResult()


async def unsubscribe(ctx, params: UnsubscribeRequestParams) -> EmptyResult:
    subscribed.discard(str(params.uri))
    return EmptyResult()


# -- prompts and completions --------------------------------------------------------------------


@server.prompt()
def test_simple_prompt() -> str:
    """A prompt without arguments."""
    return "This is a simple prompt for testing."


@server.prompt()
def test_prompt_with_arguments(
    arg1: Annotated[str, Field(description="First test argument")],
    arg2: Annotated[str, Field(description="Second test argument")],
) -> str:
    """A prompt with two arguments."""
    return f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"


@server.prompt()
def test_prompt_with_embedded_resource(
    resourceUri: Annotated[str, Field(description="URI of the resource to embed")],
) -> list[UserMessage]:
    """A prompt that embeds a resource."""
    resource = TextResourceContents(
        uri=resourceUri, mime_type="text/plain", text="Embedded resource content for testing."
    )
    return [
        UserMessage(EmbeddedResource(type="resource", resource=resource)),
        UserMessage("Please process the embedded resource above."),
    ]


@server.prompt()
def test_prompt_with_image() -> list[UserMessage]:
    """A prompt with an image."""
    return [
        UserMessage(ImageContent(type="image", data=RED_PIXEL, mime_type="image/png")),
        UserMessage("Please analyze the image above."),
    ]


SUGGESTIONS = ("paris", "park", "party", "test", "testing", "tested")


@server.completion()
async def complete(
    ref: PromptReference | ResourceTemplateReference,
    argument: CompletionArgument,
    context: CompletionContext | None,
) -> Completion:
    found = [value for value in SUGGESTIONS if value.startswith(argument.value)]
    return Completion(values=found, total=len(found), has_more=False)


# MCPServer has no decorators for these 2025-11-25 methods; with a handler each, the server
# offers `resources.subscribe` and `logging`.
low = server._lowlevel_server
low.add_request_handler("resources/subscribe", SubscribeRequestParams, subscribe)
low.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, unsubscribe)
low.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)


# -- resumable streams --------------------------------------------------------------------------


class MemoryEventStore(EventStore):
    """Every event of every stream, in memory: enough to replay a stream after a reconnect."""

    def __init__(self) -> None:
        self.events: list[tuple[EventId, StreamId, JSONRPCMessage | None]] = []
        self.ids = itertools.count(1)

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        event_id = str(next(self.ids))
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        position = next((i for i, e in enumerate(self.events) if e[0] == last_event_id), None)
        if position is None:
            return None
        stream = self.events[position][1]
        for event_id, stream_id, message in self.events[position + 1 :]:
            if stream_id == stream and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream


def app():
    """The Streamable HTTP app at ``/mcp``, resumable, asking clients to come back after 0.5 s."""
    return server.streamable_http_app(
        streamable_http_path="/mcp", event_store=MemoryEventStore(), retry_interval=500
    )


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=3001)
    uvicorn.run(app(), host="127.0.0.1", port=parser.parse_args().port, log_level="warning")


if __name__ == "__main__":
    main()
