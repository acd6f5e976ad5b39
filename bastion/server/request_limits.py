"""ASGI middleware: every request body is capped, and must arrive in time, while it is read.

One table says how many bytes each path may receive. A declared ``Content-Length`` over the limit
is answered 413 before a byte of the body is read; every body is counted as it arrives (chunked,
or with a length this module reads otherwise than the HTTP parser) and answered 413 the moment
it passes the limit. A body that is not complete within the deadline is answered 408. Each
answer is in the form of the route family that was asked (problem details on ``/v1``, an OAuth
error on the OAuth endpoints, a JSON-RPC error on the gateway), and closes the connection, so
the rest of the body is never used (what still comes is read and dropped for a bounded time
first, so that the client reads the answer: `bastion.server.lingering_close`).

No request may carry the character U+0000 (NUL) where the application reads text: in its path,
its query string or a form body (as ``%00``, or as it is; a JSON body is read by
`bastion.untrusted_json`, which refuses its escape). PostgreSQL stores no NUL in text, and in a
name or an identifier a NUL is the classic way to make two programs read one string as two: it is
answered 400 before the application sees it, on every route alike. A form may only be sent as
``application/x-www-form-urlencoded`` (what OAuth and HTML forms send): no route takes
``multipart/form-data``, whose parts may name a character set that writes a NUL without one.

A client that goes away before its body is complete is no failure of the server: what the
application raises at that (Starlette's ``ClientDisconnect``) ends here, with one line in the log,
not a traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.http_fields import media_type
from bastion.route_paths import route_path
from bastion.whole_numbers import capped

log = logging.getLogger("bastion.server")

# (status, sentence) -> (content type, body): the answer in a route family's own form.
Refusal = Callable[[int, str], tuple[str, bytes]]
# The most of a body, not read by the application before it answered, that is read and dropped so
# that the connection can stay open; more, and the connection is closed instead.
DRAIN_BYTES = 64 * 1024


@dataclass(frozen=True)
class BodyLimit:
    """At most ``max_bytes`` of request body on ``path`` (exact) or below ``prefix``."""

    max_bytes: int
    # The setting that changes the limit, named in the answer.
    setting: str
    refusal: Refusal
    path: str | None = None
    prefix: str | None = None


class BodyRefused(Exception):  # noqa: N818 - raised into the application by `receive`
    """The request body passed its limit or its deadline; the middleware answers for it."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class BodyLimits:
    """The limit of each path: exact paths first, then the longest prefix, then the default."""

    def __init__(self, default: BodyLimit, limits: Sequence[BodyLimit] = ()) -> None:
        self.default = default
        self.exact = {limit.path: limit for limit in limits if limit.path is not None}
        self.prefixes = sorted(
            (limit for limit in limits if limit.prefix is not None),
            key=lambda limit: len(limit.prefix or ""),
            reverse=True,
        )

    def for_path(self, path: str) -> BodyLimit:
        found = self.exact.get(path)
        if found is not None:
            return found
        for limit in self.prefixes:
            if path.startswith(limit.prefix or ""):
                return limit
        return self.default


class RequestBodyLimits:
    """The middleware; outermost in `bastion.server.app.create_app`, so it covers every route."""

    def __init__(self, app: ASGIApp, limits: BodyLimits, body_timeout: float) -> None:
        self.app = app
        self.limits = limits
        self.body_timeout = body_timeout
        self.deadlines = _Deadlines()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        limit = self.limits.for_path(route_path(scope))
        if "\x00" in path or b"%00" in scope["query_string"]:
            await _answer(send, limit, 400, NUL)
            return
        declared, lengths, chunked, expecting, form = None, 0, False, False, False
        for name, value in scope["headers"]:
            # Either header frames a body, however its value is written: such a body is counted
            # as it arrives, whatever this loop makes of the value.
            if name == b"content-length":
                lengths += 1
                # As the HTTP parser reads it: whitespace around the number is allowed. However
                # long, a number past the limit is refused as too large.
                size = capped(value.strip(b" \t").decode("latin-1"), limit.max_bytes)
                if size is not None:
                    declared = size
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"expect":
                expecting = True
            elif name == b"content-type" and value != b"application/json":
                # If the header is sent twice, either may be read. Read as the form parser reads
                # it: a value it takes for a form's is one `media_type` names so.
                media = media_type(value.decode("latin-1"))
                if media == "multipart/form-data":
                    await _answer(send, limit, 415, MULTIPART)
                    return
                form = form or media == "application/x-www-form-urlencoded"
        if declared is not None and declared > limit.max_bytes:
            await _answer(send, limit, 413, _too_large(limit))
            return
        if not lengths and not chunked:
            # No body to read: nothing to count, nothing to wait for.
            await self.app(scope, receive, send)
            return
        reading = _Reading(limit, receive, send)
        if form:
            reading.form_tail = b""
        # An empty body is read already: answering without reading it leaves nothing unread.
        reading.complete = declared == 0 and lengths == 1 and not chunked
        if lengths == 1 and not chunked and not expecting and declared is not None:
            # A client that waits for "100 Continue" sends nothing more once answered.
            reading.drainable = declared <= DRAIN_BYTES
        self.deadlines.add(reading, self.body_timeout)
        try:
            await self.app(scope, reading.receive, reading.send)
        except Exception as e:
            if reading.gone:
                # No one to answer: whatever the application made of it is no failure (named, in
                # case a fault of its own met the client's leaving).
                log.info(
                    "the client went away before its request body was complete: %s %s (%s)",
                    scope["method"],
                    path,
                    type(e).__name__,
                )
                return
            # Whatever the application made of the refusal raised into it, the refusal answers.
            if reading.refused is None:
                raise
        finally:
            self.deadlines.discard(reading)
        if reading.refused is not None and not reading.started:
            await _answer(send, limit, reading.refused.status, reading.refused.detail)


class _Reading:
    """One request body on its way in: its count, whether it is complete, and whether it was
    refused (too large, or past its deadline)."""

    __slots__ = ("limit", "_receive", "_send", "deadline", "size", "complete", "started")
    __slots__ += ("refused", "expired", "waiting", "drainable", "form_tail", "gone")

    def __init__(self, limit: BodyLimit, receive: Receive, send: Send) -> None:
        self.limit = limit
        self._receive = receive
        self._send = send
        self.deadline = 0.0
        self.size = 0
        self.complete = False
        self.started = False
        self.refused: BodyRefused | None = None
        self.expired = False
        self.waiting: asyncio.Task | None = None
        # Whether the rest of the body may be read and dropped if the application answers
        # without it (a small body of declared length).
        self.drainable = False
        # In a form body, the last two bytes read, for a ``%00`` split across two messages; None
        # for any other body.
        self.form_tail: bytes | None = None
        # Whether the client went away before the body was complete.
        self.gone = False

    async def receive(self) -> Message:
        if self.complete:
            # Past the body, receive only waits for the client to go away: no deadline there.
            return await self._receive()
        if self.refused is not None:
            raise self.refused
        if self.expired:
            raise self._too_slow()
        self.waiting = task = asyncio.current_task()
        try:
            message = await self._receive()
        except asyncio.CancelledError:
            if not self.expired:
                raise
            # Cancelled by _Deadlines, not by the application: that cancellation ends here.
            if task is not None:
                task.uncancel()
            raise self._too_slow() from None
        finally:
            self.waiting = None
        if message["type"] == "http.request":
            body = message.get("body", b"")
            self.size += len(body)
            if self.size > self.limit.max_bytes:
                raise self._refuse(413, _too_large(self.limit))
            if self.form_tail is not None:
                seen = self.form_tail + body
                if b"%00" in seen or b"\x00" in body:
                    raise self._refuse(400, NUL)
                self.form_tail = seen[-2:]
            if not message.get("more_body", False):
                self.complete = True
        elif message["type"] == "http.disconnect":
            self.gone = True
        return message

    def expire(self) -> None:
        """The deadline passed: stop the wait for more of the body, if one is under way."""
        self.expired = True
        if self.waiting is not None:
            self.waiting.cancel()

    def _too_slow(self) -> BodyRefused:
        return self._refuse(408, TOO_SLOW)

    def _refuse(self, status: int, detail: str) -> BodyRefused:
        self.refused = BodyRefused(status, detail)
        return self.refused

    async def send(self, message: Message) -> None:
        if self.refused is not None:
            return  # the refusal is the answer, not what the application made of it
        if message["type"] == "http.response.start":
            self.started = True
            if not self.complete and not await self._drained():
                # Answered before a large body was read (a 401, say): close the connection
                # rather than read the rest of a body nobody will use.
                message = {**message, "headers": [*message.get("headers", ()), _CLOSE]}
        await self._send(message)

    async def _drained(self) -> bool:
        """Read and drop the rest of a small body the application answered without reading,
        within its deadline; whether it all came. Then the connection stays open: closed with
        bytes unread (the body, or a request behind it), a socket is reset rather than closed,
        and the client may get the reset instead of the answer."""
        if not self.drainable:
            return False
        try:
            while not self.complete:
                if (await self.receive())["type"] == "http.disconnect":
                    return False
        except BodyRefused:
            # Past the deadline: the application's answer stands, on a connection then closed.
            self.refused = None
            return False
        return True


class _Deadlines:
    """The bodies being read, checked against their deadlines once a second by one timer for
    all of them: a timer per request would cost more than the rest of this middleware."""

    def __init__(self) -> None:
        self.reading: set[_Reading] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, reading: _Reading, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        reading.deadline = loop.time() + timeout
        self.reading.add(reading)
        if self._timer is None:
            self._timer = loop.call_later(1.0, self._check, loop)

    def discard(self, reading: _Reading) -> None:
        self.reading.discard(reading)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for reading in [r for r in self.reading if r.deadline <= now and not r.complete]:
            self.reading.discard(reading)
            reading.expire()
        self._timer = loop.call_later(1.0, self._check, loop) if self.reading else None


_CLOSE = (b"connection", b"close")
TOO_SLOW = "the request body did not arrive in time (body_timeout); send it at once"
NUL = (
    "the request holds the character U+0000 (NUL, %00) in its path, its query or its form, "
    "where no name or value may hold it"
)
MULTIPART = (
    "multipart/form-data is taken by no route here: send a form as "
    "application/x-www-form-urlencoded"
)


def _too_large(limit: BodyLimit) -> str:
    return f"the request body is larger than {limit.max_bytes} bytes ({limit.setting})"


async def _answer(send: Send, limit: BodyLimit, status: int, detail: str) -> None:
    content_type, body = limit.refusal(status, detail)
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        # Some refusals quote what was sent: never sniffed as a page (`problems.NOT_A_PAGE`).
        (b"x-content-type-options", b"nosniff"),
        _CLOSE,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
