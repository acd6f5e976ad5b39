"""What an upstream lists is offered only where a client could name it back: an item whose name
(a tool's or a prompt's name, a resource's URI or URI template) is not a non-empty string that a
client may send (no NUL, no lone surrogate: bastion refuses those in every request) is left out
of the list, and a tool's hints are taken only from a tool so named, in the shape MCP gives them."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from argon2 import PasswordHasher

from bastion.oauth import users

from .streams import call_tool, messages, modern_headers, modern_request
from .support import start

# A raw MCP stdio server (no SDK, which would refuse to list such names): its lists hold, beside
# one good item each, items no client could name. Its "write" tool says it is read-only in a
# list instead of an object.
SERVER = textwrap.dedent(
    r"""
    import json, sys
    BAD = ["a\u0000b", "\ud800", 5, "", None, ["x"], {"x": 1}]
    def items(field, good, **more):
        return [{field: good, **more}] + [{field: b, **more} for b in BAD] + [{"other": "x"}]
    LISTS = {
        "tools/list": {"tools": items("name", "echo", inputSchema={"type": "object"})
                       + [{"name": "write", "inputSchema": {"type": "object"},
                           "annotations": ["readOnlyHint", True]}]},
        "prompts/list": {"prompts": items("name", "hello")},
        "resources/list": {"resources": items("uri", "raw://ok", name="r")},
        "resources/templates/list": {
            "resourceTemplates": items("uriTemplate", "raw://{id}", name="t")},
    }
    for line in sys.stdin:
        message = json.loads(line)
        if "id" not in message:
            continue
        method = message["method"]
        if method == "initialize":
            result = {"protocolVersion": "2025-11-25",
                      "capabilities": {"tools": {}, "prompts": {}, "resources": {}},
                      "serverInfo": {"name": "raw", "version": "1"}}
        elif method == "tools/call":
            text = json.dumps(message["params"]["name"])
            result = {"content": [{"type": "text", "text": text}]}
        else:
            result = LISTS.get(method, {})
        print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
    """
)
POLICY = """
allow(_actor, _action: String, _it: McpServer) if context.server = "raw";
allow(_actor, _action: String, _it: Tool) if context.server = "raw";
allow(_actor, _action: String, _it: Prompt) if context.server = "raw";
allow(_actor, _action: String, _it: McpResource) if context.server = "raw";
"""


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    saved = users._HASHER
    users._HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    folder = tmp_path_factory.mktemp("names")
    script = folder / "raw_server.py"
    script.write_text(SERVER)
    upstream = {"name": "raw", "command": sys.executable, "args": [str(script)]}
    try:
        with start(folder, policy_extra=POLICY, more_upstreams=(upstream,)) as running:
            yield running
    finally:
        users._HASHER = saved


@pytest.fixture(scope="module")
def token(bastion):
    return bastion.token("sam", "raw")


def listed(bastion, token, method: str) -> dict:
    response = bastion.http.post(
        bastion.mcp_url("raw"),
        json=modern_request(1, method, {}),
        headers=modern_headers(token, method),
    )
    assert response.status_code == 200, response.text
    return messages(response)[-1]["result"]


@pytest.mark.parametrize(
    ("method", "key", "field", "good"),
    [
        ("tools/list", "tools", "name", ["echo", "write"]),
        ("prompts/list", "prompts", "name", ["hello"]),
        ("resources/list", "resources", "uri", ["raw://ok"]),
        ("resources/templates/list", "resourceTemplates", "uriTemplate", ["raw://{id}"]),
    ],
)
def test_a_list_offers_only_items_a_client_could_name(bastion, token, method, key, field, good):
    assert [item.get(field) for item in listed(bastion, token, method)[key]] == good


def test_a_tool_named_so_is_refused_when_asked_for_and_the_others_answer(bastion, token):
    for name in ("a\u0000b", "\ud800"):
        response = bastion.http.post(
            bastion.mcp_url("raw"),
            content=json.dumps(modern_request(2, "tools/call", {"name": name, "arguments": {}})),
            headers=modern_headers(token, "tools/call", "x"),
        )
        assert response.status_code == 400, response.text
    for name in ("echo", "write"):  # "write" listed hints in a list: read as none, no error
        answer = call_tool(bastion, token, "raw", name, {})
        assert answer["result"]["content"][0]["text"] == json.dumps(name), answer


def test_hints_in_another_shape_do_not_make_a_tool_read_only(bastion):
    state = bastion.app.state.gateway.upstreams["raw"]
    hints = state._hints_of(None)
    assert hints.annotations.get("write") == {}
    assert set(hints.annotations) == {"echo", "write"}
