"""An upstream's answer of `OFF_LOOP_BYTES` of JSON or more is read, masked and written for the
client on a worker thread, not on the event loop every other call of the replica needs; a
smaller one never leaves the loop. Either way the client gets the same bytes: through bastion,
from a real MCP server over stdio, over 2026-07-28 and 2025-11-25 event streams and as JSON
bodies, answered to the client as JSON and as an event stream, masks applied."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.gateway import handlers, transport, upstream
from bastion.gateway.jsonrpc import encode
from bastion.gateway.large_messages import OFF_LOOP_BYTES, LargeMessage, written
from bastion.gateway.masks import mask_result
from bastion.gateway.upstream import _large_message, _message
from tests.loop import noting_where
from tests.oauth.support import Servers
from tests.ports import free_socket

from .lab_server import SECRET
from .streams import ENVELOPE, messages, modern_headers
from .support import LAB, fresh_module, start

# stdio; 2026-07-28 and 2025-11-25 upstreams answering on event streams; one answering JSON.
SERVERS = ["lab", "labhttp", "labold", "labjson"]
# Customers in the answer: some MB of JSON, each named in it twice (structured and as text).
COUNT = 40_000
POLICY = """
allow(_actor, _action: String, _it: McpServer) if context.server = "labjson";
allow(_actor, "call", _it: Tool) if context.tool = "leak_much";
mask(_user: User, "call", _tool: Tool, "customers.*.email") if context.tool = "leak_much";
"""


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    lab = fresh_module("lab_server_json", LAB)
    app = lab.server.streamable_http_app(streamable_http_path="/mcp", json_response=True)
    with Servers() as servers:
        url = servers.serve(app, free_socket())
        labjson = {"name": "labjson", "url": f"{url}/mcp"}
        folder = tmp_path_factory.mktemp("large")
        with start(folder, policy_extra=POLICY, more_upstreams=(labjson,)) as running:
            running.tokens = {name: running.token("sam", name) for name in SERVERS}
            yield running


def call(bastion, server: str, shape: str):
    """``leak_much`` of COUNT customers as sam, answered as one JSON body (``shape`` "json") or
    as an event stream (asking for progress, which the tool reports first)."""
    params = {"name": "leak_much", "arguments": {"count": COUNT}, "_meta": dict(ENVELOPE)}
    headers = modern_headers(bastion.tokens[server], "tools/call", "leak_much")
    if shape == "json":
        headers["accept"] = "application/json"
    else:
        params["_meta"]["progressToken"] = "p1"
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
    response = bastion.http.post(bastion.mcp_url(server), json=body, headers=headers)
    assert response.status_code == 200, response.text[:300]
    return response


def masked_throughout(response) -> None:
    assert SECRET not in response.text
    result = messages(response)[-1]["result"]
    customers = result["structuredContent"]["customers"]
    assert len(customers) == COUNT
    assert {c["email"] for c in customers} == {"[masked]"}
    assert json.loads(result["content"][0]["text"]) == result["structuredContent"]


@pytest.mark.parametrize("shape", ["json", "events"])
@pytest.mark.parametrize("server", SERVERS)
def test_a_large_answer_is_read_masked_and_written_off_the_loop(
    bastion, monkeypatch, server, shape
):
    large = {"read": [], "masked": [], "written": []}
    monkeypatch.setattr(upstream, "_large_message", noting_where(_large_message, large["read"]))
    monkeypatch.setattr(handlers, "mask_result", noting_where(mask_result, large["masked"]))
    monkeypatch.setattr(transport, "written", noting_where(written, large["written"]))
    answer = call(bastion, server, shape)
    masked_throughout(answer)
    assert len(answer.content) > OFF_LOOP_BYTES
    assert large == {
        "read": ["worker thread"],
        "masked": ["worker thread"],
        "written": ["worker thread"],
    }
    if shape == "events" and server != "labjson":  # a JSON body carries no progress
        assert answer.headers["content-type"].startswith("text/event-stream")
        assert [m.get("method") for m in messages(answer)] == ["notifications/progress", None]

    # The same answer below the threshold: all of it on the loop, and the same bytes.
    small = {"read": [], "masked": [], "written": []}
    monkeypatch.setattr(upstream, "OFF_LOOP_BYTES", math.inf)
    monkeypatch.setattr(upstream, "_message", noting_where(_message, small["read"]))
    monkeypatch.setattr(handlers, "mask_result", noting_where(mask_result, small["masked"]))
    monkeypatch.setattr(transport, "encode", noting_where(encode, small["written"]))
    assert call(bastion, server, shape).content == answer.content
    assert {where for seen in small.values() for where in seen} == {"event loop"}
    assert small["masked"] == ["event loop"]
    assert large["read"] == large["written"] == ["worker thread"]  # not called again


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_the_stepwise_writer_writes_what_the_gateway_writes(value):
    assert written(value) == encode(value).encode()


def outcome(read, data):
    try:
        value = read(data)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, numbers JSON has not
        return type(e).__name__, str(e)
    return "ok", value, type(value) if not isinstance(value, dict) else dict


@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(
        json_values.map(json.dumps).map(str.encode),
        json_values.map(json.dumps),
        json_values.map(lambda v: json.dumps(v).encode("utf-16")),
        st.binary(max_size=12).map(lambda b: b"{" + b),
        st.sampled_from([b'{"n": NaN}', b'{"n": 1e999}', "[-Infinity]", b'{"a":1} x']),
    )
)
def test_the_large_reader_reads_what_the_reader_reads(data):
    assert outcome(_large_message, data) == outcome(_message, data)
    read = _large_message(data) if outcome(_message, data)[0] == "ok" else None
    if isinstance(read, dict):
        assert read.__class__ is LargeMessage  # how the handlers know it
