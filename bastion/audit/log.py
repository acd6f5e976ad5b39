"""An append-only audit event log stored in bastion's database (SQLite or PostgreSQL).

Each event has a kind (``token.issued``, ``grant.revoked``...), the actor and subject it concerns,
the OAuth client when there is one, and a JSON detail. The gateway adds decision records later.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bastion.db import Database

_MIGRATIONS = [
    """
    CREATE TABLE audit_events (
        id TEXT PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT,
        client_id TEXT,
        detail TEXT NOT NULL
    );
    CREATE INDEX audit_events_kind_at ON audit_events (kind, at);
    """,
    # Retention deletes by age alone.
    """
    CREATE INDEX audit_events_at ON audit_events (at);
    """,
]
# Events deleted per statement when pruning, so other writers wait little for the connection.
PRUNE_BATCH = 5000


@dataclass(frozen=True)
class AuditEvent:
    """One recorded event."""

    id: str
    at: float
    kind: str
    subject: str | None
    client_id: str | None
    detail: dict[str, Any] = field(default_factory=dict)


def _like(text: str) -> str:
    """``text`` matched as itself in a LIKE pattern (escape character ``!``)."""
    return text.replace("!", "!!").replace("%", "!%").replace("_", "!_")


class AuditLog:
    """Writes and reads audit events. Details must never hold secrets (tokens, passwords, keys)."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        db.migrate("audit", _MIGRATIONS)

    def record(
        self,
        kind: str,
        *,
        subject: str | None = None,
        client_id: str | None = None,
        **detail: Any,
    ) -> AuditEvent:
        event = AuditEvent(uuid.uuid4().hex, self.clock(), kind, subject, client_id, detail)
        self.db.execute(
            "INSERT INTO audit_events (id, at, kind, subject, client_id, detail)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                event.id,
                event.at,
                kind,
                subject,
                client_id,
                json.dumps(detail, sort_keys=True, default=str),
            ),
        )
        return event

    def events(
        self,
        kind: str | None = None,
        limit: int = 1000,
        *,
        kind_prefix: str | None = None,
        request_id: str | None = None,
    ) -> list[AuditEvent]:
        """The most recent events first: of one ``kind``, or of the kinds starting with
        ``kind_prefix`` (``approval.``), or about one approval request (``request_id`` in the
        detail)."""
        sql = "SELECT id, at, kind, subject, client_id, detail FROM audit_events"
        where: list[str] = []
        params: list[Any] = []
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        if kind_prefix is not None:
            where.append("kind LIKE ? ESCAPE '!'")
            params.append(_like(kind_prefix) + "%")
        if request_id is not None:
            # The detail is stored as json.dumps(sort_keys=True) writes it; checked again below.
            where.append("detail LIKE ? ESCAPE '!'")
            params.append("%" + _like(json.dumps({"request_id": request_id})[1:-1]) + "%")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY at DESC, id LIMIT ?"
        rows = self.db.execute(sql, (*params, limit))
        found = [AuditEvent(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]
        if request_id is not None:
            found = [e for e in found if e.detail.get("request_id") == request_id]
        return found

    def prune(self, before: float, batch: int = PRUNE_BATCH) -> int:
        """Delete events recorded before ``before`` (epoch seconds), a batch per statement;
        return how many went."""
        removed = 0
        while True:
            rows = self.db.execute(
                "DELETE FROM audit_events WHERE id IN"
                " (SELECT id FROM audit_events WHERE at < ? LIMIT ?) RETURNING id",
                (before, batch),
            )
            removed += len(rows)
            if len(rows) < batch:
                return removed
