"""uvicorn's request-response cycle (httptools) for a gateway request run from the protocol
(`bastion.server.direct_gateway`), with a short way for the answer nearly every call gets.

An answer of one known length, its head then its whole body (``send_json``), is written here as
uvicorn writes it (the status line, the server's default headers (date, server), the answer's
own, ``connection: close`` when the connection is not kept alive, and the body), but in one write
where uvicorn makes two: the head is held until its body comes. That is one system call and one
loopback segment fewer per answer, and the client is not woken for a head whose body is not
there yet (which, on two cores, let it take the CPU between the two writes). A head held when
anything but its whole body follows is written first, and the rest is uvicorn's; an answer
begun and never finished (a head, then the application ends) is closed without its head, where
uvicorn would have written the head before closing. Everything else is uvicorn's own ``send``: an
event stream (chunked), a body in pieces or of another length than announced, a ``connection``
or ``transfer-encoding`` header, a header name in capitals or a header uvicorn refuses, a paused
writer, a client that went away, HEAD.

The gateway's usual answer (JSON, no headers of its own) skips the two messages altogether
(`GatewayCycle.send_whole_json`), and the body held before the cycle was made is taken without
``receive``'s message (`GatewayCycle.take_body`). Each way is checked against the installed
uvicorn's own cycle, message by message (tests/gateway/test_gateway_cycle.py), so that a uvicorn
release that writes answers otherwise fails there rather than putting the two out of step.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from operator import itemgetter
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    RequestResponseCycle,
)

_NAME, _VALUE = itemgetter(0), itemgetter(1)
_LINE = b"%s: %s\r\n".__mod__  # raises TypeError unless given a pair
_CONTENT_LENGTH = b"content-length"
_JSON_LENGTH = b"content-type: application/json\r\ncontent-length: "
# Headers whose meaning uvicorn acts on besides the length: answers naming them take its way.
_FRAMING = frozenset({b"transfer-encoding", b"connection"})
_BYTES = frozenset({bytes})
# A name uvicorn refuses, or one it would write lowercased.
_NAME_NOT_AS_IS = re.compile(b"(?:%s)|[A-Z]" % HEADER_RE.pattern)

# The server's default headers (replaced each second, for the date) last seen, and the lines
# uvicorn writes for them (None: uvicorn's own way, for headers it would refuse or act on).
_defaults: tuple[list[tuple[bytes, bytes]] | None, bytes | None] = (None, None)


def _default_lines(defaults: list[tuple[bytes, bytes]]) -> bytes | None:
    lines = []
    try:
        for name, value in defaults:
            if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
                return None
            name = name.lower()
            if name == _CONTENT_LENGTH or name in _FRAMING:
                return None
            lines += [name, b": ", value, b"\r\n"]
        return b"".join(lines)
    except Exception:  # not what uvicorn takes: its own way raises its own error
        return None


class GatewayCycle(RequestResponseCycle):
    """uvicorn's `RequestResponseCycle` for one held gateway request: its body already here, no
    access log, no 100 Continue (a request that waits for it is not held)."""

    # uvicorn's initial state, as class attributes: the instance gets its own when one changes.
    access_log = False
    disconnected = False
    keep_alive = True
    waiting_for_100_continue = False
    more_body = False
    response_started = False
    response_complete = False
    chunked_encoding: bool | None = None
    expected_content_length = 0
    # The head was made here (a known length, not HEAD): a whole body may follow it here.
    _plain = False
    # That head, not written yet: it goes out with the body, or before anything else.
    _held = b""

    def __init__(
        self,
        scope: Any,
        transport: asyncio.Transport,
        flow: FlowControl,
        logger: logging.Logger,
        access_logger: logging.Logger,
        default_headers: list[tuple[bytes, bytes]],
        body: bytes,
        on_response: Callable[..., None],
    ) -> None:
        self.scope = scope
        self.transport = transport
        self.flow = flow
        self.logger = logger
        self.access_logger = access_logger
        self.default_headers = default_headers
        self.on_response = on_response
        self.body = body  # type: ignore[assignment]
        # Set: the body is there for the first receive.
        self.message_event = ready = asyncio.Event()
        ready.set()

    async def send(self, message: Any) -> None:
        if not self.flow.write_paused and not self.disconnected:
            if self._plain and not self.response_complete:
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    body = message.get("body", b"")
                    if len(body) == self.expected_content_length:
                        self.expected_content_length = 0
                        self._plain = False
                        head, self._held = self._held, b""
                        self._write_whole(head + body)
                        return
            elif not self.response_started and message["type"] == "http.response.start":
                head = self._head(message)
                if head is not None:
                    self._held = head
                    return
        if self._held:  # not the whole body: the head goes out first, as uvicorn wrote it
            head, self._held = self._held, b""
            if not self.disconnected:
                self.transport.write(head)
        await RequestResponseCycle.send(self, message)

    def _head(self, message: Any) -> bytes | None:
        """The answer's head as uvicorn writes it, with uvicorn's state set as it sets it; None
        (nothing set) when the answer is not one of a known length with plain headers."""
        try:
            line = STATUS_LINE.get(message.get("status"))
            headers = message.get("headers", [])
            if line is None or headers.__class__ is not list or self.scope["method"] == "HEAD":
                return None
            names = [*map(_NAME, headers)]
            joined = b"".join(names)
            values = b"".join(map(_VALUE, headers))
            lines = b"".join(map(_LINE, headers))  # raises unless each header is a pair
            if (
                not _BYTES.issuperset(map(type, names))
                or _NAME_NOT_AS_IS.search(joined)
                or HEADER_VALUE_RE.search(values)
                or not _FRAMING.isdisjoint(names)
            ):
                return None
            # The first content-length, as uvicorn takes it (ValueError: none, uvicorn's way).
            length = int(headers[names.index(_CONTENT_LENGTH)][1].decode())
        except Exception:  # not what uvicorn takes: its own way raises its own error
            return None
        prefix = self._prefix()
        if prefix is None:
            return None
        self.response_started = True
        self.expected_content_length = length
        self.chunked_encoding = False
        self._plain = True
        if self.keep_alive:
            return b"".join((line, prefix, lines, b"\r\n"))
        return b"".join((line, prefix, lines, b"connection: close\r\n\r\n"))

    def _prefix(self) -> bytes | None:
        """The lines uvicorn writes for the server's default headers (None: its own way)."""
        global _defaults
        defaults = self.default_headers
        seen, prefix = _defaults
        if defaults != seen:
            seen, prefix = _defaults = (list(defaults), _default_lines(defaults))
        return prefix

    def send_whole_json(self, status: int, body: bytes) -> bool:
        """A whole JSON answer, written at once as `send` writes ``http.response.start`` (with
        ``content-type: application/json`` and ``content-length``) then its whole ``body``, the
        cycle left as they leave it: without the two messages, their checks and a head made
        from a list of headers. False, with nothing done, where the short way would not take
        them (an answer under way, a paused writer, a client gone, HEAD, a status uvicorn has no
        line for, default headers it would refuse): then send the messages."""
        line = STATUS_LINE.get(status)
        if (
            line is None
            or self.response_started
            or self.flow.write_paused
            or self.disconnected
            or self.scope["method"] == "HEAD"
        ):
            return False
        prefix = self._prefix()
        if prefix is None:
            return False
        self.response_started = True
        self.chunked_encoding = False
        end = b"\r\n\r\n" if self.keep_alive else b"\r\nconnection: close\r\n\r\n"
        self._write_whole(b"".join((line, prefix, _JSON_LENGTH, b"%d" % len(body), end, body)))
        return True

    def _write_whole(self, answer: bytes) -> None:
        """Write a whole answer, head and body, in one write (one segment), and end it as
        uvicorn ends an answer: complete, the connection closed unless kept alive."""
        self.transport.write(answer)
        self.response_complete = True
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()

    def take_body(self) -> bytes | None:
        """What the first `receive` gives, at once: the whole body, held before the cycle was
        made, the cycle left as `receive` leaves it. None, with nothing done, where `receive`
        would wait or say that the client went away."""
        if (
            self.disconnected
            or self.response_complete
            or self.more_body
            or not self.message_event.is_set()
        ):
            return None
        flow = self.flow
        if flow.read_paused:
            flow.resume_reading()
        self.message_event.clear()
        body = bytes(self.body)
        self.body = bytearray()
        return body

    async def receive(self) -> Any:
        if not self.disconnected and not self.response_complete:
            flow = self.flow
            if flow.read_paused:
                flow.resume_reading()
            await self.message_event.wait()
            self.message_event.clear()
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        message = {"type": "http.request", "body": bytes(self.body), "more_body": self.more_body}
        self.body = bytearray()
        return message
