"""CORS, the Fetch standard's CORS protocol (fetch.spec.whatwg.org, "CORS protocol"), for the
web origins the operator allows (``[gateway] allowed_origins``, and ``[oauth] allowed_origins``
on the OAuth endpoints): what lets a browser-based MCP client on another origin call
``/mcp/<server>`` and the OAuth endpoints it discovers and authorizes with, without a proxy in
front.

A preflight (``OPTIONS`` with ``Access-Control-Request-Method``) from an allowed origin is
answered 204 with what may be sent; every other answer to such an origin names the origin in
``Access-Control-Allow-Origin`` (never ``*``) and the headers the page may read. No
``Access-Control-Allow-Credentials``: these routes take bearer tokens, never the user's cookies.
Another origin's preflight is refused 403 with no CORS headers, which the browser reports to
the page as a failed fetch; its other requests are answered as they always were, with nothing
that lets the page read the answer. The allowed origins are compared as browsers send them
(`bastion.origins.normalized_origin`) and echoed as sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from bastion.origins import normalized_origin
from bastion.route_paths import route_path

# How long a browser may keep a preflight's answer (seconds): Chromium's own cap. An origin
# taken off the list in that time has its requests refused by the Origin check on /mcp/, and
# answered with no CORS headers elsewhere (the browser keeps the answer from the page).
MAX_AGE = 7200
_PREFLIGHT = b"access-control-request-method"
_VARY = (b"vary", b"Origin")
_ALLOW_ORIGIN = b"access-control-allow-origin"
# The headers that frame a request body.
_BODY = (b"content-length", b"transfer-encoding")
# What a browser-based client sends to the OAuth endpoints it calls (the RFC 9728 and RFC 8414
# metadata, the keys, /register, /token, /revoke; the MCP SDK's browser client among them): its
# MCP protocol version to the metadata, a JSON body to /register (with an initial access token
# where registration is not open), a form to /token and /revoke (with Basic client credentials,
# or a DPoP proof); and what it must read of their answers (a 401's challenge, a 429's wait, a
# DPoP nonce).
OAUTH_METHODS = ("GET", "POST")
OAUTH_REQUEST_HEADERS = ("authorization", "content-type", "accept", "dpop", "mcp-protocol-version")
OAUTH_EXPOSED = ("www-authenticate", "retry-after", "dpop-nonce")


def _listed(names: Iterable[str]) -> bytes:
    return ", ".join(dict.fromkeys(n.lower() for n in names)).encode("latin-1")


class CrossOrigin:
    """The CORS answers of one family of routes: the origins allowed, the methods and request
    headers a page may send, the response headers it may read. Made once; each answer's
    headers are prepared here, so an answer adds only the origin it echoes."""

    __slots__ = ("origins", "_preflight", "_actual")

    def __init__(
        self,
        origins: frozenset[str],
        methods: Iterable[str],
        request_headers: Iterable[str],
        exposed: Iterable[str],
        max_age: int = MAX_AGE,
    ) -> None:
        # Normalized (`normalized_origin`), as `GatewayConfig` keeps them.
        self.origins = origins
        # The allowed headers are a fixed list, not the request's list echoed back: the browser
        # checks what it means to send against it, and a fixed answer is the same for every
        # preflight from an origin (what the browser caches, and `Vary: Origin` says).
        self._preflight = [
            (b"access-control-allow-methods", ", ".join(methods).encode("latin-1")),
            (b"access-control-allow-headers", _listed(request_headers)),
            (b"access-control-max-age", b"%d" % max_age),
            _VARY,
        ]
        self._actual = [(b"access-control-expose-headers", _listed(exposed)), _VARY]

    def allows(self, origin: str) -> bool:
        """Whether a page of ``origin`` (an ``Origin`` header as sent) is allowed."""
        normalized = normalized_origin(origin)
        return normalized is not None and normalized in self.origins

    async def answer_preflight(self, origin: str, send: Send) -> None:
        """The 204 that lets a page of ``origin`` (allowed) send its request."""
        headers = [(b"access-control-allow-origin", origin.encode("latin-1")), *self._preflight]
        headers.append((b"content-length", b"0"))
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    def headers(self, origin: str) -> list[tuple[bytes, bytes]]:
        """What an answer to a page of ``origin`` (allowed) adds to its head: the origin, the
        headers the page may read, ``Vary: Origin``."""
        return [(_ALLOW_ORIGIN, origin.encode("latin-1")), *self._actual]

    def sending(self, origin: str, send: Send) -> Send:
        """``send``, for an answer to a page of ``origin`` (allowed): whatever the answer and
        its status (a 401 and its challenge, an event stream), its head names the origin and
        the headers the page may read."""
        added = self.headers(origin)

        async def send_to_page(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *added]}
            await send(message)

        return send_to_page

    def completing(self, origin: str, send: Send) -> Send:
        """`sending`, around routes that answer CORS themselves (`sending`, inside): an answer
        whose head names an origin already goes as it is (a browser refuses an answer that
        names two), any other (made before those routes, or by a fault) gets the headers."""
        added = self.headers(origin)

        async def send_to_page(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", ())
                if not any(name.lower() == _ALLOW_ORIGIN for name, _ in headers):
                    message = {**message, "headers": [*headers, *added]}
            await send(message)

        return send_to_page


def oauth_cross_origin(origins: frozenset[str]) -> CrossOrigin:
    """The CORS answers of the OAuth endpoints a browser-based client calls, to ``origins``."""
    return CrossOrigin(origins, OAUTH_METHODS, OAUTH_REQUEST_HEADERS, OAUTH_EXPOSED)


class CrossOriginRoutes:
    """ASGI middleware: CORS (`CrossOrigin`) for the requests to ``paths`` and below
    ``prefixes``; and below ``own_prefix``, whose routes answer CORS themselves (``own``: the
    gateway's ``/mcp/``, `bastion.gateway.transport`), the same headers on the answers those
    routes do not make. Every other request goes to ``app`` as it came. The answers of
    ``paths`` and ``prefixes`` say ``Vary: Origin`` whoever asks, since one kept by a cache (the
    metadata, the keys) must not be given to a page it was not made for.

    Outermost: whichever layer answers (a route, the body limits' 413, Starlette's 500 for a
    fault; bastion's HTTP protocol's refusals through `outside`, its direct gateway path
    through `sending` and `headers`), a page of an allowed origin reads the answer, and can
    tell a fault from a refusal."""

    def __init__(
        self,
        app: ASGIApp,
        cors: CrossOrigin,
        paths: frozenset[str] | None = None,
        prefixes: tuple[str, ...] = (),
        setting: str = "[oauth] allowed_origins",
        own: CrossOrigin | None = None,
        own_prefix: str = "",
    ) -> None:
        """``paths``: below the application's root path, exactly, and with ``prefixes`` (the
        start of a path); None for every request. ``setting`` lists the origins, and a refused
        preflight names it. Below ``own_prefix`` (when ``own`` is given) only the origins
        ``own`` allows are answered, with its headers, and every request goes on to ``app``,
        preflights too (answered, or refused, there); one without ``Origin`` untouched."""
        self.app = app
        self.cors = cors
        self.paths = paths
        self.prefixes = prefixes
        self.setting = setting
        self.own = own
        self.own_prefix = own_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answering = self._answering(route_path(scope))
        headers = scope["headers"]
        # A preflight has no body (the Fetch standard's CORS-preflight request): an OPTIONS
        # with one goes on, through the body limits, as any other request. Below `own_prefix`
        # the routes answer preflights themselves.
        if (
            answering is self.cors
            and scope["method"] == "OPTIONS"
            and any(k == _PREFLIGHT for k, _ in headers)
            and not any(k in _BODY for k, v in headers if v.strip() != b"0")
        ):
            origin = _origin(scope)
            if origin is not None and self.cors.allows(origin):
                await self.cors.answer_preflight(origin, send)
                return
            if any(k == b"origin" for k, _ in headers):
                await _refuse(send, origin or "null", self.setting)
                return
        await self.app(scope, receive, self._sending(answering, scope, send))

    def outside(self, app: ASGIApp) -> ASGIApp:
        """``app``, an answer made without the application (a refusal of bastion's HTTP
        protocol, `bastion.server.connections`), with the CORS headers the application's
        answer would have on these routes. A preflight gets ``app``'s answer as well: it is
        refused there, not answered 204."""

        async def answer(scope: Scope, receive: Receive, send: Send) -> None:
            await app(scope, receive, self.sending(scope, send))

        return answer

    def sending(self, scope: Scope, send: Send) -> Send:
        """``send``, for an answer to ``scope`` made without the application and its CORS (a
        refusal of bastion's HTTP protocol, the direct gateway path's 500): with the CORS
        headers an answer of the application would have there."""
        if scope["type"] != "http":
            return send
        return self._sending(self._answering(route_path(scope)), scope, send)

    def headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        """The CORS headers of an answer to ``scope`` that bastion's HTTP protocol writes whole
        itself (the direct gateway path's 408), as `sending` would add them."""
        answering = self._answering(route_path(scope))
        if answering is None:
            return []
        origin = _origin(scope)
        if origin is not None and answering.allows(origin):
            return answering.headers(origin)
        return [] if answering is self.own else [_VARY]

    def _answering(self, path: str) -> CrossOrigin | None:
        """The CORS of the answers to ``path``: ``own`` below ``own_prefix``, whose routes
        answer CORS themselves; ``cors`` on ``paths`` and below ``prefixes``; else none."""
        if self.own is not None and path.startswith(self.own_prefix):
            return self.own
        if self.paths is None or path in self.paths:
            return self.cors
        return self.cors if self.prefixes and path.startswith(self.prefixes) else None

    def _sending(self, answering: CrossOrigin | None, scope: Scope, send: Send) -> Send:
        """``send`` with the headers of ``answering`` (`_answering`) for ``scope``'s origin.
        Below `own_prefix` a request without an allowed Origin (every non-browser client on
        the gateway's call path) costs one look through its header names, and nothing is
        wrapped: no Vary there, its answers are made for a bearer token, not kept by caches;
        elsewhere the others' answers say ``Vary: Origin``."""
        if answering is None:
            return send
        origin = _origin(scope)
        if origin is not None and answering.allows(origin):
            if answering is self.own:
                return answering.completing(origin, send)
            return answering.sending(origin, send)
        return send if answering is self.own else _varying(send)


def _origin(scope: Scope) -> str | None:
    """The request's ``Origin``, if it sent one alone."""
    # A loop, not a list: on /mcp/ this is asked of every request that reaches the application.
    found = None
    for name, value in scope["headers"]:
        if name == b"origin":
            if found is not None:
                return None
            found = value
    return found.decode("latin-1") if found is not None else None


def refusal_body(origin: str, setting: str) -> str:
    """What a refused preflight's 403 says, as an OAuth error (the gateway's is JSON-RPC's):
    the ``setting`` that would allow ``origin``."""
    return json.dumps(
        {
            "error": "invalid_request",
            "error_description": f"requests from the origin {origin[:100]!r} are not allowed:"
            f" list it in {setting}",
        }
    )


async def _refuse(send: Send, origin: str, setting: str) -> None:
    data = refusal_body(origin, setting).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
    await send({"type": "http.response.start", "status": 403, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _varying(send: Send) -> Send:
    async def send_varying(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), _VARY]}
        await send(message)

    return send_varying
