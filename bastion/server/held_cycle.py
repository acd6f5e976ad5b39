"""The request-response cycle of a request whose body the protocol already holds: uvicorn's
`RequestResponseCycle` (uvicorn 0.54, ``httptools_impl``) for a ``POST`` answered without an
access log line, with nothing more to read but the client's going away.

`bastion.server.connections.BoundedHttpProtocol` runs the gateway's calls on it
(`bastion.server.direct_gateway`). To the protocol it is a cycle like uvicorn's (the same
attributes: whether the answer is complete, whether the client went away, whether the connection
is kept), and it writes answers as uvicorn does: the default headers (date, server), header
values checked, ``Content-Length`` or else chunked, ``Connection: close`` when either side asks,
writes held back while the transport's buffer is full, the connection closed after an answer that
closes it, and the protocol told when an answer is complete (which starts the next pipelined
request, or times the idle connection). Its first ``receive`` gives the body; later ones wait for
the client to go away (or the answer to end), as uvicorn's do. What it leaves out is what such a
request never needs: 100 Continue, HEAD, more body, the access log, an event per body part.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE

_DISCONNECT = {"type": "http.disconnect"}
_CLOSE = b"connection: close\r\n"
_CHUNKED = b"transfer-encoding: chunked\r\n"


class HeldCycle:
    """One request on its connection, from its held body to the end of its answer."""

    __slots__ = ("scope", "transport", "flow", "logger", "default_headers", "on_response", "body")
    __slots__ += ("disconnected", "keep_alive", "response_started", "response_complete")
    __slots__ += ("chunked", "remaining", "_gone")

    def __init__(
        self,
        scope: dict[str, Any],
        body: bytes,
        transport: asyncio.Transport,
        flow: FlowControl,
        logger: logging.Logger,
        default_headers: list[tuple[bytes, bytes]],
        on_response: Callable[[], None],
    ) -> None:
        self.scope = scope
        self.transport = transport
        self.flow = flow
        self.logger = logger
        self.default_headers = default_headers
        self.on_response = on_response
        self.body: bytes | None = body
        self.disconnected = False
        self.keep_alive = True
        self.response_started = False
        self.response_complete = False
        self.chunked = False
        self.remaining = 0
        # Made by the first receive that waits (most requests never do).
        self._gone: asyncio.Event | None = None

    @property
    def message_event(self) -> HeldCycle:
        """What uvicorn's protocol sets when the connection is lost (`set`)."""
        return self

    def set(self) -> None:
        if self._gone is not None:
            self._gone.set()

    async def run_asgi(self, app: Callable[..., Any]) -> None:
        """Run ``app`` on this cycle, as uvicorn's cycle runs an application (its log lines)."""
        try:
            await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            self.logger.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started:
                await self._send_500()
            else:
                self.transport.close()
        else:
            if not self.response_started and not self.disconnected:
                self.logger.error("ASGI callable returned without starting response.")
                await self._send_500()
            elif not self.response_complete and not self.disconnected:
                self.logger.error("ASGI callable returned without completing response.")
                self.transport.close()
        finally:
            self.on_response = _nothing

    async def _send_500(self) -> None:
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21")]
        await self.send({"type": "http.response.start", "status": 500, "headers": headers})
        await self.send({"type": "http.response.body", "body": b"Internal Server Error"})

    async def receive(self) -> dict[str, Any]:
        body = self.body
        if body is not None:
            self.body = None
            return {"type": "http.request", "body": body, "more_body": False}
        if not self.disconnected and not self.response_complete:
            # Reading again, so that the client's going away is seen.
            self.flow.resume_reading()
            if self._gone is None:
                self._gone = asyncio.Event()
            await self._gone.wait()
        return _DISCONNECT

    async def send(self, message: dict[str, Any]) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if not self.response_started:
            if message["type"] != "http.response.start":
                raise RuntimeError(f"expected http.response.start, got {message['type']!r}")
            self._start(message["status"], message.get("headers", ()))
        elif not self.response_complete:
            if message["type"] != "http.response.body":
                raise RuntimeError(f"expected http.response.body, got {message['type']!r}")
            self._body(message.get("body", b""), message.get("more_body", False))
        else:
            raise RuntimeError(f"{message['type']!r} sent after the response was complete")

    def _start(self, status: int, headers: Any) -> None:
        self.response_started = True
        content = [STATUS_LINE[status]]
        for name, value in self.default_headers:
            content += [name, b": ", value, b"\r\n"]
        length = None
        closes = False
        for name, value in headers:
            if HEADER_RE.search(name):
                raise RuntimeError("Invalid HTTP header name.")
            if HEADER_VALUE_RE.search(value):
                raise RuntimeError("Invalid HTTP header value.")
            name = name.lower()
            if name == b"content-length" and length is None:
                length = int(value.decode())
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.chunked = True
            elif name == b"connection" and b"close" in [
                token.lower().strip() for token in value.split(b",")
            ]:
                self.keep_alive = False
                closes = True
            content += [name, b": ", value, b"\r\n"]
        if length is not None and not self.chunked:
            self.remaining = length
        if not self.keep_alive and not closes:
            content.append(_CLOSE)
        if length is None and not self.chunked and status not in (204, 304):
            self.chunked = True
            content.append(_CHUNKED)
        content.append(b"\r\n")
        self.transport.write(b"".join(content))

    def _body(self, body: bytes, more_body: bool) -> None:
        if self.chunked:
            content = [b"%x\r\n" % len(body), body, b"\r\n"] if body else []
            if not more_body:
                content.append(b"0\r\n\r\n")
            self.transport.write(b"".join(content))
        else:
            if len(body) > self.remaining:
                raise RuntimeError("Response content longer than Content-Length")
            self.remaining -= len(body)
            self.transport.write(body)
        if not more_body:
            if self.remaining != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()


def _nothing() -> None:
    pass
