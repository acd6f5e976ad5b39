"""The gateway's HTTP/1.1 client toward upstreams, against a real loopback server."""

from __future__ import annotations

import asyncio
import logging

import pytest

from bastion.gateway.http1 import MAX_HEAD, Http1Client, HttpClientError
from tests.waits import PATIENCE


async def serving(answers: list[bytes]):
    """A server that answers each request with the next raw response; records what it got."""
    seen: list[tuple[int, bytes]] = []

    async def handle(reader, writer):
        peer = writer.get_extra_info("peername")[1]
        while answers:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            seen.append((peer, head + await reader.readexactly(length)))
            writer.write(answers.pop(0))
            await writer.drain()
            if b"connection: close" in seen[-1][1] or not answers:
                break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/mcp", seen


def test_keep_alive_chunked_sse_and_connection_close():
    async def main():
        answers = [
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked"
            b"\r\n\r\n9\r\ndata: 1\n\n\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\nx",
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ]
        server, url, seen = await serving(answers)
        client = Http1Client(url)
        try:
            response = await client.request("POST", {"content-type": "application/json"}, b"{}")
            assert (response.status_code, await response.read()) == (200, b"{}")
            response.close()
            response = await client.request("POST", {}, b"[]")
            assert [line async for line in response.lines()] == ["data: 1", ""]
            response.close()
            response = await client.request("POST", {}, b"")
            assert await response.read() == b"x"
            response.close()
            response = await client.request("DELETE", {})
            assert response.status_code == 204
            response.close()
        finally:
            await client.aclose()
            server.close()
        peers = [peer for peer, _ in seen]
        assert peers[0] == peers[1] == peers[2] != peers[3]  # reused until the server closed
        assert seen[0][1].startswith(b"POST /mcp HTTP/1.1\r\n")

    asyncio.run(main())


@pytest.mark.parametrize("value", ["a\r\nx-injected: 1", "a\nb", "a\0b"])
def test_a_header_value_cannot_start_another_header(value):
    client = Http1Client("http://127.0.0.1:9/mcp")
    with pytest.raises(HttpClientError):
        client._encode("POST", {"mcp-name": value}, b"")


def test_each_request_head_says_its_own_headers_and_length():
    client = Http1Client("http://127.0.0.1:9/mcp")
    first = client._encode("POST", {"authorization": "Bearer one"}, b"{}")
    again = client._encode("POST", {"authorization": "Bearer one"}, b'{"a":1}')
    other = client._encode("POST", {"authorization": "Bearer two"}, b"{}")
    assert first == (
        b"POST /mcp HTTP/1.1\r\nhost: 127.0.0.1:9\r\nauthorization: Bearer one\r\n"
        b"accept-encoding: identity\r\ncontent-length: 2\r\n\r\n{}"
    )
    assert again.endswith(
        b'Bearer one\r\naccept-encoding: identity\r\ncontent-length: 7\r\n\r\n{"a":1}'
    )
    assert b"Bearer two" in other and b"Bearer one" not in other
    # A value refused once is refused every time (only what passed the check is kept).
    for _ in range(2):
        with pytest.raises(HttpClientError):
            client._encode("POST", {"authorization": "Bearer one\r\nx: 1"}, b"")


def test_an_unreachable_upstream_is_a_clear_error():
    async def main():
        client = Http1Client("http://127.0.0.1:9/mcp", connect_timeout=2)
        with pytest.raises(HttpClientError, match="cannot connect"):
            await client.request("POST", {}, b"{}")

    asyncio.run(main())


def test_lines_split_across_chunks_and_the_limits_on_lines_and_bodies():
    async def main():
        # One event-stream body sent in awkward chunks: line ends split from their lines, a CR
        # LF, an empty line, a last line with no end; then a line, and a body, over the limit.
        body = [b'data: {"a"', b": 1}\r", b"\n\nda", b"ta: 2\n", b"\ntail"]
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in body) + b"0\r\n\r\n"
        answers = [
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked"
            b"\r\n\r\n" + chunked,
            b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n" + b"x" * 40,
            b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n" + b"y" * 40,
        ]
        server, url, _ = await serving(answers)
        client = Http1Client(url)
        try:
            response = await client.request("POST", {}, b"{}")
            lines = [line async for line in response.lines()]
            assert lines == ['data: {"a": 1}', "", "data: 2", "", "tail"]
            response.close()
            response = await client.request("POST", {}, b"{}")
            with pytest.raises(HttpClientError, match="longer than 16 bytes"):
                [line async for line in response.lines(limit=16)]
            response.abort()
            response = await client.request("POST", {}, b"{}")
            with pytest.raises(HttpClientError, match="larger than 16 bytes"):
                await response.read(limit=16)
            response.abort()
        finally:
            await client.aclose()
            server.close()

    asyncio.run(main())


def test_a_response_head_past_its_limit_is_refused_not_kept():
    """The status line and headers are read up to `MAX_HEAD` bytes: an upstream that sends a
    header without end made bastion keep all of it (127 MiB in 4 s on the loopback, copied
    again at each read) until the call's deadline."""

    async def main():
        huge = b"x-padding: " + b"a" * (2 * MAX_HEAD) + b"\r\n"
        many = b"".join(b"x-%d: v\r\n" % i for i in range(MAX_HEAD // 8))
        small = b"x-padding: " + b"a" * (MAX_HEAD // 2) + b"\r\n"
        answers = [
            b"HTTP/1.1 200 OK\r\n" + huge + b"content-length: 2\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\n" + many + b"content-length: 2\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\n" + small + b"content-length: 2\r\n\r\n{}",
        ]
        server, url, _ = await serving(answers)
        client = Http1Client(url)
        try:
            for _ in range(2):
                with pytest.raises(HttpClientError, match=f"head is larger than {MAX_HEAD} bytes"):
                    await client.request("POST", {}, b"{}")
            response = await client.request("POST", {}, b"{}")  # a new connection: within it
            assert (response.status_code, await response.read()) == (200, b"{}")
            response.close()
        finally:
            await client.aclose()
            server.close()

    asyncio.run(main())


def test_events_skip_what_is_not_json_and_refuse_an_event_over_the_limit(monkeypatch, caplog):
    from bastion.gateway import upstream

    async def main():
        # A priming event (an id, empty data) first, as SDK servers send: skipped silently.
        # An event nested past Python's stack is not JSON to bastion either: skipped, logged.
        deep = b"data: " + b"[" * 100_000 + b"]" * 100_000 + b"\n\n"
        stream = (
            b"id: 1\nretry: 500\ndata: \n\ndata: {not json\n\ndata: [1]\n\n"
            + deep
            + b'data: {"id": 1}\n\n'
        )
        big = b"data: " + b"z" * 30 + b"\ndata: " + b"z" * 30 + b"\n\n"
        answers = [
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n"
            % len(body)
            + body
            for body in (stream, big)
        ]
        server, url, _ = await serving(answers)
        client = Http1Client(url)
        try:
            response = await client.request("POST", {}, b"{}")
            assert [m async for m in upstream._events(response)] == [{"id": 1}]
            response.close()
            monkeypatch.setattr(upstream, "MAX_MESSAGE", 50)  # each line fits, the event does not
            response = await client.request("POST", {}, b"{}")
            with pytest.raises(HttpClientError, match="event of the response is larger"):
                [m async for m in upstream._events(response)]
            response.abort()
        finally:
            await client.aclose()
            server.close()

    with caplog.at_level(logging.INFO, logger="bastion.gateway"):
        asyncio.run(main())
    # The broken events are logged, once each; the priming event is not.
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == ["an upstream sent an event that is not JSON"] * 2


def test_a_body_read_as_it_arrives_is_whole_and_bounded():
    """A body that is still arriving when it is read (not all there yet, unlike the answers
    above) is read to its end, and refused past the limit."""

    rest = asyncio.Queue()  # the rest of a body is sent once the client has begun to read it

    async def handle(reader, writer):
        for _ in range(2):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n" + b"x" * 10)
            await writer.drain()
            await rest.get()
            writer.write(b"y" * 30)
            await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        client = Http1Client(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/mcp")
        try:
            response = await client.request("POST", {}, b"")
            assert not response._connection.complete  # read while it arrives
            rest.put_nowait(None)
            assert await response.read() == b"x" * 10 + b"y" * 30
            response.close()
            response = await client.request("POST", {}, b"")
            assert not response._connection.complete
            rest.put_nowait(None)
            with pytest.raises(HttpClientError, match="larger than 16 bytes"):
                await response.read(limit=16)
            response.abort()
        finally:
            await client.aclose()
            server.close()

    asyncio.run(main())


def test_a_deadline_that_ends_as_the_connection_opens_is_not_lost():
    """The caller's deadline (``asyncio.timeout`` around a call, as the gateway's start of an
    upstream) may end just as the connection is made. Python 3.11's ``asyncio.wait_for`` then
    returned the connection and dropped the cancellation: the deadline was spent, and the
    request went on waiting for an upstream that never answers, with no bound at all."""

    async def main():
        holder: list = []  # connections the silent server took, kept open
        server = await asyncio.start_server(
            lambda reader, writer: holder.append(writer), "127.0.0.1", 0
        )
        client = Http1Client(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/mcp")
        loop = asyncio.get_running_loop()
        opening = loop.create_connection
        deadline: asyncio.Timeout | None = None

        async def opened_as_the_deadline_ends(*args, **kwargs):
            made = await opening(*args, **kwargs)
            deadline.reschedule(loop.time())  # the deadline ends at this very moment
            return made

        loop.create_connection = opened_as_the_deadline_ends
        try:
            async with asyncio.timeout(PATIENCE) as bound:  # the test's own, should all else fail
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(5) as deadline:
                        response = await client.request("POST", {}, b"{}")
                        await response.read()
            assert not bound.expired(), "the deadline was lost: only the test's bound ended it"
            assert deadline.expired()
        finally:
            loop.create_connection = opening
            await client.aclose()
            server.close()

    asyncio.run(main())
