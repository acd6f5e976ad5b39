"""Where upstream notifications go: 2025-11-25 sessions and 2026-07-28 listen streams.

A 2025-11-25 session (``Mcp-Session-Id``, a random 128-bit value) is only ever found again by
the same user, chain of agents and server that opened it: anyone else gets 404, as for an id that
never existed (a sub-agent too, with a token of another chain: what it did for one agent that
delegated to it is not another's). Each session may hold one standing GET stream, which receives the upstream's
list_changed notifications and the updates of the resources the session subscribed to. In
2026-07-28 there are no sessions: a client asks for notifications with ``subscriptions/listen``,
whose answer is the stream. Both kinds of stream are a `Listener`, held to the token that opened
it and decided again before each notification.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bastion.decide import Authorizer
from bastion.decide.contract import ChainDecision, decide_chain, policy_result
from bastion.facts.model import Entity
from bastion.gateway.enforce import Caller
from bastion.gateway.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    RequestId,
    RpcError,
    notification,
)

# The list_changed notifications and the `subscriptions/listen` filter flag that asks for each.
LIST_CHANGED = {
    "notifications/tools/list_changed": "toolsListChanged",
    "notifications/prompts/list_changed": "promptsListChanged",
    "notifications/resources/list_changed": "resourcesListChanged",
}
RESOURCE_UPDATED = "notifications/resources/updated"
# In every notification of a listen stream: the id of the listen request that opened it.
SUBSCRIPTION_ID = "io.modelcontextprotocol/subscriptionId"
# Streams (GET and listen) a user may hold open on one server at a time, all their agents
# together: an agent never exceeds its user, and registering more agents buys no more.
MAX_STREAMS_PER_USER = 32
# Notifications waiting for a client that does not read them: past this, its stream is cut off.
MAX_BACKLOG = 1000
# 2025-11-25 sessions a user may hold on one server, all their agents together; opening one more
# ends the one used least recently (its client gets 404 and initializes again, as after a restart).
MAX_SESSIONS_PER_USER = 64
# Resources a user may follow on one server at once (``gateway.max_subscriptions_per_user``):
# their sessions' subscriptions and their listen streams' resources, all their agents together.
# Each is a URI kept while it is followed (up to ``gateway.max_name_chars`` characters), so more
# sessions or streams buy no more memory. Counted here per process; with ``gateway.redis_url``
# across processes too (`bastion.gateway.follows`).
MAX_SUBSCRIPTIONS_PER_USER = 2000


def read_decision(
    authz: Authorizer,
    caller: Caller,
    server: str,
    uri: str,
    context: dict[str, Any],
    clock: Callable[[], float],
) -> tuple[Entity, ChainDecision, bool]:
    """The resource ``uri`` names, the policy's answer on its ``read`` (the chain's), and
    whether ``caller`` may hear of it now: as ``resources/read`` would be decided
    (`policy_result`: every principal may ``read`` it, the token has every scope that requires,
    its sign-in is as recent as that asks, at ``clock``), and no person has to approve it or
    review it (a notification is not counted by rate limits)."""
    resource = Entity("McpResource", f"{server}/{uri}")
    asked = {**context, "uri": uri}
    chain = decide_chain(
        authz,
        caller.principals,
        "read",
        resource,
        asked,
        granted_scopes=caller.scopes,
        task=caller.task,
    )
    duties = chain.obligations
    held = (duties.requires_approval and not duties.approval_granted) or duties.requires_review
    if held or not chain.allowed:
        return resource, chain, False
    result, _ = policy_result(chain, "read", resource, asked, caller.auth_time, clock)
    return resource, chain, result == "allow"


@dataclass(eq=False)
class Session:
    id: str
    server: str
    subject: str
    # The agents of the opening token's chain, first to calling (`Caller.chain`).
    chain: tuple[str, ...]
    protocol_version: str
    last_seen: float
    # What the client declared at initialize (sampling, elicitation, roots...).
    capabilities: dict[str, Any] = field(default_factory=dict)
    # The resources the client subscribed to (``resources/subscribe``), each allowed ``read``
    # when it did; their updates go on the GET stream, decided again each time.
    subscriptions: set[str] = field(default_factory=set)
    # Those of them whose updates were withheld at the last update (`Listener.withheld`), kept
    # with the session so that a GET stream opened again goes on from there.
    withheld: set[str] = field(default_factory=set)
    # The level of log messages the client asked for (``logging/setLevel``): its own, kept
    # here, never the upstream's for everyone. None: no log messages.
    log_level: str | None = None
    # The standing GET stream, while one is open.
    listener: Listener | None = None
    closed: bool = False

    def close(self) -> None:
        self.closed = True
        if self.listener is not None:
            self.listener.close()


@dataclass(eq=False)
class Listener:
    """A stream of notifications to one client: a 2026-07-28 ``subscriptions/listen`` stream
    (``id`` is the listen request's) or a 2025-11-25 session's GET stream (``id`` is None). Who
    opened it with which token, and the notifications bastion agreed to send on it (list_changed
    methods, resource URIs: for a GET stream, its session's subscriptions as they change)."""

    id: RequestId | None
    server: str
    caller: Caller
    token: str
    methods: frozenset[str]
    uris: frozenset[str] | set[str]
    stream: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)
    # True when the stream ends because its token or its ``connect`` was refused: it is then
    # cut off without the listen request's result, and the client has to listen again.
    refused: bool = False
    # Names its follows in Redis (`bastion.gateway.follows`) as a session's id names its own.
    follow_id: str = field(default_factory=lambda: secrets.token_hex(8))
    # The resources among ``uris`` whose last update was withheld (the caller may no longer
    # read them): a decision record is written when an update's answer differs from the last
    # one, not for every update (`Gateway.may_hear`). Every one of ``uris`` was heard of when
    # it was granted (its own record), so none is withheld at first.
    withheld: set[str] = field(default_factory=set)

    def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        """Send a notification on the stream; a listen stream's carry the listen request's id.
        A client that falls `MAX_BACKLOG` notifications behind is cut off, as refused (what
        waits for it is dropped): a stream holds bounded memory whatever the upstream sends."""
        if self.refused:
            return
        if self.stream.qsize() >= MAX_BACKLOG:
            self._cut_off()
            return
        if self.id is not None:
            params = {**(params or {}), "_meta": {SUBSCRIPTION_ID: self.id}}
        self.stream.put_nowait(notification(method, params))

    def ask(self, request: dict[str, Any]) -> None:
        """Send a request an upstream sends the client (a 2025-11-25 GET stream only), under
        the same bound as notifications."""
        if self.refused:
            raise RpcError(INVALID_REQUEST, "the client's stream was closed")
        if self.stream.qsize() >= MAX_BACKLOG:
            self._cut_off()
            raise RpcError(INVALID_REQUEST, "the client does not read its stream")
        self.stream.put_nowait(request)

    def _cut_off(self) -> None:
        while not self.stream.empty():
            self.stream.get_nowait()
        self.close(refused=True)

    def close(self, refused: bool = False) -> None:
        """End the stream: gracefully (with the listen request's result), or as refused."""
        self.refused = self.refused or refused
        self.stream.put_nowait(None)


class SessionTable:
    def __init__(
        self,
        idle_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        max_subscriptions_per_user: int = MAX_SUBSCRIPTIONS_PER_USER,
    ) -> None:
        self.idle_seconds = idle_seconds
        self.clock = clock
        self.max_subscriptions_per_user = max_subscriptions_per_user
        self._sessions: dict[str, Session] = {}
        self._by_user: dict[tuple[str, str], dict[str, Session]] = {}  # (server, user) -> theirs
        self._listeners: set[Listener] = set()
        self._streams: dict[tuple[str, str], int] = {}  # (server, user) -> open streams
        # (server, user) -> the resources their open listen streams follow (a GET stream's are
        # its session's subscriptions, counted with the session).
        self._listened: dict[tuple[str, str], int] = {}
        self._last_sweep = 0.0
        # Told of every session that ends (its upstream session, if its own, closes too).
        self.on_end: Callable[[Session], None] | None = None

    def open(
        self,
        server: str,
        subject: str,
        chain: tuple[str, ...],
        protocol_version: str,
        capabilities: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> Session:
        """A new session (``session_id``: its id, if chosen beforehand with `new_id`)."""
        self._sweep()
        theirs = self._by_user.setdefault((server, subject), {})
        if len(theirs) >= MAX_SESSIONS_PER_USER:
            self.end(min(theirs.values(), key=lambda s: s.last_seen))
        session = Session(
            session_id or self.new_id(),
            server,
            subject,
            chain,
            protocol_version,
            self.clock(),
            capabilities or {},
        )
        self._sessions[session.id] = session
        theirs[session.id] = session
        return session

    @staticmethod
    def new_id() -> str:
        return secrets.token_urlsafe(16)

    def get(self, session_id: str) -> Session | None:
        """The session ``session_id``, whoever holds it (for bastion's own use: a client finds
        only its own, with `find`)."""
        return self._sessions.get(session_id)

    def sessions_of(self, server: str, subject: str) -> list[Session]:
        """The sessions ``subject`` holds on ``server``, all their agents together."""
        return list(self._by_user.get((server, subject), {}).values())

    def find(
        self, session_id: str, server: str, subject: str, chain: tuple[str, ...]
    ) -> Session | None:
        session = self._sessions.get(session_id)
        if (
            session is None
            or session.closed
            or (session.server, session.subject, session.chain) != (server, subject, chain)
        ):
            return None
        now = self.clock()
        if now - session.last_seen > self.idle_seconds:
            self.end(session)
            return None
        session.last_seen = now
        return session

    def end(self, session: Session) -> None:
        if self.on_end is not None and not session.closed:
            self.on_end(session)
        session.close()
        self._sessions.pop(session.id, None)
        key = (session.server, session.subject)
        theirs = self._by_user.get(key)
        if theirs is not None:
            theirs.pop(session.id, None)
            if not theirs:
                del self._by_user[key]

    def subscriptions_of(self, server: str, subject: str) -> int:
        """How many resources ``subject`` follows on ``server``: their sessions' subscriptions
        and their listen streams' resources, all their agents together."""
        self._sweep()
        sessions = self._by_user.get((server, subject), {}).values()
        return sum(len(s.subscriptions) for s in sessions) + self._listened.get(
            (server, subject), 0
        )

    def room_to_follow(self, server: str, subject: str, more: int) -> None:
        """`RpcError` (-32602, HTTP 400) unless ``subject`` may follow ``more`` resources more on
        ``server`` (``gateway.max_subscriptions_per_user``)."""
        held = self.subscriptions_of(server, subject)
        if held + more > self.max_subscriptions_per_user:
            raise self.too_many(held)

    def too_many(self, held: int) -> RpcError:
        """The refusal of one follow more for a user who follows ``held`` resources."""
        most = self.max_subscriptions_per_user
        return RpcError(
            INVALID_PARAMS,
            f"a user may follow at most {most} resources on a server, all their sessions,"
            f" listen streams and agents together (gateway.max_subscriptions_per_user);"
            f" {held} are followed: unsubscribe from some, or end a session or stream, first",
            http_status=400,
        )

    def followed(self) -> Iterator[tuple[str, str, str, str]]:
        """Every resource followed in this process, as (server, user, holder, uri): a session's
        subscriptions (held by its id) and a listen stream's resources (by its `follow_id`)."""
        for session in list(self._sessions.values()):
            for uri in list(session.subscriptions):
                yield session.server, session.subject, session.id, uri
        for listener in list(self._listeners):
            if listener.id is not None:
                for uri in listener.uris:
                    yield listener.server, listener.caller.subject, listener.follow_id, uri

    def listen(self, listener: Listener) -> None:
        """Start sending ``listener`` its notifications; `RpcError` (HTTP 429) if its user
        already holds `MAX_STREAMS_PER_USER` streams on that server, or (-32602, HTTP 400) if a
        listen stream's resources would take them past ``gateway.max_subscriptions_per_user``."""
        key = (listener.server, listener.caller.subject)
        held = self._streams.get(key, 0)
        if held >= MAX_STREAMS_PER_USER:
            raise RpcError(
                INVALID_REQUEST,
                f"a user may hold at most {MAX_STREAMS_PER_USER} notification streams open on"
                " a server; close one first",
                http_status=429,
            )
        if listener.id is not None and listener.uris:
            self.room_to_follow(*key, len(listener.uris))
            self._listened[key] = self._listened.get(key, 0) + len(listener.uris)
        self._streams[key] = held + 1
        self._listeners.add(listener)

    def unlisten(self, listener: Listener) -> bool:
        """Stop sending ``listener`` notifications; False if it was not listening."""
        if listener not in self._listeners:
            return False
        self._listeners.discard(listener)
        key = (listener.server, listener.caller.subject)
        held = self._streams.pop(key, 1) - 1
        if held:
            self._streams[key] = held
        if listener.id is not None and listener.uris:
            followed = self._listened.pop(key, 0) - len(listener.uris)
            if followed > 0:
                self._listened[key] = followed
        return True

    def listeners_of(self, server: str) -> Iterator[Listener]:
        return (s for s in list(self._listeners) if s.server == server)

    def of_no_grant(self) -> list[Listener]:
        """The streams opened with a token that rests on no grant of bastion's (a trusted
        issuer's)."""
        return [s for s in self._listeners if not s.caller.grant_id]

    def end_grant(self, grant_id: str) -> None:
        """A grant, or one of its tokens, was revoked: cut off the streams opened with it."""
        for listener in list(self._listeners):
            if grant_id and listener.caller.grant_id == grant_id:
                listener.close(refused=True)

    def end_suspended(
        self, suspended: Callable[[Caller], object], session_suspended: Callable[[str], bool]
    ) -> None:
        """The kill switch: cut off every stream whose caller is ``suspended`` (its agent, user
        or session), and end the 2025-11-25 sessions suspended themselves. A suspended agent's
        or user's session stays, refused call by call, so that resuming needs no new session."""
        for listener in list(self._listeners):
            if suspended(listener.caller):
                listener.close(refused=True)
        for session in list(self._sessions.values()):
            if session_suspended(session.id):
                self.end(session)

    def close_all(self) -> None:
        """End every session and every stream (GET and listen streams end cleanly)."""
        for session in list(self._sessions.values()):
            self.end(session)
        for listener in list(self._listeners):
            listener.close()

    def __len__(self) -> int:
        return len(self._sessions)

    def _sweep(self) -> None:
        now = self.clock()
        if now - self._last_sweep < 60:
            return
        self._last_sweep = now
        for session in list(self._sessions.values()):
            if now - session.last_seen > self.idle_seconds:
                self.end(session)
