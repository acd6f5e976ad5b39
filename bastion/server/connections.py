"""uvicorn's HTTP/1.1 protocol (httptools) with a deadline and a size limit on each request head.

uvicorn closes idle keep-alive connections, but a connection that opens and sends nothing, or
trickles its request line and headers a byte at a time, stays open for as long as the client
likes, and a head that never ends is buffered without limit. Here a head must be complete within
``header_timeout`` seconds of the connection opening (or of the read that brought its first byte,
for the next request on a kept-alive connection) and within ``max_header_bytes`` (counted as it arrives, and once more
when complete, for a head that arrived in one read): otherwise the connection is answered 408 or
431 and closed.

With a `bastion.server.direct.DirectDecisions`, a decision request is answered here, without the
ASGI application, when all it needs is in memory: its body is held as it arrives (within
``body_timeout``, else 408 as the application answers), then decided; any other request, or one
that does not check out here, is handed to the application as it arrived.

With a `bastion.server.direct_gateway.DirectGateway`, a gateway ``POST /mcp/<server>`` is held
the same way, then run by the gateway's transport on uvicorn's request-response cycle (with a
short way for its common answer, `bastion.server.gateway_cycle`), past the application's
middleware (but uvicorn's proxy headers middleware, when on).

Every request's authority is checked once its head is complete
(`bastion.server.request_authority`, RFC 9112 §3.2): one without a single valid ``Host`` (HTTP/1.1),
or whose absolute target names another authority than its ``Host``, is refused 400 in its route
family's form (``refusals``, the application's body limits) and the connection closed, before
anything is decided, held or handed to the application; with ``[server] allowed_hosts``
(`bastion.server.request_authority.AllowedHosts`), one whose ``Host`` is none of the names
listed is refused 421 the same way. A refusal here, and bytes that begin no
request (uvicorn's 400), are answered in turn: after the answers of the requests before them on
the connection, which go on (uvicorn closed the connection at once, and the answer of a request
still under way, a gateway call that may have run upstream, was lost); nothing after them is parsed.

Every close of a connection, uvicorn's and this protocol's, goes through its transport's
`bastion.server.lingering_close.LingeringTransport`: while bytes of the client's may be unread (a
request not whole, a refusal, requests behind the one that closes), the connection is shut for
writing once its answer is written, and what still comes is read and dropped within
``linger_timeout`` and ``max_linger_bytes`` before it closes, so that a client still sending
reads the answer rather than a reset; between requests it is closed at once.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from itertools import chain
from operator import itemgetter
from typing import Any

import httptools
from starlette.types import ASGIApp
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from bastion.cors import CrossOriginRoutes
from bastion.server import problems
from bastion.server.direct import DirectDecisions, DirectRoute
from bastion.server.direct_gateway import DirectGateway, GatewayRoute
from bastion.server.gateway_cycle import GatewayCycle
from bastion.server.lingering_close import LingeringTransport
from bastion.server.request_authority import AllowedHosts, authority_problem
from bastion.server.request_limits import TOO_SLOW, BodyLimits


class BoundedHttpProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` whose request heads have a deadline and a size limit, and whose
    closes linger while the client may still be sending."""

    def __init__(
        self,
        *args: Any,
        header_timeout: float,
        max_header_bytes: int,
        linger_timeout: float,
        max_linger_bytes: int,
        direct: DirectDecisions | None = None,
        gateway: DirectGateway | None = None,
        refusals: BodyLimits | None = None,
        allowed_hosts: AllowedHosts | None = None,
        cross_origin: CrossOriginRoutes | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.direct = direct
        self.gateway = gateway
        # The form of a refusal on each path (the application's body limits' table).
        self.refusals = refusals
        # The names requests may be for (None: any, and nothing is looked up).
        self.allowed_hosts = allowed_hosts
        # The application's outermost CORS (its OAuth endpoints', and /mcp/'s beyond the
        # gateway's own), which this protocol's own answers on its routes carry as the
        # application's do.
        self.cross_origin = cross_origin
        # The gateway as this server runs the application (behind uvicorn's proxy headers
        # middleware when that is on).
        self._gateway_app = gateway.app(self.config) if gateway is not None else None
        # The exact targets answered here, POST only; a decision route first, as it was asked
        # first (the two never share a target).
        self._routes: dict[bytes, DirectRoute | GatewayRoute] = {
            **(gateway.routes if gateway is not None else {}),
            **(direct.routes if direct is not None else {}),
        }
        # A request being answered from the protocol: its route, its body so far, and the
        # deadline of the rest of its body.
        self._held: DirectRoute | GatewayRoute | None = None
        self._held_body: list[bytes] = []
        self._held_deadline: asyncio.TimerHandle | None = None
        self.header_timeout = header_timeout
        self.max_header_bytes = max_header_bytes
        self._head_bytes = 0
        self._in_head = True
        self._head_deadline: asyncio.TimerHandle | None = None
        # A head that arrived whole but too large: nothing more of this connection is served.
        self._oversized = False
        # A request refused in turn (`_refuse_in_turn`), or a connection closing while bytes of
        # the client's may be unread (`_lingers`): nothing after it is read or served.
        self._refused = False
        # Between a request's first byte and its end, as the parser reads it.
        self._in_message = False
        self.linger_timeout = linger_timeout
        self.max_linger_bytes = max_linger_bytes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Every close of the connection, uvicorn's and this protocol's, lingers while bytes of
        # the client's may be unread (`bastion.server.lingering_close`).
        self._linger = LingeringTransport(
            transport, self.loop, self._lingers, self.linger_timeout, self.max_linger_bytes
        )
        self.transport = self._linger  # type: ignore[assignment]
        # Counted from the connection, so a client that connects and says nothing is closed too.
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._linger.ended()
        self._disarm()
        self._release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            # Answered once the answers before it are, then the connection closes (read and
            # dropped meanwhile; counted once the close lingers).
            self._linger.drop(data)
            return
        in_head = self._in_head
        super().data_received(data)
        if self._refused:
            return
        if self._held is not None and self._held_deadline is None:
            # The body is still coming: it has body_timeout to arrive, as through the application.
            source = self.gateway if self._held.__class__ is GatewayRoute else self.direct
            assert source is not None
            timeout = source.body_timeout
            self._held_deadline = self.loop.call_later(timeout, self._held_too_slow)
        if self._oversized:
            self._refuse(431, _TOO_LARGE)
        elif self._in_head and not self.transport.is_closing():
            if in_head:
                # All of ``data`` went into a head that is still not complete.
                self._head_bytes += len(data)
                if self._head_bytes > self.max_header_bytes:
                    self._refuse(431, _TOO_LARGE)
                    return
            if self._head_deadline is None:
                # A head that began in this read and is not complete: its deadline, counted
                # from this read (armed here, not as it began, so a head that came whole in
                # one read, the usual case, arms and cancels no timer).
                self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = self._in_message = True
        self._head_bytes = 0
        # The connection is no longer idle. uvicorn stops its keep-alive timer when data
        # arrives, but an answer given here starts it from inside the parser, which then goes
        # on to a request behind it in the same read: that request was cut off
        # keep_alive_timeout later, unanswered.
        self._unset_keepalive_if_required()

    def on_header(self, name: bytes, value: bytes) -> None:
        # uvicorn's (the value without the whitespace after it, which llhttp keeps and which is
        # not part of it, RFC 9110 §5.5), but for the 100 Continue check, made once the head is
        # complete.
        self.headers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_deadline is not None:
            self._disarm()
        if self._oversized or self._refused:
            return
        # A head that came whole within one read was never counted while incomplete: its size
        # is its parts' (request target, names and values, each line's separators).
        headers = self.headers
        size = len(self.url) + 4 * len(headers) + sum(map(len, chain.from_iterable(headers)))
        if size > self.max_header_bytes:
            self._oversized = True  # answered by data_received, once the parser returns
            return
        names = [*map(_NAME, headers)]
        version = self.parser.get_http_version()
        problem = authority_problem(headers, names, self.url, version)
        if problem is not None:
            self._refuse_authority(400, problem, version)
            return
        allowed = self.allowed_hosts
        if allowed is not None:
            problem = allowed.refusal(headers, names, self.url)
            if problem is not None:
                self._refuse_authority(421, problem, version)
                return
        if b"expect" in names:
            # uvicorn asks this of each header as it comes (on_header): here, of the whole head.
            self.expect_100_continue = any(
                value.lower() == b"100-continue" for name, value in headers if name == b"expect"
            )
        if self._routes and self._may_answer_directly(names, version):
            return  # the body is held until the message is complete (on_message_complete)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._held is not None:
            self._held_body.append(body)
        elif not (self._oversized or self._refused):
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        held = self._held
        if held.__class__ is GatewayRoute:
            body = b"".join(self._held_body)
            self._release()
            self._run_gateway(body)
            return
        if held is not None:
            assert self.direct is not None
            content = self.direct.answer(held, self.headers, b"".join(self._held_body))  # type: ignore[arg-type]
            if content is not None:
                self._release()
                self._respond(content)
                return
            self._hand_over()
        if not (self._oversized or self._refused):
            super().on_message_complete()

    def _may_answer_directly(self, names: list[bytes], version: str) -> bool:
        """Whether this request, its head complete (its header ``names`` in order, its HTTP
        ``version``), is one the protocol may answer itself (then its body is held): as uvicorn
        would start it, with nothing else under way."""
        route = self._routes.get(self.url) if self.parser.get_method() == b"POST" else None
        if route is None:
            return False
        limit = self.limit_concurrency
        if (
            self.access_log  # uvicorn writes the access log line
            or self.root_path
            or version != "1.1"
            or not self.parser.should_keep_alive()
            or (self.cycle is not None and not self.cycle.response_complete)
            or self.pipeline
            or self.flow.write_paused
            # uvicorn's own refusal (503) when this process has as much as it may take.
            or (limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit))
            or not DirectDecisions.framed(self.headers, names, route.limit.max_bytes)
        ):
            return False
        self._held = route
        return True

    def _run_gateway(self, body: bytes) -> None:
        """Run the held gateway request as uvicorn runs a request, on its own cycle (which
        writes the answer, keeps the connection alive or closes it, starts what was pipelined
        behind it, and says when the client went away), with the gateway as its application
        (its upstream named by the request's target)."""
        assert self._gateway_app is not None
        scope = self.scope
        url = self.url
        scope["method"] = "POST"
        scope["path"] = url.decode("ascii")
        scope["raw_path"] = url
        scope["query_string"] = b""
        cycle = GatewayCycle(
            scope,
            self.transport,
            self.flow,
            self.logger,
            self.access_logger,
            self.server_state.default_headers,
            body,
            self.on_response_complete,
        )
        self.cycle = cycle
        self._start_asgi_task(cycle, self._gateway_app)

    def _should_upgrade(self) -> bool:
        # A refused request is not upgraded either (uvicorn asks once the parser stops at it).
        return not self._refused and super()._should_upgrade()

    def _refuse_authority(self, status: int, problem: str, version: str) -> None:
        """Refuse the request whose head is complete for its authority: ``status`` (400 for
        `authority_problem`, 421 for a host not allowed) in its route family's form, in turn."""
        try:
            parsed = httptools.parse_url(self.url)
            raw_path, query = parsed.path, parsed.query or b""
        except httptools.HttpParserInvalidURLError:
            raw_path, query = b"/", b""
        path = raw_path.decode("latin-1")
        refusal = self.refusals.for_path(path).refusal if self.refusals else problems.refusal
        content_type, body = refusal(status, problem)
        scope = self.scope
        scope["method"] = self.parser.get_method().decode("ascii")
        scope["http_version"] = version
        scope.update(path=path, raw_path=raw_path, query_string=query)
        refusal: ASGIApp = _Refusal(content_type.encode(), body, status)
        if self.cross_origin is not None:
            refusal = self.cross_origin.outside(refusal)
        self._refuse_in_turn(scope, refusal, self.access_log)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that begin no request (or break the request they are
        in), given after the answers of the requests before them (uvicorn's closed the
        connection at once, losing any still under way)."""
        if self._refused:
            return  # behind a request refused already: never read
        self._refused = True  # nothing after these bytes is read either
        self._release()
        cycle = self.cycle
        under_way = cycle is not None and not cycle.response_complete
        if under_way and cycle.more_body:
            # The bytes broke the framing of this request, whose body is still coming: it is
            # the one refused, and never run if it waits its turn.
            waiting = [entry for entry in self.pipeline if entry[0] is cycle]
            if waiting:
                self.pipeline.remove(waiting[0])
            else:
                under_way = False
                if cycle.response_started:  # no 400 in the middle of its answer
                    self.transport.close()
                    return
        if not under_way:
            super().send_400_response(msg)
            return
        scope = {
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "root_path": self.root_path,
            "method": "",
            "path": "",
            "raw_path": b"",
            "query_string": b"",
            "headers": [],
        }
        self._refuse_in_turn(scope, _Refusal(b"text/plain; charset=utf-8", msg.encode()), False)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        if app is service_unavailable and self.cross_origin is not None:
            # uvicorn's 503 past limit_concurrency (max_connections), with CORS as any answer.
            app = self.cross_origin.outside(app)
        super()._start_asgi_task(cycle, app)

    def _refuse_in_turn(self, scope: Any, refusal: ASGIApp, access_log: bool) -> None:
        """Answer ``refusal`` once the requests before it on this connection are answered (at
        once if none is under way), then close the connection (lingering); nothing after it is
        parsed."""
        self._refused = True
        self._disarm()
        cycle = RequestResponseCycle(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=False,
            on_response=self.on_response_complete,
        )
        before = self.cycle
        self.cycle = cycle
        if before is None or before.response_complete:
            self._start_asgi_task(cycle, refusal)
        else:
            self.pipeline.appendleft((cycle, refusal))

    def _lingers(self) -> bool:
        """At a close: whether bytes of the client's may be unread (a request begun and not
        whole, a refusal, requests behind the one that closes), so that the close lingers. If
        so, nothing more of the connection is parsed or served, and what comes is read (to be
        dropped)."""
        if not (self._refused or self._in_message or self.pipeline or self.flow.read_paused):
            return False
        self._refused = True
        self._disarm()
        self._release()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # Its answer cannot be given any more, as when the connection is lost.
            cycle.disconnected = True
            cycle.message_event.set()
        self.flow.resume_reading()
        return True

    def _hand_over(self) -> None:
        """Give the held request to uvicorn as the parser gave it: its head, then its body."""
        body = self._held_body
        self._release()
        if self.transport.is_closing():
            return
        super().on_headers_complete()
        for part in body:
            super().on_body(part)

    def _release(self) -> None:
        self._held, self._held_body = None, []
        if self._held_deadline is not None:
            self._held_deadline.cancel()
            self._held_deadline = None

    def _held_too_slow(self) -> None:
        """The held body missed its deadline: answered as the application answers it (408 in
        the route family's form), and the connection closed."""
        self._held_deadline = None
        route = self._held
        self._release()
        if route is None or self.transport.is_closing():
            return
        content_type, body = route.limit.refusal(408, TOO_SLOW)
        cors: list[tuple[bytes, bytes]] = []
        if self.cross_origin is not None:
            # What the application's answer would carry there (a page reads the 408 of /mcp/).
            scope = {**self.scope, "path": self.url.decode("ascii")}
            cors = self.cross_origin.headers(scope)
        self._write(408, content_type.encode(), body, close=True, extra=cors)
        self.transport.close()

    def _respond(self, content: bytes) -> None:
        self._write(200, b"application/json", content)
        # What uvicorn does once an answer is sent: count it, and time the idle connection.
        self.on_response_complete()

    def _write(
        self,
        status: int,
        content_type: bytes,
        body: bytes,
        close: bool = False,
        extra: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        """An answer with the headers uvicorn gives every answer (date, server), and ``extra``."""
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        for name, value in extra:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"content-length: %d\r\ncontent-type: %s\r\n" % (len(body), content_type))
        if status != 200:
            head.append(b"cache-control: no-store\r\nx-content-type-options: nosniff\r\n")
        if close:
            head.append(b"connection: close\r\n")
        self.transport.write(b"".join([*head, b"\r\n", body]))

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


class _Refusal:
    """An ASGI application that answers ``status`` (400) with ``body`` and closes the
    connection."""

    def __init__(self, content_type: bytes, body: bytes, status: int = 400) -> None:
        self.status = status
        self.headers = [
            (b"content-type", content_type),
            (b"content-length", b"%d" % len(body)),
            (b"cache-control", b"no-store"),
            # A refusal may quote what was sent (its Host, its target): never sniffed as a page.
            (b"x-content-type-options", b"nosniff"),
            (b"connection", b"close"),
        ]
        self.body = body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


_NAME = itemgetter(0)
_PHRASES = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
_TOO_LARGE = "the request head is larger than max_header_bytes"


def bounded_http_protocol(
    header_timeout: float,
    max_header_bytes: int,
    direct: DirectDecisions | None = None,
    gateway: DirectGateway | None = None,
    refusals: BodyLimits | None = None,
    *,
    linger_timeout: float,
    max_linger_bytes: int,
    allowed_hosts: AllowedHosts | None = None,
    cross_origin: CrossOriginRoutes | None = None,
) -> Callable[..., Any]:
    """The protocol factory to pass to uvicorn as ``http=``."""
    return functools.partial(
        BoundedHttpProtocol,
        header_timeout=header_timeout,
        max_header_bytes=max_header_bytes,
        direct=direct,
        gateway=gateway,
        refusals=refusals,
        linger_timeout=linger_timeout,
        max_linger_bytes=max_linger_bytes,
        allowed_hosts=allowed_hosts,
        cross_origin=cross_origin,
    )
