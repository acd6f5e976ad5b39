"""API keys for the `/v1` API: random, stored only as SHA-256 hashes, with scopes and expiry.

A key reads ``bst_<id>_<secret>``: the id finds the row, the secret (32 random bytes) makes it
unguessable. A plain SHA-256 is enough because the key is high-entropy, not a password: there is
no dictionary to try, so a slow hash would add nothing but latency to every request.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from bastion.audit.log import AuditLog
from bastion.constant_time import same
from bastion.db import Database
from bastion.names import check_new_name

SCOPES = (
    "decide",
    "facts:read",
    "facts:write",
    "policy:read",
    "policy:write",
    # Answer held calls and results (/v1/approvals): for a chat bot or console that has
    # authenticated the person it answers for; never for an agent.
    "approvals",
    # Read the agent registry (/v1/agents: owners, parents, names, purposes, status), and
    # change an agent's owner, name, purpose or parent.
    "agents:read",
    "agents:write",
    # Suspend and resume agents, users and MCP sessions (/v1/suspensions: the kill switch).
    "suspensions",
    # Set, clear and list signals about users, devices, agents and sessions (/v1/signals): for
    # an MDM, a SIEM or a script that reports on them.
    "signals",
    # Read and acknowledge alerts (/v1/alerts, docs/signals.md).
    "alerts",
    # Forget session labels (/v1/labels/clear, docs/delegation.md).
    "labels",
    # Open, list, show and end just-in-time tasks (/v1/tasks, docs/delegation.md): a key sees
    # and ends the tasks it opened; a task's facts only ever grant the task's agent.
    "tasks",
    # See and revoke users' connections to upstream MCP servers (/v1/connections,
    # docs/identity.md); never their tokens.
    "connections",
    # Review and accept the tool definitions of upstreams with pin_tools (/v1/tools,
    # docs/gateway.md, "Tool pins").
    "tools",
    # The AuthZEN Authorization API (/access/v1/...): for a PEP that asks for decisions.
    "authzen",
    # Oso Cloud's API under /api (docs/oso-cloud.md): decisions and reads of facts and policy;
    # fact and policy writes; the SDK's agent events (for_agents), which feed behaviour counters.
    "oso:read",
    "oso:write",
    "oso:events",
    "admin",
)
KEY_PREFIX = "bst_"
# The longest lifetime a key may be given (10 years); longer means no expiry, so leave it out.
MAX_KEY_SECONDS = 10 * 365 * 24 * 3600
# Bounds of the cache of verified keys (`KeyStore.verify`): it is emptied when it holds more
# keys, or more characters of keys, than these. Refused keys are remembered too, and a refused
# key may be as long as a request head allows.
_REMEMBERED_KEYS = 10_000
_REMEMBERED_CHARS = 1 << 20

_MIGRATIONS = [
    """
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        hash TEXT NOT NULL,
        name TEXT NOT NULL,
        scopes TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        created_by TEXT NOT NULL,
        expires_at DOUBLE PRECISION,
        revoked_at DOUBLE PRECISION
    );
    """,
]


class KeyNameError(ValueError):
    """A key's name that is not 1 to 128 printable characters without surrounding spaces: a
    newline in it would forge a line of `bastion keys list`."""


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """What the server knows about a key: never the key itself."""

    id: str
    name: str
    scopes: frozenset[str]
    created_at: float
    created_by: str
    expires_at: float | None = None
    revoked_at: float | None = None

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    @property
    def principal(self) -> str:
        """How writes made with this key are recorded (policy versions, change log)."""
        return f"key:{self.id}:{self.name}"

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "scopes": sorted(self.scopes),
            "created_at": self.created_at,
            "created_by": self.created_by,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
        }


def check_new_key(
    name: str, scopes: list[str] | tuple[str, ...], expires_in: float | None
) -> frozenset[str]:
    """The scopes of a key to be made with ``name`` and ``expires_in``, or the error that names
    what is wrong with them: checked before anything is opened or written."""
    check_new_name(name, "a key's name", KeyNameError)
    scope_set = check_scopes(list(scopes))
    if expires_in is not None and not 0 < expires_in <= MAX_KEY_SECONDS:
        raise ValueError(
            f"expires_in must be a number of seconds greater than 0 and at most"
            f" {MAX_KEY_SECONDS} (10 years), got {expires_in!r}; leave it out for a key"
            " that does not expire"
        )
    return scope_set


def check_scopes(scopes: list[str] | tuple[str, ...]) -> frozenset[str]:
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise ValueError(
            f"unknown scope(s) {', '.join(map(repr, unknown))}; choose from {', '.join(SCOPES)}"
            if unknown
            else f"a key needs at least one scope; choose from {', '.join(SCOPES)}"
        )
    return frozenset(scopes)


class KeyStore:
    """API keys in the shared `Database`."""

    def __init__(
        self, db: Database, *, env_admin_key: str | None = None, cache_seconds: float = 1.0
    ) -> None:
        self.db = db
        # Each key made or revoked is recorded, in the transaction that does it.
        self.audit = AuditLog(db)
        # Verified keys are remembered briefly so decisions do not wait on the database; a
        # revocation therefore reaches every replica within ``cache_seconds`` (an expiry at
        # once: a key is remembered no longer than it lives). By the exact key
        # sent: a key remembered costs a dictionary look-up, not a SHA-256, on every request.
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}
        self._cache_chars = 0
        self._cache_seconds = cache_seconds
        db.migrate("api_keys", _MIGRATIONS)
        self._env_hash = None
        if env_admin_key:
            if len(env_admin_key) < 32:
                raise ValueError(
                    "BASTION_ADMIN_KEY must be at least 32 random characters;"
                    " make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
            self._env_hash = _hash(env_admin_key)

    def create(
        self,
        name: str,
        scopes: list[str] | tuple[str, ...],
        *,
        expires_in: float | None = None,
        created_by: str,
    ) -> tuple[str, ApiKey]:
        """Make a key; return the key (shown once, never stored) and its record. Recorded as
        ``api_key.created`` with ``created_by`` as the actor (never the key)."""
        scope_set = check_new_key(name, scopes, expires_in)
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        now = time.time()
        expires_at = now + expires_in if expires_in else None
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO api_keys (id, hash, name, scopes, created_at, created_by, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    key_id,
                    _hash(key),
                    name,
                    " ".join(sorted(scope_set)),
                    now,
                    created_by,
                    expires_at,
                ),
            )
            self.audit.record(
                "api_key.created",
                key_id=key_id,
                name=name,
                scopes=sorted(scope_set),
                expires_at=expires_at,
                actor=created_by,
            )
        return key, ApiKey(key_id, name, scope_set, now, created_by, expires_at)

    def _row(self, key_id: str) -> tuple | None:
        rows = self.db.execute(
            "SELECT id, hash, name, scopes, created_at, created_by, expires_at, revoked_at"
            " FROM api_keys WHERE id = ?",
            (key_id,),
        )
        return rows[0] if rows else None

    @staticmethod
    def _record(row: tuple) -> ApiKey:
        id_, _hash_, name, scopes, created_at, created_by, expires_at, revoked_at = row
        return ApiKey(
            id_, name, frozenset(scopes.split()), created_at, created_by, expires_at, revoked_at
        )

    def remembered(self, key: str) -> tuple[bool, ApiKey | None]:
        """(True, what `verify` answers) if it answered for this key within the last
        ``cache_seconds``; (False, None) if the database must be asked. Reads no database."""
        hit = self._cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return True, hit[1]
        return False, None

    def verify(self, key: str) -> ApiKey | None:
        """The record of a valid key, or None if unknown, wrong, expired or revoked.

        Raises `DatabaseUnavailable` when the key cannot be checked; that is not remembered.
        """
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        record = self._verify(key)
        if len(self._cache) > _REMEMBERED_KEYS or self._cache_chars > _REMEMBERED_CHARS:
            self._cache.clear()
            self._cache_chars = 0
        if key not in self._cache:
            self._cache_chars += len(key)
        until = now + self._cache_seconds
        if record is not None and record.expires_at is not None:
            # Remembered no longer than it lives: a key verified just before its expiry was
            # accepted for the rest of the cache's lifetime after it.
            until = min(until, now + (record.expires_at - time.time()))
        self._cache[key] = (until, record)
        return record

    def _verify(self, key: str) -> ApiKey | None:
        if self._env_hash is not None and same(_hash(key), self._env_hash):
            return ApiKey("env", "BASTION_ADMIN_KEY", frozenset({"admin"}), 0.0, "environment")
        if not key.startswith(KEY_PREFIX):
            return None
        key_id, _, _secret = key[len(KEY_PREFIX) :].partition("_")
        row = self._row(key_id)
        if row is None or not same(row[1], _hash(key)):
            return None
        record = self._record(row)
        now = time.time()
        if record.revoked_at is not None or (record.expires_at and record.expires_at <= now):
            return None
        return record

    def list(self) -> list[ApiKey]:
        rows = self.db.execute(
            "SELECT id, hash, name, scopes, created_at, created_by, expires_at, revoked_at"
            " FROM api_keys ORDER BY created_at"
        )
        return [self._record(r) for r in rows]

    def revoke(self, key_id: str, *, actor: str) -> bool:
        """Revoke a key at once, recorded as ``api_key.revoked`` with ``actor``; False (nothing
        recorded) if there is no such key or it was already revoked."""
        with self.db.transaction():
            rows = self.db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL"
                " RETURNING name",
                (time.time(), key_id),
            )
            if rows:
                self.audit.record("api_key.revoked", key_id=key_id, name=rows[0][0], actor=actor)
        self._cache.clear()
        self._cache_chars = 0
        return bool(rows)
