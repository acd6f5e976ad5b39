"""The gateway's ``POST /mcp/<server>`` run from the HTTP protocol, past Starlette and the
application's middleware.

Through Starlette, its error middleware, the body limits' middleware and `GatewayFirst`, each
gateway call paid for layers that do nothing for it. Here
`bastion.server.connections.BoundedHttpProtocol` holds the body of a ``POST`` to an exact
``/mcp/<server>`` target of a configured upstream (HTTP/1.1, one plain ``Content-Length`` within
``gateway.max_body_bytes``, within ``body_timeout``: the limit and the 408 of
`bastion.server.request_limits`), then runs the transport's own
`StreamableHttpEndpoint.serve` on uvicorn's request-response cycle
(`bastion.server.gateway_cycle`: uvicorn's, with a short way for an answer of one known length),
which writes the answer (keep-alive, pipelining, flow control, chunked event streams, the
client's disconnect). An unexpected exception is answered and logged as the application's error
handler and uvicorn answer and log it, with the application's CORS (`bastion.cors`) for a page
of an allowed origin.

With ``proxy_headers`` on, the request goes through uvicorn's own proxy headers middleware first,
as through the application: the client's address and scheme are those the trusted proxies
(``forwarded_allow_ips``) name, and no one else's headers are read.

Anything else goes to the application as it arrived, before anything is read or decided: GET
and DELETE, other targets, a body sent chunked, over the limit or waiting for 100 Continue,
HTTP/1.0, a connection with an answer under way, uvicorn's access log on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from bastion.gateway.jsonrpc import INTERNAL_ERROR, RpcError
from bastion.gateway.transport import StreamableHttpEndpoint, send_json
from bastion.server.app import FAILED
from bastion.server.request_limits import BodyLimit


@dataclass(frozen=True, slots=True)
class GatewayRoute:
    """An upstream's ``/mcp/<server>``, answered from the protocol, and its body limit."""

    server: str
    limit: BodyLimit


class DirectGateway:
    """The gateway's call path, for the protocol of one application."""

    def __init__(self, app: Any) -> None:
        state = app.state
        gateway = state.gateway
        self.endpoint = StreamableHttpEndpoint(gateway)
        self.metrics = state.metrics
        self.body_timeout = state.config.body_timeout
        # Exact request targets (of a POST) only: a query string, an escape or a trailing slash
        # goes the long way (and is answered there as before).
        self.routes: dict[bytes, GatewayRoute] = {
            path.encode(): GatewayRoute(name, state.body_limits.for_path(path))
            for name in gateway.upstreams
            if (path := f"/mcp/{name}").isascii()
        }
        self._failure = RpcError(INTERNAL_ERROR, FAILED).body(None)
        # The application's outermost CORS (`bastion.cors.CrossOriginRoutes`), for the answers
        # made here, past the transport's own: a page of an allowed origin reads a fault's 500.
        self.cross_origin = state.cross_origin
        # uvicorn's proxy headers middleware in front of `serve`, by the proxies it trusts.
        self._behind_proxies: dict[str, ProxyHeadersMiddleware] = {}

    def app(self, config: Any) -> Any:
        """`serve`, as uvicorn's ``config`` runs the application: behind uvicorn's proxy
        headers middleware when ``proxy_headers`` is on (made once for its trusted proxies)."""
        if not config.proxy_headers:
            return self.serve
        trusted = config.forwarded_allow_ips
        key = trusted if isinstance(trusted, str) else ",".join(trusted)
        app = self._behind_proxies.get(key)
        if app is None:
            app = self._behind_proxies[key] = ProxyHeadersMiddleware(self.serve, trusted)
        return app

    async def serve(self, scope: Any, receive: Any, send: Any) -> None:
        """The request the protocol held (an ASGI application, run on uvicorn's cycle by its
        ``run_asgi``: ``send`` is the cycle's), for the upstream its target names."""
        self.metrics.direct_gateway_request()
        try:
            await self.endpoint.serve(self.routes[scope["raw_path"]].server, scope, receive, send)
        except Exception:
            # As Starlette's ServerErrorMiddleware with the application's handler: a JSON-RPC
            # 500 naming no internals, the connection closed; then uvicorn logs the exception.
            if not send.__self__.response_started:
                if self.cross_origin is not None:
                    send = self.cross_origin.sending(scope, send)
                await send_json(send, 500, self._failure, {"connection": "close"})
            raise
