"""ASGI middleware: every request body is capped, and must arrive in time, while it is read.

One table says how many bytes each path may receive. A declared ``Content-Length`` over the limit
is answered 413 before a byte of the body is read; a body without one (chunked) is counted as it
arrives and answered 413 the moment it passes the limit. A body that is not complete within the
deadline is answered 408. Each answer is in the form of the route family that was asked (problem
details on ``/v1``, an OAuth error on the OAuth endpoints, a JSON-RPC error on the gateway), and
closes the connection, so the rest of the body is never read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# (status, sentence) -> (content type, body): the answer in a route family's own form.
Refusal = Callable[[int, str], tuple[str, bytes]]


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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, root = scope["path"], scope.get("root_path", "")
        limit = self.limits.for_path(path[len(root) :] if root and path.startswith(root) else path)
        declared, chunked = None, False
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit():
                # uvicorn refuses a Content-Length that is not a number; were one to pass, the
                # body is still counted as it arrives.
                declared = int(value)
            elif name == b"transfer-encoding":
                chunked = True
        if declared is not None and declared > limit.max_bytes:
            await _answer(send, limit, 413, _too_large(limit))
            return
        if not chunked and not declared:
            # No body to read: nothing to count, nothing to wait for.
            await self.app(scope, receive, send)
            return
        reading = _Reading(limit, receive, time.monotonic() + self.body_timeout)
        try:
            await self.app(scope, reading.receive, reading.send(send))
        except Exception:
            # Whatever the application made of the refusal raised into it, the refusal answers.
            if reading.refused is None:
                raise
        if reading.refused is not None and not reading.started:
            await _answer(send, limit, reading.refused.status, reading.refused.detail)


class _Reading:
    """One request body on its way in: its count, its deadline, and whether it was refused."""

    def __init__(self, limit: BodyLimit, receive: Receive, deadline: float) -> None:
        self.limit = limit
        self._receive = receive
        self.deadline = deadline
        self.size = 0
        self.complete = False
        self.started = False
        self.refused: BodyRefused | None = None

    async def receive(self) -> Message:
        if self.complete:
            # Past the body, receive only waits for the client to go away: no deadline there.
            return await self._receive()
        if self.refused is not None:
            raise self.refused
        message = None
        with anyio.move_on_after(self.deadline - time.monotonic()):
            message = await self._receive()
        if message is None:
            raise self._refuse(
                408, "the request body did not arrive in time (body_timeout); send it at once"
            )
        if message["type"] == "http.request":
            self.size += len(message.get("body", b""))
            if self.size > self.limit.max_bytes:
                raise self._refuse(413, _too_large(self.limit))
            if not message.get("more_body", False):
                self.complete = True
        return message

    def _refuse(self, status: int, detail: str) -> BodyRefused:
        self.refused = BodyRefused(status, detail)
        return self.refused

    def send(self, send: Send) -> Send:
        async def guarded(message: Message) -> None:
            if self.refused is not None:
                return  # the refusal is the answer, not what the application made of it
            if message["type"] == "http.response.start":
                self.started = True
                if not self.complete:
                    # Answered before the body was read (a 401, say): close the connection
                    # rather than read the rest of a body nobody will use.
                    message = {**message, "headers": [*message["headers"], _CLOSE]}
            await send(message)

        return guarded


_CLOSE = (b"connection", b"close")


def _too_large(limit: BodyLimit) -> str:
    return f"the request body is larger than {limit.max_bytes} bytes ({limit.setting})"


async def _answer(send: Send, limit: BodyLimit, status: int, detail: str) -> None:
    content_type, body = limit.refusal(status, detail)
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        _CLOSE,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
