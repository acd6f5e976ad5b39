"""Closing a connection whose client may still be sending: a lingering close, as nginx's
``lingering_close`` does it.

A socket closed with bytes of the client's unread (in its receive queue, or arriving after) is
reset, not closed: a client still sending its body fails on its next send ("Connection reset by
peer") and may never read the answer written just before (the 413, the 400). So when bastion
closes a connection with bytes possibly unread, it shuts down its sending side once the answer
is written (the client reads the answer, then its end), then reads and drops whatever still
comes, until the client closes its side, ``max_bytes`` have come or ``seconds`` have passed,
whichever is first; then the connection is closed. A connection closed with nothing unread
(between requests) is closed at once. At its bound a lingering connection is cut, whatever
remains to write: a client that neither reads nor stops sending holds nothing past it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class LingeringTransport:
    """One connection's transport, as bastion's HTTP protocol and uvicorn's request cycles use
    it: the connection's own, but for ``close``, which lingers when ``lingers()`` says that bytes
    of the client's may be unread (the protocol then parses and serves nothing more of it).

    Each method but ``close`` is the transport's own, bound once: a request that does not close
    its connection costs nothing more than before."""

    __slots__ = ("transport", "_loop", "_lingers", "_seconds", "_left", "_deadline")
    __slots__ += ("write", "writelines", "is_closing", "abort", "get_extra_info", "set_protocol")
    __slots__ += ("get_protocol", "pause_reading", "resume_reading", "is_reading", "write_eof")
    __slots__ += ("can_write_eof", "get_write_buffer_size", "get_write_buffer_limits")
    __slots__ += ("set_write_buffer_limits",)

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        lingers: Callable[[], bool],
        seconds: float,
        max_bytes: int,
    ) -> None:
        self.transport = transport
        self._loop = loop
        self._lingers = lingers
        self._seconds = seconds
        self._left = max_bytes
        # While lingering, when it ends at the latest; None before.
        self._deadline: asyncio.TimerHandle | None = None
        self.write = transport.write
        self.writelines = transport.writelines
        self.is_closing = transport.is_closing
        self.abort = transport.abort
        self.get_extra_info = transport.get_extra_info
        self.set_protocol = transport.set_protocol
        self.get_protocol = transport.get_protocol
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading
        self.is_reading = transport.is_reading
        self.write_eof = transport.write_eof
        self.can_write_eof = transport.can_write_eof
        self.get_write_buffer_size = transport.get_write_buffer_size
        self.get_write_buffer_limits = transport.get_write_buffer_limits
        self.set_write_buffer_limits = transport.set_write_buffer_limits

    def close(self) -> None:
        """Close the connection: at once when nothing of the client's may be unread, else once
        the client has closed its side or the bounds are reached (above)."""
        if self._deadline is not None:
            return  # lingering already: the client or the bounds end it
        transport = self.transport
        if transport.is_closing() or self._seconds <= 0 or not self._lingers():
            transport.close()
            return
        # From here the connection is closed to whoever holds it: nothing more is written.
        self.is_closing = _closed
        self.write = self.writelines = _dropped
        self._deadline = self._loop.call_later(self._seconds, transport.abort)
        # Written once what is still buffered is (TLS has no half-close: the client reads the
        # answer by its length, and ends the connection or is ended at the bounds).
        if transport.can_write_eof():
            transport.write_eof()

    def drop(self, data: bytes) -> None:
        """What the client sent after the protocol stopped reading requests: counted while
        lingering, the connection closed past ``max_bytes``."""
        if self._deadline is not None:
            self._left -= len(data)
            if self._left < 0:
                self.transport.abort()

    def ended(self) -> None:
        """The connection is closed (by the client, the bounds, or a failure)."""
        if self._deadline is not None:
            self._deadline.cancel()

    def __getattr__(self, name: str) -> Any:
        # Anything else a transport has (as uvicorn's WebSocket protocols would ask).
        return getattr(self.transport, name)


def _closed() -> bool:
    return True


def _dropped(data: Any) -> None:
    pass
