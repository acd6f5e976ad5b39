"""An append-only audit event log stored in bastion's database (SQLite or PostgreSQL).

Each event has a kind (``token.issued``, ``grant.revoked``...), the actor and subject it concerns,
the OAuth client when there is one, and a JSON detail. An event is written in the transaction of
the change it records; a running server then numbers and chains it (`AuditLog.chain`, within a
second), off every request's path, so that writers never wait on one another for it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bastion.audit.chain import Chain, link_rows, next_link, prune_oldest
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
    # The hash chain (`bastion.audit.chain`). Events recorded before it take seq 0: outside
    # the chain (the default, so that no row is rewritten); a new event is written with none
    # (NULL) and numbered and chained by `AuditLog.chain`.
    """
    ALTER TABLE audit_events ADD COLUMN seq BIGINT DEFAULT 0;
    ALTER TABLE audit_events ADD COLUMN prev_hash TEXT;
    ALTER TABLE audit_events ADD COLUMN hash TEXT;
    CREATE UNIQUE INDEX audit_events_seq ON audit_events (seq) WHERE seq > 0;
    CREATE INDEX audit_events_unchained ON audit_events (at, id) WHERE seq IS NULL;
    """,
]
CHAIN = Chain(
    "audit_events",
    ("seq", "id", "at", "kind", "subject", "client_id", "detail"),
    "audit events",
    "bastion:audit_events",
    chained_later=True,
)
# Events numbered and chained per transaction.
CHAIN_BATCH = 5000
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
            "INSERT INTO audit_events (id, at, kind, subject, client_id, detail, seq)"
            " VALUES (?, ?, ?, ?, ?, ?, NULL)",
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

    def chain(self, batch: int = CHAIN_BATCH) -> int:
        """Number and chain the events not chained yet, oldest first, under the chain's lock
        (every replica's turn in one chain); return how many. Those written meanwhile wait for
        the next call. Asks first, without the lock, whether there is any."""
        if not self.db.execute(f"SELECT 1 FROM {CHAIN.table} WHERE seq IS NULL LIMIT 1"):
            return 0
        chained = 0
        while True:
            with self.db.transaction():
                self.db.lock(CHAIN.lock)
                rows = self.db.execute(
                    "SELECT id, at, kind, subject, client_id, detail FROM audit_events"
                    " WHERE seq IS NULL ORDER BY at, id LIMIT ?",
                    (batch,),
                )
                seq, prev_hash = next_link(self.db, CHAIN)
                self.db.executemany(
                    "UPDATE audit_events SET seq = ?, prev_hash = ?, hash = ?"
                    " WHERE id = ? AND seq IS NULL",
                    [(s, p, h, i) for s, i, *_, p, h in link_rows(rows, seq, prev_hash)],
                )
            chained += len(rows)
            if len(rows) < batch:
                return chained

    def prune(self, before: float, batch: int = PRUNE_BATCH) -> int:
        """Delete events recorded before ``before`` (epoch seconds), a batch per statement;
        return how many went. Those not chained yet are chained first; then only the oldest
        chained ones go, never the newest (`bastion.audit.chain.prune_oldest`)."""
        self.chain(batch)
        removed = 0
        while True:
            rows = self.db.execute(
                "DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events"
                " WHERE at < ? AND seq = 0 LIMIT ?) RETURNING id",
                (before, batch),
            )
            removed += len(rows)
            if len(rows) < batch:
                return removed + prune_oldest(self.db, CHAIN, before, batch)
