"""Requests an upstream sends the client (elicitation, sampling) pass through bastion: to the
client whose request the upstream is answering, only if that client declared the capability,
and only that client's answer goes back. In 2025-11-25 they travel on the request's event stream
(relayed from a 2025-11-25 upstream, or asked one by one for a 2026-07-28 upstream's
``input_required`` result); in 2026-07-28 the client answers the upstream's ``input_required``
result itself and retries."""

from __future__ import annotations

import json
import threading

import pytest
from mcp import types
from mcp.shared.exceptions import MCPError

from bastion.gateway.client_requests import answer_for_upstream
from bastion.gateway.masks import compile_paths
from tests.waits import PATIENCE

from .streams import events, legacy_session

# labhttp speaks 2026-07-28 to bastion; labold only 2025-11-25 (sessions, requests on streams).
HTTP_LABS = ["labhttp", "labold"]


def callbacks(seen: dict) -> dict:
    async def elicit(context, params):
        seen.setdefault("asked", []).append(params.message)
        return types.ElicitResult(action="accept", content={"name": "Ada"})

    async def sample(context, params):
        seen.setdefault("asked", []).append(params.messages[0].content.text)
        text = types.TextContent(type="text", text="Paris")
        return types.CreateMessageResult(role="assistant", content=text, model="test-model")

    return {"elicitation_callback": elicit, "sampling_callback": sample}


async def _call(client, seen, tool):
    try:
        result = await client.call_tool(tool, {})
        seen["text"] = result.content[0].text
        seen["is_error"] = result.is_error
    except MCPError as e:
        seen["error"] = e


@pytest.mark.parametrize(
    ("server", "mode"), [("labhttp", "legacy"), ("labhttp", "auto"), ("labold", "legacy")]
)
def test_the_upstream_asks_the_client_and_gets_its_answers(bastion, server, mode):
    asked: dict = {}

    async def script(client, seen):
        seen["greet"] = (await client.call_tool("greet", {})).content[0].text
        seen["quiz"] = (await client.call_tool("quiz", {})).content[0].text

    seen = bastion.sdk("sam", server, mode, script, **callbacks(asked))
    assert seen["greet"] == "hello Ada"
    assert seen["quiz"] == "the model said Paris"
    assert asked["asked"] == ["What is your name?", "Capital of France?"]


def test_a_2026_client_is_not_asked_by_a_2025_upstream(bastion):
    # The 2025-11-25 upstream asks in the middle of its call; a 2026-07-28 client can only be
    # asked by an input_required result, which that call cannot turn into.
    asked: dict = {}

    async def script(client, seen):
        await _call(client, seen, "greet")

    seen = bastion.sdk("sam", "labold", "auto", script, **callbacks(asked))
    assert "asked" not in asked
    assert seen.get("text") != "hello Ada"


@pytest.mark.parametrize("server", HTTP_LABS)
@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_a_client_is_not_asked_what_it_did_not_declare(bastion, server, mode):
    async def script(client, seen):
        await _call(client, seen, "greet")

    seen = bastion.sdk("sam", server, mode, script)  # no elicitation callback: not declared
    assert "error" in seen or seen["is_error"]
    assert seen.get("text") != "hello Ada"


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_an_upstream_that_asks_anyway_is_refused(bastion, mode):
    # labhttp asks for elicitation whatever the client declared: bastion relays none of it.
    async def script(client, seen):
        await _call(client, seen, "ask_anyway")

    seen = bastion.sdk("sam", "labhttp", mode, script)
    assert "error" in seen and "did not declare the elicitation capability" in str(seen["error"])


@pytest.mark.parametrize("wants", ["tools", "allServers", "thisServer"])
@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_a_sampling_request_is_relayed_only_with_what_the_client_declared(bastion, mode, wants):
    """A client that declared plain sampling (the SDK's, with a sampling callback) is not asked
    for a tool loop (``tools``) nor for the context of its servers (``includeContext``: its
    other servers' context would reach this upstream): MCP 2025-11-25 has the server send them
    only to a client that declared ``sampling.tools`` or ``sampling.context``."""
    asked: dict = {}

    async def script(client, seen):
        try:
            result = await client.call_tool("ask_model_more", {"wants": wants})
            seen["text"] = result.content[0].text
        except MCPError as e:
            seen["error"] = e

    seen = bastion.sdk("sam", "labhttp", mode, script, **callbacks(asked))
    assert "asked" not in asked, (wants, asked)
    declared = "tools" if wants == "tools" else "context"
    assert f"did not declare sampling.{declared}" in str(seen.get("error")), seen


@pytest.mark.parametrize("server", HTTP_LABS)
@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_a_call_whose_result_is_masked_cannot_ask_its_client(bastion, server, mode):
    asked: dict = {}

    async def script(client, seen):
        await _call(client, seen, "greet_privately")

    seen = bastion.sdk("sam", server, mode, script, **callbacks(asked))
    assert "asked" not in asked
    assert seen.get("text") != "hello Ada"


def test_a_stdio_upstream_cannot_ask_a_client(bastion):
    # Over stdio a request from the server names no request of bastion's: no client to ask.
    asked: dict = {}

    async def script(client, seen):
        await _call(client, seen, "greet")

    seen = bastion.sdk("sam", "lab", "legacy", script, **callbacks(asked))
    assert "asked" not in asked
    assert seen.get("text") != "hello Ada"


def _answer(bastion, server, headers, request_id, name):
    body = {
        "jsonrpc": "2.0",
        "id": request_id,
        "result": {"action": "accept", "content": {"name": name}},
    }
    response = bastion.http.post(bastion.mcp_url(server), json=body, headers=headers)
    return response.status_code


@pytest.mark.parametrize("server", HTTP_LABS)
def test_only_the_client_that_was_asked_may_answer(bastion, server):
    token = bastion.token("sam", server)
    sam = legacy_session(bastion, token, server, {"elicitation": {}})
    call = {"jsonrpc": "2.0", "id": 41, "method": "tools/call"}
    call["params"] = {"name": "greet", "arguments": {}}
    frames: list = []
    asked = threading.Event()

    def run():
        with bastion.http.stream(
            "POST", bastion.mcp_url(server), json=call, headers=sam
        ) as response:
            for frame in events(response):
                frames.append(frame)
                asked.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert asked.wait(PATIENCE)
    question = frames[0]
    assert question["method"] == "elicitation/create"
    assert question["params"]["message"] == "What is your name?"
    # bastion's own id, unique across clients; never the upstream's.
    assert str(question["id"]).startswith("bastion-")

    avery = legacy_session(bastion, bastion.token("avery", server), server, {"elicitation": {}})
    other_session = legacy_session(bastion, token, server, {"elicitation": {}})
    assert _answer(bastion, server, avery, question["id"], "Mallory") == 400
    assert _answer(bastion, server, other_session, question["id"], "Mallory") == 400
    assert _answer(bastion, server, sam, "bastion-no-such-request", "Mallory") == 400
    assert _answer(bastion, server, sam, question["id"], "Ada") == 202
    thread.join(PATIENCE)
    assert frames[-1]["id"] == 41
    assert frames[-1]["result"]["content"][0]["text"] == "hello Ada"
    assert json.dumps(frames).count("Mallory") == 0
    # Answered once: a second answer finds nothing to answer.
    assert _answer(bastion, server, sam, question["id"], "Ada") == 400


NO_RESULT = {"code": -32603, "message": "the client sent no result"}
WITHHELD = "the client answered with an error; its message is withheld by bastion because a field"


@pytest.mark.parametrize(
    ("answer", "masked", "sent"),
    [
        ({"error": {"code": 7, "message": "no", "data": [1]}}, False, {"code": 7, "message": "no", "data": [1]}),
        ({"error": {"code": "7", "message": ["no"]}}, False, {"code": -32603, "message": "the client answered with an error"}),
        ({"error": {"code": 7, "message": "no secret", "data": "secret"}}, True, {"code": 7, "message": WITHHELD}),
        ({"error": {"code": 7.5, "message": "secret"}}, True, {"code": -32603, "message": WITHHELD}),
        ({"error": "no"}, False, NO_RESULT),
        ({"result": ["x"]}, True, NO_RESULT),
    ],
)  # fmt: skip
def test_a_clients_error_goes_upstream_in_json_rpcs_shape_and_under_a_mask_as_its_code(
    answer, masked, sent
):
    masks = compile_paths(("content.secret",) if masked else ())
    error = answer_for_upstream(answer, masks, "elicitation/create")["error"]
    if sent["message"] == WITHHELD:
        assert error["message"].startswith(WITHHELD) and "secret" not in error["message"][-30:]
        error = {**error, "message": WITHHELD}
    assert error == sent


@pytest.mark.parametrize(
    ("method", "answer", "sent"),
    [
        (
            "elicitation/create",
            {"action": "accept", "content": {"secret": "s", "name": "n"}, "_meta": {"x": "s"},
             "extra": "s"},
            {"action": "accept", "content": {"secret": "[masked]", "name": "n"}},
        ),
        (
            "sampling/createMessage",
            {"role": "assistant", "model": "m", "content": {"type": "text", "text": "t",
             "_meta": {"x": "s"}}, "secret": "s", "_meta": {"x": "s"}},
            {"role": "assistant", "model": "m", "content": {"type": "text", "text": "t"}},
        ),
        (
            "roots/list",
            {"roots": [{"uri": "file:///a", "name": "a", "_meta": {"x": "s"}}], "secret": "s"},
            {"roots": [{"uri": "file:///a", "name": "a"}]},
        ),
    ],
)  # fmt: skip
def test_a_clients_answer_under_a_mask_goes_upstream_in_mcps_shape_only(method, answer, sent):
    """As a result is rebuilt under a mask, an answer keeps only the members MCP defines for it:
    its ``_meta`` and members of its own could carry what the mask covers."""
    # (A path must reach into the answer, else it is withheld whole.)
    paths = ("content.secret",) if method == "elicitation/create" else ("secret",)
    result = answer_for_upstream({"result": answer}, compile_paths(paths), method)["result"]
    assert result == sent
    # Without a mask, the answer as the client sent it.
    assert answer_for_upstream({"result": answer}, (), method)["result"] == answer
