"""The upstream session of one user toward an upstream that needs each user's own OAuth token
(``auth = "per_user"``): it carries only that user's access token (`bastion.connections`).

Such an upstream's sessions are upstream sessions like any other (`bastion.gateway.upstream_sessions`:
one per user or per client session, capped, closed when idle, revoked or suspended); this module
adds the credential. Before each request, and before its standing stream is opened again, the
session reads its user's current access token (refreshed when it expires soon). A user without a
usable connection gets MCP's URLElicitationRequiredError (-32042, MCP 2025-11-25, Elicitation,
URL mode) naming bastion's connect page if their client declared URL elicitation, and otherwise
an error carrying the same URL; nothing is sent upstream. A token the upstream refuses (401, to a
request or on the standing stream) is refreshed once (`Connections.access_token_refused`) and
the refused message sent once more with the fresh token: a 401 answers a message the upstream
did not act on, so sending it again runs it once. A 401 on the stream of a request the upstream
took (its resumption) is no such refusal: that request is not sent again. If the refresh fails,
or the fresh token is refused too, the token is forgotten, the session is ended, and the user
is sent to connect again. The client's own token never travels: the session's only credential
is the user's upstream token.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

from bastion.connections.errors import ConnectionUnavailable
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

T = TypeVar("T")


class TokenRefused(RpcError):
    """The upstream refused the user's token, and one refresh did not get the message through
    (`UserTokenUpstream._refreshing_once`): the error for the client (connect again, or
    -32000 when no refresh can be had now or the request may have acted)."""


# Whether the client of the message being handled takes URL elicitations (set by the transport
# for each message; read when a request of that message finds its user not connected).
_url_elicitation: ContextVar[bool] = ContextVar("bastion_url_elicitation", default=False)


def client_declared(capabilities: dict[str, Any] | None) -> None:
    """The client of the message being handled declared ``capabilities``."""
    declared = (capabilities or {}).get("elicitation")
    _url_elicitation.set(isinstance(declared, dict) and "url" in declared)


def _of_the_upstream(described: dict[str, Any]) -> dict[str, Any]:
    """What an upstream said at the initialize of one user's session that may be told to
    another user: its protocol version, its capabilities (the features it has) and its name and
    version. Not its ``instructions``, nor the rest of its ``serverInfo``: free text it wrote
    for the user whose token asked (their account, their workspace)."""
    info = described.get("serverInfo")
    if not isinstance(info, dict):
        info = {}
    told: dict[str, Any] = {
        key: described[key] for key in ("protocolVersion", "capabilities") if key in described
    }
    told["serverInfo"] = {
        key: info[key] for key in ("name", "version") if isinstance(info.get(key), str)
    }
    return told


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
        # The tasks inside `_refreshing_once`: a start nested in a request of the same task
        # leaves a refusal to the request's, so one call makes one refresh.
        self._answering: set[asyncio.Task] = set()

    @property
    def init_result(self) -> dict[str, Any]:
        """What the upstream said at this session's initialize; until it has said it (the user
        is not connected), what it said last to any user's session in this process, read now
        (a session lives `session_idle_seconds`: a copy made when it opened would say what was
        known then), less what it wrote for that user (`_of_the_upstream`); before any,
        ``tools`` only."""
        if self._own_init_result:
            return self._own_init_result
        known = self._last_known.init_result
        if known:
            return _of_the_upstream(known)
        return {
            "protocolVersion": UPSTREAM_PROTOCOL_VERSION,
            "capabilities": {"tools": {}},
            "serverInfo": {"name": self.name, "version": ""},
        }

    @init_result.setter
    def init_result(self, value: dict[str, Any]) -> None:
        self._own_init_result = value

    async def _authorize(self, connect: bool) -> bool:
        """Carry the user's current access token. False if they have none and ``connect`` is
        False; else the error that sends them to the connect page."""
        connections = self.connections
        if connections is None:
            raise RpcError(UPSTREAM_UNAVAILABLE, f"upstream {self.name}: no connections service")
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

    def _connect_first(self, error: type[RpcError] = RpcError) -> RpcError:
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
            return error(URL_ELICITATION_REQUIRED, message, {"elicitations": [question]})
        return error(CONNECTION_REQUIRED, message, {"url": url})

    def _refused(self) -> RpcError:
        """The upstream refused the user's token: forget it, end this session; connect again."""
        assert self.connections is not None
        self.connections.forget_token(self.user, self.name)
        self.bearer = None
        self._end(self, "(the upstream refused the user's token)")
        return self._connect_first(TokenRefused)

    async def _refreshing_once(self, send: Callable[[], Awaitable[T]]) -> T:
        """``send()``; if the upstream refuses the user's token (401), the token refreshed once
        and, if the upstream refused the message before acting on it, ``send()`` once more with
        the fresh token. `TokenRefused` (`_refused`: connect again) if the refresh fails or the
        fresh token is refused too: never a second refresh, never a third try."""
        task = asyncio.current_task()
        if task in self._answering:
            return await send()  # within a call of this task that answers its refusal itself
        assert task is not None and self.connections is not None
        self._answering.add(task)
        # What was sent: another call of this session may move the token on meanwhile, and
        # a token another call refreshed is used as it is, never refreshed again for this one.
        refused = self.bearer
        try:
            try:
                return await send()
            except UpstreamUnauthorized as e:
                before_acting = e.before_acting
            if refused is None:
                raise self._refused()
            try:
                token = await self.connections.access_token_refused(self.user, self.name, refused)
            except ConnectionUnavailable as e:
                # Refused, and no fresh token to be had now: the session ends (its standing
                # stream would send the refused token again each second); the next call tries.
                self.connections.forget_token(self.user, self.name)
                self._end(self, "(the upstream refused the user's token; no refresh now)")
                raise TokenRefused(
                    UPSTREAM_UNAVAILABLE, f"upstream {self.name} refused the user's token: {e}"
                ) from None
            if token is None:
                raise self._refused()
            self.bearer = token
            if not before_acting:
                raise TokenRefused(
                    UPSTREAM_UNAVAILABLE,
                    f"upstream {self.name} refused the user's token after it had taken the"
                    " request, which may have acted: not sent again (the token is refreshed)",
                )
            try:
                return await send()
            except UpstreamUnauthorized:
                raise self._refused() from None
        finally:
            self._answering.discard(task)

    # -- what the gateway calls ------------------------------------------------------------------

    async def ensure_started(self) -> None:
        if self._started or not await self._authorize(connect=False):
            return  # a user not connected yet: nothing to start (their first call asks them)
        await self._refreshing_once(super().ensure_started)
        self._last_known.init_result = self.init_result

    async def request(self, method: str, params: dict[str, Any] | None, **options: Any):
        await self._authorize(connect=True)
        send = super().request
        return await self._refreshing_once(lambda: send(method, params, **options))

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        if await self._authorize(connect=False):
            send = super().notify
            # A notification has no answer to carry the refusal: the session has ended.
            with contextlib.suppress(TokenRefused):
                await self._refreshing_once(lambda: send(method, params))

    async def watch(self, uris: frozenset[str], sent: Sent | None = None) -> None:
        await self._authorize(connect=True)
        send = super().watch
        await self._refreshing_once(lambda: send(uris, sent))

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
        send = super()._watch_once
        try:
            return await self._refreshing_once(lambda: send(uris, opened))
        except TokenRefused:
            # Refused, and not taken after one refresh: the session has ended; opened again
            # each second, the stream would send the refused token each second.
            opened.set()
            return False
