"""`bastion.server.held_cycle.HeldCycle` writes every answer the gateway gives byte for byte as
uvicorn's own `RequestResponseCycle` writes it, closes and keeps connections as it does, and
refuses what it refuses; its receive gives the held body, then waits for the client to go."""

from __future__ import annotations

import asyncio
import logging

import pytest
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from bastion.server.held_cycle import HeldCycle

DEFAULT_HEADERS = [(b"date", b"Wed, 02 Dec 2026 04:33:19 GMT"), (b"server", b"uvicorn")]
LOG = logging.getLogger("uvicorn.error")


class RecordingTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def start(status: int, *headers: tuple[bytes, bytes]) -> dict:
    return {"type": "http.response.start", "status": status, "headers": list(headers)}


def body(data: bytes, more: bool = False) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more}


JSON = (b"content-type", b"application/json")
SSE = (b"content-type", b"text/event-stream")
ANSWERS = {
    "json": [start(200, JSON, (b"content-length", b"7")), body(b'{"a":1}')],
    "json in two parts": [
        start(200, JSON, (b"content-length", b"7")),
        body(b'{"a"', more=True),
        body(b":1}"),
    ],
    "accepted, no body": [start(202, (b"content-length", b"0")), body(b"")],
    "no content": [start(204), body(b"")],
    "event stream": [
        start(200, SSE, (b"cache-control", b"no-cache, no-transform")),
        body(b"event: message\ndata: {}\n\n", more=True),
        body(b"", more=True),
        body(b"event: message\ndata: {}\n\n"),
    ],
    "event stream ended empty": [start(200, SSE), body(b"x", more=True), body(b"")],
    "closing": [
        start(500, JSON, (b"Connection", b"keep-alive, Close"), (b"content-length", b"2")),
        body(b"{}"),
    ],
    "chunked asked": [start(200, (b"transfer-encoding", b"chunked")), body(b"abc")],
}


async def written_by(kind: str, messages: list[dict], keep_alive: bool) -> tuple:
    transport = RecordingTransport()
    flow = FlowControl(transport)  # type: ignore[arg-type]
    completed: list[bool] = []
    scope = {"type": "http", "method": "POST", "headers": []}
    if kind == "uvicorn":
        event = asyncio.Event()
        event.set()
        cycle = RequestResponseCycle(
            scope,  # type: ignore[arg-type]
            transport,  # type: ignore[arg-type]
            flow,
            LOG,
            logging.getLogger("uvicorn.access"),
            False,
            DEFAULT_HEADERS,
            event,
            False,
            keep_alive,
            lambda: completed.append(True),
        )
        cycle.more_body = False
        cycle.body = bytearray(b"{}")
    else:
        cycle = HeldCycle(
            scope,
            b"{}",
            transport,  # type: ignore[arg-type]
            flow,
            LOG,
            DEFAULT_HEADERS,
            lambda: completed.append(True),
        )
        cycle.keep_alive = keep_alive
    received = await cycle.receive()
    assert received == {"type": "http.request", "body": b"{}", "more_body": False}
    for message in messages:
        await cycle.send(message)
    return transport.written, transport.closed, completed, cycle.keep_alive


@pytest.mark.parametrize("keep_alive", [True, False])
@pytest.mark.parametrize("answer", list(ANSWERS))
def test_an_answer_is_written_as_uvicorn_writes_it(answer, keep_alive):
    theirs = asyncio.run(written_by("uvicorn", ANSWERS[answer], keep_alive))
    ours = asyncio.run(written_by("held", ANSWERS[answer], keep_alive))
    assert ours == theirs
    assert theirs[2] == [True]  # the protocol is told the answer is complete


WRONG = {
    "longer than its length": [start(200, (b"content-length", b"1")), body(b"ab")],
    "shorter than its length": [start(200, (b"content-length", b"3")), body(b"ab")],
    "a header value with a line break": [start(200, (b"x-a", b"1\r\nx-b: 2")), body(b"")],
    "a header name with a space": [start(200, (b"x a", b"1")), body(b"")],
    "a body first": [body(b"")],
    "a second start": [start(200, (b"content-length", b"0")), start(200)],
    "more after the end": [start(200, (b"content-length", b"0")), body(b""), body(b"")],
}


@pytest.mark.parametrize("answer", list(WRONG))
def test_what_uvicorn_refuses_to_write_is_refused(answer):
    for kind in ("uvicorn", "held"):
        with pytest.raises(RuntimeError):
            asyncio.run(written_by(kind, WRONG[answer], True))


def test_receive_waits_after_the_body_until_the_client_goes_or_the_answer_ends():
    async def scenario(end: str) -> dict:
        transport = RecordingTransport()
        cycle = HeldCycle(
            {}, b"{}", transport, FlowControl(transport), LOG, DEFAULT_HEADERS, lambda: None
        )  # type: ignore[arg-type]
        assert (await cycle.receive())["body"] == b"{}"
        waiting = asyncio.ensure_future(cycle.receive())
        await asyncio.sleep(0.01)
        assert not waiting.done()
        if end == "gone":
            # What uvicorn's protocol does when the connection is lost.
            cycle.disconnected = True
            cycle.message_event.set()
        else:
            await cycle.send(start(200, (b"content-length", b"0")))
            await cycle.send(body(b""))
        return await asyncio.wait_for(waiting, 1)

    for end in ("gone", "answered"):
        assert asyncio.run(scenario(end)) == {"type": "http.disconnect"}
