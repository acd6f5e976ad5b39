"""A bare HTTP/1.1 proxy on the stack bastion's gateway runs on: uvloop, httptools' request
parser, and bastion's own HTTP/1.1 client toward the upstream. Each POST goes to the upstream
as it came (its body, and the headers an MCP server reads), and the upstream's answer is
written back whole in one write. No token, policy, record, count or mask: the floor under
`gateway_bench.py`'s gateway path, started by ``gateway_bench.py --floor`` and measured in the
same run (what a Python proxy on this stack costs before it does any of bastion's work).

    .venv/bin/python benchmarks/floor_proxy.py PORT UPSTREAM_URL
"""

from __future__ import annotations

import asyncio
import signal
import sys

import httptools
import uvloop

from bastion.gateway.http1 import Http1Client

# What the upstream reads of a request (2026-07-28's routing headers among them).
FORWARDED = frozenset(
    {b"content-type", b"accept", b"mcp-protocol-version", b"mcp-method", b"mcp-name"}
)


class Proxy(asyncio.Protocol):
    def __init__(self, upstream: Http1Client) -> None:
        self.upstream = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()  # type: ignore[union-attr]

    def on_message_begin(self) -> None:
        self.headers, self.body = {}, []

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in FORWARDED:
            self.headers[name.decode("latin-1")] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        asyncio.ensure_future(self.forward(self.headers, b"".join(self.body)))

    async def forward(self, headers: dict[str, str], body: bytes) -> None:
        response = await self.upstream.request("POST", headers, body)
        try:
            data = await response.read()
            kind = response.headers.get("content-type", "application/json")
        finally:
            response.close()
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 %d OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
            % (response.status_code, kind.encode("latin-1"), len(data), data)
        )


async def serve(port: int, upstream_url: str) -> None:
    upstream = Http1Client(upstream_url)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Proxy(upstream), "127.0.0.1", port)
    stopped = asyncio.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stopped.set)
    async with server:
        await stopped.wait()
    await upstream.aclose()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2]))
