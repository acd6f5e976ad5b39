"""The direct gateway path's request-response cycle (`bastion.server.gateway_cycle`) does what
uvicorn's own cycle does with every answer: the same bytes, in the same order, the same
closing, the same callbacks and errors, the same state after each message. Its short way (a head
with one content-length, then the whole body) writes the head and body in one write where
uvicorn writes two, and nothing else differs; everything else (event streams, bodies in pieces
or of the wrong length, connection and transfer-encoding headers, capitals, refused headers,
HEAD, a client that went away, a paused writer, a connection no longer kept alive) is uvicorn's
way, checked here against uvicorn itself. An answer begun the short way and never finished (a
head and no body) has its head held, not written: the one case where the bytes differ, checked
as such."""

from __future__ import annotations

import asyncio
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from bastion.server.gateway_cycle import GatewayCycle

DEFAULTS = [(b"date", b"Wed, 02 Dec 2026 10:00:00 GMT"), (b"server", b"uvicorn")]


class Transport:
    """What the cycle does to its connection, in order."""

    def __init__(self) -> None:
        self.done: list[tuple[str, bytes]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.done.append(("write", bytes(data)))

    def close(self) -> None:
        self.done.append(("close", b""))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.done.append(("pause_reading", b""))

    def resume_reading(self) -> None:
        self.done.append(("resume_reading", b""))


STATE = (
    "response_started",
    "response_complete",
    "expected_content_length",
    "chunked_encoding",
    "keep_alive",
    "disconnected",
)


def gateway_cycle(
    transport: Transport,
    flow: FlowControl,
    body: bytes = b"{}",
    method: str = "POST",
    defaults=DEFAULTS,
    on_response=lambda: None,
) -> GatewayCycle:
    scope = {"type": "http", "method": method, "http_version": "1.1", "path": "/mcp/x"}
    logger, access = logging.getLogger("uvicorn.error"), logging.getLogger("uvicorn.access")
    return GatewayCycle(
        scope,
        transport,  # type: ignore[arg-type]
        flow,
        logger,
        access,
        defaults,
        body,
        on_response,
    )


async def run(
    kind,
    messages,
    method="POST",
    defaults=DEFAULTS,
    keep_alive=True,
    disconnected=False,
    paused=False,
    read_paused=False,
    whole=None,
):
    """What a cycle of ``kind`` does with ``messages``: per message, its outcome and the cycle's
    state after it; then two receives, and everything done to the transport. ``whole``: (status,
    body) for `GatewayCycle.send_whole_json` first; the messages only if it declines."""
    transport = Transport()
    flow = FlowControl(transport)  # type: ignore[arg-type]
    flow.read_paused = read_paused
    responses = []
    scope = {"type": "http", "method": method, "http_version": "1.1", "path": "/mcp/x"}
    logger = logging.getLogger("uvicorn.error")
    access = logging.getLogger("uvicorn.access")
    if kind is GatewayCycle:
        cycle = gateway_cycle(
            transport,
            flow,
            method=method,
            defaults=defaults,
            on_response=lambda: responses.append(1),
        )
    else:
        event = asyncio.Event()
        event.set()
        cycle = RequestResponseCycle(
            scope=scope,  # type: ignore[arg-type]
            transport=transport,  # type: ignore[arg-type]
            flow=flow,
            logger=logger,
            access_logger=access,
            access_log=False,
            default_headers=defaults,
            message_event=event,
            expect_100_continue=False,
            keep_alive=True,
            on_response=lambda: responses.append(1),
        )
        cycle.body = b"{}"  # type: ignore[assignment]
        cycle.more_body = False
    cycle.keep_alive = keep_alive
    cycle.disconnected = disconnected
    seen = []
    if whole is not None:
        if paused:
            flow.pause_writing()
            asyncio.get_running_loop().call_soon(flow.resume_writing)
        if cycle.send_whole_json(*whole):
            messages = []
            seen.append((("ok", None), [getattr(cycle, name) for name in STATE], len(responses)))
    for message in messages:
        if paused:
            flow.pause_writing()
            asyncio.get_running_loop().call_soon(flow.resume_writing)
        try:
            outcome = ("ok", await cycle.send(message))
        except Exception as e:
            outcome = (type(e).__name__, str(e))
        seen.append((outcome, [getattr(cycle, name) for name in STATE], len(responses)))
    received = []
    for _ in range(2):
        try:
            received.append(await asyncio.wait_for(cycle.receive(), 0.01))
        except TimeoutError:
            received.append("waits")
    held = cycle._held if isinstance(cycle, GatewayCycle) else b""
    return seen, received, sent(transport.done), cycle.message_event.is_set(), held


def sent(done: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """What the client gets, in order: writes one after the other as one (the same bytes)."""
    out: list[tuple[str, bytes]] = []
    for what, data in done:
        if what == "write" and out and out[-1][0] == "write":
            out[-1] = ("write", out[-1][1] + data)
        else:
            out.append((what, data))
    return out


def same(ours, theirs) -> None:
    """``ours`` (a `GatewayCycle`'s run) is ``theirs`` (uvicorn's), but for the head of an
    answer begun the short way and never finished, which ours holds and theirs wrote."""
    *ours, held = ours
    *theirs, _ = theirs
    if held:
        assert theirs[2].count(("write", held)) == 1
        theirs[2] = [done for done in theirs[2] if done != ("write", held)]
    assert ours == theirs


def start(headers, status=200):
    return {"type": "http.response.start", "status": status, "headers": headers}


def body(data=b"", more=None):
    message = {"type": "http.response.body", "body": data}
    if more is not None:
        message["more_body"] = more
    return message


JSON = [(b"content-type", b"application/json")]


def length(n) -> list:
    return [(b"content-length", b"%d" % n)]


CASES = {
    "a JSON answer": [start(JSON + length(2)), body(b"{}")],
    "with more_body False said": [start(JSON + length(2)), body(b"{}", False)],
    "with a session header": [
        start(JSON + [(b"mcp-session-id", b"abc")] + length(2)),
        body(b"{}"),
    ],
    "no body (202)": [start(length(0), 202), body()],
    "204": [start(length(0), 204), body()],
    "an event stream": [
        start([(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]),
        body(b"event: message\ndata: {}\n\n", True),
        body(b"", False),
    ],
    "a body in pieces": [start(length(4)), body(b"ab", True), body(b"cd")],
    "a body longer than said": [start(length(1)), body(b"ab")],
    "a body shorter than said": [start(length(3)), body(b"ab")],
    "a body after the answer": [start(length(2)), body(b"ab"), body(b"")],
    "a second start": [start(length(2)), start(length(2))],
    "a body first": [body(b"ab")],
    "no type": [{"status": 200}],
    "connection: close (the 500)": [
        start(JSON + [(b"connection", b"close")] + length(2), 500),
        body(b"{}"),
    ],
    "connection: keep-alive": [start([(b"connection", b"keep-alive")] + length(0)), body()],
    "chunked said": [start([(b"transfer-encoding", b"chunked")]), body(b"ab", False)],
    "two lengths": [start(length(2) + length(3)), body(b"ab")],
    "capitals": [start([(b"Content-Length", b"2")]), body(b"ab")],
    "capitals in another name": [start([(b"Content-Type", b"x")] + length(2)), body(b"ab")],
    "a name uvicorn refuses": [start([(b"x y", b"1")] + length(0)), body()],
    "a value uvicorn refuses": [start([(b"x", b"a\r\nb: c")] + length(0)), body()],
    "a length that is no number": [start([(b"content-length", b"two")]), body(b"ab")],
    "a length with spaces": [start([(b"content-length", b" 2 ")]), body(b"ab")],
    "headers as a tuple": [start(tuple(length(2))), body(b"ab")],
    "a header as a list": [start([[b"content-length", b"2"]]), body(b"ab")],
    "a header of three": [start([(b"content-length", b"2", b"x")]), body(b"ab")],
    "a header of str": [start([("content-length", "2")]), body(b"ab")],
    "a name as bytearray": [start([(bytearray(b"content-length"), b"2")]), body(b"ab")],
    "a name as memoryview": [start([(memoryview(b"content-length"), b"2")]), body(b"ab")],
    "no headers": [start([]), body(b"ab")],
    "no status line": [start(length(0), 99), body()],
    "no status": [{"type": "http.response.start", "headers": length(0)}, body()],
}


SETTINGS = [
    {},
    {"keep_alive": False},
    {"method": "HEAD"},
    {"disconnected": True},
    {"paused": True},
    {"read_paused": True},
    {"defaults": []},
    {"defaults": [(b"Server", b"uvicorn")]},
    {"defaults": [(b"connection", b"close")]},
    {"defaults": [(b"content-length", b"2")]},
    {"defaults": [(b"x-bad", b"a\nb")]},
    {"defaults": [("server", "uvicorn")]},
]


@pytest.mark.parametrize("messages", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("setting", SETTINGS, ids=repr)
def test_each_answer_is_written_as_uvicorn_writes_it(messages, setting):
    ours = asyncio.run(run(GatewayCycle, messages, **setting))
    theirs = asyncio.run(run(RequestResponseCycle, messages, **setting))
    same(ours, theirs)


def test_the_common_answer_takes_the_short_way():
    """The test above would pass with no short way at all: this one would not."""
    transport = Transport()
    cycle = gateway_cycle(transport, FlowControl(transport))  # type: ignore[arg-type]
    for message in CASES["a JSON answer"]:
        asyncio.run(cycle.send(message))
    assert [what for what, _ in transport.done] == ["write"]  # head and body at once
    assert transport.done[0][1].endswith(b"\r\n\r\n{}")

    async def count() -> int:
        calls = 0
        original = RequestResponseCycle.send

        async def counted(self, message):
            nonlocal calls
            calls += 1
            await original(self, message)

        RequestResponseCycle.send = counted  # type: ignore[method-assign]
        try:
            await run(GatewayCycle, CASES["a JSON answer"])
            await run(GatewayCycle, CASES["an event stream"])
        finally:
            RequestResponseCycle.send = original  # type: ignore[method-assign]
        return calls

    assert asyncio.run(count()) == 3  # the event stream's three messages only


@pytest.mark.parametrize("status", [200, 202, 400, 500, 99])
@pytest.mark.parametrize("data", [b"", b"{}", b'{"jsonrpc":"2.0","id":1,"result":{}}'])
@pytest.mark.parametrize("setting", SETTINGS, ids=repr)
def test_a_whole_json_answer_is_written_as_uvicorn_writes_its_two_messages(status, data, setting):
    """`send_whole_json` (the gateway's usual answer, without ASGI messages) leaves the client,
    the connection and the cycle as uvicorn's cycle given the head and the body does; where it
    declines, the messages are sent to it as ever."""
    messages = [start(JSON + length(len(data)), status), body(data)]
    seen, *ours = asyncio.run(run(GatewayCycle, messages, whole=(status, data), **setting))
    their_seen, *theirs = asyncio.run(run(RequestResponseCycle, messages, **setting))
    assert ours[:-1] == theirs[:-1] and not ours[-1]  # nothing held
    assert seen[-1][1:] == their_seen[-1][1:]  # the state after the answer, the callbacks


def test_the_usual_answer_takes_the_whole_way():
    """The test above would pass if `send_whole_json` always declined: this one would not."""
    done = asyncio.run(run(GatewayCycle, [], whole=(200, b"{}")))[2]
    assert [what for what, _ in done] == ["write"]
    assert done[0][1].startswith(b"HTTP/1.1 200 OK\r\n") and done[0][1].endswith(b"\r\n\r\n{}")
    # A paused writer (a client reading slowly) is waited for, as uvicorn waits: not written to.
    transport = Transport()
    flow = FlowControl(transport)  # type: ignore[arg-type]
    flow.pause_writing()
    cycle = gateway_cycle(transport, flow)
    assert not cycle.send_whole_json(200, b"{}") and not transport.done


@pytest.mark.parametrize(
    "setting",
    [{}, {"read_paused": True}, {"disconnected": True}, {"answered": True}, {"taken": True}],
    ids=repr,
)
def test_the_body_taken_at_once_is_what_receive_gives(setting):
    """`take_body` gives the held body as the first `receive` does, and leaves the cycle, the
    connection and the next `receive` as it does; where receive would wait or say the client
    went away, it declines (None) and receive is used."""

    async def go(take: bool):
        transport = Transport()
        flow = FlowControl(transport)  # type: ignore[arg-type]
        flow.read_paused = setting.get("read_paused", False)
        cycle = gateway_cycle(transport, flow, b'{"jsonrpc":"2.0"}')
        cycle.disconnected = setting.get("disconnected", False)
        if setting.get("answered"):
            assert cycle.send_whole_json(200, b"{}")
        if setting.get("taken"):
            await cycle.receive()
        got = cycle.take_body() if take else None
        took = got is not None
        if got is None:
            try:
                got = await asyncio.wait_for(cycle.receive(), 0.01)
            except TimeoutError:
                got = "waits"
        else:
            got = {"type": "http.request", "body": got, "more_body": False}
        first = [*transport.done, flow.read_paused, cycle.message_event.is_set()]
        try:
            after = await asyncio.wait_for(cycle.receive(), 0.01)
        except TimeoutError:
            after = "waits"
        state = [getattr(cycle, name) for name in STATE]
        return took, (got, first, after, state, transport.done, cycle.body)

    (took, taken), (_, received) = asyncio.run(go(True)), asyncio.run(go(False))
    assert taken == received
    # Taken at once where the body is there to take (else the test above proves nothing).
    assert took == (setting in ({}, {"read_paused": True}))


names = st.sampled_from(
    [
        b"content-type",
        b"content-length",
        b"connection",
        b"transfer-encoding",
        b"x-a",
        b"X-A",
        b"a b",
    ]
)
values = st.sampled_from([b"application/json", b"2", b"0", b"close", b"chunked", b"", b"a\x01"])
bodies = st.sampled_from([b"", b"{}", b"ab", b"abc"])


@settings(max_examples=300, deadline=None)
@given(
    headers=st.lists(st.tuples(names, values), max_size=4),
    status=st.sampled_from([200, 202, 204, 304, 500]),
    parts=st.lists(st.tuples(bodies, st.sampled_from([None, True, False])), max_size=3),
    keep_alive=st.booleans(),
    method=st.sampled_from(["POST", "HEAD"]),
)
def test_any_answer_is_written_as_uvicorn_writes_it(headers, status, parts, keep_alive, method):
    messages = [start(headers, status), *(body(data, more) for data, more in parts)]
    setting = {"keep_alive": keep_alive, "method": method}
    ours = asyncio.run(run(GatewayCycle, messages, **setting))
    theirs = asyncio.run(run(RequestResponseCycle, messages, **setting))
    same(ours, theirs)
