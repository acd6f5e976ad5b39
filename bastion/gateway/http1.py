"""A small HTTP/1.1 client (RFC 9112) for the gateway's upstreams: pooled keep-alive connections,
each request sent in one write, responses parsed by httptools (the C parser uvicorn uses).

The gateway's second hop is on every call's path; a general-purpose client spends more there
than the upstream spends answering. This one does only what an MCP upstream needs: a request
with a body, a response read whole or line by line (SSE), over http or https.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from urllib.parse import urlsplit

import httptools

from bastion import outbound_proxy
from bastion.http_fields import field_name_problem, field_value_problem
from bastion.outbound_proxy import TunnelRefused, tunnel_connection
from bastion.tls import trust

# An idle connection older than this is closed rather than reused.
_IDLE_SECONDS = 3.0
# How long a response's unread rest may take to arrive before its connection is dropped.
_DRAIN_SECONDS = 5.0


# Request heads kept encoded per client (one per set of headers sent: per user where each
# user's token goes upstream); past this many, they are encoded again from scratch.
_HEADS = 256

# The most bastion reads of one response body, or of one line of an event stream.
MAX_MESSAGE = 64 * 1024 * 1024
# The most bastion reads of a response's head (its status line and headers): a head without end
# was kept whole until the call's deadline (127 MiB in 4 s over the loopback), copied again by the
# parser at each read.
MAX_HEAD = 64 * 1024


def _text(line: bytearray) -> str:
    return bytes(line).removesuffix(b"\r").decode(errors="replace")


def _framed(head: bytes, body: bytes) -> bytes:
    """A request: its head (`Http1Client.head`), its length, and its body."""
    return b"%b%d\r\n\r\n%b" % (head, len(body), body)


class HttpClientError(Exception):
    """The upstream could not be reached, or its answer was not HTTP/1.1 we can read."""


class HttpConnectError(HttpClientError):
    """No connection to the upstream could be made (refused, timed out, its name not resolved,
    its TLS handshake failed): nothing of the request was written. ``cause``: the class of the
    error behind it (``ConnectionRefusedError``, ``gaierror``, ``SSLError``, ``TimeoutError``)."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


def _head_too_large() -> HttpClientError:
    return HttpClientError(f"the response's head is larger than {MAX_HEAD} bytes")


def _check_header(name: str, value: str) -> None:
    # A CR, LF or NUL in a header would let a value start a new header or request upstream.
    problem = field_name_problem(name) or field_value_problem(value)
    if problem:
        raise HttpClientError(f"header {name!r} {problem}")


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; one request at a time on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # The loop the connection is made on, which its futures belong to (asked for once).
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._error: Exception | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._headers: dict[str, str] = {}
        self._head: asyncio.Future[None] | None = None
        # The bytes of the head received so far while it is not complete, and the size of the
        # headers it held (`MAX_HEAD`).
        self._reading_head = False
        self._head_bytes = 0
        self._header_bytes = 0
        self._chunks: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.complete = False
        self._keep_alive = False
        self.idle_since = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._parser is None:
            self._fail(HttpClientError("the upstream sent data nobody asked for"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(HttpClientError(f"unreadable HTTP response: {e}"))
            return
        if self._reading_head:  # all of ``data`` was the head's
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._fail(_head_too_large())

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.complete:
            self._fail(
                HttpClientError(f"the upstream closed the connection{f': {exc}' if exc else ''}")
            )

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        # Counted here too: a head that ends within one read is over the limit all the same.
        self._header_bytes += len(name) + len(value) + 4  # ": " and CR LF
        if self._header_bytes > MAX_HEAD:
            self._fail(_head_too_large())
            raise HttpClientError("stop parsing")  # feed_data raises; the error above is kept
        self._headers[name.lower().decode("latin-1")] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._reading_head = False
        # Asked now: once the message is complete the parser has moved on to the next one.
        self._keep_alive = self._parser.should_keep_alive()  # type: ignore[union-attr]
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # used by Response
    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        self._wake()
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def send(self, data: bytes) -> asyncio.Future[None]:
        """Write a request; the future resolves when the response's head has arrived."""
        assert self.transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self._headers = {}
        self._reading_head = True
        self._head_bytes = self._header_bytes = 0
        self._chunks.clear()
        self.complete = False
        self._keep_alive = False
        self._error = None
        self._head = self._loop.create_future()
        self.transport.write(data)
        return self._head

    async def next_chunk(self) -> bytes | None:
        while True:
            if self._chunks:
                return self._chunks.popleft()
            if self.complete:
                return None
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    @property
    def reusable(self) -> bool:
        return (
            self.complete
            and not self.lost
            and self._error is None
            and self._parser is not None
            and self._keep_alive
        )


class Response:
    """An upstream's answer: status and headers now, the body when read."""

    def __init__(self, client: Http1Client, connection: _Connection) -> None:
        self._client = client
        self._connection = connection
        self.status_code = connection._parser.get_status_code()  # type: ignore[union-attr]
        self.headers: Mapping[str, str] = connection._headers
        self._closed = False

    async def read(self, limit: int = MAX_MESSAGE) -> bytes:
        """The whole body; `HttpClientError` if it grows past ``limit`` bytes."""
        connection = self._connection
        if connection.complete:
            # All of it has arrived (a small answer, most often): taken at once.
            chunks = connection._chunks
            if sum(map(len, chunks)) > limit:
                raise HttpClientError(f"the response is larger than {limit} bytes")
            body = b"".join(chunks)
            chunks.clear()
            return body
        parts, size = [], 0
        while (chunk := await self._connection.next_chunk()) is not None:
            size += len(chunk)
            if size > limit:
                raise HttpClientError(f"the response is larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def lines(self, limit: int = MAX_MESSAGE) -> AsyncIterator[str]:
        """The body as text lines without their line ends (for text/event-stream); a line
        longer than ``limit`` bytes is an `HttpClientError`. Each byte is searched once."""
        pending = bytearray()
        while (chunk := await self._connection.next_chunk()) is not None:
            searched = len(pending)  # the part before holds no line end
            pending += chunk
            start = 0
            while (end := pending.find(b"\n", max(start, searched))) != -1:
                yield _text(pending[start:end])
                start = end + 1
            del pending[:start]
            if len(pending) > limit:
                raise HttpClientError(f"a line of the response is longer than {limit} bytes")
        if pending:
            yield _text(pending)

    def close(self) -> None:
        """Give the connection back for the next request, or close it if it cannot be reused.

        A body not read to its end (an SSE stream that goes on after the answer the caller
        wanted) is read to its end in the background first, for a few seconds at most.
        """
        if self._closed:
            return
        self._closed = True
        connection = self._connection
        if connection.complete or connection._error is not None or connection.lost:
            self._client._release(connection)
        else:
            task = asyncio.ensure_future(self._drain())
            self._client._draining.add(task)
            task.add_done_callback(self._client._draining.discard)

    def abort(self) -> None:
        """Close the connection under a response that is not wanted any more (a stream ended
        early, a request cancelled): nothing more is read from it, and it is not reused."""
        if self._closed:
            return
        self._closed = True
        transport = self._connection.transport
        if transport is not None:
            transport.close()

    async def _drain(self) -> None:
        try:
            async with asyncio.timeout(_DRAIN_SECONDS):
                while await self._connection.next_chunk() is not None:
                    pass
        except (HttpClientError, TimeoutError):
            pass
        finally:
            self._client._release(self._connection)


class Http1Client:
    """Requests to one origin over a pool of keep-alive connections."""

    def __init__(self, url: str, *, connect_timeout: float = 10.0, max_idle: int = 64) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default_port = self.port == (443 if parts.scheme == "https" else 80)
        self._host_header = parts.netloc.rpartition("@")[2] if not default_port else self.host
        self._ssl = trust() if parts.scheme == "https" else None
        self._connect_timeout = connect_timeout
        # Through the configured proxy's tunnel unless the upstream is exempt or on the loopback.
        proxy = outbound_proxy.configured()
        self._proxy = None if proxy is None or proxy.bypasses(self.host) else proxy
        self._max_idle = max_idle
        self._idle: list[_Connection] = []
        # Encoded request heads by method and headers (`_encode`), at most _HEADS of them.
        self._heads: dict[tuple, bytes] = {}
        self._draining: set[asyncio.Task] = set()
        self._closed = False

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            # Not asyncio.wait_for: on Python 3.11 it returns a connection made as the caller's
            # own deadline ends and drops that cancellation, so the caller waits on unbounded.
            async with asyncio.timeout(self._connect_timeout):
                protocol = functools.partial(_Connection, loop)
                if self._proxy is not None:
                    _, connection = await tunnel_connection(
                        self._proxy,
                        self.host,
                        self.port,
                        protocol,
                        ssl_context=self._ssl,
                        proxy_trust=trust(),
                    )
                else:
                    _, connection = await loop.create_connection(
                        protocol,
                        self.host,
                        self.port,
                        ssl=self._ssl,
                        server_hostname=self.host if self._ssl else None,
                    )
        except TunnelRefused as e:  # its message names the proxy
            raise HttpConnectError(
                f"cannot connect to {self.host}:{self.port}: {e}", "ProxyError"
            ) from None
        except (OSError, TimeoutError) as e:
            via = f" through the proxy {self._proxy.shown}" if self._proxy is not None else ""
            raise HttpConnectError(
                f"cannot connect to {self.host}:{self.port}{via}:"
                f" {str(e) or f'no connection within {self._connect_timeout:g} s'}",
                type(e).__name__,
            ) from None
        return connection

    def head(self, method: str, headers: Mapping[str, str]) -> bytes:
        """The head of a request, checked (`HttpClientError` for a header HTTP does not allow:
        `bastion.http_fields`) and encoded up to its Content-Length's value: what `send` takes.
        A caller that sends the same head again may keep it and send it again."""
        # The head but for its length is the same from call to call (the same upstream, tool
        # and credentials): checked and encoded once, then looked up.
        key = (method, *headers.items())
        head = self._heads.get(key)
        if head is None:
            lines = [f"{method} {self.target} HTTP/1.1", f"host: {self._host_header}"]
            for name, value in headers.items():
                _check_header(name, value)
                lines.append(f"{name}: {value}")
            lines.append("accept-encoding: identity")
            head = ("\r\n".join(lines) + "\r\ncontent-length: ").encode("latin-1")
            if len(self._heads) >= _HEADS:
                self._heads.clear()
            self._heads[key] = head
        return head

    def _encode(self, method: str, headers: Mapping[str, str], body: bytes) -> bytes:
        return _framed(self.head(method, headers), body)

    async def request(self, method: str, headers: Mapping[str, str], body: bytes = b"") -> Response:
        """Send a request and return once the response's status and headers are in. The caller
        reads the body and must `Response.close` it."""
        return await self._send(self._encode(method, headers, body))

    def send(
        self, head: bytes, body: bytes = b"", sent: Callable[[], None] | None = None
    ) -> Awaitable[Response]:
        """`request`, with a head `head` made. ``sent`` is called as the request is written,
        once connected: what fails before it, nothing of the request was written."""
        return self._send(_framed(head, body), sent)

    async def _send(self, data: bytes, sent: Callable[[], None] | None = None) -> Response:
        if self._closed:
            raise HttpClientError("the client is closed")
        connection = None
        now = time.monotonic()
        while self._idle:
            candidate = self._idle.pop()
            # Servers close idle connections (uvicorn after 5 s): a request is never retried,
            # since it may have reached the upstream, so one that may be closing is not used.
            # One closed already (its end read, not yet reported) would drop the request's
            # bytes unsent; one whose end is still on the way takes them: they count as sent.
            transport = candidate.transport
            if (
                not candidate.lost
                and not transport.is_closing()  # type: ignore[union-attr]
                and now - candidate.idle_since < _IDLE_SECONDS
            ):
                connection = candidate
                break
            transport.close()  # type: ignore[union-attr]
        if connection is None:
            connection = await self._connect()
        if sent is not None:
            sent()
        try:
            await connection.send(data)
        except BaseException:
            connection.transport.close()  # type: ignore[union-attr]
            raise
        return Response(self, connection)

    def _release(self, connection: _Connection) -> None:
        if connection.reusable and not self._closed and len(self._idle) < self._max_idle:
            connection._parser = None
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        elif connection.transport is not None:
            connection.transport.close()

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._draining):
            task.cancel()
        idle, self._idle = self._idle, []
        for connection in idle:
            if connection.transport is not None:
                connection.transport.close()
