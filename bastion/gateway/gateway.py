"""The MCP gateway: upstreams, the enforcer, sessions, and the ASGI app of the paths it serves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
from starlette.types import Receive, Scope, Send

from bastion import untrusted_json
from bastion.approvals.service import Approvals
from bastion.audit.buffered import flush_at_stop, flush_forever
from bastion.audit.decisions import DecisionRecords
from bastion.audit.journal import open_journal
from bastion.audit.refusals import RefusalLog
from bastion.db import DatabaseUnavailable
from bastion.decide import Authorizer
from bastion.decide.contract import remembered_connects
from bastion.decide.mcp import message_action
from bastion.facts.model import Entity
from bastion.gateway.client_requests import ClientRequests
from bastion.gateway.config import GatewayConfig, UpstreamConfig
from bastion.gateway.enforce import Caller, Enforcer, Held, StepUp, refused
from bastion.gateway.follows import FollowLeases, FollowsUnavailable, follows_unavailable
from bastion.gateway.handlers import Exchange, listed_once, suspended_meanwhile
from bastion.gateway.holds import RequestStates, pending_error
from bastion.gateway.jsonrpc import RpcError
from bastion.gateway.metadata import WELL_KNOWN, ProtectedResourceMetadata, metadata_url
from bastion.gateway.pinning import Pinning
from bastion.gateway.ratelimit import RateLimiter, RedisRateLimiter
from bastion.gateway.refusals import RequestRefusals, UpstreamErrorLog
from bastion.gateway.sessions import (
    LIST_CHANGED,
    RESOURCE_UPDATED,
    Listener,
    Session,
    SessionTable,
    read_decision,
)
from bastion.gateway.tool_pins import PROMPT, TOOL, ToolPins
from bastion.gateway.transport import InFlight, StreamableHttpEndpoint, cross_origin, send_json
from bastion.gateway.upstream import (
    SUSPENDED,
    Hear,
    HttpUpstream,
    Upstream,
    open_upstream,
    say_if_program_missing,
)
from bastion.gateway.upstream_credentials import UserTokenUpstream
from bastion.gateway.upstream_sessions import SessionOwner, UpstreamSession, UpstreamSessions
from bastion.gateway.uris import upstream_uri
from bastion.identity.trusted_issuers import IssuerUnavailable, TrustedIssuers
from bastion.oauth.dpop import DPoPProofs
from bastion.oauth.errors import InvalidToken
from bastion.oauth.store import USERS_CHANGED
from bastion.oauth.verifier import VerifiedToken, VerifiedTokens
from bastion.origins import origin_of
from bastion.retries import Outage, kind_of
from bastion.route_paths import route_path
from bastion.signals.posture import PostureSettings
from bastion.signals.read_only import PASSED_THROUGH
from bastion.signals.suspensions import Suspensions, token_principals

if TYPE_CHECKING:
    from bastion.connections.service import Connections

log = logging.getLogger("bastion.gateway")

_MCP = "/mcp/"
_METADATA = WELL_KNOWN + _MCP
_HINTS = ("readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint")
# On SQLite, how often the requests under way are looked at for a revocation another process made
# (`Gateway._check_requests_forever`): as often as a held request's token is checked.
REQUEST_CHECK_SECONDS = 1.0


class ToolHints:
    """What one upstream session said of its tools: each tool's annotations (hints), and the
    schema of its arguments (`bastion.gateway.input_types`)."""

    def __init__(self) -> None:
        self.annotations: dict[str, dict[str, Any]] = {}
        self.input_schemas: dict[str, dict[str, Any]] = {}
        self.complete = False

    def learn(self, tools: Any) -> None:
        """Take the hints of ``tools``, a ``tools/list`` result's tools as the upstream sent them
        (only a list's objects named as a client could call them count, and not a name the
        list gives twice: `listed_once`; such a tool has no hints, so it is a write)."""
        for tool in listed_once(tools, "name"):
            name = tool["name"]
            notes = tool.get("annotations")
            notes = notes if isinstance(notes, dict) else {}
            self.annotations[name] = {k: notes[k] for k in _HINTS if isinstance(notes.get(k), bool)}
            schema = tool.get("inputSchema")
            if isinstance(schema, dict):
                self.input_schemas[name] = schema
            else:
                self.input_schemas.pop(name, None)


class UpstreamState:
    """One upstream and what bastion remembers of it: its tools' annotations, (unless its
    ``session`` is ``shared``) the upstream sessions of its users or client sessions, and (with
    ``pin_tools``, ``pin_prompts``) its tools' and prompts' accepted definitions."""

    def __init__(
        self,
        upstream: Upstream,
        sessions: UpstreamSessions | None = None,
        pins: ToolPins | None = None,
        pin_tools: str = "off",
        pin_prompts: str = "off",
        relist_seconds: float = 5.0,
    ) -> None:
        self.upstream = upstream
        self.name = upstream.name
        self.entity = Entity("McpServer", upstream.name)
        self.sessions = sessions
        # Per upstream session: an upstream may describe its tools differently to each user,
        # and what one user's session said never decides another's calls.
        self._hints: weakref.WeakKeyDictionary[Upstream, ToolHints] = weakref.WeakKeyDictionary()
        # Tool and prompt pins: None where off.
        self.tool_pins = (
            Pinning(self.name, TOOL, pins, pin_tools, self._read_tools, relist_seconds)
            if pins is not None and pin_tools != "off"
            else None
        )
        self.prompt_pins = (
            Pinning(self.name, PROMPT, pins, pin_prompts, self._read_prompts, relist_seconds)
            if pins is not None and pin_prompts != "off"
            else None
        )

    def pinning(self, kind: str) -> Pinning | None:
        return self.tool_pins if kind == TOOL else self.prompt_pins

    @property
    def run_seconds(self) -> float:
        """The longest one round of a call's run at this upstream takes: starting it (its process
        or connection and the MCP handshake), then its answer, each within its ``timeout``. An
        approved run's mark holds that long, renewed every third of it while the run lasts
        (`Enforcer.keep_running`: a run that asks its client round after round lasts longer)."""
        return 2 * self.upstream.config.timeout

    def _hints_of(self, connection: Upstream | None) -> ToolHints:
        connection = connection or self.upstream
        hints = self._hints.get(connection)
        if hints is None:
            hints = self._hints[connection] = ToolHints()
        return hints

    async def learn(
        self, kind: str, items: Any, connection: Upstream | None = None, complete: bool = False
    ) -> None:
        """Take ``items``, a page of ``tools/list`` (``prompts/list``) a client asked for
        (``complete``: the whole list, in one page): a tool's hints, and under pins, what each
        is, held against its pin."""
        connection = connection or self.upstream
        if kind == TOOL:
            self._hints_of(connection).learn(items)
        pinning = self.pinning(kind)
        if pinning is not None:
            await pinning.take(connection, items, complete)

    def listed_as_pinned(self, kind: str, name: str, connection: Upstream | None = None) -> bool:
        """Whether the tool (prompt) ``name`` is listed on ``connection`` as it was accepted
        (always, without pins)."""
        pinning = self.pinning(kind)
        return pinning is None or pinning.change(name, connection or self.upstream) is None

    def forget_tools(self, connection: Upstream | None = None) -> None:
        connection = connection or self.upstream
        self._hints.pop(connection, None)
        if self.tool_pins is not None:
            self.tool_pins.forget(connection)

    def forget_prompts(self, connection: Upstream | None = None) -> None:
        if self.prompt_pins is not None:
            self.prompt_pins.forget(connection or self.upstream)

    async def annotations(
        self, tool: str, connection: Upstream | None = None, fresh: bool = False
    ) -> dict[str, Any]:
        """The tool's annotations (hints) on ``connection`` (the caller's upstream session, or
        the shared one): from what the upstream listed last, its tool list read once if need
        be; with ``fresh``, from its tool list read now (under ``pin_tools``, none unless the
        tool is still listed as accepted: a hint flipped since is not believed)."""
        connection = connection or self.upstream
        hints = self._hints_of(connection)
        if fresh or (tool not in hints.annotations and not hints.complete):
            hints = await self._read_tools(connection)
            if fresh and not self.listed_as_pinned(TOOL, tool, connection):
                return {}
        return hints.annotations.get(tool, {})

    def listed_annotations(self, tool: str, connection: Upstream) -> dict[str, Any]:
        """The tool's annotations as ``connection``'s upstream listed them last, if bastion has
        heard that list; none otherwise. Reads nothing of the upstream."""
        hints = self._hints.get(connection)
        return hints.annotations.get(tool, {}) if hints is not None else {}

    def input_schema(self, tool: str, connection: Upstream | None = None) -> dict[str, Any] | None:
        """The ``inputSchema`` the upstream listed last for ``tool`` on ``connection``, if any
        (read with its annotations: `annotations` first)."""
        return self._hints_of(connection).input_schemas.get(tool)

    async def _read_list(self, connection: Upstream, method: str, key: str) -> list[Any]:
        """The upstream's whole list (``tools/list``, ``prompts/list``) as it gives it now (at
        most 100 pages)."""
        items: list[Any] = []
        cursor = None
        for _ in range(100):
            params = {"cursor": cursor} if cursor else {}
            response = await connection.request(method, params)
            page = response.get("result")
            page = page if isinstance(page, dict) else {}
            found = page.get(key)
            items += found if isinstance(found, list) else []
            cursor = page.get("nextCursor")
            if not cursor:
                break
        return items

    async def _read_tools(self, connection: Upstream) -> ToolHints:
        """The upstream's whole tool list as it gives it now, kept as what it says of its tools
        (in place of what it said before: a tool it no longer lists has no hints), and held
        against the pins under ``pin_tools``."""
        tools = await self._read_list(connection, "tools/list", "tools")
        hints = ToolHints()
        hints.learn(tools)
        hints.complete = True
        self._hints[connection] = hints
        if self.tool_pins is not None:
            await self.tool_pins.take(connection, tools, whole=True)
        return hints

    async def _read_prompts(self, connection: Upstream) -> None:
        """The upstream's whole prompt list as it gives it now, held against the pins."""
        prompts = await self._read_list(connection, "prompts/list", "prompts")
        if self.prompt_pins is not None:
            await self.prompt_pins.take(connection, prompts, whole=True)

    def lease(self, caller: Caller, session_id: str) -> UpstreamSession | None:
        """The caller's own upstream session, busy until released (`UpstreamSessions.release`);
        None when the upstream is ``shared``. `RpcError` when none can be opened."""
        if self.sessions is None:
            return None
        owner = self.sessions.owner(caller.subject, caller.chain, session_id)
        return self.sessions.acquire(owner, caller.grant_id)

    @contextlib.contextmanager
    def connection(self, caller: Caller, session_id: str):
        """The connection that serves ``caller`` (its client session ``session_id``) for a
        moment: the shared one, or its own upstream session."""
        lease = self.lease(caller, session_id)
        try:
            yield self.upstream if lease is None else lease.upstream
        finally:
            if lease is not None:
                assert self.sessions is not None
                self.sessions.release(lease)


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
        facts_heard: Callable[[], Awaitable[bool] | None] = lambda: None,
        facts_in_force: Callable[[], Awaitable[None] | None] = lambda: None,
        position: Callable[[], tuple[int | None, int | None]] = lambda: (None, None),
        max_json_depth: int = untrusted_json.DEFAULT_MAX_DEPTH,
        approvals: Approvals | None = None,
        suspensions: Suspensions | None = None,
        posture: PostureSettings | None = None,
        trusted: TrustedIssuers | None = None,
        dpop: DPoPProofs | None = None,
        refusals: RefusalLog | None = None,
        tool_pins: ToolPins | None = None,
        journal_dir: str | None = None,
        journal_fsync: bool = False,
    ) -> None:
        self.config = config
        # Where this process journals its decisions before their records are stored
        # (`[server] decision_journal_dir`, bastion.audit.journal); None: no journal.
        self.journal_dir = journal_dir
        # Whether it is forced to the disk at each flush (`[server] decision_journal_fsync`).
        self.journal_fsync = journal_fsync
        # The accepted definitions of the tools and prompts of upstreams with ``pin_tools`` or
        # ``pin_prompts`` (shared by replicas).
        self.tool_pins = tool_pins
        pinned = [
            u.name for u in config.upstreams if u.pin_tools != "off" or u.pin_prompts != "off"
        ]
        if pinned and tool_pins is None:
            raise ValueError(
                f"upstreams {pinned} have pin_tools or pin_prompts but the gateway has no ToolPins"
            )
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
        # Where the metadata is asked for (`PREFIXES`): below the well-known prefix, the path of
        # ``public_url`` then /mcp/ (RFC 9728 §3.1), which a proxy that serves bastion under
        # that path forwards as it is; and /mcp/ at once, where such a proxy strips the path
        # (the URL bastion named before the evening of 2026-12-06, under the path, arrives so).
        public_path = urlsplit(self.public_url).path.rstrip("/")
        self.metadata_prefixes = tuple(dict.fromkeys((WELL_KNOWN + public_path + _MCP, _METADATA)))
        self.PREFIXES = (_MCP, *self.metadata_prefixes)
        # Pages of other origins may not call /mcp/ (DNS rebinding: MCP's transport, Security).
        own = origin_of(self.public_url)
        self.allowed_origins = frozenset(config.allowed_origins or ((own,) if own else ()))
        # CORS for those pages (`bastion.cors`): /mcp/'s here; the OAuth endpoints' (the RFC
        # 9728 metadata among them) around the whole application (`bastion.server.app`).
        self.cors = cross_origin(self.allowed_origins, self.posture)
        self.records = records
        # Clients' requests refused before any decision, audited aggregated (the OAuth side's
        # `RefusalLog`); None audits none.
        self.refusals = RequestRefusals(
            refusals,
            UpstreamErrorLog(
                window_seconds=config.upstream_error_log_seconds,
                max_keys=config.upstream_error_log_max_keys,
            ),
        )
        self.limiter = (
            RedisRateLimiter(config.redis_url, config.redis_prefix, config.redis_timeout_seconds)
            if config.redis_url
            else RateLimiter()
        )
        self.enforcer = Enforcer(
            authorizer,
            records,
            self.limiter,
            digest_key=digest_key,
            facts_stale=facts_stale,
            facts_heard=facts_heard,
            facts_in_force=facts_in_force,
            position=position,
            approvals=approvals,
            suspensions=suspensions,
        )
        # The connect check's "yes" on every message, kept while it cannot have changed.
        self.connects = remembered_connects()
        # Signs the requestState of held calls (2026-07-28 clients).
        self.states = RequestStates(digest_key or secrets.token_bytes(32))
        self.sessions = SessionTable(
            config.session_idle_seconds,
            max_subscriptions_per_user=config.max_subscriptions_per_user,
        )
        # With Redis, what each user follows is counted across processes (`FollowLeases`).
        self.follows = (
            FollowLeases(
                config.redis_url,
                config.redis_prefix,
                config.redis_timeout_seconds,
                config.subscription_lease_seconds,
            )
            if config.redis_url
            else None
        )
        self._renewer: asyncio.Task | None = None
        self.resource_scopes = resource_scopes
        # bastion's progress token for a request -> the upstream connection the request went
        # on, the only one whose progress for it is heard, and where it goes (`Exchange.hear`)
        self.progress_routes: dict[str, tuple[Upstream, Hear]] = {}
        # (server, user, chain of agents, session id or None, the client's request id) -> its
        # request
        self.in_flight: dict[tuple, InFlight] = {}
        # Moves whenever the requests under way have their tokens checked again (a revocation
        # heard, or on SQLite a change by another process): a request whose token was checked
        # before it moved, and which was not under way yet then, has it checked again before it
        # goes on (`transport.StreamableHttpEndpoint._post`).
        self.revocations_heard = 0
        # Checks of the tokens of requests under way and streams when their grant was revoked,
        # and those whose check has not begun yet.
        self._checks: set[asyncio.Future] = set()
        self._checks_to_begin: set[InFlight | Listener] = set()
        # What bastion asked a client on an upstream's behalf: its id -> (the owner, as above
        # without the request id, and where the client's response goes)
        self.asked: dict[str, tuple[tuple, asyncio.Future]] = {}
        # Requests upstreams send clients (sampling, elicitation, roots).
        self.client_requests = ClientRequests(self)
        # Users' connections to upstreams with ``auth = "per_user"`` (`bastion.connections`),
        # set when the server is composed; None refuses their every request.
        self.connections: Connections | None = None
        self.upstreams: dict[str, UpstreamState] = {}
        for upstream_config in config.upstreams:
            if upstream_config.transport == "stdio":
                say_if_program_missing(upstream_config)
            state = UpstreamState(
                open_upstream(upstream_config),
                pins=tool_pins,
                pin_tools=upstream_config.pin_tools,
                pin_prompts=upstream_config.pin_prompts,
                relist_seconds=upstream_config.pin_relist_seconds,
            )
            state.upstream.on_notification = self._notification_handler(state)
            if upstream_config.session != "shared":
                state.sessions = UpstreamSessions(upstream_config, self._session_opener(state))
            self.upstreams[state.name] = state
        self._sweeper: asyncio.Task | None = None
        self._request_checker: asyncio.Task | None = None
        self.sessions.on_end = self._client_session_ended
        self._flusher: asyncio.Task | None = None
        self._signal_handlers: list[tuple[int, Any, Any]] = []
        self._endpoint = StreamableHttpEndpoint(self)

    # -- identity of each protected resource ---------------------------------------------------

    def resource(self, server: str) -> str:
        return f"{self.public_url}/mcp/{server}"

    def metadata_url(self, server: str) -> str:
        return metadata_url(self.public_url, f"/mcp/{server}")

    def challenge_scopes(self, server: str) -> tuple[str, ...]:
        """The ``scope`` of the 401 challenge, what an MCP client asks for first: the upstream's
        ``scopes`` (what the operator offers first), and with them any scope the policy requires
        of every message (``requires_scope`` on ``connect``) that the resource offers; without
        them the client would be refused its first message and authorize twice. An upstream
        with no ``scopes`` names none: its clients then ask for all of ``scopes_supported``."""
        upstream = self.config.upstream(server)
        if upstream is None or not upstream.scopes:
            return ()
        offered = self.resource_scopes(self.resource(server))
        more = tuple(
            scope
            for scope in self.enforcer.connect_scopes(server)
            if scope in offered and scope not in upstream.scopes
        )
        return upstream.scopes + more if more else upstream.scopes

    def offered_scopes(self, server: str) -> tuple[str, ...]:
        """The scopes ``server``'s resource offers (its metadata's ``scopes_supported``): a
        challenge names no other, since a client asking for one is refused at /authorize
        (``invalid_scope``), with every other scope it asked for."""
        return self.resource_scopes(self.resource(server)) or self.challenge_scopes(server)

    def metadata(self, server: str) -> ProtectedResourceMetadata:
        return ProtectedResourceMetadata(
            resource=self.resource(server),
            authorization_servers=(
                self.issuer,
                *(self.trusted.issuers_for(server) if self.trusted is not None else ()),
            ),
            scopes_supported=self.offered_scopes(server),
            resource_name=server,
            dpop_signing_alg_values=self.dpop.algorithms if self.dpop else (),
        )

    # -- decisions shared by every handler -------------------------------------------------------

    async def admit(
        self,
        ex: Exchange,
        record: bool = False,
        passed_through: bool = False,
        then: tuple[Entity, dict[str, Any]] | None = None,
    ) -> None:
        """``connect`` on the server, for every principal, on every message (continuous).

        Allowed with nothing to do, it stays unrecorded (the message's own decision is). Anything
        else goes through `Enforcer.decide`: a refusal, and also the obligations a policy may put
        on ``connect`` (a scope to step up to, an approval, a rate limit), never ignored.

        ``passed_through``: the message is forwarded as sent, with no decision of its own
        (``gateway.pass_methods``), and ``context.passed_through`` says so; it is the connect
        decision that refuses it to a caller downgraded to read-only (`refuses_write`).

        ``then``: the target of the message's own decision, asked next, and what its context
        adds (a call's tool and arguments): a step-up that ``connect`` sends the client to
        names the scopes that decision would ask too (`_step_up_for`)."""
        enforcer = self.enforcer
        if (heard := enforcer.facts_heard()) is not None:
            # A fact change this process has heard of is applied before anything is decided
            # (if it is not soon enough, `Enforcer.decide` refuses, and records it).
            await heard
        context = ex.context(**{PASSED_THROUGH: True}) if passed_through else ex.context()
        server = ex.upstream.entity
        # On stale facts `Enforcer.decide` refuses, and records it.
        stale = enforcer.facts_stale()
        # A passed-through message's downgrade to read-only is among what needs deciding
        # (`nothing_to_do`: ``context.passed_through`` is a write it refuses).
        if record or stale or self._connect_needs_deciding(ex.caller, server, context):
            try:
                verdict = await enforcer.decide(
                    ex.caller,
                    ex.server,
                    ex.message.method or "",
                    message_action(server),
                    server,
                    context,
                )
            except Held as held:
                # Approved, the next message connects: a grant for minutes covers a session.
                raise pending_error(held) from None
            except StepUp as step_up:
                if then is None:
                    raise
                raise await self._step_up_for(ex, step_up, *then) from None
            enforcer.write(verdict.record)

    async def _step_up_for(
        self, ex: Exchange, step_up: StepUp, resource: Entity, extra: dict[str, Any]
    ) -> StepUp:
        """``step_up``, the refusal of ``connect`` for scopes (or a sign-in), with the scopes the
        message's own decision on ``resource`` would ask of the token it sends the client for,
        where the resource offers them: one authorization, not one for ``connect`` and another
        at once for the message (MCP authorization, Scope Challenge Handling: "the scopes needed
        to satisfy the current request"). They are only named: the message stays refused, and a
        decision that would refuse it anyway names none. Nothing is read of the upstream for a
        caller refused at ``connect``: a tool's annotations are those bastion has already."""
        context = ex.context(**extra)
        if resource.type == "Tool":
            context = {**context, "annotations": ex.known_annotations(extra["tool"])}
        wanted = await self.enforcer.scopes_after(
            ex.caller,
            step_up.scopes,
            ex.message.method or "",
            message_action(resource),
            resource,
            context,
        )
        offered = self.offered_scopes(ex.server)
        more = tuple(s for s in wanted if s in offered and s not in step_up.scopes)
        if not more:
            return step_up
        return StepUp(step_up.scopes + more, step_up.decision_id, step_up.max_age)

    def _connect_needs_deciding(self, caller: Caller, server: Entity, context: dict) -> bool:
        """Whether ``connect`` must go through `Enforcer.decide`: the caller is suspended, or the
        contract's decision is anything but allowed with nothing to do (`plainly_allowed`: a
        refusal, a scope the token lacks, an approval, a review, a rate limit, a sign-in age, a
        passed-through write under a read-only downgrade)."""
        if self.enforcer.suspended(caller) is not None:
            return True  # refused (and recorded) by `Enforcer.decide`
        return not self.connects(
            self.enforcer.authorizer(),
            caller.principals,
            message_action(server),
            server,
            context,
            caller.scopes,
            caller.task,
        )

    def pin_accepted(self, server: str, kind: str, name: str, digest: str | None) -> None:
        """An operator accepted the definition of the tool (prompt) ``name`` through this
        process: in force here at once (other replicas ask the database when a call or a list
        finds it not as pinned)."""
        state = self.upstreams.get(server)
        pinning = state.pinning(kind) if state is not None else None
        if pinning is not None:
            pinning.accepted[name] = digest

    # -- upstream notifications ------------------------------------------------------------------

    def _own_sessions(self) -> list[UpstreamSessions]:
        return [state.sessions for state in self.upstreams.values() if state.sessions is not None]

    def _client_session_ended(self, session: Session) -> None:
        """A client session ended: so do its follows, and its upstream session if it has one
        of its own."""
        if self.follows is not None:
            self.follows.release(session.server, session.subject, session.id, session.subscriptions)
        state = self.upstreams.get(session.server)
        if state is None or state.sessions is None or state.sessions.per_user:
            return
        owner = SessionOwner(session.subject, session.chain, session.id)
        found = state.sessions.find(owner)
        if found is not None:
            state.sessions.close(found, "(its client session ended)")

    def connection_revoked(self, subject: str, upstream: str) -> None:
        """``subject``'s connection to ``upstream`` (``auth = "per_user"``) was revoked: close
        their upstream sessions there, at once."""
        state = self.upstreams.get(upstream)
        if state is not None and state.sessions is not None:
            state.sessions.close_where(
                lambda s: s.owner.user == subject, "(its user's connection was revoked)"
            )

    def _grant_revoked(self, grant_id: str) -> None:
        """A token of ``grant_id``, or the grant, was revoked: its streams and upstream sessions
        end, and each request of its tokens still under way has its token checked again
        (`InFlight.check_token`: stopped if it is refused). `USERS_CHANGED` (a user disabled,
        or all their grants revoked) has the requests and streams of trusted issuers' tokens,
        which rest on no grant of bastion's, checked so (a stream refused ends)."""
        self.revocations_heard += 1
        if grant_id == USERS_CHANGED:
            grant_id = ""
            for listener in self.sessions.of_no_grant():
                self._check(listener)
        elif grant_id:
            self.sessions.end_grant(grant_id)
            for pool in self._own_sessions():
                pool.end_grant(grant_id)
        for flight in self.in_flight.values():
            if flight.exchange is not None and flight.exchange.caller.grant_id == grant_id:
                self._check(flight)

    def _suspended(self) -> None:
        """The kill switch was used: end the suspended callers' sessions and streams, stop
        their requests under way, and close the upstream sessions of a suspended user (or,
        ``per_client_session``, of any agent of its chain, or of its client session)."""
        enforcer = self.enforcer
        self.sessions.end_suspended(enforcer.suspended, enforcer.session_suspended)
        # Every request of a suspended caller still under way is stopped: at its upstream, or
        # waiting for people.
        for flight in list(self.in_flight.values()):
            exchange = flight.exchange
            if exchange is not None and enforcer.suspended(exchange.caller) is not None:
                flight.stop(SUSPENDED, suspended_meanwhile())
        suspensions = enforcer.suspensions
        if suspensions is None:
            return

        def suspended(session: UpstreamSession) -> bool:
            owner = session.owner
            principals = token_principals(owner.user, owner.chain)
            return suspensions.first(principals, owner.client_session) is not None

        for pool in self._own_sessions():
            pool.close_where(suspended, "(suspended)")

    async def _sweep_forever(self) -> None:
        """Close idle upstream sessions, checking a few times per idle period."""
        pools = self._own_sessions()
        every = min(max(min(p.config.session_idle_seconds for p in pools) / 4, 0.25), 30.0)
        while True:
            await asyncio.sleep(every)
            for pool in pools:
                pool.sweep()

    def _session_opener(self, state: UpstreamState):
        """Makes the upstream session of one owner: its notifications go to the owner's streams
        only, and its requests on the standing stream to the owner's client. With ``auth =
        "per_user"`` it carries the owner's own upstream token (`UserTokenUpstream`)."""

        def end(upstream: Upstream, reason: str) -> None:
            if state.sessions is not None:
                state.sessions.close_where(lambda s: s.upstream is upstream, reason)

        def open_session(config: UpstreamConfig, owner: SessionOwner) -> Upstream:
            if config.auth == "per_user":
                assert isinstance(state.upstream, HttpUpstream)
                upstream: Upstream = UserTokenUpstream(
                    config, owner.user, self.connections, state.upstream, end
                )
            else:
                upstream = open_upstream(config)
            upstream.on_notification = self._notification_handler(state, owner, upstream)
            upstream.on_request = partial(
                self.client_requests.from_standing_stream, state, owner, upstream
            )
            return upstream

        return open_session

    def _notification_handler(
        self,
        state: UpstreamState,
        owner: SessionOwner | None = None,
        connection: Upstream | None = None,
    ):
        # The connection whose notifications these are: a request's progress is heard from
        # the connection it went on only.
        source = connection if connection is not None else state.upstream

        def listeners() -> list[Listener]:
            found = self.sessions.listeners_of(state.name)
            if owner is None:
                return list(found)
            return [
                s
                for s in found
                if owner.covers(s.caller.subject, s.caller.chain, s.caller.session_id)
            ]

        async def handle(message: dict[str, Any]) -> None:
            method = message.get("method", "")
            params = message.get("params")
            params = params if isinstance(params, dict) else {}
            if method == "notifications/progress":
                route = self.progress_routes.get(str(params.get("progressToken")))
                if route is not None and route[0] is source:
                    await route[1](message)
            elif method in LIST_CHANGED:
                if method == "notifications/tools/list_changed":
                    state.forget_tools(connection)
                elif method == "notifications/prompts/list_changed":
                    state.forget_prompts(connection)
                # Only the method travels on: the upstream's params are about its own streams.
                for listener in listeners():
                    if method in listener.methods and await self.may_hear(listener, method):
                        listener.notify(method)
            elif method == RESOURCE_UPDATED and isinstance(params.get("uri"), str):
                # Compared and decided in the one spelling clients' URIs are taken in.
                uri = upstream_uri(params["uri"])
                if uri is None:
                    log.debug("%s: an update of a URI no client can name is dropped", state.name)
                    return
                for listener in listeners():
                    if uri in listener.uris and await self.may_hear(listener, method, uri):
                        listener.notify(method, {"uri": uri})

        return handle

    async def verify_token(
        self, token: str, server: str, address: str | None = None
    ) -> VerifiedToken:
        """The facts of ``token`` for a message to ``server``: bastion's own tokens first (a
        token seen before is checked in memory, revocations included; a new one in full off the
        event loop), then a token whose ``iss`` is a trusted issuer (or one of its tenants'),
        checked against that issuer alone. Raises `InvalidToken`, `DatabaseUnavailable` or `IssuerUnavailable`."""
        tokens, resource = self.tokens, self.resource(server)
        verified = tokens.remembered(token, resource, on_loop=True)
        if verified == "off_loop":
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
        ``connect`` (else the stream ends, and a refused ``connect`` is recorded; so too where
        ``connect`` needs an approval that no approval for minutes covers), and for a
        resource's update, ``read`` it (else that notification is not sent): recorded when the
        answer for that resource differs from the stream's last one (`Listener.withheld`)."""
        if not await self._stream_token_valid(listener):
            return False
        enforcer = self.enforcer
        await enforcer.settled()
        caller = listener.caller
        context = enforcer.context(caller, listener.server, method)
        server = Entity("McpServer", listener.server)
        if enforcer.facts_stale() or self._connect_needs_deciding(caller, server, context):
            # Decided again in full, so that a refusal is recorded (with its rules); neither
            # counted under the caller's rate limits nor held for a person (an approval refuses
            # it, no request filed; a review of a connect holds nothing, and is not looked up):
            # its client sent nothing. So it never raises `Held` (``from_client=False``: no
            # hold is placed).
            try:
                verdict = await enforcer.decide(
                    caller,
                    listener.server,
                    method,
                    message_action(server),
                    server,
                    context,
                    from_client=False,
                )
            except (RpcError, StepUp):
                listener.close(refused=True)
                return False
            enforcer.write(verdict.record)  # allowed after all: the facts changed meanwhile
            # Facts may have changed during the decision's own waits: read as they are now.
            await enforcer.settled()
        if uri is None:
            return True
        started = time.perf_counter()
        authz = enforcer.authorizer()
        resource, chain, heard = read_decision(
            authz, caller, listener.server, uri, context, enforcer.clock
        )
        if heard == (uri in listener.withheld):
            # The answer changed since the last update (withheld now, or heard again): a
            # decision record says so, once, rather than one per update per stream.
            enforcer.record_heard(
                authz, enforcer.position(), caller, listener.server, method, resource,
                {**context, "uri": uri}, chain, heard, started,
            )  # fmt: skip
            (listener.withheld.discard if heard else listener.withheld.add)(uri)
        return heard

    # -- what users follow (max_subscriptions_per_user) -----------------------------------------

    async def follow(self, server: str, subject: str, holder: str, uris: Iterable[str]) -> None:
        """With Redis, count ``holder``'s follows of ``uris`` for ``subject`` on ``server``
        across processes, atomically: `RpcError` (-32602, HTTP 400) past
        ``gateway.max_subscriptions_per_user``, (-32006) if Redis cannot be reached. Without
        Redis, nothing to do (`SessionTable.room_to_follow` counts this process's)."""
        if self.follows is None:
            return
        try:
            held = await self.follows.take(
                server, subject, holder, uris, self.sessions.max_subscriptions_per_user
            )
        except FollowsUnavailable:
            raise follows_unavailable() from None
        if held is not None:
            raise self.sessions.too_many(held)

    async def listen(self, listener: Listener) -> None:
        """`SessionTable.listen` for a ``subscriptions/listen`` stream, its resources counted
        across processes first (`follow`)."""
        await self.follow(
            listener.server, listener.caller.subject, listener.follow_id, listener.uris
        )
        try:
            self.sessions.listen(listener)
        except RpcError:
            self._unfollow(listener)
            raise

    def unlisten(self, listener: Listener) -> None:
        if self.sessions.unlisten(listener):
            self._unfollow(listener)

    def _unfollow(self, listener: Listener) -> None:
        if self.follows is not None:
            self.follows.release(
                listener.server, listener.caller.subject, listener.follow_id, listener.uris
            )

    async def _renew_follows_forever(self) -> None:
        """Renew this process's follows in Redis every third of their lease. Redis away is
        logged by `FollowLeases.renew` (once); any other failure once for as long as it stays
        the same, with its traceback."""
        follows = self.follows
        assert follows is not None
        outage = Outage(log)
        while True:
            await asyncio.sleep(follows.lease_seconds / 3)
            try:
                await follows.renew(self.sessions.followed)
            except Exception as e:
                outage.failed(
                    "renewing subscriptions in Redis failed; will retry",
                    kind=kind_of(e),
                    level=logging.ERROR,
                    exc_info=True,
                )
            else:
                outage.ended("subscriptions are renewed again")

    # -- lifecycle and routes --------------------------------------------------------------------

    async def start(self) -> None:
        if self.records is not None:
            if self.journal_dir is not None:
                # Before any call is decided; then the journals of dead processes recovered (a
                # failure there is logged, and tried again by the next sweep: the database may
                # be away at start).
                await asyncio.to_thread(
                    open_journal, self.records, self.journal_dir, self.journal_fsync
                )
            # In memory, each round: the counts of closed windows of upstream errors.
            self._flusher = asyncio.create_task(
                flush_forever(self.records, each_round=self.refusals.upstream_errors.sweep)
            )
        self._end_streams_on_stop_signals()
        if self.follows is not None:
            self._renewer = asyncio.create_task(self._renew_follows_forever())
        # A revocation this process makes or hears of (NOTIFY, on PostgreSQL) cuts the grant's
        # streams off at once, not at their next notification.
        loop = asyncio.get_running_loop()
        self.tokens.on_forget(
            lambda grant_id: loop.call_soon_threadsafe(self._grant_revoked, grant_id)
        )
        # A suspension this replica applies ends the suspended callers' sessions and streams.
        if self.enforcer.suspensions is not None:
            self.enforcer.suspensions.on_suspend(lambda: loop.call_soon_threadsafe(self._suspended))
        if self._own_sessions():
            self._sweeper = asyncio.create_task(self._sweep_forever())
        if self.tokens.listener is None:
            self._request_checker = asyncio.create_task(self._check_requests_forever())

    async def _check_requests_forever(self) -> None:
        """On SQLite, where another process's revocation (the CLI, a replica on the same file)
        is announced to no one: every `REQUEST_CHECK_SECONDS`, once the database has
        changed, the requests under way have their tokens checked again (`_grant_revoked`'s
        check, for each), and those not under way yet before they go on
        (`revocations_heard`)."""
        seen: int | None = None
        while True:
            await asyncio.sleep(REQUEST_CHECK_SECONDS)
            if not self.in_flight:
                continue  # looked at once one is: a change meanwhile is still unseen
            marker = await anyio.to_thread.run_sync(self.tokens.db.data_version)
            if marker is not None and marker == seen:
                continue  # nothing committed since the last look: nothing revoked
            seen = marker
            self.revocations_heard += 1
            for flight in self.in_flight.values():
                self._check(flight)

    def _check(self, checked: InFlight | Listener) -> None:
        """Check the token of a request under way (`InFlight.check_token`: stopped if it is
        refused) or of a stream (`_stream_token_valid`: ended), in a task: one for a burst of
        revocations (a check not begun yet will see each of them)."""
        if checked in self._checks_to_begin:
            return
        self._checks_to_begin.add(checked)
        check = asyncio.ensure_future(self._check_now(checked))
        self._checks.add(check)
        check.add_done_callback(self._checks.discard)

    async def _check_now(self, checked: InFlight | Listener) -> None:
        # Begun: a revocation heard from now on may come after the token's state is read, so
        # it has a check of its own.
        self._checks_to_begin.discard(checked)
        if isinstance(checked, InFlight):
            await checked.check_token()
        else:
            await self._stream_token_valid(checked)

    async def _stream_token_valid(self, listener: Listener) -> bool:
        """Whether the token that opened ``listener``'s stream is still valid; if not, or if
        it cannot be checked now, the stream is ended (refused)."""
        try:
            await self.verify_token(
                listener.token, listener.server, listener.caller.address or None
            )
        except (InvalidToken, DatabaseUnavailable, IssuerUnavailable):
            listener.close(refused=True)
            return False
        return True

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

    async def close(self) -> None:
        for number, previous, ours in self._signal_handlers:
            if signal.getsignal(number) is ours:
                signal.signal(number, previous)
        self._signal_handlers.clear()
        self.sessions.close_all()
        for check in self._checks:  # of requests that end with the server
            check.cancel()
        self.refusals.upstream_errors.flush(everything=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._request_checker is not None:
            self._request_checker.cancel()
        if self._renewer is not None:
            self._renewer.cancel()
        for pool in self._own_sessions():
            with contextlib.suppress(Exception):
                await pool.close_all()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        if self.records is not None:
            await flush_at_stop(self.records)
            if self.records.journal is not None:
                await asyncio.to_thread(self.records.journal.close)
        for state in self.upstreams.values():
            with contextlib.suppress(Exception):
                await state.upstream.close()
        if self.tool_pins is not None:
            await anyio.to_thread.run_sync(self.tool_pins.db.close)
        # Its revocation listener's thread is waited for (up to 2 s), and its connection closed:
        # not on the event loop, which still ends the other connections meanwhile.
        await anyio.to_thread.run_sync(self.tokens.close)
        with contextlib.suppress(Exception):
            await self.limiter.close()
        if self.follows is not None:
            with contextlib.suppress(Exception):
                await self.follows.close()  # the sessions' follows removed first
        with contextlib.suppress(Exception):
            await self.enforcer.behavior.close()
        with contextlib.suppress(Exception):
            await self.enforcer.labels.close()

    # -- ASGI: the paths the gateway serves -----------------------------------------------------

    # ``/mcp/<server>`` and its RFC 9728 metadata: the server sends every request under these
    # prefixes here, ahead of the API's routing (see `bastion.gateway.mount.GatewayFirst`).
    # Per gateway (the metadata's depend on ``public_url``): set in ``__init__``.
    PREFIXES: tuple[str, ...] = (_MCP, _METADATA)
    # ``/mcp/<server>`` alone (the application's CORS completes its answers there).
    MCP_PREFIX = _MCP

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        if path.startswith(_MCP):
            await self._endpoint.serve(path[len(_MCP) :], scope, receive, send)
            return
        await self._metadata(scope, receive, send)

    async def _metadata(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The RFC 9728 metadata of each upstream (an ASGI application)."""
        path = route_path(scope)
        prefix = next((p for p in self.metadata_prefixes if path.startswith(p)), None)
        server = path[len(prefix) :] if prefix is not None else None
        if server is None:
            await send_json(send, 404, {"error": "not_found"})
        elif scope["method"] not in ("GET", "HEAD"):
            await send_json(send, 405, None, {"allow": "GET"})
        elif server not in self.upstreams:
            await send_json(send, 404, {"error": "not_found"})
        else:
            await send_json(send, 200, self.metadata(server).to_dict())


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


__all__ = ["Gateway", "refused"]
