"""The upstream session of one user toward an upstream that needs each user's own OAuth token
(``auth = "per_user"``): it carries only that user's access token (`bastion.connections`).

Such an upstream's sessions are upstream sessions like any other (`bastion.gateway.upstream_sessions`:
one per user or per client session, capped, closed when idle, revoked or suspended); this module
adds the credential. Before each request, and before its standing stream is opened again, the
session reads its user's current access token (refreshed when it expires soon). A user without a
usable connection gets MCP's URLElicitationRequiredError (-32042, MCP 2025-11-25, Elicitation,
URL mode) naming bastion's connect page if their client declared URL elicitation, and otherwise
an error carrying the same URL; nothing is sent upstream. A token the upstream refuses (401, to a
request or on the standing stream) is forgotten, the session is ended, and the user is sent to
connect again. The client's own token
never travels: the session's only credential is the user's upstream token.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from bastion.gateway.config import UpstreamConfig
from bastion.gateway.jsonrpc import UPSTREAM_UNAVAILABLE, URL_ELICITATION_REQUIRED, RpcError
from bastion.gateway.upstream import (
    UPSTREAM_PROTOCOL_VERSION,
    HttpUpstream,
    Sent,
    UpstreamUnauthorized,
)

if TYPE_CHECKING:
    from bastion.connections.service import Connections


# A client that did not declare URL elicitation gets this error, with the URL in its data.
CONNECTION_REQUIRED = -32009

# Whether the client of the message being handled takes URL elicitations (set by the transport
# for each message; read when a request of that message finds its user not connected).
_url_elicitation: ContextVar[bool] = ContextVar("bastion_url_elicitation", default=False)


def client_declared(capabilities: dict[str, Any] | None) -> None:
    """The client of the message being handled declared ``capabilities``."""
    declared = (capabilities or {}).get("elicitation")
    _url_elicitation.set(isinstance(declared, dict) and "url" in declared)


class UserTokenUpstream(HttpUpstream):
    """One upstream session of ``user``, sending that user's upstream access token."""

    def __init__(
        self,
        config: UpstreamConfig,
        user: str,
        connections: Connections | None,
        last_known: HttpUpstream,
        end: Callable[[UserTokenUpstream, str], None],
    ) -> None:
        # What the upstream said at the initialize of any user's session, kept on the
        # upstream's own (never connected) `HttpUpstream`: a user not yet connected is told that.
        self._last_known = last_known
        super().__init__(config)
        self.user = user
        # None (no connections service composed) refuses every request.
        self.connections = connections
        # Ends this session in its pool, saying why (in the log).
        self._end = end

    @property
    def init_result(self) -> dict[str, Any]:
        """What the upstream said at this session's initialize; until it has said it (the user
        is not connected), what it said last to any user's session in this process, read now
        (a session lives `session_idle_seconds`: a copy made when it opened would say what was
        known then); before any, ``tools`` only."""
        return (
            self._own_init_result
            or self._last_known.init_result
            or {
                "protocolVersion": UPSTREAM_PROTOCOL_VERSION,
                "capabilities": {"tools": {}},
                "serverInfo": {"name": self.name, "version": ""},
            }
        )

    @init_result.setter
    def init_result(self, value: dict[str, Any]) -> None:
        self._own_init_result = value

    async def _authorize(self, connect: bool) -> bool:
        """Carry the user's current access token. False if they have none and ``connect`` is
        False; else the error that sends them to the connect page."""
        connections = self.connections
        if connections is None:
            raise RpcError(UPSTREAM_UNAVAILABLE, f"upstream {self.name}: no connections service")
        from bastion.connections.service import ConnectionUnavailable

        try:
            token = await connections.access_token(self.user, self.name)
        except ConnectionUnavailable as e:
            raise RpcError(UPSTREAM_UNAVAILABLE, str(e)) from None
        if token is None:
            self.bearer = None
            if not connect:
                return False
            raise self._connect_first()
        self.bearer = token
        return True

    def _connect_first(self) -> RpcError:
        assert self.connections is not None
        url = self.connections.connect_url(self.user, self.name)
        message = f"connect your account to {self.name} first: open {url}"
        question = {
            "mode": "url",
            "elicitationId": f"connect-{secrets.token_urlsafe(12)}",
            "url": url,
            "message": f"{self.name} needs your own authorization: connect your account.",
        }
        if _url_elicitation.get():
            return RpcError(URL_ELICITATION_REQUIRED, message, {"elicitations": [question]})
        return RpcError(CONNECTION_REQUIRED, message, {"url": url})

    def _refused(self) -> RpcError:
        """The upstream refused the user's token: forget it, end this session; connect again."""
        assert self.connections is not None
        self.connections.forget_token(self.user, self.name)
        self.bearer = None
        self._end(self, "(the upstream refused the user's token)")
        return self._connect_first()

    # -- what the gateway calls ------------------------------------------------------------------

    async def ensure_started(self) -> None:
        if self._started or not await self._authorize(connect=False):
            return  # a user not connected yet: nothing to start (their first call asks them)
        try:
            await super().ensure_started()
        except UpstreamUnauthorized:
            raise self._refused() from None
        self._last_known.init_result = self.init_result

    async def request(self, method: str, params: dict[str, Any] | None, **options: Any):
        await self._authorize(connect=True)
        try:
            return await super().request(method, params, **options)
        except UpstreamUnauthorized:
            raise self._refused() from None

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        if await self._authorize(connect=False):
            try:
                await super().notify(method, params)
            except UpstreamUnauthorized:
                self._refused()

    async def watch(self, uris: frozenset[str], sent: Sent | None = None) -> None:
        await self._authorize(connect=True)
        try:
            await super().watch(uris, sent)
        except UpstreamUnauthorized:
            raise self._refused() from None

    async def _from_server(self, message: dict[str, Any]) -> None:
        # What the upstream sends on a stream opened with the user's token goes on only while
        # they are still connected: a connection revoked through another process (a replica,
        # the CLI) ends this session here at its next message.
        if not await self._authorize(connect=False):
            self._end(self, "(its user's connection is gone)")
            return
        await super()._from_server(message)

    async def _watch_once(self, uris: frozenset[str], opened) -> bool:
        # The standing stream is opened again with the user's current (refreshed) token.
        if not await self._authorize(connect=False):
            opened.set()
            return False  # no longer connected: no stream
        try:
            return await super()._watch_once(uris, opened)
        except UpstreamUnauthorized:
            # Refused: the session ends; opened again each second, the stream would send the
            # refused token each second for as long as the session lived.
            self._refused()
            return False
