"""Whatever an upstream answers or lists, the client gets a clear answer and nothing a mask
covers: hypothesis writes the upstream's answers (any JSON as the result or the error, MCP shapes with
odd members) and the notifications it sends before them (progress, log messages, others, of any
shape), a scripted HTTP upstream sends them, and sam asks through bastion in either era.

Properties, for every answer:
- the client gets HTTP 200 and a JSON-RPC answer to its own id: a result, or an error with a
  code and a message; never bastion's own failure (-32603, "internal error in bastion"), and
  nothing logged as a failure; what comes before the answer is notifications, a progress one
  with the client's own token;
- a value at a masked path never reaches the client, whatever shape it arrives in (in
  ``structuredContent``, in a text block's JSON, in an embedded resource, in an error), and
  neither does the JSON text that holds it.

And what it lists (a raw stdio upstream, below) is offered only where a client could name it
back; what it says of itself at initialize or server/discover is read in MCP's shapes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion.gateway.jsonrpc import error_parts
from tests.oauth.support import free_socket, serve

from .streams import call_tool, legacy_session, messages, modern_headers, modern_request
from .support import start

# A raw MCP stdio server (no SDK, which would refuse to list such names): its lists hold, beside
# one good item each, items no client could name. Its "write" tool says it is read-only in a
# list instead of an object.
RAW_SERVER = textwrap.dedent(
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
SECRET = "s3cr3t-value-1f9a"  # only ever under a key named "secret"
POLICY = """
allow(_actor, _action: String, _it: McpServer) if context.server in ["fuzz", "oddinit", "odddisc", "raw", "silent", "mute"];
allow(_actor, _action: String, _it: Tool) if context.server in ["fuzz", "oddinit", "odddisc", "raw", "silent", "mute"];
allow(_actor, _action: String, _it: Prompt) if context.server in ["fuzz", "oddinit", "odddisc", "raw"];
allow(_actor, _action: String, _it: McpResource) if context.server in ["fuzz", "oddinit", "odddisc", "raw"];
mask(_user: User, "call", _it: Tool, "items.*.secret") if
  context.server in ["fuzz", "oddinit", "odddisc", "raw"] and context.tool = "masked";
requires_review(_user: User, "call", Tool{"fuzz/reviewed"});
"""
REQUESTS = {
    "tools/list": {},
    "tools/call": {"name": "plain", "arguments": {}},
    "prompts/list": {},
    "prompts/get": {"name": "p", "arguments": {}},
    "resources/list": {},
    "resources/templates/list": {},
    "resources/read": {"uri": "fuzz://r"},
    "completion/complete": {
        "ref": {"type": "ref/prompt", "name": "p"},
        "argument": {"name": "a", "value": ""},
    },
}
INITIALIZED = {
    "protocolVersion": "2025-11-25",
    "capabilities": {"tools": {}, "prompts": {}, "resources": {}, "completions": {}},
    "serverInfo": {"name": "fuzz", "version": "1"},
}


class Scripted:
    """An MCP upstream over HTTP (no session) that answers each request with the message the
    test set last (its id put in), as JSON, or as an event stream after the notifications the
    test set (a progress notification's token "TOKEN" is the request's own); ``initialize`` as a
    plain server would."""

    def __init__(self, initialized: dict | None = None, answer: dict | None = None) -> None:
        self.initialized = INITIALIZED if initialized is None else initialized
        self.answer: dict = answer or {"result": {}}
        self.raw: bytes | None = None
        # Or the answer as an event stream of these texts, "ID" standing for the request's id.
        self.raw_events: list[str] | None = None
        self.notes: list[dict] = []
        self.app = Starlette(routes=[Route("/mcp", self.post, methods=["POST"])])

    async def post(self, request: Request) -> Response:
        message = json.loads(await request.body())
        if not isinstance(message, dict) or "id" not in message or "method" not in message:
            return Response(status_code=202)  # a notification, or a response to its request
        if message.get("method") == "initialize":
            result = self.initialized
            return JSONResponse({"jsonrpc": "2.0", "id": message["id"], "result": result})
        if self.raw is not None:  # the answer as bytes, "ID" standing for the request's id
            body = self.raw.replace(b'"ID"', json.dumps(message["id"]).encode())
            return Response(body, media_type="application/json")
        if self.raw_events is not None:
            texts = [e.replace('"ID"', json.dumps(message["id"])) for e in self.raw_events]
            body = "".join(f"event: message\ndata: {e}\n\n" for e in texts)
            return Response(body, media_type="text/event-stream")
        answer = {**self.answer, "jsonrpc": "2.0", "id": message["id"]}
        if not self.notes:
            return JSONResponse(answer)
        token = ((message.get("params") or {}).get("_meta") or {}).get("progressToken")
        events = [*map(partial(_with_token, token), self.notes), answer]
        body = "".join(f"event: message\ndata: {json.dumps(e)}\n\n" for e in events)
        return Response(body, media_type="text/event-stream")


def _with_token(token, note: dict) -> dict:
    params = note.get("params")
    if isinstance(params, dict) and params.get("progressToken") == "TOKEN" and token is not None:
        note = {**note, "params": {**params, "progressToken": token}}
    return {"jsonrpc": "2.0", **note}


@pytest.fixture(scope="module")
def upstream():
    return Scripted()


# What two more upstreams say of themselves, each member in another shape than MCP's: one at
# initialize (2025-11-25), one at server/discover (2026-07-28, which it answers every request
# with).
ODD = {"capabilities": {"tools": [1], "resources": "yes", "logging": 5, "prompts": None}}
ODD_INIT = {**ODD, "protocolVersion": 7, "serverInfo": "odd", "instructions": {"a": 1}}
ODD_DISCOVERY = {
    "result": {**ODD, "supportedVersions": ["2026-07-28"], "_meta": "odd", "instructions": [1]}
}


# "silent" takes connections and never answers; "mute" is a stdio process that never answers.
MUTE_SERVER = "import sys, time\nfor line in sys.stdin:\n    time.sleep(3600)\n"


@pytest.fixture(scope="module")
def silent_url():
    """An HTTP address that accepts connections, reads what comes, and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: list[socket.socket] = []

    def hold() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(listener.accept()[0])

    threading.Thread(target=hold, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/mcp"
    listener.close()
    for connection in held:
        connection.close()


@pytest.fixture(scope="module")
def bastion(tmp_path_factory, upstream, silent_url):
    odd_init, odd_discovery = Scripted(ODD_INIT), Scripted(answer=ODD_DISCOVERY)
    folder = tmp_path_factory.mktemp("upfuzz")
    (folder / "raw_server.py").write_text(RAW_SERVER)
    (folder / "mute_server.py").write_text(MUTE_SERVER)
    with (
        serve(upstream.app, free_socket()) as url,
        serve(odd_init.app, free_socket()) as init_url,
        serve(odd_discovery.app, free_socket()) as discovery_url,
    ):
        more = (
            {"name": "fuzz", "url": f"{url}/mcp"},
            {"name": "oddinit", "url": f"{init_url}/mcp"},
            {"name": "odddisc", "url": f"{discovery_url}/mcp"},
            {"name": "raw", "command": sys.executable, "args": [str(folder / "raw_server.py")]},
            {"name": "silent", "url": silent_url, "timeout": 1},
            {
                "name": "mute",
                "command": sys.executable,
                "args": [str(folder / "mute_server.py")],
                "timeout": 1,
            },
        )
        with start(folder, policy_extra=POLICY, more_upstreams=more) as running:
            yield running


@pytest.fixture(scope="module")
def token(bastion):
    return bastion.token("sam", "fuzz")


# Any JSON: text that may be a name, a URI, a mime type, or JSON itself; never the secret.
leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["text", "image", "resource", "resource_link", "fuzz://r", "p", "plain"])
)
any_json = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def mcp_shaped(values):
    """MCP's result members, each holding ``values``, some of them in MCP's own shapes."""
    block = st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image", "resource", "resource_link", "audio"])},
        optional={"text": values, "resource": values, "data": values, "uri": values},
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "content": st.lists(block, max_size=3) | values,
            "structuredContent": values,
            "isError": values,
            "tools": st.lists(values, max_size=3) | values,
            "prompts": values,
            "resources": values,
            "resourceTemplates": values,
            "contents": values,
            "messages": values,
            "completion": values,
            "nextCursor": values,
            "_meta": values,
            "resultType": st.sampled_from(["complete", "input_required"]) | values,
            "inputRequests": st.dictionaries(st.text(max_size=4), questions(values), max_size=2)
            | values,
            "requestState": values,
        },
    )


QUESTIONS = ["elicitation/create", "sampling/createMessage", "roots/list", "tools/call"]


def questions(values):
    """A request an upstream asks the client (MCP's, or another), with params of any shape."""
    return st.fixed_dictionaries(
        {"method": st.sampled_from(QUESTIONS) | values}, optional={"params": values}
    )


def notifications(values):
    """What an upstream may send before its answer: notifications MCP defines, with their
    members of any shape (a progress of the request's own token, or not), or any other, and
    requests for the client (which declared no capability: each is refused to the upstream)."""
    progress = st.fixed_dictionaries(
        {"progressToken": st.just("TOKEN") | values},
        optional={"progress": st.integers(0, 10) | values, "total": values, "message": values},
    )
    log = st.fixed_dictionaries(
        {"level": st.sampled_from(["info", "error", "debug"]) | values},
        optional={"data": values, "logger": values},
    )
    note = st.one_of(
        st.builds(lambda p: {"method": "notifications/progress", "params": p}, progress),
        st.builds(lambda p: {"method": "notifications/message", "params": p}, log),
        st.builds(
            lambda m, p: {"method": m, "params": p},
            st.sampled_from(
                [
                    "notifications/resources/updated",
                    "notifications/tools/list_changed",
                    "notifications/cancelled",
                    "notifications/whatever",
                ]
            )
            | values,
            values,
        ),  # fmt: skip
        st.builds(
            lambda i, q: {"id": i, **q}, st.integers(1, 99) | st.text(max_size=4), questions(values)
        ),
    )
    return st.lists(note, max_size=3)


def answers(values):
    """An upstream's answer: a result (any JSON, or MCP-shaped), or an error (of any shape)."""
    return st.one_of(
        st.builds(lambda r: {"result": r}, values | mcp_shaped(values)),
        st.builds(lambda e: {"error": e}, values),
        st.builds(
            lambda c, m, d: {"error": {"code": c, "message": m, "data": d}},
            st.integers(-40000, 40000) | values,
            values,
            values,
        ),
    )


@pytest.fixture(scope="module")
def legacy(bastion, token):
    """The headers of a 2025-11-25 session with the fuzzed upstream."""
    return legacy_session(bastion, token, "fuzz")


def ask(bastion, token, upstream, method, params, answer, legacy=None, notes=()) -> list[dict]:
    """Ask ``method`` with ``params`` (and a progress token) while the upstream sends ``notes``
    then answers ``answer``: in 2026-07-28 (asking for every log message), or in the 2025-11-25
    session whose headers ``legacy`` are. The messages the client got, the answer last, checked
    as JSON-RPC."""
    upstream.answer, upstream.notes = answer, list(notes)
    name = params.get("name") or params.get("uri")
    if legacy is None:
        body, headers = modern_request(9, method, params), modern_headers(token, method, name)
        body["params"]["_meta"]["progressToken"] = "mine"
        body["params"]["_meta"]["io.modelcontextprotocol/logLevel"] = "debug"
    else:
        params = {**params, "_meta": {"progressToken": "mine"}}
        body, headers = {"jsonrpc": "2.0", "id": 9, "method": method, "params": params}, legacy
    response = bastion.http.post(bastion.mcp_url("fuzz"), json=body, headers=headers, timeout=30)
    assert response.status_code == 200, (answer, response.status_code, response.text)
    got = messages(response)
    for note in got[:-1]:
        assert isinstance(note.get("method"), str) and "id" not in note, (notes, note)
        if note["method"] == "notifications/progress":
            assert note["params"]["progressToken"] == "mine", (notes, note)
    reply = got[-1]
    assert reply.get("id") == 9, (answer, reply)
    assert ("result" in reply) != ("error" in reply), (answer, reply)
    if "error" in reply:
        error = reply["error"]
        assert isinstance(error.get("code"), int) and isinstance(error.get("message"), str)
        assert error["message"], (answer, reply)
        assert "internal error in bastion" not in error["message"], (answer, reply)
    return got


def kind(reply: dict) -> str:
    return f"error {reply['error']['code']}" if "error" in reply else "result"


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(sorted(REQUESTS)),
    answer=answers(any_json),
    notes=notifications(any_json),
    old=st.booleans(),
)
def test_any_upstream_answer_gets_the_client_a_clear_answer(
    bastion, token, upstream, legacy, caplog, method, answer, notes, old
):
    caplog.clear()
    # A call reads the tools' hints from the upstream's list (the same answer) until it has one.
    bastion.app.state.gateway.upstreams["fuzz"].forget_tools()
    with caplog.at_level(logging.ERROR, logger="bastion"):
        reply = ask(
            bastion, token, upstream, method, REQUESTS[method], answer, legacy if old else None,
            notes,
        )[-1]  # fmt: skip
        event(f"{method}: {kind(reply)}")
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, (answer, [r.getMessage() for r in failures])


# Values where the secret is only at the masked path (``items.*.secret``), or in JSON text.
def _with(record: dict, secret: bool) -> dict:
    return {**record, "secret": SECRET} if secret else record


_record = st.builds(
    _with, st.dictionaries(st.text(max_size=8), any_json, max_size=3), st.booleans()
)
_items = st.lists(_record, max_size=3) | st.dictionaries(st.text(max_size=8), _record, max_size=3)
_shaped = st.builds(
    lambda items, rest: {**rest, "items": items},
    _items | any_json,
    st.dictionaries(st.text(max_size=8), any_json, max_size=2),
)
with_secrets = _shaped | _shaped.map(json.dumps) | any_json


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(answer=answers(with_secrets), notes=notifications(with_secrets), old=st.booleans())
def test_a_masked_value_never_reaches_the_client_in_any_shape(
    bastion, token, upstream, legacy, answer, notes, old
):
    params = {"name": "masked", "arguments": {}}
    got = ask(
        bastion, token, upstream, "tools/call", params, answer, legacy if old else None, notes
    )
    event(kind(got[-1]))
    event(f"{len(got) - 1} notifications relayed")
    assert SECRET not in json.dumps(got), (answer, notes, got)


def test_the_fuzzed_upstream_is_reached_and_its_answer_relayed(bastion, token, upstream):
    """The properties above hold of answers that arrive: a plain one does, as it was sent, and
    so does a notification sent before it."""
    answer = {"result": {"content": [{"type": "text", "text": "hello"}]}}
    reply = ask(bastion, token, upstream, "tools/call", REQUESTS["tools/call"], answer)[-1]
    assert reply["result"]["content"] == [{"type": "text", "text": "hello"}]
    masked = {"result": {"structuredContent": {"items": [{"secret": SECRET, "kept": 1}]}}}
    reply = ask(
        bastion, token, upstream, "tools/call", {"name": "masked", "arguments": {}}, masked
    )[-1]
    assert reply["result"]["structuredContent"]["items"][0]["kept"] == 1, reply
    assert SECRET not in json.dumps(reply)
    # A progress notification before the answer reaches the client, with the client's token;
    # under a mask without its free text.
    progress = {"progressToken": "TOKEN", "progress": 1, "message": SECRET}
    notes = [{"method": "notifications/progress", "params": progress}]
    for tool, shown in (("plain", {"message": SECRET}), ("masked", {})):
        got = ask(bastion, token, upstream, "tools/call", {"name": tool}, answer, notes=notes)
        assert got[0]["params"] == {"progressToken": "mine", "progress": 1, **shown}, got


@pytest.mark.parametrize(
    ("error", "parts"),
    [
        ({"code": -32001, "message": "busy", "data": {"a": 1}}, (-32001, "busy", {"a": 1})),
        ({"code": "-32001", "message": "busy"}, (-1, "busy", None)),
        ({"code": True, "message": 5}, (-1, "default", None)),
        ({"code": 1.5, "message": ""}, (-1, "default", None)),
        ({"code": None, "message": None, "data": [1]}, (-1, "default", [1])),
        (["code", 7], (-1, "default", None)),
        ("error", (-1, "default", None)),
    ],
)
def test_an_error_someone_else_wrote_is_read_for_what_it_holds(error, parts):
    """The one reader of an upstream's error and of a client's error answer (to a question an
    upstream asked): an odd code or message is replaced, never a failure of bastion's own."""
    assert error_parts(error, -1, "default") == parts


@pytest.mark.parametrize("server", ["oddinit", "odddisc"])
def test_an_upstream_describing_itself_in_other_shapes_is_served_with_what_mcp_shapes(
    bastion, server
):
    """Capabilities that are not objects, a server name that is not an object, a version or
    instructions that are not text (at initialize or server/discover): each is left out, and a
    client of either era gets clear answers (a list of tools as ``tools`` was bastion's own
    failure at the client's initialize, discover and tools/list)."""
    token = bastion.token("sam", server)
    session = legacy_session(bastion, token, server)  # initialize: asserts 200
    for body, headers in (
        ({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}, session),
        (modern_request(2, "server/discover", {}), modern_headers(token, "server/discover")),
        (modern_request(3, "tools/list", {}), modern_headers(token, "tools/list")),
    ):
        answer = bastion.http.post(bastion.mcp_url(server), json=body, headers=headers)
        assert answer.status_code == 200, answer.text
        reply = messages(answer)[-1]
        assert "internal error" not in json.dumps(reply), reply
        if body["method"] == "server/discover":
            assert reply["result"]["capabilities"] == {}, reply


# -- what an upstream lists ----------------------------------------------------------------------
# Offered only where a client could name it back: an item whose name (a tool's or a prompt's
# name, a resource's URI or URI template) is not a non-empty string that a client may send (no
# NUL, no lone surrogate: bastion refuses those in every request) is left out of the list, and a
# tool's hints are taken only from a tool so named, in the shape MCP gives them.


@pytest.fixture(scope="module")
def raw_token(bastion):
    return bastion.token("sam", "raw")


def listed(bastion, token, method: str) -> dict:
    """``method`` (a list) of the raw upstream, in 2026-07-28: its result."""
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
def test_a_list_offers_only_items_a_client_could_name(bastion, raw_token, method, key, field, good):
    assert [item.get(field) for item in listed(bastion, raw_token, method)[key]] == good


def test_a_tool_named_so_is_refused_when_asked_for_and_the_others_answer(bastion, raw_token):
    for name in ("a\u0000b", "\ud800"):
        response = bastion.http.post(
            bastion.mcp_url("raw"),
            content=json.dumps(modern_request(2, "tools/call", {"name": name, "arguments": {}})),
            headers=modern_headers(raw_token, "tools/call", "x"),
        )
        assert response.status_code == 400, response.text
    for name in ("echo", "write"):  # "write" listed hints in a list: read as none, no error
        answer = call_tool(bastion, raw_token, "raw", name, {})
        assert answer["result"]["content"][0]["text"] == json.dumps(name), answer


def test_hints_in_another_shape_do_not_make_a_tool_read_only(bastion):
    state = bastion.app.state.gateway.upstreams["raw"]
    hints = state._hints_of(None)
    assert hints.annotations.get("write") == {}
    assert set(hints.annotations) == {"echo", "write"}


@pytest.mark.parametrize(
    "answer",
    [
        {"result": {"content": [{"type": "text", "text": SECRET}], "_meta": {"a": SECRET}}},
        {"error": {"code": 5, "message": SECRET, "data": SECRET}},
        {"result": {"resultType": "input_required", "inputRequests": {"q": {"method": SECRET}}}},
    ],
)
@pytest.mark.parametrize("old", [False, True])
def test_nothing_of_a_call_held_for_review_reaches_the_client_before_it_is_released(
    bastion, token, upstream, answer, old
):
    """A call whose result waits for a reviewer: what the upstream sends during it (progress
    with a message, log messages, an error, a question for the client) is not the reviewer's
    to see after the client has it; the client gets progress without its message, and its
    answer is that the result is held (or an error without the upstream's text)."""
    progress = {"progressToken": "TOKEN", "progress": 1, "message": SECRET}
    notes = [
        {"method": "notifications/progress", "params": progress},
        {"method": "notifications/message", "params": {"level": "error", "data": SECRET}},
    ]
    session = None
    if old:
        session = legacy_session(bastion, token, "fuzz")
        level = {"jsonrpc": "2.0", "id": 0, "method": "logging/setLevel"}
        level["params"] = {"level": "debug"}
        assert bastion.http.post(bastion.mcp_url("fuzz"), json=level, headers=session).is_success
    # Arguments of its own: an identical call would find this one's hold, and not be sent.
    params = {"name": "reviewed", "arguments": {"case": f"{old} {json.dumps(answer)}"}}
    got = ask(bastion, token, upstream, "tools/call", params, answer, session, notes)
    assert SECRET not in json.dumps(got), got
    assert got[0]["params"] == {"progressToken": "mine", "progress": 1}, got
    assert "error" in got[-1], got


@pytest.mark.parametrize(
    "question",
    [
        {"method": {"items": [{"secret": SECRET}]}, "params": {}},
        {"method": "elicitation/create", "params": {"mode": SECRET, "message": "m"}},
        {"method": "sampling/createMessage", "params": {"messages": [SECRET]}},
    ],
)
@pytest.mark.parametrize("old", [False, True])
def test_a_question_of_a_masked_call_is_refused_without_its_text(
    bastion, token, upstream, question, old
):
    """A masked call's result cannot ask its client for input, and the refusal is the same
    whatever the upstream asked: a refusal naming the upstream's method or mode carried it."""
    answer = {"result": {"resultType": "input_required", "inputRequests": {"q": question}}}
    upstream.answer, upstream.notes = answer, []
    declared = {"elicitation": {"form": {}}, "sampling": {}}
    if old:
        headers = legacy_session(bastion, token, "fuzz", declared)
        params = {"name": "masked", "arguments": {}}
        body = {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": params}
    else:
        body = modern_request(9, "tools/call", {"name": "masked", "arguments": {}}, declared)
        headers = modern_headers(token, "tools/call", "masked")
    response = bastion.http.post(bastion.mcp_url("fuzz"), json=body, headers=headers, timeout=30)
    reply = messages(response)[-1]
    assert (
        reply["error"]["message"]
        == "a call whose result is masked or held for review cannot ask its client for input"
    )
    assert SECRET not in response.text


@pytest.mark.parametrize("depth", [200, 900, 960, 990, 1010, 5000])
@pytest.mark.parametrize("tool", ["plain", "masked"])
@pytest.mark.parametrize("old", [False, True])
@pytest.mark.parametrize("where", ["structured", "text"])
def test_an_answer_nested_deep_gets_the_client_a_clear_answer(
    bastion, token, upstream, legacy, depth, tool, old, where
):
    """JSON nested as deep as Python's parser takes, or deeper: never bastion's own failure.
    Nested 990 to 1,020 deep, orjson read what json does not, and the gateway's writer (json's
    encoder, past 255 levels) could not write it (a 500): json reads past 255 levels."""
    nested = b"[" * depth + b"]" * depth
    upstream.raw = b'{"jsonrpc": "2.0", "id": "ID", "result": {"structuredContent": {"items": '
    if where == "structured":
        upstream.raw += nested + b'}, "content": [{"type": "text", "text": "x"}]}}'
    else:  # a text block of JSON, which a mask reads
        upstream.raw += b'[]}, "content": [{"type": "text", "text": "' + nested + b'"}]}}'
    try:
        ask(
            bastion, token, upstream, "tools/call", {"name": tool, "arguments": {}},
            {"result": {}}, legacy if old else None,
        )  # fmt: skip
    finally:
        upstream.raw = None


_fragments = st.sampled_from(
    [b"{", b"}", b"[", b"]", b'"ID"', b'"id"', b":", b",", b'"result"', b'"error"', b"null",
     b'"jsonrpc"', b'"2.0"', b"\\ud800", b'"\\u0000"', b"1e999", b"\xff", b"\xef\xbb\xbf", b" "]
)  # fmt: skip


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    raw=st.binary(max_size=64) | st.lists(_fragments, max_size=24).map(b"".join),
    old=st.booleans(),
)
def test_any_bytes_an_upstream_answers_get_the_client_a_clear_answer(
    bastion, token, upstream, legacy, caplog, raw, old
):
    """Not JSON, JSON of another encoding, half a message, a message without the request's id:
    the client gets a JSON-RPC answer, never bastion's own failure, and nothing is logged as
    one."""
    caplog.clear()
    upstream.raw = raw
    try:
        with caplog.at_level(logging.ERROR, logger="bastion"):
            reply = ask(
                bastion, token, upstream, "tools/call", REQUESTS["tools/call"], {"result": {}},
                legacy if old else None,
            )[-1]  # fmt: skip
            event(kind(reply))
    finally:
        upstream.raw = None
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failures, (raw, [r.getMessage() for r in failures])


@pytest.mark.parametrize("server", ["silent", "mute"])
def test_an_upstream_that_never_answers_its_start_fails_each_call_in_its_timeout(bastion, server):
    """An HTTP upstream that takes the connection and never answers, a process that never
    answers its handshake: each call fails within the upstream's timeout (1 s here), three at
    once as well (those waiting for the first call's start included), and each new call tries
    again."""
    token = bastion.token("sam", server)

    def call(_: int) -> dict:
        return call_tool(bastion, token, server, "echo", {})

    for _attempt in range(2):
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(call, range(3)))
        # (Without the bound, each waited until its client gave up.)
        for answer in answers:
            assert answer["error"]["code"] == -32000, answer
            assert "did not start within 1s" in answer["error"]["message"], answer


def _not_json(constant: str):
    raise AssertionError(f"the client was sent {constant}, which is not JSON")


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
@pytest.mark.parametrize("where", ["answer", "answer as an event", "notification"])
@pytest.mark.parametrize("old", [False, True])
def test_a_number_json_has_not_from_an_upstream_never_reaches_the_client(
    bastion, token, upstream, legacy, number, where, old
):
    """``NaN``, ``Infinity`` and a number past a float's range (which Python's reader takes as
    infinity) are not JSON (RFC 8259 §6): an upstream's message holding one is refused as not
    JSON, never written on to the client, which could not read what it got."""
    text = f'{{"jsonrpc": "2.0", "id": "ID", "result": {{"structuredContent": {{"n": {number}}}}}}}'
    note = f'{{"method": "notifications/message", "params": {{"level": "info", "data": {number}}}}}'
    if where == "answer":
        upstream.raw = text.encode()
    elif where == "answer as an event":
        upstream.raw_events = [json.dumps({"method": "notifications/x"}), text]
    else:
        upstream.raw_events = [note, '{"jsonrpc": "2.0", "id": "ID", "result": {}}']
    try:
        body, headers = (
            modern_request(9, "tools/call", {"name": "plain", "arguments": {}}),
            modern_headers(token, "tools/call", "plain"),
        )
        if old:
            body = {"jsonrpc": "2.0", "id": 9, "method": "tools/call"}
            body["params"], headers = {"name": "plain", "arguments": {}}, legacy
        response = bastion.http.post(bastion.mcp_url("fuzz"), json=body, headers=headers)
    finally:
        upstream.raw = upstream.raw_events = None
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("text/event-stream"):
        frames = [line[5:] for line in response.text.splitlines() if line.startswith("data:")]
    else:
        frames = [response.text]
    got = [json.loads(frame, parse_constant=_not_json) for frame in frames if frame.strip()]
    assert got and got[-1].get("id") == 9, got
    if where == "notification":
        assert "result" in got[-1], got  # the notification dropped, the answer relayed
    else:
        assert "error" in got[-1] and "upstream" in got[-1]["error"]["message"], got
