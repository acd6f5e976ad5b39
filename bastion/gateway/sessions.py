"""Sessions of the 2025-11-25 era: ``Mcp-Session-Id``, bound to the token's user and agent.

A session id is a random 128-bit value. It is only ever found again by the same user, agent and
server that opened it: anyone else gets 404, as for an id that never existed. Each session may
hold one standing GET stream, which receives the upstream's list_changed notifications.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Session:
    id: str
    server: str
    subject: str
    client_id: str
    protocol_version: str
    last_seen: float
    stream: asyncio.Queue[dict[str, Any] | None] | None = None
    closed: bool = False
    _done: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, message: dict[str, Any]) -> None:
        if self.stream is not None:
            self.stream.put_nowait(message)

    def close(self) -> None:
        self.closed = True
        if self.stream is not None:
            self.stream.put_nowait(None)


class SessionTable:
    def __init__(self, idle_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_seconds = idle_seconds
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._last_sweep = 0.0

    def open(self, server: str, subject: str, client_id: str, protocol_version: str) -> Session:
        self._sweep()
        session = Session(
            secrets.token_urlsafe(16), server, subject, client_id, protocol_version, self.clock()
        )
        self._sessions[session.id] = session
        return session

    def find(self, session_id: str, server: str, subject: str, client_id: str) -> Session | None:
        session = self._sessions.get(session_id)
        if (
            session is None
            or session.closed
            or (session.server, session.subject, session.client_id) != (server, subject, client_id)
        ):
            return None
        now = self.clock()
        if now - session.last_seen > self.idle_seconds:
            self.end(session)
            return None
        session.last_seen = now
        return session

    def end(self, session: Session) -> None:
        session.close()
        self._sessions.pop(session.id, None)

    def of_server(self, server: str) -> Iterator[Session]:
        return (s for s in list(self._sessions.values()) if s.server == server)

    def close_all(self) -> None:
        for session in list(self._sessions.values()):
            self.end(session)

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
