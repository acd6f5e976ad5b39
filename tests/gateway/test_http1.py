"""The gateway's HTTP/1.1 client toward upstreams, against a real loopback server."""

from __future__ import annotations

import asyncio

import pytest

from bastion.gateway.http1 import Http1Client, HttpClientError


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


def test_an_unreachable_upstream_is_a_clear_error():
    async def main():
        client = Http1Client("http://127.0.0.1:9/mcp", connect_timeout=2)
        with pytest.raises(HttpClientError, match="cannot connect"):
            await client.request("POST", {}, b"{}")

    asyncio.run(main())
