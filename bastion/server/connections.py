"""uvicorn's HTTP/1.1 protocol (httptools) with a deadline and a size limit on each request head.

uvicorn closes idle keep-alive connections, but a connection that opens and sends nothing, or
trickles its request line and headers a byte at a time, stays open for as long as the client
likes, and a head that never ends is buffered without limit. Here a head must be complete within
``header_timeout`` seconds of the connection opening (or of its first byte, for the next request
on a kept-alive connection) and within ``max_header_bytes`` (counted as it arrives, and once more
when complete, for a head that arrived in one read): otherwise the connection is answered 408 or
431 and closed.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class BoundedHttpProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` whose request heads have a deadline and a size limit."""

    def __init__(self, *args: Any, header_timeout: float, max_header_bytes: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.max_header_bytes = max_header_bytes
        self._head_bytes = 0
        self._in_head = True
        self._head_deadline: asyncio.TimerHandle | None = None
        # A head that arrived whole but too large: nothing more of this connection is served.
        self._oversized = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Counted from the connection, so a client that connects and says nothing is closed too.
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        in_head = self._in_head
        super().data_received(data)
        if self._oversized:
            self._refuse(431, _TOO_LARGE)
        elif in_head and self._in_head and not self.transport.is_closing():
            # All of ``data`` went into a head that is still not complete.
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._refuse(431, _TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        if self._head_deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        if self._oversized:
            return
        # A head that came whole within one read was never counted while incomplete: its size
        # is its parts' (request target, names and values, each line's separators).
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_header_bytes:
            self._oversized = True  # answered by data_received, once the parser returns
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._oversized:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._oversized:
            super().on_message_complete()

    def _arm(self) -> None:
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self._in_head:
            self._refuse(408, "the request head did not arrive in time (header_timeout)")

    def _refuse(self, status: int, reason: str) -> None:
        self._disarm()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            # Nothing else is being answered on this connection: say why it is closed.
            body = reason.encode()
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                % (status, _PHRASES[status], len(body), body)
            )
        self.transport.close()


_PHRASES = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
_TOO_LARGE = "the request head is larger than max_header_bytes"


def bounded_http_protocol(header_timeout: float, max_header_bytes: int) -> Callable[..., Any]:
    """The protocol factory to pass to uvicorn as ``http=``."""
    return functools.partial(
        BoundedHttpProtocol, header_timeout=header_timeout, max_header_bytes=max_header_bytes
    )
