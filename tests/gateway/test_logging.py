"""Log messages and completions through bastion: ordinary MCP, offered by default and decided.

An upstream's log messages about a call reach the client that made it, at the level that client
asked for (``logging/setLevel`` per 2025-11-25 session, ``_meta`` per 2026-07-28 request), and
no client's level changes what another gets: the shared upstream is never set to one client's
level as it is. ``logging/setLevel`` and ``completion/complete`` are decided as ``connect``, a
completion also as ``get`` of its prompt or ``read`` of its resource template."""

from __future__ import annotations

import json

import pytest

from bastion.policy.parser import parse_fact

from .lab_server import SECRET
from .streams import ENVELOPE, legacy_session, messages, modern_headers

# The SDK marks logging deprecated as of 2026-07-28; it is still MCP in both eras.
pytestmark = pytest.mark.filterwarnings("ignore:The logging capability is deprecated")

LOG_LEVEL = "io.modelcontextprotocol/logLevel"
LEVELS = ["debug", "info", "warning", "error"]  # what the lab's chatter tool logs, in order


def last(response) -> dict:
    return messages(response)[-1]


def set_level(bastion, server: str, headers: dict, level: str) -> dict:
    body = {"jsonrpc": "2.0", "id": 7, "method": "logging/setLevel", "params": {"level": level}}
    return last(bastion.http.post(bastion.mcp_url(server), json=body, headers=headers))


def chatter(bastion, server: str, headers: dict, meta: dict | None = None) -> list[str]:
    """Call the lab's chatter tool; the levels of the log messages that came back with it."""
    params: dict = {"name": "chatter", "arguments": {}}
    if meta is not None:
        params["_meta"] = meta
    body = {"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": params}
    response = bastion.http.post(bastion.mcp_url(server), json=body, headers=headers)
    assert response.status_code == 200, response.text
    frames = messages(response)
    assert frames[-1]["result"]["content"][0]["text"] == "said it all"
    return [f["params"]["level"] for f in frames if f.get("method") == "notifications/message"]


def set_levels_seen(bastion) -> list[str]:
    if not bastion.lab_trace.exists():
        return []
    entries = [json.loads(line) for line in bastion.lab_trace.read_text().splitlines()]
    return [e["tag"] for e in entries if e["kind"] == "set-level"]


@pytest.mark.parametrize("server", ["labhttp", "labold"])
def test_log_messages_of_a_call_reach_the_client_that_asked_at_its_level(bastion, server):
    heard: dict = {"legacy": [], "auto": []}

    def script_for(mode):
        async def on_log(params):
            heard[mode].append((params.level, params.data))

        async def script(client, seen):
            if mode == "legacy":
                await client.set_logging_level("info")
            seen["text"] = (await client.call_tool("chatter", {})).content[0].text

        return script, on_log

    for mode, options in (("legacy", {}), ("auto", {"log_level": "warning"})):
        script, on_log = script_for(mode)
        seen = bastion.sdk("sam", server, mode, script, logging_callback=on_log, **options)
        assert seen["text"] == "said it all"
    assert heard["legacy"] == [
        (level, f"{level} message") for level in ("info", "warning", "error")
    ]
    assert heard["auto"] == [(level, f"{level} message") for level in ("warning", "error")]


def test_one_clients_level_changes_nothing_for_another(bastion):
    server = "labold"  # a 2025-11-25 upstream: one log level for the whole connection
    before = set_levels_seen(bastion)
    chatty = legacy_session(bastion, bastion.token("sam", server), server)
    terse = legacy_session(bastion, bastion.token("sam", server), server)
    silent = legacy_session(bastion, bastion.token("avery", server), server)
    assert set_level(bastion, server, chatty, "debug")["result"] == {}
    assert set_level(bastion, server, terse, "error")["result"] == {}
    assert chatter(bastion, server, chatty) == LEVELS
    assert chatter(bastion, server, terse) == ["error"]
    assert chatter(bastion, server, silent) == []  # never asked: nothing
    # A 2026-07-28 request gets what its own _meta asks for, and nothing without a level.
    token = bastion.token("sam", server)
    modern = modern_headers(token, "tools/call", "chatter")
    assert chatter(bastion, server, modern, {**ENVELOPE, LOG_LEVEL: "warning"}) == LEVELS[2:]
    assert chatter(bastion, server, modern, ENVELOPE) == []
    # The chatty client asks for less: the others are not affected, and the upstream, shared,
    # was only ever asked for the most detailed level any client wanted (never "error").
    assert set_level(bastion, server, chatty, "warning")["result"] == {}
    assert chatter(bastion, server, chatty) == LEVELS[2:]
    assert chatter(bastion, server, terse) == ["error"]
    assert set_levels_seen(bastion)[len(before) :] in (["debug"], [])
    assert "error" not in set_levels_seen(bastion)[len(before) :]


def test_a_2026_request_without_a_level_gets_no_log_messages_from_a_2026_upstream(bastion):
    server = "labhttp"
    token = bastion.token("sam", server)
    headers = modern_headers(token, "tools/call", "chatter")
    assert chatter(bastion, server, headers, ENVELOPE) == []
    assert chatter(bastion, server, headers, {**ENVELOPE, LOG_LEVEL: "info"}) == LEVELS[1:]
    assert chatter(bastion, server, headers, {**ENVELOPE, LOG_LEVEL: "loud"}) == []


def test_set_level_is_decided_as_connect_and_refused_in_2026(bastion):
    server = "labold"
    session = legacy_session(bastion, bastion.token("sam", server), server)
    held = parse_fact(f'connect_held(McpServer{{"{server}"}}, User{{"sam"}})')
    bastion.apply(inserts=[held])
    try:
        refused = set_level(bastion, server, session, "debug")
        assert refused["error"]["data"]["reason"] == "approval_pending"
    finally:
        bastion.apply(deletes=[held])
    assert set_level(bastion, server, session, "loud")["error"]["code"] == -32602
    modern = modern_headers(bastion.token("sam", server), "logging/setLevel")
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "logging/setLevel",
        "params": {"level": "debug", "_meta": ENVELOPE},
    }
    answer = last(bastion.http.post(bastion.mcp_url(server), json=body, headers=modern))
    assert answer["error"]["code"] == -32601


def test_logging_and_completions_are_offered_when_the_upstream_has_them(bastion):
    async def script(client, seen):
        seen["capabilities"] = client.server_capabilities

    seen = bastion.sdk("sam", "labold", "legacy", script)
    assert seen["capabilities"].logging is not None
    assert seen["capabilities"].completions is not None


def complete(bastion, server: str, token: str, ref: dict, value: str = "") -> dict:
    body = {
        "jsonrpc": "2.0",
        "id": 9,
        "method": "completion/complete",
        "params": {"ref": ref, "argument": {"name": "name", "value": value}, "_meta": ENVELOPE},
    }
    headers = modern_headers(token, "completion/complete")
    return last(bastion.http.post(bastion.mcp_url(server), json=body, headers=headers))


@pytest.mark.parametrize("server", ["lab", "labhttp", "labold"])
def test_completions_are_decided_as_get_of_the_prompt_or_read_of_the_resource(bastion, server):
    token = bastion.token("sam", server)
    greeting = complete(bastion, server, token, {"type": "ref/prompt", "name": "greeting"}, "A")
    assert greeting["result"]["completion"]["values"] == ["Ada", "Alan"]
    # A prompt nobody may get (no fact names it): refused, as prompts/get would be.
    hidden = complete(bastion, server, token, {"type": "ref/prompt", "name": "unlisted"})
    assert hidden["error"]["data"]["reason"] == "not_permitted"
    # A resource only admins may read: refused for sam, as resources/read would be.
    secret = {"type": "ref/resource", "uri": "lab://secret"}
    assert complete(bastion, server, token, secret)["error"]["data"]["reason"] == "not_permitted"
    # Under a mask (reading lab://leaky is masked), no values are given.
    masked = complete(bastion, server, token, {"type": "ref/resource", "uri": "lab://leaky"})
    assert masked["result"]["completion"]["values"] == []
    bastion.flush()
    record = bastion.records.get(hidden["error"]["data"]["decision_id"])
    assert (record.method, record.target) == (
        "completion/complete",
        f'Prompt{{"{server}/unlisted"}}',
    )


def test_a_completion_asks_the_scope_and_the_approval_reading_the_resource_asks(bastion):
    """A token without the scope a resource's ``read`` requires gets no values of it through a
    completion: the same step-up (403 ``insufficient_scope`` naming the scope) that
    resources/read gets; a resource held for approval holds its completion too. The lab
    completes anything but its greeting with a secret, which never comes out."""
    token = bastion.token("sam", "labhttp")  # customers:read only
    body = {
        "jsonrpc": "2.0",
        "id": 9,
        "method": "completion/complete",
        "params": {
            "ref": {"type": "ref/resource", "uri": "lab://guarded"},
            "argument": {"name": "name", "value": ""},
            "_meta": ENVELOPE,
        },
    }
    headers = modern_headers(token, "completion/complete")
    stepped = bastion.http.post(bastion.mcp_url("labhttp"), json=body, headers=headers)
    assert stepped.status_code == 403, stepped.text
    assert 'error="insufficient_scope"' in stepped.headers["www-authenticate"]
    assert "customers:write" in stepped.headers["www-authenticate"]
    assert SECRET not in stepped.text
    held = complete(bastion, "labhttp", token, {"type": "ref/resource", "uri": "lab://held"})
    assert held["error"]["data"]["reason"] == "approval_pending", held
    assert SECRET not in json.dumps(held)


def test_a_malformed_completion_is_refused_before_the_upstream(bastion):
    token = bastion.token("sam", "labhttp")
    answer = complete(bastion, "labhttp", token, {"type": "ref/tool", "name": "leak"})
    assert answer["error"]["code"] == -32602
