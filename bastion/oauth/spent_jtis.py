"""Single-use JWT identifiers (``jti``), shared by every replica through the database: the
client assertions of ``private_key_jwt`` (RFC 7523 §3) and DPoP proofs (RFC 9449 §11.1) are each
accepted once. A ``jti`` is remembered, under the name of whoever signed it, until the JWT it
came in can no longer be accepted anyway; `SpentJtis.forget_expired` then deletes it."""

from __future__ import annotations

from bastion.db import Database

# The table keeps the name it had when client assertions were its only users.
_MIGRATIONS = [
    """
    CREATE TABLE oauth_client_assertions (
        client_id TEXT NOT NULL,
        jti TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (client_id, jti)
    );
    CREATE INDEX oauth_client_assertions_expiry ON oauth_client_assertions (expires_at);
    """
]


class SpentJtis:
    """The ``(signer, jti)`` pairs already used, until they expire."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate("oauth_client_assertions", _MIGRATIONS)

    def use_once(self, signer: str, jti: str, expires_at: float) -> bool:
        """Record ``jti`` of ``signer`` as spent; exactly one caller, on any replica, ever gets
        True. Blocking (a database write): call it from a worker thread."""
        rows = self.db.execute(
            "INSERT INTO oauth_client_assertions (client_id, jti, expires_at) VALUES (?, ?, ?)"
            " ON CONFLICT (client_id, jti) DO NOTHING RETURNING jti",
            (signer, jti, expires_at),
        )
        return bool(rows)

    def forget_expired(self, now: float) -> None:
        """Delete spent jtis whose JWTs can no longer be accepted anyway."""
        self.db.execute("DELETE FROM oauth_client_assertions WHERE expires_at < ?", (now,))
