"""Upstream sessions of one user, or of one client session: which connection serves a request.

An upstream's ``session`` setting says how clients' requests map onto its MCP sessions. With
``shared`` (the default) every client's requests go on bastion's one session, and the upstream
cannot tell users apart. With ``per_user`` each user gets an upstream session of their own, and with
``per_client_session`` each client MCP session does (a 2026-07-28 client, which has none, gets one
per user and chain of agents: a sub-agent's upstream session for one agent that delegated to it is
not its session for another): opened on first use, closed when unused for ``session_idle_seconds``,
when the grant of a token that used it is revoked, when its user (or, ``per_client_session``, any
agent of its chain, or its client session) is suspended, and (``per_client_session``) when its
client session ends. At most ``max_sessions`` are open per
upstream: one more closes the one unused longest among those no request is waiting on, and is
refused when every one is busy.

Each upstream session is an `Upstream` of its own (its own ``Mcp-Session-Id``, connections and
standing stream), made by the factory the gateway gives, which attaches the user's own upstream
token when the upstream has ``auth = "per_user"`` (`bastion.gateway.upstream_credentials`; such
a session is also closed when its user's connection is revoked, or the upstream refuses it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bastion.gateway.config import UpstreamConfig
from bastion.gateway.jsonrpc import UPSTREAM_UNAVAILABLE, RpcError
from bastion.gateway.upstream import Upstream

log = logging.getLogger("bastion.gateway.upstream")


@dataclass(frozen=True, slots=True)
class SessionOwner:
    """Whom an upstream session serves: a user (``per_user``), or one client session of theirs
    (``per_client_session``: the chain of agents, `Caller.chain`, and its ``Mcp-Session-Id``, ""
    for a 2026-07-28 client)."""

    user: str
    chain: tuple[str, ...] = ()
    client_session: str = ""

    def covers(self, subject: str, chain: tuple[str, ...], session_id: str) -> bool:
        """Whether a client (its user, chain and session) is one this upstream session serves."""
        if subject != self.user:
            return False
        return not self.chain or (chain, session_id) == (self.chain, self.client_session)


@dataclass(eq=False, slots=True)
class UpstreamSession:
    """One upstream session of a `SessionOwner`, and what bastion knows of its use."""

    owner: SessionOwner
    upstream: Upstream
    last_used: float
    busy: int = 0  # requests on it now: a busy session is never closed to make room
    # The grants of the tokens whose requests used it: revoking one closes it.
    grants: set[str] = field(default_factory=set)
    closed: bool = False


OpenUpstream = Callable[[UpstreamConfig, SessionOwner], Upstream]


class UpstreamSessions:
    """The upstream sessions of one upstream whose ``session`` is not ``shared``."""

    def __init__(
        self,
        config: UpstreamConfig,
        open_upstream: OpenUpstream,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.per_user = config.session == "per_user"
        self._open_upstream = open_upstream
        self.clock = clock
        self._sessions: dict[SessionOwner, UpstreamSession] = {}
        self._closing: set[asyncio.Task] = set()

    def owner(self, subject: str, chain: tuple[str, ...], session_id: str) -> SessionOwner:
        """The owner whose upstream session serves this client."""
        if self.per_user:
            return SessionOwner(subject)
        return SessionOwner(subject, chain, session_id)

    def acquire(self, owner: SessionOwner, grant_id: str = "") -> UpstreamSession:
        """The owner's upstream session, opened if it has none, marked busy until `release`.
        `RpcError` when ``max_sessions`` are open and every one is busy."""
        now = self.clock()
        session = self._sessions.get(owner)
        if session is None:
            self._make_room()
            session = UpstreamSession(owner, self._open_upstream(self.config, owner), now)
            self._sessions[owner] = session
        session.busy += 1
        session.last_used = now
        if grant_id:
            session.grants.add(grant_id)
        return session

    def release(self, session: UpstreamSession) -> None:
        session.busy -= 1
        session.last_used = self.clock()

    def find(self, owner: SessionOwner) -> UpstreamSession | None:
        return self._sessions.get(owner)

    def _make_room(self) -> None:
        if len(self._sessions) < self.config.max_sessions:
            return
        idle = [s for s in self._sessions.values() if s.busy == 0]
        if not idle:
            raise RpcError(
                UPSTREAM_UNAVAILABLE,
                f"upstream {self.config.name} has its {self.config.max_sessions} sessions"
                " (max_sessions) open and every one is in use; try again later",
            )
        self.close(min(idle, key=lambda s: s.last_used), "to make room (max_sessions)")

    def close(self, session: UpstreamSession, reason: str) -> None:
        """Forget ``session`` and close it upstream (in the background: this may run from a
        callback, and its requests, if any, fail)."""
        if self._sessions.get(session.owner) is session:
            del self._sessions[session.owner]
        if session.closed:
            return
        session.closed = True
        log.info(
            "upstream %s: closing the session of %s %s", self.config.name, session.owner, reason
        )
        task = asyncio.ensure_future(session.upstream.close())
        self._closing.add(task)
        task.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Task) -> None:
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("upstream %s: closing a session: %s", self.config.name, task.exception())

    def close_where(self, doomed: Callable[[UpstreamSession], bool], reason: str) -> None:
        for session in list(self._sessions.values()):
            if doomed(session):
                self.close(session, reason)

    def end_grant(self, grant_id: str) -> None:
        """A grant was revoked: close the sessions its tokens used."""
        self.close_where(lambda s: grant_id in s.grants, "(a grant that used it was revoked)")

    def sweep(self) -> None:
        """Close the sessions unused for ``session_idle_seconds`` (none busy)."""
        limit = self.clock() - self.config.session_idle_seconds
        self.close_where(lambda s: s.busy == 0 and s.last_used < limit, "(idle)")

    async def close_all(self) -> None:
        for session in list(self._sessions.values()):
            self.close(session, "(bastion stops)")
        for task in list(self._closing):
            with contextlib.suppress(Exception):
                await task

    def __len__(self) -> int:
        return len(self._sessions)
