"""The durable rows of upstream connections (SQLite or PostgreSQL, `bastion.db`): each user's
sealed tokens per upstream, the connections being made (one row per ``state``), the client
bastion registered with each upstream's authorization server, and the tokens of connections
gone from bastion still to revoke at the server that issued them (an outbox, RFC 7009)."""

from __future__ import annotations

from dataclasses import dataclass

from bastion.audit.log import AuditLog
from bastion.db import Database

_MIGRATIONS = [
    """
    CREATE TABLE upstream_connections (
        subject TEXT NOT NULL,
        upstream TEXT NOT NULL,
        sealed TEXT NOT NULL,
        scope TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        refreshed_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (subject, upstream)
    );
    CREATE INDEX upstream_connections_upstream ON upstream_connections (upstream);
    CREATE TABLE upstream_connection_flows (
        state TEXT PRIMARY KEY,
        subject TEXT NOT NULL,
        upstream TEXT NOT NULL,
        sealed TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE upstream_oauth_clients (
        upstream TEXT NOT NULL,
        issuer TEXT NOT NULL,
        sealed TEXT NOT NULL,
        PRIMARY KEY (upstream, issuer)
    );
    """,
    # Until when one process (replica) refreshes the connection: the others wait for it.
    """
    ALTER TABLE upstream_connections ADD COLUMN refreshing_until DOUBLE PRECISION NOT NULL
        DEFAULT 0;
    """,
    # The revocations still to make: written in the transaction that deletes the connection
    # (its sealed tokens as the row held them), deleted once the server has answered. A process
    # holds a row (``owner``) until ``lease_until``; ``next_at``: when it is due again.
    """
    CREATE TABLE upstream_revocations (
        id TEXT PRIMARY KEY,
        subject TEXT NOT NULL,
        upstream TEXT NOT NULL,
        sealed TEXT NOT NULL,
        actor TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        next_at DOUBLE PRECISION NOT NULL,
        owner TEXT NOT NULL,
        lease_until DOUBLE PRECISION NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        give_up_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX upstream_revocations_due ON upstream_revocations (next_at);
    """,
]


@dataclass(frozen=True, slots=True)
class StoredConnection:
    subject: str
    upstream: str
    sealed: str  # {"access_token", "refresh_token", "issuer"} sealed (`connections.sealing`)
    scope: str
    expires_at: float
    created_at: float
    refreshed_at: float


@dataclass(frozen=True, slots=True)
class StoredFlow:
    state: str
    subject: str
    upstream: str
    sealed: str  # {"verifier", "issuer"} sealed
    created_at: float


@dataclass(frozen=True, slots=True)
class PendingRevocation:
    """The tokens of a connection gone from bastion, still to revoke at their server: one row
    of the outbox, as the process holding it sees it."""

    id: str
    subject: str
    upstream: str
    sealed: str  # the connection's sealed tokens, as its row held them
    actor: str  # who ended the connection (``bastion`` for one it dropped)
    attempts: int  # begun so far, the one this process makes now included
    created_at: float
    give_up_at: float  # not tried after this (`revocation_retry_seconds`)


@dataclass(frozen=True, slots=True)
class RevocationHold:
    """How a revocation enters the outbox with the delete of its connection: ``id``, held by
    ``owner`` (the process that tries it at once) until ``lease_until``, given up at
    ``give_up_at``."""

    id: str
    owner: str
    now: float
    lease_until: float
    give_up_at: float

    def pending(self, row: StoredConnection, actor: str) -> PendingRevocation:
        return PendingRevocation(
            self.id, row.subject, row.upstream, row.sealed, actor, 1, self.now, self.give_up_at
        )


_COLUMNS = "subject, upstream, sealed, scope, expires_at, created_at, refreshed_at"
_REVOCATION_COLUMNS = "id, subject, upstream, sealed, actor, attempts, created_at, give_up_at"


class ConnectionStore:
    """Blocking: call it from a worker thread."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate("upstream_connections", _MIGRATIONS)

    # -- connections -----------------------------------------------------------------------------

    def get(self, subject: str, upstream: str) -> StoredConnection | None:
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM upstream_connections WHERE subject = ? AND upstream = ?",
            (subject, upstream),
        )
        return StoredConnection(*rows[0]) if rows else None

    def holds_connections(self) -> bool:
        """Whether any connection is stored (sealed under the connection keys)."""
        return bool(self.db.execute("SELECT 1 FROM upstream_connections LIMIT 1"))

    def listed(self, subject: str | None = None, upstream: str | None = None, limit: int = 1000):
        where, params = [], []
        if subject is not None:
            where.append("subject = ?")
            params.append(subject)
        if upstream is not None:
            where.append("upstream = ?")
            params.append(upstream)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM upstream_connections{clause}"
            " ORDER BY subject, upstream LIMIT ?",
            (*params, limit),
        )
        return [StoredConnection(*row) for row in rows]

    def put(self, connection: StoredConnection) -> None:
        """Keep a new connection (a finished flow), in place of any the user had."""
        self.db.execute(
            f"INSERT INTO upstream_connections ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (subject, upstream) DO UPDATE SET sealed = excluded.sealed,"
            " scope = excluded.scope, expires_at = excluded.expires_at,"
            " created_at = excluded.created_at, refreshed_at = excluded.refreshed_at,"
            " refreshing_until = 0",
            (
                connection.subject,
                connection.upstream,
                connection.sealed,
                connection.scope,
                connection.expires_at,
                connection.created_at,
                connection.refreshed_at,
            ),
        )

    def replace(self, old: StoredConnection, new: StoredConnection, refreshed: bool = True) -> bool:
        """Put ``new`` (a refresh, or the same tokens sealed again) in place of ``old``, only if
        the row still holds ``old``'s sealed tokens: False, and nothing written, if it was
        revoked, connected again, refreshed or re-sealed meanwhile (here or on another
        replica). A sealed value is never made twice (Fernet draws a fresh IV each time).
        ``refreshed``: ``new`` is a refresh's, which ends the claim on the row's refresh (the
        same tokens sealed again leave a refresh under way claimed)."""
        return bool(
            self.db.execute(
                "UPDATE upstream_connections SET sealed = ?, scope = ?, expires_at = ?,"
                f" refreshed_at = ?{', refreshing_until = 0' if refreshed else ''}"
                " WHERE subject = ? AND upstream = ? AND sealed = ?"
                " RETURNING subject",
                (
                    new.sealed,
                    new.scope,
                    new.expires_at,
                    new.refreshed_at,
                    old.subject,
                    old.upstream,
                    old.sealed,
                ),
                read=False,
            )
        )

    def claim_refresh(self, row: StoredConnection, now: float, until: float) -> bool:
        """Whether this process is the one to refresh ``row`` (until ``until``): the row still
        holds its sealed tokens and no process claimed their refresh beyond ``now``. One
        statement: of two replicas claiming at once, one gets it."""
        return bool(
            self.db.execute(
                "UPDATE upstream_connections SET refreshing_until = ?"
                " WHERE subject = ? AND upstream = ? AND sealed = ? AND refreshing_until <= ?"
                " RETURNING subject",
                (until, row.subject, row.upstream, row.sealed, now),
                read=False,
            )
        )

    def release_refresh(self, row: StoredConnection) -> None:
        """End this process's claim on ``row``'s refresh (nothing if the row has moved on)."""
        self.db.execute(
            "UPDATE upstream_connections SET refreshing_until = 0"
            " WHERE subject = ? AND upstream = ? AND sealed = ?",
            (row.subject, row.upstream, row.sealed),
        )

    def delete(
        self, subject: str, upstream: str, sealed: str | None = None
    ) -> StoredConnection | None:
        """Delete the connection, and return it (None if there was none). With ``sealed``, only
        if the row still holds those sealed tokens (a connection made or refreshed meanwhile
        is kept). One statement: of two deletes at once, on any replicas, one gets the row."""
        only = " AND sealed = ?" if sealed is not None else ""
        rows = self.db.execute(
            f"DELETE FROM upstream_connections WHERE subject = ? AND upstream = ?{only}"
            f" RETURNING {_COLUMNS}",
            (subject, upstream) if sealed is None else (subject, upstream, sealed),
            read=False,
        )
        return StoredConnection(*rows[0]) if rows else None

    def drop(self, row: StoredConnection, reason: str, hold: RevocationHold | None = None) -> bool:
        """Delete ``row``, a connection that can no longer be used (its refresh refused, its
        authorization server no longer the upstream's), only if it still holds its sealed
        tokens, and in the same transaction record ``connection.dropped`` with ``reason``
        (nothing recorded for a row revoked, connected again or refreshed meanwhile) and, with
        ``hold``, put its tokens in the revocations' outbox (actor ``bastion``)."""
        with self.db.transaction():
            gone = self.delete(row.subject, row.upstream, row.sealed)
            if gone is not None:
                AuditLog(self.db).record(
                    "connection.dropped", subject=row.subject, upstream=row.upstream, reason=reason
                )
                if hold is not None:
                    self._add_revocation(hold.pending(gone, "bastion"), hold)
        return gone is not None

    def revoke(
        self, subject: str, upstream: str, actor: str, hold: RevocationHold | None = None
    ) -> StoredConnection | None:
        """Delete the connection as `delete` does and, in the same transaction, record
        ``connection.revoked`` naming ``actor`` and, with ``hold``, put its tokens in the
        revocations' outbox; None (nothing recorded or kept) if there was none."""
        with self.db.transaction():
            row = self.delete(subject, upstream)
            if row is not None:
                AuditLog(self.db).record(
                    "connection.revoked", subject=subject, upstream=upstream, actor=actor
                )
                if hold is not None:
                    self._add_revocation(hold.pending(row, actor), hold)
        return row

    # -- the revocations' outbox -----------------------------------------------------------------

    def _add_revocation(self, pending: PendingRevocation, hold: RevocationHold) -> None:
        self.db.execute(
            f"INSERT INTO upstream_revocations ({_REVOCATION_COLUMNS}, next_at, owner,"
            " lease_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                pending.id,
                pending.subject,
                pending.upstream,
                pending.sealed,
                pending.actor,
                pending.attempts,
                pending.created_at,
                pending.give_up_at,
                hold.now,
                hold.owner,
                hold.lease_until,
            ),
        )

    def revocations(self, subject: str | None = None) -> list[PendingRevocation]:
        """The revocations still to make (``subject``'s only, if given), oldest first."""
        clause, params = (" WHERE subject = ?", (subject,)) if subject is not None else ("", ())
        rows = self.db.execute(
            f"SELECT {_REVOCATION_COLUMNS} FROM upstream_revocations{clause}"
            " ORDER BY created_at, id",
            params,
        )
        return [PendingRevocation(*row) for row in rows]

    def claim_revocations(
        self, upstreams: list[str], owner: str, now: float, lease_until: float, limit: int
    ) -> list[PendingRevocation]:
        """Take up to ``limit`` revocations of ``upstreams`` that are due and that no process
        holds (nor gave up on), soonest due first, for ``owner`` until ``lease_until``; each
        taken counts one attempt more. Of two processes claiming at once, one gets each row."""
        if not upstreams:
            return []
        marks = ", ".join("?" for _ in upstreams)
        with self.db.transaction():
            due = self.db.execute(
                "SELECT id FROM upstream_revocations WHERE next_at <= ? AND lease_until <= ?"
                f" AND give_up_at > ? AND upstream IN ({marks}) ORDER BY next_at LIMIT ?",
                (now, now, now, *upstreams, limit),
            )
            claimed = []
            for (revocation_id,) in due:
                taken = self.db.execute(
                    "UPDATE upstream_revocations SET owner = ?, lease_until = ?,"
                    " attempts = attempts + 1 WHERE id = ? AND lease_until <= ?"
                    f" RETURNING {_REVOCATION_COLUMNS}",
                    (owner, lease_until, revocation_id, now),
                )
                claimed.extend(PendingRevocation(*row) for row in taken)
        return claimed

    def finish_revocation(self, pending: PendingRevocation, owner: str, **recorded: object) -> bool:
        """Delete ``pending`` (done, refused for good, or given up) and record
        ``connection.upstream_revocation`` with ``recorded``, in one transaction; False, and
        nothing recorded, if ``owner`` no longer holds it (another process took it over)."""
        with self.db.transaction():
            held = self.db.execute(
                "DELETE FROM upstream_revocations WHERE id = ? AND owner = ? RETURNING id",
                (pending.id, owner),
            )
            if held:
                self._record_revocation(pending, recorded)
        return bool(held)

    def retry_revocation(
        self, pending: PendingRevocation, owner: str, next_at: float, **recorded: object
    ) -> bool:
        """Let ``pending`` go until ``next_at`` (any process may take it then) and record
        ``connection.upstream_revocation`` with ``recorded``; False as `finish_revocation`."""
        with self.db.transaction():
            held = self.db.execute(
                "UPDATE upstream_revocations SET next_at = ?, owner = '', lease_until = 0"
                " WHERE id = ? AND owner = ? RETURNING id",
                (next_at, pending.id, owner),
            )
            if held:
                self._record_revocation(pending, recorded)
        return bool(held)

    def give_up_revocations(self, now: float, why: str, limit: int) -> list[PendingRevocation]:
        """Delete up to ``limit`` revocations no process holds whose time ran out
        (``give_up_at``), whatever their upstream (one no longer configured included), each
        recorded failed with ``why``, in one transaction; one statement, so of two processes
        at once one deletes each."""
        with self.db.transaction():
            rows = self.db.execute(
                "DELETE FROM upstream_revocations WHERE id IN (SELECT id FROM"
                " upstream_revocations WHERE give_up_at <= ? AND lease_until <= ? LIMIT ?)"
                f" AND lease_until <= ? RETURNING {_REVOCATION_COLUMNS}",
                (now, now, limit, now),
            )
            gone = [PendingRevocation(*row) for row in rows]
            for pending in gone:
                self._record_revocation(
                    pending, {"outcome": f"failed: {why}", "attempts": pending.attempts}
                )
        return gone

    def release_revocations(self, owner: str) -> int:
        """Let every revocation ``owner`` holds go, for any process to take at once (a process
        stopping); how many."""
        rows = self.db.execute(
            "UPDATE upstream_revocations SET owner = '', lease_until = 0 WHERE owner = ?"
            " RETURNING id",
            (owner,),
        )
        return len(rows)

    def reseal_revocation(self, pending: PendingRevocation, sealed: str) -> bool:
        """Put ``sealed`` (the same tokens sealed again) in place of ``pending``'s, if the row is
        still there with them."""
        return bool(
            self.db.execute(
                "UPDATE upstream_revocations SET sealed = ? WHERE id = ? AND sealed = ?"
                " RETURNING id",
                (sealed, pending.id, pending.sealed),
            )
        )

    def _record_revocation(self, pending: PendingRevocation, recorded: dict) -> None:
        AuditLog(self.db).record(
            "connection.upstream_revocation",
            subject=pending.subject,
            upstream=pending.upstream,
            actor=pending.actor,
            **recorded,
        )

    # -- connections being made ------------------------------------------------------------------

    def add_flow(self, flow: StoredFlow, older_than: float) -> None:
        with self.db.transaction():
            # Flows nobody finished are forgotten as new ones start.
            self.db.execute(
                "DELETE FROM upstream_connection_flows WHERE created_at < ?", (older_than,)
            )
            self.db.execute(
                "INSERT INTO upstream_connection_flows (state, subject, upstream, sealed,"
                " created_at) VALUES (?, ?, ?, ?, ?)",
                (flow.state, flow.subject, flow.upstream, flow.sealed, flow.created_at),
            )

    def flows(self) -> list[StoredFlow]:
        """The connections being made (those nobody finished included, until the next start
        forgets them)."""
        rows = self.db.execute(
            "SELECT state, subject, upstream, sealed, created_at FROM upstream_connection_flows"
            " ORDER BY created_at, state"
        )
        return [StoredFlow(*row) for row in rows]

    def reseal_flow(self, flow: StoredFlow, sealed: str) -> bool:
        """Put ``sealed`` (the same value sealed again) in place of ``flow``'s, if the flow is
        still there with it (not taken meanwhile)."""
        return bool(
            self.db.execute(
                "UPDATE upstream_connection_flows SET sealed = ? WHERE state = ? AND sealed = ?"
                " RETURNING state",
                (sealed, flow.state, flow.sealed),
            )
        )

    def take_flow(self, state: str) -> StoredFlow | None:
        """The flow of ``state``, removed as it is read: a state is used once, and of two
        replicas taking it at once exactly one gets it."""
        rows = self.db.execute(
            "DELETE FROM upstream_connection_flows WHERE state = ?"
            " RETURNING state, subject, upstream, sealed, created_at",
            (state,),
            read=False,
        )
        return StoredFlow(*rows[0]) if rows else None

    # -- the clients bastion registered (RFC 7591) ---------------------------------------------

    def client(self, upstream: str, issuer: str) -> str | None:
        rows = self.db.execute(
            "SELECT sealed FROM upstream_oauth_clients WHERE upstream = ? AND issuer = ?",
            (upstream, issuer),
        )
        return rows[0][0] if rows else None

    def clients(self) -> list[tuple[str, str, str]]:
        """Every registration kept: (upstream, issuer, sealed)."""
        rows = self.db.execute(
            "SELECT upstream, issuer, sealed FROM upstream_oauth_clients ORDER BY upstream, issuer"
        )
        return [(upstream, issuer, sealed) for upstream, issuer, sealed in rows]

    def add_client(
        self, upstream: str, issuer: str, sealed: str, replacing: str | None = None
    ) -> str:
        """Keep the first registration of (upstream, issuer), or the one that replaces
        ``replacing`` (made for another redirect URI); return the one kept (two replicas may
        register at once: both use the first)."""
        if replacing is None:
            self.db.execute(
                "INSERT INTO upstream_oauth_clients (upstream, issuer, sealed) VALUES (?, ?, ?)"
                " ON CONFLICT (upstream, issuer) DO NOTHING",
                (upstream, issuer, sealed),
            )
        else:
            self.db.execute(
                "UPDATE upstream_oauth_clients SET sealed = ?"
                " WHERE upstream = ? AND issuer = ? AND sealed = ?",
                (sealed, upstream, issuer, replacing),
            )
        return self.client(upstream, issuer) or sealed
