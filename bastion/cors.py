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

    def sending(self, origin: str, send: Send) -> Send:
        """``send``, for an answer to a page of ``origin`` (allowed): whatever the answer and
        its status (a 401 and its challenge, an event stream), its head names the origin and
        the headers the page may read."""
        added = [(b"access-control-allow-origin", origin.encode("latin-1")), *self._actual]

        async def send_to_page(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *added]}
            await send(message)

        return send_to_page


def oauth_cross_origin(origins: frozenset[str]) -> CrossOrigin:
    """The CORS answers of the OAuth endpoints a browser-based client calls, to ``origins``."""
    return CrossOrigin(origins, OAUTH_METHODS, OAUTH_REQUEST_HEADERS, OAUTH_EXPOSED)


class CrossOriginRoutes:
    """ASGI middleware: CORS (`CrossOrigin`) for the requests to ``paths`` and below
    ``prefixes``; every other request goes to ``app`` as it came. Their answers say ``Vary:
    Origin`` whoever asks, since one kept by a cache (the metadata, the keys) must not be given
    to a page it was not made for.

    Outermost: whichever layer answers (a route, the body limits' 413, Starlette's 500 for a
    fault; bastion's HTTP protocol's refusals through `outside`), a page of an allowed origin
    reads the answer, and can tell a fault from a refusal."""

    def __init__(
        self,
        app: ASGIApp,
        cors: CrossOrigin,
        paths: frozenset[str] | None = None,
        prefixes: tuple[str, ...] = (),
        setting: str = "[oauth] allowed_origins",
    ) -> None:
        """``paths``: below the application's root path, exactly, and with ``prefixes`` (the
        start of a path); None for every request. ``setting`` lists the origins, and a refused
        preflight names it."""
        self.app = app
        self.cors = cors
        self.paths = paths
        self.prefixes = prefixes
        self.setting = setting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._covers(scope):
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        # A preflight has no body (the Fetch standard's CORS-preflight request): an OPTIONS
        # with one goes on, through the body limits, as any other request.
        if (
            scope["method"] == "OPTIONS"
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
        await self.app(scope, receive, self._sending(scope, send))

    def outside(self, app: ASGIApp) -> ASGIApp:
        """``app``, an answer made without the application (a refusal of bastion's HTTP
        protocol, `bastion.server.connections`), with the CORS headers the application's
        answer would have on these routes. A preflight gets ``app``'s answer as well: it is
        refused there, not answered 204."""

        async def answer(scope: Scope, receive: Receive, send: Send) -> None:
            covered = scope["type"] == "http" and self._covers(scope)
            await app(scope, receive, self._sending(scope, send) if covered else send)

        return answer

    def _covers(self, scope: Scope) -> bool:
        if self.paths is None:
            return True
        path = route_path(scope)
        return path in self.paths or (bool(self.prefixes) and path.startswith(self.prefixes))

    def _sending(self, scope: Scope, send: Send) -> Send:
        origin = _origin(scope)
        if origin is not None and self.cors.allows(origin):
            return self.cors.sending(origin, send)
        return _varying(send)


def _origin(scope: Scope) -> str | None:
    """The request's ``Origin``, if it sent one alone."""
    origins = [v for k, v in scope["headers"] if k == b"origin"]
    return origins[0].decode("latin-1") if len(origins) == 1 else None


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
