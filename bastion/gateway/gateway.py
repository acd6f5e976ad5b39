"""The MCP gateway: upstreams, the enforcer, sessions, and the ASGI app of the paths it serves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import threading
from collections.abc import Callable
from typing import Any

import anyio
from starlette.types import Receive, Scope, Send

from bastion import untrusted_json
from bastion.approvals.service import Approvals
from bastion.audit.decisions import DecisionRecords
from bastion.db import DatabaseUnavailable
from bastion.decide import Authorizer
from bastion.decide.contract import plainly_allowed
from bastion.facts.model import Entity
from bastion.gateway.config import GatewayConfig, normalized_origin
from bastion.gateway.enforce import Caller, Enforcer, Held, StepUp, refused
from bastion.gateway.handlers import Exchange
from bastion.gateway.holds import RequestStates, pending_error
from bastion.gateway.jsonrpc import RpcError
from bastion.gateway.metadata import WELL_KNOWN, ProtectedResourceMetadata, metadata_url
from bastion.gateway.ratelimit import RateLimiter, RedisRateLimiter
from bastion.gateway.sessions import (
    LIST_CHANGED,
    RESOURCE_UPDATED,
    Listener,
    SessionTable,
    may_read,
)
from bastion.gateway.transport import InFlight, StreamableHttpEndpoint, send_json
from bastion.gateway.upstream import Hear, Upstream, open_upstream
from bastion.identity.trusted_issuers import IssuerUnavailable, TrustedIssuers
from bastion.oauth.dpop import DPoPProofs
from bastion.oauth.errors import InvalidToken
from bastion.oauth.verifier import VerifiedToken, VerifiedTokens
from bastion.signals.posture import PostureSettings
from bastion.signals.suspensions import Suspensions

log = logging.getLogger("bastion.gateway")

_MCP = "/mcp/"
_METADATA = WELL_KNOWN + _MCP
_HINTS = ("readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint")


class UpstreamState:
    """One upstream and what bastion remembers of it: its tools' annotations."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.name = upstream.name
        self.entity = Entity("McpServer", upstream.name)
        self._annotations: dict[str, dict[str, Any]] = {}
        self._complete = False

    def learn_tools(self, tools: list[dict[str, Any]]) -> None:
        for tool in tools:
            notes = tool.get("annotations") or {}
            self._annotations[str(tool.get("name"))] = {
                k: notes[k] for k in _HINTS if isinstance(notes.get(k), bool)
            }

    def forget_tools(self) -> None:
        self._annotations.clear()
        self._complete = False

    async def annotations(self, tool: str) -> dict[str, Any]:
        """The tool's annotations (hints), reading the upstream's tool list once if needed."""
        if tool not in self._annotations and not self._complete:
            cursor = None
            for _ in range(100):
                params = {"cursor": cursor} if cursor else {}
                response = await self.upstream.request("tools/list", params)
                page = response.get("result") or {}
                self.learn_tools([t for t in page.get("tools") or () if isinstance(t, dict)])
                cursor = page.get("nextCursor")
                if not cursor:
                    break
            self._complete = True
        return self._annotations.get(tool, {})


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        tokens: VerifiedTokens,
        issuer: str,
        authorizer: Callable[[], Authorizer],
        records: DecisionRecords | None,
        resource_scopes: Callable[[str], tuple[str, ...]] = lambda uri: (),
        digest_key: bytes | None = None,
        facts_stale: Callable[[], bool] = lambda: False,
        max_json_depth: int = untrusted_json.DEFAULT_MAX_DEPTH,
        approvals: Approvals | None = None,
        suspensions: Suspensions | None = None,
        posture: PostureSettings | None = None,
        trusted: TrustedIssuers | None = None,
        dpop: DPoPProofs | None = None,
    ) -> None:
        self.config = config
        # [[gateway.trusted_issuers]]: identity providers whose access tokens are accepted too.
        self.trusted = trusted
        # DPoP (RFC 9449): checks the proof a DPoP-bound token comes with; None refuses them.
        self.dpop = dpop
        # [signals.posture]: the network zone, device and token age of each request's context.
        self.posture = posture or PostureSettings()
        # [server].max_json_depth: how deep a client's JSON-RPC message may nest.
        self.max_json_depth = max_json_depth
        self.tokens = tokens
        self.issuer = issuer
        self.public_url = config.public_url or _origin(issuer)
        # Pages of other origins may not call /mcp/ (DNS rebinding: MCP's transport, Security).
        own = normalized_origin(_origin(self.public_url))
        self.allowed_origins = frozenset(config.allowed_origins or ((own,) if own else ()))
        self.records = records
        self.limiter = (
            RedisRateLimiter(config.redis_url, config.redis_prefix)
            if config.redis_url
            else RateLimiter()
        )
        self.enforcer = Enforcer(
            authorizer,
            records,
            self.limiter,
            digest_key=digest_key,
            facts_stale=facts_stale,
            approvals=approvals,
            suspensions=suspensions,
        )
        # Signs the requestState of held calls (2026-07-28 clients).
        self.states = RequestStates(digest_key or secrets.token_bytes(32))
        self.sessions = SessionTable(config.session_idle_seconds)
        self.resource_scopes = resource_scopes
        # bastion's progress token for a request -> where its progress goes (`Exchange.hear`)
        self.progress_routes: dict[str, Hear] = {}
        # (server, user, agent, session id or None, the client's request id) -> its request
        self.in_flight: dict[tuple, InFlight] = {}
        # What bastion asked a client on an upstream's behalf: its id -> (the owner, as above
        # without the request id, and where the client's response goes)
        self.asked: dict[str, tuple[tuple, asyncio.Future]] = {}
        self.upstreams: dict[str, UpstreamState] = {}
        for upstream_config in config.upstreams:
            state = UpstreamState(open_upstream(upstream_config))
            state.upstream.on_notification = self._notification_handler(state)
            self.upstreams[state.name] = state
        self._flusher: asyncio.Task | None = None
        self._signal_handlers: list[tuple[int, Any, Any]] = []
        self._endpoint = StreamableHttpEndpoint(self)

    # -- identity of each protected resource ---------------------------------------------------

    def resource(self, server: str) -> str:
        return f"{self.public_url}/mcp/{server}"

    def metadata_url(self, server: str) -> str:
        return metadata_url(self.public_url, f"/mcp/{server}")

    def challenge_scopes(self, server: str) -> tuple[str, ...]:
        upstream = self.config.upstream(server)
        return upstream.scopes if upstream and upstream.scopes else ()

    def metadata(self, server: str) -> ProtectedResourceMetadata:
        return ProtectedResourceMetadata(
            resource=self.resource(server),
            authorization_servers=(
                self.issuer,
                *(self.trusted.issuers_for(server) if self.trusted is not None else ()),
            ),
            scopes_supported=self.resource_scopes(self.resource(server))
            or self.challenge_scopes(server),
            resource_name=server,
            dpop_signing_alg_values=self.dpop.algorithms if self.dpop else (),
        )

    def allows_origin(self, origin: str) -> bool:
        """Whether a page of ``origin`` (an ``Origin`` header) may call ``/mcp/``."""
        normalized = normalized_origin(origin)
        return normalized is not None and normalized in self.allowed_origins

    # -- decisions shared by every handler -------------------------------------------------------

    async def admit(self, ex: Exchange, record: bool = False) -> None:
        """``connect`` on the server, for every principal, on every message (continuous).

        Allowed with nothing to do, it stays unrecorded (the message's own decision is). Anything
        else goes through `Enforcer.decide`: a refusal, and also the obligations a policy may put
        on ``connect`` (a scope to step up to, an approval, a rate limit), never ignored."""
        enforcer = self.enforcer
        context = ex.context()
        server = ex.upstream.entity
        # On stale facts `Enforcer.decide` refuses, and records it.
        stale = enforcer.facts_stale()
        if record or stale or self._connect_needs_deciding(ex.caller, server, context):
            try:
                verdict = await enforcer.decide(
                    ex.caller, ex.server, ex.message.method or "", "connect", server, context
                )
            except Held as held:
                # Approved, the next message connects: a grant for minutes covers a session.
                raise pending_error(held) from None
            enforcer.write(verdict.record)

    def _connect_needs_deciding(self, caller: Caller, server: Entity, context: dict) -> bool:
        """Whether ``connect`` must go through `Enforcer.decide`: a principal is refused, or the
        policy attaches something to do (a scope the token lacks, an approval, a rate limit)."""
        if self.enforcer.suspended(caller) is not None:
            return True  # refused (and recorded) by `Enforcer.decide`
        return not plainly_allowed(
            self.enforcer.authorizer(), caller.principals, "connect", server, context, caller.scopes
        )

    # -- upstream notifications ------------------------------------------------------------------

    def _notification_handler(self, state: UpstreamState):
        async def handle(message: dict[str, Any]) -> None:
            method = message.get("method", "")
            params = message.get("params")
            params = params if isinstance(params, dict) else {}
            if method == "notifications/progress":
                hear = self.progress_routes.get(str(params.get("progressToken")))
                if hear is not None:
                    await hear(message)
            elif method in LIST_CHANGED:
                if method == "notifications/tools/list_changed":
                    state.forget_tools()
                # Only the method travels on: the upstream's params are about its own streams.
                for listener in self.sessions.listeners_of(state.name):
                    if method in listener.methods and await self.may_hear(listener, method):
                        listener.notify(method)
            elif method == RESOURCE_UPDATED and isinstance(params.get("uri"), str):
                uri = params["uri"]
                for listener in self.sessions.listeners_of(state.name):
                    if uri in listener.uris and await self.may_hear(listener, method, uri):
                        listener.notify(method, {"uri": uri})

        return handle

    async def verify_token(
        self, token: str, server: str, address: str | None = None
    ) -> VerifiedToken:
        """The facts of ``token`` for a message to ``server``: bastion's own tokens first (a
        token seen before is checked in memory, revocations included; a new one in full off the
        event loop), then a token whose ``iss`` is a trusted issuer, checked against that issuer
        alone. Raises `InvalidToken`, `DatabaseUnavailable` or `IssuerUnavailable`."""
        tokens, resource = self.tokens, self.resource(server)
        if tokens.local:
            verified = tokens.remembered(token, resource)
        else:
            verified = await anyio.to_thread.run_sync(tokens.remembered, token, resource)
        if verified is not None:
            return verified
        trusted = self.trusted
        if trusted is not None and trusted.claims_issuer(token):
            return await trusted.verify(token, server, address)
        return await anyio.to_thread.run_sync(tokens.verify, token, resource, address)

    async def may_hear(self, listener: Listener, method: str, uri: str | None = None) -> bool:
        """Decided again for each notification of a stream (a listen stream, a session's GET
        stream): the token that opened it must still be valid and every principal may still
        ``connect`` (else the stream ends, and a refused ``connect`` is recorded), and for a
        resource's update, ``read`` it (else that notification is not sent)."""
        try:
            await self.verify_token(
                listener.token, listener.server, listener.caller.address or None
            )
        # A token that cannot be checked now is refused.
        except (InvalidToken, DatabaseUnavailable, IssuerUnavailable):
            listener.close(refused=True)
            return False
        enforcer = self.enforcer
        authz = enforcer.authorizer()
        caller = listener.caller
        context = enforcer.context(caller, listener.server, method)
        server = Entity("McpServer", listener.server)
        if enforcer.facts_stale() or self._connect_needs_deciding(caller, server, context):
            # Decided again in full, so that a refusal is recorded (with its rules).
            try:
                verdict = await enforcer.decide(
                    caller, listener.server, method, "connect", server, context
                )
            except (RpcError, StepUp, Held):
                listener.close(refused=True)
                return False
            enforcer.write(verdict.record)  # allowed after all: the facts changed meanwhile
        return uri is None or may_read(authz, caller, listener.server, uri, context)

    # -- lifecycle and routes --------------------------------------------------------------------

    async def start(self) -> None:
        if self.records is not None:
            self._flusher = asyncio.create_task(self._flush_forever())
        self._end_streams_on_stop_signals()
        # A revocation this process makes or hears of (NOTIFY, on PostgreSQL) cuts the grant's
        # streams off at once, not at their next notification.
        loop = asyncio.get_running_loop()
        self.tokens.on_forget(
            lambda grant_id: loop.call_soon_threadsafe(self.sessions.end_grant, grant_id)
        )
        # A suspension this replica applies ends the suspended callers' sessions and streams.
        if self.enforcer.suspensions is not None:
            self.enforcer.suspensions.on_suspend(
                lambda: loop.call_soon_threadsafe(
                    self.sessions.end_suspended,
                    self.enforcer.suspended,
                    self.enforcer.session_suspended,
                )
            )

    def _end_streams_on_stop_signals(self) -> None:
        """uvicorn waits for open responses to finish before the lifespan's shutdown, and a
        standing stream (a GET stream, a listen stream) never finishes by itself: so when the
        process is told to stop (SIGINT, SIGTERM), end them first, cleanly, then let the
        server's own handler run. Signals reach the main thread only; elsewhere (an app run in
        a thread) nothing is hooked."""
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for number in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(number)
            if not callable(previous):
                continue  # no handler to run after ours: leave the default behaviour alone

            def stop(signum, frame, previous=previous) -> None:
                loop.call_soon_threadsafe(self.sessions.close_all)
                previous(signum, frame)

            signal.signal(number, stop)
            self._signal_handlers.append((number, previous, stop))

    async def _flush_forever(self) -> None:
        """Write the buffered decision records every 0.2 s. While the database is unavailable
        they stay buffered (bounded: `DecisionRecords`) and every round tries again."""
        records = self.records
        assert records is not None
        failing = False
        while True:
            await asyncio.sleep(0.2)
            try:
                await asyncio.to_thread(records.flush)
            except DatabaseUnavailable as e:
                if not failing:
                    log.warning("decision records wait in memory (%s); will retry", e)
                failing = True
            except Exception:
                log.exception("writing decision records failed; will retry")
            else:
                if failing:
                    log.warning("decision records are written again")
                failing = False

    async def close(self) -> None:
        for number, previous, ours in self._signal_handlers:
            if signal.getsignal(number) is ours:
                signal.signal(number, previous)
        self._signal_handlers.clear()
        self.sessions.close_all()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        if self.records is not None:
            try:
                await asyncio.to_thread(self.records.flush)
            except Exception as e:
                log.error(
                    "%d decision records could not be written before stopping: %s",
                    self.records.waiting,
                    e,
                )
        for state in self.upstreams.values():
            with contextlib.suppress(Exception):
                await state.upstream.close()
        self.tokens.close()
        with contextlib.suppress(Exception):
            await self.limiter.close()
        with contextlib.suppress(Exception):
            await self.enforcer.behavior.close()
        with contextlib.suppress(Exception):
            await self.enforcer.labels.close()

    # -- ASGI: the paths the gateway serves -----------------------------------------------------

    # ``/mcp/<server>`` and its RFC 9728 metadata: the server sends every request under these
    # prefixes here, ahead of the API's routing (see `bastion.gateway.mount.GatewayFirst`).
    PREFIXES = (_MCP, _METADATA)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        if path.startswith(_MCP):
            await self._endpoint.serve(path[len(_MCP) :], scope, receive, send)
        elif path.startswith(_METADATA):
            await self._metadata_endpoint(path[len(_METADATA) :], scope, send)
        else:
            await send_json(send, 404, {"error": "not_found"})

    async def _metadata_endpoint(self, server: str, scope: Scope, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await send_json(send, 405, None, {"allow": "GET"})
        elif server not in self.upstreams:
            await send_json(send, 404, {"error": "not_found"})
        else:
            await send_json(send, 200, self.metadata(server).to_dict())


def route_path(scope: Scope) -> str:
    """The request's path below the application's root path (as Starlette's router reads it)."""
    path, root = scope["path"], scope.get("root_path")
    return path[len(root) :] if root and path.startswith(root) else path


def _origin(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


__all__ = ["Gateway", "refused", "route_path"]
