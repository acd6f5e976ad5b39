"""A mask never fails open, whatever shape the upstream answers in: the lab's ``leak*`` tools,
resources and prompt put an address in every place of a result and of the notifications of a
call that MCP defines (content blocks of every type, embedded resources, blobs, links,
``_meta`` at every level, annotations, descriptions, progress and log messages), and in some it
does not. Through bastion, in both protocol eras, over stdio and from 2026-07-28 and 2025-11-25
upstreams, the address never comes out, and what can be masked field by field is."""

from __future__ import annotations

import json

import pytest
from mcp import types

from bastion.gateway.masks import WITHHELD

from .lab_server import SECRET, SECRET_B64
from .streams import ENVELOPE, legacy_session, messages, modern_headers

# The SDK marks logging deprecated as of 2026-07-28; it is still MCP in both eras.
pytestmark = pytest.mark.filterwarnings("ignore:The logging capability is deprecated")
SERVERS = ["lab", "labhttp", "labold"]  # stdio; 2026-07-28 and 2025-11-25 HTTP upstreams
LOG_LEVEL = "io.modelcontextprotocol/logLevel"


def ask(bastion, server: str, era: str, method: str, params: dict) -> tuple[str, list[dict]]:
    """``method`` as sam, asking for progress and every log message; the whole body as it came,
    and its JSON-RPC messages."""
    token = bastion.token("sam", server)
    url = bastion.mcp_url(server)
    if era == "modern":
        meta = {**ENVELOPE, "progressToken": "p1", LOG_LEVEL: "debug"}
        headers = modern_headers(token, method, params.get("name") or params.get("uri"))
    else:
        meta = {"progressToken": "p1"}
        headers = legacy_session(bastion, token, server)
        level = {"jsonrpc": "2.0", "id": 0, "method": "logging/setLevel"}
        answered = bastion.http.post(
            url, json={**level, "params": {"level": "debug"}}, headers=headers
        )
        assert messages(answered)[-1]["result"] == {}
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": meta}}
    response = bastion.http.post(url, json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.text, messages(response)


def never_out(text: str) -> None:
    assert SECRET not in text
    assert SECRET_B64 not in text
    assert SECRET.replace("@", "\\u0040") not in text


@pytest.mark.parametrize("era", ["legacy", "modern"])
@pytest.mark.parametrize("server", SERVERS)
def test_a_tool_that_leaks_through_every_shape_leaks_nothing(bastion, server, era):
    text, frames = ask(bastion, server, era, "tools/call", {"name": "leak", "arguments": {}})
    never_out(text)
    result = frames[-1]["result"]
    assert result["structuredContent"] == {"customers": [{"name": "Ada", "email": "[masked]"}]}
    assert json.loads(result["content"][0]["text"])["customers"][0]["email"] == "[masked]"
    assert len(result["content"]) == 7  # each block masked or withheld, none dropped
    assert "_meta" not in result or set(result["_meta"]) <= {"io.modelcontextprotocol/serverInfo"}
    progress = [f["params"] for f in frames if f.get("method") == "notifications/progress"]
    assert [p["progress"] for p in progress] == [1, 2]  # relayed, without their messages
    assert all(set(p) == {"progressToken", "progress", "total"} for p in progress)
    logs = [f["params"] for f in frames if f.get("method") == "notifications/message"]
    if server != "lab":  # over stdio, a log message names no request: relayed to no one
        assert logs == [
            {
                "level": "info",
                "data": "[withheld by bastion: a field of this result is masked"
                " and this text is not JSON]",
            },
            {"level": "info", "data": {"customers": [{"name": "Ada", "email": "[masked]"}]}},
        ]


@pytest.mark.parametrize("era", ["legacy", "modern"])
@pytest.mark.parametrize("server", SERVERS)
def test_shapes_mcp_does_not_define_are_withheld(bastion, server, era):
    text, frames = ask(bastion, server, era, "tools/call", {"name": "leak_raw", "arguments": {}})
    never_out(text)
    result = frames[-1]["result"]
    assert set(result) <= {"content", "resultType"}
    assert result["content"][1] == {
        "type": "text",
        "text": json.dumps({"customers": [{"name": "Ada", "email": "[masked]"}]}),
    }


@pytest.mark.parametrize("era", ["legacy", "modern"])
@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("uri", ["lab://leaky", "lab://leaky-blob", "lab://leaky-raw"])
def test_a_resource_that_leaks_leaks_nothing(bastion, server, era, uri):
    text, frames = ask(bastion, server, era, "resources/read", {"uri": uri})
    never_out(text)
    contents = frames[-1]["result"]["contents"]
    assert contents and contents[0]["uri"] == uri
    if uri == "lab://leaky-raw":
        assert json.loads(contents[0]["text"])["customers"][0]["email"] == "[masked]"


@pytest.mark.parametrize("era", ["legacy", "modern"])
@pytest.mark.parametrize("server", SERVERS)
def test_a_prompt_that_leaks_leaks_nothing(bastion, server, era):
    text, frames = ask(bastion, server, era, "prompts/get", {"name": "leaky", "arguments": {}})
    never_out(text)
    result = frames[-1]["result"]
    assert "description" not in result
    assert len(result["messages"]) == 8


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_sdk_clients_read_masked_results_of_every_shape(bastion, mode):
    """What bastion rebuilds under a mask is still valid MCP: the SDK client parses it."""
    heard: list = []

    async def on_log(params):
        heard.append(params)

    async def script(client, seen):
        if mode == "legacy":
            await client.set_logging_level("debug")
        seen["call"] = await client.call_tool("leak", {})
        seen["raw"] = await client.call_tool("leak_raw", {})
        seen["reads"] = [
            await client.read_resource(uri)
            for uri in ("lab://leaky", "lab://leaky-blob", "lab://leaky-raw")
        ]
        seen["prompt"] = await client.get_prompt("leaky", {})

    seen = bastion.sdk("sam", "labhttp", mode, script, logging_callback=on_log, log_level="debug")
    dumped = json.dumps(
        [seen[k].model_dump(mode="json") for k in ("call", "raw", "prompt")]
        + [r.model_dump(mode="json") for r in seen["reads"]]
        + [h.model_dump(mode="json") for h in heard]
    )
    never_out(dumped)
    assert isinstance(seen["call"].content[2], types.TextContent)  # the image, withheld
    assert seen["call"].structured_content == {"customers": [{"name": "Ada", "email": "[masked]"}]}
    assert len(heard) == 2


@pytest.mark.parametrize("era", ["legacy", "modern"])
@pytest.mark.parametrize("server", SERVERS)
def test_an_upstream_error_under_a_mask_is_withheld(bastion, server, era):
    text, frames = ask(bastion, server, era, "tools/call", {"name": "leak_error", "arguments": {}})
    never_out(text)
    error = frames[-1]["error"]
    assert error["code"] == -32602
    assert error["message"].startswith("the upstream answered with an error")
    # The upstream's data is left out; what is there is bastion's: the decision that let the
    # call through, whose record says how it ended.
    assert list(error["data"]) == ["decision_id"]


@pytest.mark.parametrize("era", ["legacy", "modern"])
@pytest.mark.parametrize("server", SERVERS)
def test_records_in_another_shape_than_the_path_says_are_withheld(bastion, server, era):
    # The SDK answers a list with {"result": [...]} as structured output and one text block per
    # item: the mask's path fits the first, not the blocks, which must not go out as they came.
    text, frames = ask(bastion, server, era, "tools/call", {"name": "leak_list", "arguments": {}})
    never_out(text)
    result = frames[-1]["result"]
    assert result["structuredContent"] == {"result": [{"name": "Ada", "email": "[masked]"}]}
    assert result["content"] == [{"type": "text", "text": WITHHELD}]


@pytest.mark.parametrize("era", ["legacy", "modern"])
@pytest.mark.parametrize("server", SERVERS)
def test_a_mask_path_bastion_cannot_read_withholds_the_result(bastion, server, era):
    call = {"name": "leak_spelled", "arguments": {}}
    text, frames = ask(bastion, server, era, "tools/call", call)
    never_out(text)
    result = frames[-1]["result"]
    assert "structuredContent" not in result
    assert result["content"] == [{"type": "text", "text": WITHHELD}]


@pytest.mark.parametrize("era", ["legacy", "modern"])
@pytest.mark.parametrize("server", ["labhttp", "labold"])
def test_an_upstreams_http_error_under_a_mask_is_withheld(bastion, server, era):
    # A web server failing in plain text (HTTP 500): its body is the upstream's free text too.
    call = {"name": "leak_http_error", "arguments": {}}
    text, frames = ask(bastion, server, era, "tools/call", call)
    never_out(text)
    error = frames[-1]["error"]
    assert error["message"].startswith("the upstream answered with an error")
