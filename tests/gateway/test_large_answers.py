"""An upstream's answer of `OFF_LOOP_BYTES` of JSON or more is read, masked and written for the
client on a worker thread, not on the event loop every other call of the replica needs; a
smaller one never leaves the loop. Either way the client gets the same bytes: through bastion,
from a real MCP server over stdio, over 2026-07-28 and 2025-11-25 event streams and as JSON
bodies, answered to the client as JSON and as an event stream, masks applied."""

from __future__ import annotations

import json
import math
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion import large_json
from bastion.approvals import pages, store
from bastion.gateway import handlers, masks, transport, upstream
from bastion.gateway.jsonrpc import encode
from bastion.gateway.masks import compile_paths, mask_result
from bastion.gateway.upstream import _large_message, _message
from bastion.large_json import OFF_LOOP_BYTES, LargeMessage, written
from bastion.names import readable_json
from bastion.turns import Turns
from tests import clients
from tests.loop import noting_where
from tests.oauth.support import Servers, hidden_fields
from tests.ports import free_socket

from .lab_server import SECRET
from .streams import ENVELOPE, messages, modern_headers
from .support import LAB, fresh_module, start

# stdio; 2026-07-28 and 2025-11-25 upstreams answering on event streams; one answering JSON.
SERVERS = ["lab", "labhttp", "labold", "labjson"]
# Customers in the answer: some MB of JSON, each named in it twice (structured and as text).
COUNT = 40_000
# So many, the result is held for avery's review: some MB of small objects, with no one long
# text (reading or writing one string is one step: docs/gateway.md, Known limits).
REVIEWED = 4 * COUNT + 1
POLICY = f"""
allow(_actor, _action: String, _it: McpServer) if context.server = "labjson";
allow(_actor, "call", _it: Tool) if context.tool = "leak_much";
mask(_user: User, "call", _tool: Tool, "customers.*.email") if context.tool = "leak_much";
requires_review(_user: User, "call", Tool{{"lab/leak_much"}}) if
  context.arguments.count = {REVIEWED};
approver(User{{"avery"}}, _user: User, "call", Tool{{"lab/leak_much"}});
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


def call(bastion, server: str, shape: str, count: int = COUNT):
    """``leak_much`` of ``count`` customers as sam, answered as one JSON body (``shape``
    "json") or as an event stream (asking for progress, which the tool reports first); the
    REVIEWED ones as structured content only."""
    arguments = {"count": count} if count != REVIEWED else {"count": count, "as_text": False}
    params = {"name": "leak_much", "arguments": arguments, "_meta": dict(ENVELOPE)}
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


def held_and_released(bastion):
    """``leak_much`` of REVIEWED customers as sam: held for review, shown to avery on the
    review page, released by her, and called again for the released result, which is
    returned."""
    held = messages(call(bastion, "lab", "json", REVIEWED))[-1]["error"]["data"]
    assert held["reason"] == "review_pending"
    with clients.client(base_url=bastion.url, follow_redirects=False, timeout=20) as browser:
        form = browser.get("/sign-in", params={"next": "/approvals"})
        fields = {**hidden_fields(form.text), "username": "avery", "password": bastion.password}
        assert browser.post("/sign-in", data=fields).status_code == 303
        page = browser.get(f"/approvals/{held['approval_id']}")
    assert page.status_code == 200
    assert page.text.count("Ada ") == REVIEWED
    approvals = bastion.app.state.approvals
    approvals.answer(held["approval_id"], "avery", "approve", channel="api")
    released = call(bastion, "lab", "json", REVIEWED)
    assert approvals.get(held["approval_id"]).status == "delivered"
    return released


def test_a_large_result_held_for_review_is_kept_shown_and_released_off_the_loop(
    bastion, monkeypatch
):
    """A result of some MB held for review is sealed and stored, opened, shown to its
    reviewer, masked and written to the client on worker threads, in turns (json's C reader
    and writer would keep the GIL, and so the loop, for all of it), and the client gets the
    bytes it gets when all of it is done on the loop."""
    large = {"sealed": [], "opened": [], "shown": [], "masked": [], "written": []}
    monkeypatch.setattr(store, "written", noting_where(written, large["sealed"]))
    monkeypatch.setattr(store, "read", noting_where(large_json.read, large["opened"]))
    monkeypatch.setattr(pages, "readable_json", noting_where(readable_json, large["shown"]))
    monkeypatch.setattr(handlers, "mask_result", noting_where(mask_result, large["masked"]))
    monkeypatch.setattr(transport, "written", noting_where(written, large["written"]))
    released = held_and_released(bastion)
    assert SECRET not in released.text
    customers = messages(released)[-1]["result"]["structuredContent"]["customers"]
    assert len(customers) == REVIEWED and {c["email"] for c in customers} == {"[masked]"}
    assert all(large.values()), large
    assert {where for seen in large.values() for where in seen} == {"worker thread"}, large

    # Below the threshold: sealed, opened and written in one C call each (the page and the
    # mask are made where they were), and the same bytes.
    monkeypatch.setattr(upstream, "OFF_LOOP_BYTES", math.inf)
    monkeypatch.setattr(store, "OFF_LOOP_BYTES", math.inf)
    small = {key: len(seen) for key, seen in large.items()}
    assert held_and_released(bastion).content == released.content
    assert [len(large[key]) - small[key] for key in ("sealed", "opened", "written")] == [0, 0, 0]


def test_the_json_of_a_large_text_block_is_masked_in_turns(monkeypatch):
    """The JSON of one text block of some MB (masked on a worker thread, as a large answer
    is) is read and written back in turns, the loop given the GIL between them, where one C
    call each would keep it throughout; the block is masked as when it is small."""
    customers = {"customers": [{"name": f"Ada {i}", "email": SECRET} for i in range(4 * COUNT)]}
    text = json.dumps(customers)
    assert len(text) > OFF_LOOP_BYTES
    paths = compile_paths(("customers.*.email",))
    steps = []
    tick = Turns.tick
    here = threading.get_ident()

    def counted(turns: Turns) -> None:
        # This thread's turns only: the patch is the process's, and a thread another test of
        # this worker left running (a replica's reload, a flush) takes turns too.
        if threading.get_ident() == here:
            steps.append(None)
        tick(turns)

    monkeypatch.setattr(Turns, "tick", counted)

    def masked() -> tuple[dict, int]:
        return mask_result({"content": [{"type": "text", "text": text}]}, paths)

    large = masked()
    assert SECRET not in large[0]["content"][0]["text"]
    in_turns = len(steps)
    assert in_turns > 4 * COUNT  # a tick after each object read, and each chunk written

    monkeypatch.setattr(masks, "OFF_LOOP_BYTES", math.inf)
    assert masked() == large
    assert len(steps) == in_turns  # the small path: no turns


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_the_stepwise_writer_writes_what_the_gateway_writes(value):
    assert written(value) == encode(value)


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
