"""An upstream that needs each user's own OAuth token (``auth = "per_user"``): one connection
per user, each carrying only that user's access token (`bastion.connections`).

The user is the one of the message being handled (`act_for`, set by the transport for each
message, read through a context variable by every request that message makes upstream). A user
without a usable connection gets MCP's URLElicitationRequiredError (-32042, MCP 2025-11-25,
Elicitation, URL mode) naming bastion's connect page if their client declared URL elicitation,
and otherwise an error carrying the same URL; nothing is sent upstream. The client's own token
never travels: an upstream connection's only credential is the user's upstream token.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bastion.gateway.config import UpstreamConfig
from bastion.gateway.jsonrpc import (
    INVALID_REQUEST,
    UPSTREAM_UNAVAILABLE,
    URL_ELICITATION_REQUIRED,
    RpcError,
)
from bastion.gateway.upstream import (
    UPSTREAM_PROTOCOL_VERSION,
    HttpUpstream,
    Upstream,
    UpstreamUnauthorized,
)

if TYPE_CHECKING:
    from bastion.connections.service import Connections


# A client that did not declare URL elicitation gets this error, with the URL in its data.
CONNECTION_REQUIRED = -32009


@dataclass(frozen=True, slots=True)
class Acting:
    """Whose message is being handled, and whether their client takes URL elicitations."""

    subject: str
    url_elicitation: bool


_acting: ContextVar[Acting | None] = ContextVar("bastion_upstream_user", default=None)


def act_for(subject: str, capabilities: dict[str, Any] | None) -> None:
    """Every upstream request made while handling this message is ``subject``'s."""
    declared = (capabilities or {}).get("elicitation")
    _acting.set(Acting(subject, isinstance(declared, dict) and "url" in declared))


class PerUserUpstream(Upstream):
    """One `HttpUpstream` per user, each sending that user's upstream access token."""

    def __init__(self, config: UpstreamConfig) -> None:
        self._known: dict[str, Any] = {}
        super().__init__(config)
        # Set when the server is composed (`bastion.server.app`); None refuses every call.
        self.connections: Connections | None = None
        self._users: dict[str, HttpUpstream] = {}

    # What the gateway reads at initialize: the connected user's upstream's, else the last one
    # any user's connection saw, else tools only (a user connects on their first call).
    @property  # type: ignore[override]
    def init_result(self) -> dict[str, Any]:
        acting = _acting.get()
        own = self._users.get(acting.subject) if acting is not None else None
        if own is not None and own.init_result:
            return own.init_result
        return self._known or {
            "protocolVersion": UPSTREAM_PROTOCOL_VERSION,
            "capabilities": {"tools": {}},
            "serverInfo": {"name": self.name},
        }

    @init_result.setter
    def init_result(self, value: dict[str, Any]) -> None:
        self._known = value

    async def _own(self, connect: bool = True) -> HttpUpstream | None:
        """The acting user's connection, with their current access token; None if they have
        none and ``connect`` is False; else the error that sends them to the connect page."""
        acting = _acting.get()
        if acting is None:
            raise RpcError(INVALID_REQUEST, f"upstream {self.name} serves users only")
        if self.connections is None:
            raise RpcError(UPSTREAM_UNAVAILABLE, f"upstream {self.name}: no connections service")
        from bastion.connections.service import ConnectionUnavailable

        try:
            token = await self.connections.access_token(acting.subject, self.name)
        except ConnectionUnavailable as e:
            raise RpcError(UPSTREAM_UNAVAILABLE, str(e)) from None
        if token is None:
            self.forget(acting.subject)
            if not connect:
                return None
            raise self._connect_first(acting)
        upstream = self._users.get(acting.subject)
        if upstream is None:
            upstream = self._users[acting.subject] = HttpUpstream(self.config)
            upstream.on_notification = self.on_notification
        upstream.bearer = token
        return upstream

    def _connect_first(self, acting: Acting) -> RpcError:
        assert self.connections is not None
        url = self.connections.connect_url(acting.subject, self.name)
        message = f"connect your account to {self.name} first: open {url}"
        question = {
            "mode": "url",
            "elicitationId": f"connect-{secrets.token_urlsafe(12)}",
            "url": url,
            "message": f"{self.name} needs your own authorization: connect your account.",
        }
        if acting.url_elicitation:
            return RpcError(URL_ELICITATION_REQUIRED, message, {"elicitations": [question]})
        return RpcError(CONNECTION_REQUIRED, message, {"url": url})

    def forget(self, subject: str) -> None:
        """Close ``subject``'s connection (revoked, or no longer usable)."""
        upstream = self._users.pop(subject, None)
        if upstream is not None:
            task = asyncio.ensure_future(upstream.close())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _unauthorized(self, upstream: HttpUpstream) -> RpcError:
        """The upstream refused the user's token: drop this connection; connect again."""
        acting = _acting.get()
        assert acting is not None
        self.forget(acting.subject)
        if self.connections is not None:
            self.connections.forget_token(acting.subject, self.name)
        return self._connect_first(acting)

    # -- what the gateway calls ------------------------------------------------------------------

    async def ensure_started(self) -> None:
        upstream = await self._own(connect=False)
        if upstream is None:
            return
        try:
            await upstream.ensure_started()
        except UpstreamUnauthorized:
            raise await self._unauthorized(upstream) from None
        self._known = upstream.init_result

    async def request(self, method: str, params: dict[str, Any] | None, **options: Any):
        upstream = await self._own()
        assert upstream is not None
        try:
            response = await upstream.request(method, params, **options)
        except UpstreamUnauthorized:
            raise await self._unauthorized(upstream) from None
        self._known = upstream.init_result
        return response

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        upstream = await self._own(connect=False)
        if upstream is not None:
            with contextlib.suppress(UpstreamUnauthorized):
                await upstream.notify(method, params)

    async def watch(self, uris: frozenset[str]) -> None:
        upstream = await self._own()
        assert upstream is not None
        try:
            await upstream.watch(uris)
        except UpstreamUnauthorized:
            raise await self._unauthorized(upstream) from None

    async def close(self) -> None:
        users, self._users = self._users, {}
        for upstream in users.values():
            await upstream.close()

    # Each user's `HttpUpstream` does the transport's work; this one never connects itself.
    async def _connect(self) -> None:
        raise RpcError(UPSTREAM_UNAVAILABLE, f"upstream {self.name} connects per user")

    async def _exchange(self, message: dict[str, Any], **options: Any) -> dict[str, Any]:
        raise RpcError(UPSTREAM_UNAVAILABLE, f"upstream {self.name} connects per user")

    async def _send_notification(self, message: dict[str, Any]) -> None:
        return None

    def _abandon(self, request_id: Any, reason: str) -> None:
        return None
