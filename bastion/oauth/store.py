"""Persistent state of the authorization server: clients, users, consents, pending authorization
requests, backchannel (CIBA) requests, login sessions, codes, grants, refresh tokens, issued
access tokens and signing keys.

Secrets (codes, refresh tokens, session ids, client secrets, CIBA auth_req_ids) are stored only as
SHA-256 digests: they are high-entropy random strings, so a digest is enough and a database leak
reveals none. Every revocation of an access token or a grant, every user disabled and every
revocation of all of a user's grants is announced, in its transaction, on `REVOCATIONS_CHANNEL`
(PostgreSQL NOTIFY) and, once committed, to this process's subscribers. Every change an
administrator (or the server) makes here is recorded in the audit log, in the transaction that makes
it, naming the ``actor`` (`bastion.audit.actor`).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from bastion.agents.identity import owned
from bastion.audit.actor import SERVER
from bastion.audit.log import AuditLog
from bastion.db import Database, ensure_listener_marks, prune_rows
from bastion.facts.store import FactStore
from bastion.oauth.sign_in_context import UNKNOWN, SignInContext

# The payload of each notification is the grant_id whose tokens (all, or one) were revoked, or
# `USERS_CHANGED` when a user's standing changed: disabled, or all their grants revoked (a grant
# id never holds a colon).
REVOCATIONS_CHANNEL = "bastion_revocations"
USERS_CHANGED = ":users"

_MIGRATIONS = [
    """
    CREATE TABLE oauth_clients (
        client_id TEXT PRIMARY KEY,
        secret_digest TEXT,
        client_name TEXT NOT NULL,
        redirect_uris TEXT NOT NULL,
        grant_types TEXT NOT NULL,
        token_endpoint_auth_method TEXT NOT NULL,
        scope TEXT,
        source TEXT NOT NULL,
        may_introspect INTEGER NOT NULL DEFAULT 0,
        metadata TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION
    );
    CREATE TABLE oauth_users (
        username TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        disabled_at DOUBLE PRECISION
    );
    CREATE TABLE oauth_consents (
        username TEXT NOT NULL,
        client_id TEXT NOT NULL,
        resource TEXT NOT NULL,
        scope TEXT NOT NULL,
        granted_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (username, client_id, resource)
    );
    CREATE TABLE oauth_pending_authorizations (
        request_id TEXT PRIMARY KEY,
        browser_digest TEXT NOT NULL,
        csrf_token TEXT NOT NULL,
        client_id TEXT NOT NULL,
        redirect_uri TEXT NOT NULL,
        state TEXT,
        resource TEXT NOT NULL,
        scope TEXT NOT NULL,
        code_challenge TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE oauth_sessions (
        session_digest TEXT PRIMARY KEY,
        username TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE oauth_grants (
        grant_id TEXT PRIMARY KEY,
        client_id TEXT NOT NULL,
        username TEXT,
        resource TEXT NOT NULL,
        scope TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION,
        revoked_reason TEXT
    );
    CREATE TABLE oauth_codes (
        code_digest TEXT PRIMARY KEY,
        grant_id TEXT NOT NULL REFERENCES oauth_grants (grant_id),
        redirect_uri TEXT NOT NULL,
        code_challenge TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        used_at DOUBLE PRECISION
    );
    CREATE TABLE oauth_refresh_tokens (
        token_digest TEXT PRIMARY KEY,
        grant_id TEXT NOT NULL REFERENCES oauth_grants (grant_id),
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        used_at DOUBLE PRECISION
    );
    CREATE INDEX oauth_refresh_tokens_grant ON oauth_refresh_tokens (grant_id);
    CREATE TABLE oauth_access_tokens (
        jti TEXT PRIMARY KEY,
        grant_id TEXT NOT NULL REFERENCES oauth_grants (grant_id),
        expires_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION
    );
    CREATE INDEX oauth_access_tokens_grant ON oauth_access_tokens (grant_id);
    CREATE TABLE oauth_signing_keys (
        kid TEXT PRIMARY KEY,
        public_jwk TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        retired_at DOUBLE PRECISION
    );
    """,
    # Login throttling: failure counters shared by every process on the database, and the
    # sign-in attempts each pending authorization request has used.
    """
    CREATE TABLE oauth_login_failures (
        counter TEXT PRIMARY KEY,
        failures INTEGER NOT NULL,
        last_failure_at DOUBLE PRECISION NOT NULL
    );
    ALTER TABLE oauth_pending_authorizations ADD COLUMN login_attempts INTEGER NOT NULL DEFAULT 0;
    """,
    # Open registration: who registered each client without an initial access token, to limit
    # registrations per address and to expire the clients that never got a grant.
    """
    CREATE TABLE oauth_open_registrations (
        client_id TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        registered_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX oauth_open_registrations_address
        ON oauth_open_registrations (address, registered_at);
    CREATE INDEX oauth_grants_client ON oauth_grants (client_id);
    """,
    # OpenID CIBA (poll mode): requests a client made for a person, waiting for their answer.
    """
    CREATE TABLE oauth_backchannel_requests (
        auth_req_digest TEXT PRIMARY KEY,
        request_id TEXT NOT NULL UNIQUE,
        client_id TEXT NOT NULL,
        username TEXT NOT NULL,
        resource TEXT NOT NULL,
        scope TEXT NOT NULL,
        binding_message TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        interval_seconds INTEGER NOT NULL,
        last_polled_at DOUBLE PRECISION NOT NULL,
        status TEXT NOT NULL,
        answered_at DOUBLE PRECISION,
        grant_id TEXT
    );
    CREATE INDEX oauth_backchannel_requests_user ON oauth_backchannel_requests (username, status);
    CREATE INDEX oauth_backchannel_requests_client
        ON oauth_backchannel_requests (client_id, status);
    """,
    # When the person typed their password (OpenID Connect ``auth_time``): kept with the login
    # session, and with each grant made from it, so access tokens carry it (step-up on risk).
    """
    ALTER TABLE oauth_sessions ADD COLUMN authenticated_at DOUBLE PRECISION;
    ALTER TABLE oauth_grants ADD COLUMN auth_time DOUBLE PRECISION;
    """,
    # Token exchange (RFC 8693): a delegated token's grant is a child of the grant of the token
    # it was exchanged from, so revoking a grant revokes every delegation made from it.
    """
    ALTER TABLE oauth_grants ADD COLUMN parent_grant_id TEXT;
    CREATE INDEX oauth_grants_parent ON oauth_grants (parent_grant_id);
    """,
    # When every grant of a user was last revoked (a Shared Signals session-revoked, say): a
    # grant that rests on a sign-in, an approval or an assertion from before then is refused,
    # so one being made while the revocation ran does not outlive it. Kept for any name, also
    # for an identity provider's users that are not rows of oauth_users.
    """
    CREATE TABLE oauth_user_revocations (
        username TEXT PRIMARY KEY,
        revoked_at DOUBLE PRECISION NOT NULL
    );
    """,
    # Each access token as issued: the SHA-256 of the token, so one signed with a stolen key
    # under a live jti but with other claims is refused, and the kid of the key that signed it,
    # so retiring a key revokes its tokens. NULL in the rows of tokens issued before.
    """
    ALTER TABLE oauth_access_tokens ADD COLUMN token_digest TEXT;
    ALTER TABLE oauth_access_tokens ADD COLUMN kid TEXT;
    CREATE INDEX oauth_access_tokens_kid ON oauth_access_tokens (kid);
    """,
    # Token exchange: the access token a delegated grant was exchanged from (its jti), so that
    # revoking that token alone (RFC 7009) revokes the delegations made from it.
    """
    ALTER TABLE oauth_grants ADD COLUMN parent_jti TEXT;
    CREATE INDEX oauth_grants_parent_jti ON oauth_grants (parent_jti);
    """,
    # A remembered consent answers only at the redirect URI it was given at (RFC 8252 §8.6).
    # Those remembered before named none, so could answer at any: they are forgotten, and each
    # person is asked once more (docs/oauth.md, "Remembered consent").
    """
    DROP TABLE oauth_consents;
    CREATE TABLE oauth_consents (
        username TEXT NOT NULL,
        client_id TEXT NOT NULL,
        resource TEXT NOT NULL,
        redirect_uri TEXT NOT NULL,
        scope TEXT NOT NULL,
        granted_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (username, client_id, resource, redirect_uri)
    );
    """,
    # The max_age (or prompt=login) of a pending request, asked of the identity provider a
    # person signs in through for it.
    "ALTER TABLE oauth_pending_authorizations ADD COLUMN max_age INTEGER;",
    # How the person signed in (OpenID Connect ``acr`` and ``amr``, `bastion.oauth.sign_in_context`):
    # kept with the login session and each grant made from it, as ``auth_time`` is, so access
    # tokens carry them. ``amr`` as JSON text. NULL in the rows from before: their tokens carry
    # neither, and a policy sees neither.
    """
    ALTER TABLE oauth_sessions ADD COLUMN acr TEXT;
    ALTER TABLE oauth_sessions ADD COLUMN amr TEXT;
    ALTER TABLE oauth_grants ADD COLUMN acr TEXT;
    ALTER TABLE oauth_grants ADD COLUMN amr TEXT;
    """,
    # The protected resources an introspecting client (a resource server) introspects for, as
    # JSON (`Client.introspection_resources`; NULL: it may not introspect): a token meant for
    # none of them is answered as an unknown one (RFC 7662 §4). The clients allowed before
    # keep every resource ("*"), marked so that `bastion clients show` tells to narrow them.
    """
    ALTER TABLE oauth_clients ADD COLUMN introspection_resources TEXT;
    ALTER TABLE oauth_clients ADD COLUMN introspection_kept_at_upgrade INTEGER NOT NULL DEFAULT 0;
    UPDATE oauth_clients SET introspection_resources = '["*"]', introspection_kept_at_upgrade = 1
        WHERE may_introspect = 1;
    """,
    # OpenID CIBA: when and how the person who answered a request signed in (the login session
    # they answered from), so that its grant rests on that sign-in, as a consent's does, and
    # its tokens carry it. NULL in the rows answered before: as a legacy session, older than any
    # revocation of all the user's grants, and their tokens carry none of it.
    """
    ALTER TABLE oauth_backchannel_requests ADD COLUMN auth_time DOUBLE PRECISION;
    ALTER TABLE oauth_backchannel_requests ADD COLUMN acr TEXT;
    ALTER TABLE oauth_backchannel_requests ADD COLUMN amr TEXT;
    """,
]


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


class KeyRetirementRefused(ValueError):
    """A signing key that may not be retired (nothing was changed): the message says why and
    what to do instead."""


class GrantRefused(Exception):
    """A grant that may not be made (nothing was saved); the message says why, for the person
    or the client: its user is disabled or unknown, their grants were revoked after the
    authorization it rests on, or the grant it would be delegated from is revoked."""


class ClientRevoked(GrantRefused):
    """A grant refused because its client is revoked (in a token exchange: the actor's)."""


@dataclass(frozen=True)
class Client:
    client_id: str
    client_name: str
    redirect_uris: tuple[str, ...]
    grant_types: tuple[str, ...]
    token_endpoint_auth_method: str
    scope: str | None
    source: str  # "dynamic" (RFC 7591), "metadata_document", or "admin"
    metadata: dict
    created_at: float
    revoked_at: float | None
    secret_digest: str | None = None
    # The protected resources (their configured URIs, or `ALL_RESOURCES` alone) whose tokens
    # this client may introspect (`bastion.oauth.introspection`); none: it may not introspect.
    introspection_resources: tuple[str, ...] = ()
    # Allowed to introspect before the binding existed, and so given every resource by the
    # upgrade rather than by an administrator (`bastion clients show` says to narrow it).
    introspection_kept_at_upgrade: bool = False

    @property
    def is_public(self) -> bool:
        return self.token_endpoint_auth_method == "none"

    @property
    def may_introspect(self) -> bool:
        return bool(self.introspection_resources)

    @property
    def vouched_for(self) -> bool:
        """Whether the deployment vouches for the client (an administrator registered it);
        anyone may register a client, or publish a metadata document, with any name and
        redirect URI."""
        return self.source == "admin"


@dataclass(frozen=True)
class OpenRegistrationRefusal:
    """Why an open registration was not saved: ``limit`` is "address" (too many from it in the
    window) or "unused" (too many open clients without a grant); ``oldest`` is when the oldest
    of the ``count`` registrations that fill it was made."""

    limit: str
    count: int
    oldest: float


@dataclass(frozen=True)
class PendingAuthorization:
    """A validated /authorize request waiting for the person to log in and consent."""

    request_id: str
    browser_digest: str
    csrf_token: str
    client_id: str
    redirect_uri: str
    state: str | None
    resource: str
    scope: str
    code_challenge: str
    expires_at: float
    # The most seconds since the person signed in that the client accepts (OpenID Connect Core
    # 1.0 §3.1.2.1 ``max_age``; 0 for ``prompt=login``); None: any. A login through an identity
    # provider asks the provider for it (`bastion.identity.oidc_login`).
    max_age: int | None = None


@dataclass(frozen=True)
class BackchannelRequest:
    """A CIBA request a client made for a person (OpenID CIBA Core 1.0 §7): what it asks for,
    and where it stands. ``status`` is "pending", "approved", "denied" or "issued" (its token
    was delivered: the auth_req_id is spent). ``request_id`` names it on the person's page; the
    auth_req_id, the client's secret, is kept only as a digest."""

    request_id: str
    client_id: str
    username: str
    resource: str
    scope: str
    binding_message: str | None
    created_at: float
    expires_at: float
    interval_seconds: int
    status: str
    answered_at: float | None
    grant_id: str | None
    # When and how the person who answered signed in (the login session they answered from;
    # None and unknown until answered, or for a session from before bastion kept them): the
    # grant rests on that sign-in, as one made at the consent page does, and its tokens say so.
    auth_time: float | None = None
    sign_in: SignInContext = UNKNOWN


@dataclass(frozen=True)
class Grant:
    """One authorization a person (or a client acting as itself) gave: the root every code,
    refresh token and access token hangs from, so revoking it revokes them all."""

    grant_id: str
    client_id: str
    username: str | None
    resource: str
    scope: str
    created_at: float
    expires_at: float
    revoked_at: float | None
    # When the person authenticated (their password) for this grant; None for a client acting
    # as itself, or a grant made before bastion kept it.
    auth_time: float | None = None
    # The grant this one was delegated from by token exchange (RFC 8693); None for a root.
    parent_grant_id: str | None = None
    # The access token (its jti) it was exchanged from: revoking that token revokes this grant.
    parent_jti: str | None = None
    # How the person signed in for it (``acr``, ``amr``), as ``auth_time``: every token of the
    # grant, refreshed or exchanged, carries these, never others.
    sign_in: SignInContext = UNKNOWN


@dataclass(frozen=True)
class SessionLogin:
    """A live login session: whose, when they signed in (None for a session from before bastion
    kept it) and how (`SignInContext`; unknown for a session from before bastion kept it)."""

    username: str
    authenticated_at: float | None
    sign_in: SignInContext = UNKNOWN


@dataclass(frozen=True)
class AccessTokenState:
    """What the store holds of an issued access token."""

    grant_id: str
    revoked: bool  # the token, or its grant
    expires_at: float
    # SHA-256 (hex) of the token as issued; None for a token issued before bastion kept it.
    token_digest: str | None


@dataclass(frozen=True)
class UserStanding:
    """What bastion holds against a user, for the tokens that rest on no grant of its own (a
    trusted issuer's, docs/identity.md): whether they are one of bastion's users and disabled,
    and when all their grants were last revoked (None: never), for any name; and whether the
    name is a client's id, which names no user (`OAuthStore.user_name_problem`)."""

    disabled: bool
    revoked_at: float | None
    client: bool = False
    # Whether the name is one of bastion's users (local, or made at a provider's first login):
    # then no agent acting as itself may bear it (`TrustedIssuers`).
    person: bool = False

    def refusal(self, username: str, issued_at: float) -> tuple[str, str] | None:
        """(check, reason) refusing a token of ``username`` issued at ``issued_at``, or None:
        the user is disabled, or the token was issued at or before the revocation, or the name
        is a client's id."""
        if self.client:
            return "claims", f"the user {_named_like_a_client(username)}"
        if self.disabled:
            return "disabled", f"user {username!r} is disabled in bastion"
        if self.revoked_at is not None and issued_at <= self.revoked_at:
            return "revoked", (
                f"every grant of user {username!r} was revoked after this token was issued"
                " (iat): the user must sign in again"
            )
        return None


def _named_like_a_client(username: str) -> str:
    return f"{username!r} is the id of a client: it cannot name a user"


_CLIENT_COLUMNS = (
    "client_id, client_name, redirect_uris, grant_types, token_endpoint_auth_method, scope,"
    " source, may_introspect, metadata, created_at, revoked_at, secret_digest,"
    " introspection_resources, introspection_kept_at_upgrade"
)
# The live grants delegated, at any depth, from a grant (through revoked ones too).
_LIVE_DELEGATIONS = (
    "WITH RECURSIVE tree (grant_id) AS (SELECT grant_id FROM oauth_grants"
    " WHERE parent_grant_id = ? UNION SELECT g.grant_id FROM oauth_grants g"
    " JOIN tree t ON g.parent_grant_id = t.grant_id) SELECT t.grant_id FROM tree t"
    " JOIN oauth_grants g ON g.grant_id = t.grant_id WHERE g.revoked_at IS NULL"
)
_BACKCHANNEL_COLUMNS = (
    "request_id, client_id, username, resource, scope, binding_message, created_at, expires_at,"
    " interval_seconds, status, answered_at, grant_id, auth_time, acr, amr"
)
_GRANT_COLUMNS = (
    "grant_id, client_id, username, resource, scope, created_at, expires_at, revoked_at, auth_time,"
    " parent_grant_id, parent_jti, acr, amr"
)


def _grant(row: tuple) -> Grant:
    return Grant(*row[:11], sign_in=SignInContext.from_stored(row[11], row[12]))


def _backchannel(row: tuple) -> BackchannelRequest:
    return BackchannelRequest(*row[:13], sign_in=SignInContext.from_stored(row[13], row[14]))


def _client(row: tuple) -> Client:
    return Client(
        client_id=row[0],
        client_name=row[1],
        redirect_uris=tuple(json.loads(row[2])),
        grant_types=tuple(json.loads(row[3])),
        token_endpoint_auth_method=row[4],
        scope=row[5],
        source=row[6],
        # row[7], may_introspect, is kept equal to bool(introspection_resources), as before
        # the binding; the binding alone decides.
        metadata=json.loads(row[8]),
        created_at=row[9],
        revoked_at=row[10],
        secret_digest=row[11],
        introspection_resources=tuple(json.loads(row[12])) if row[12] else (),
        introspection_kept_at_upgrade=bool(row[13]),
    )


def _introspection_json(resources: tuple[str, ...]) -> str | None:
    return json.dumps(list(resources)) if resources else None


def prune_grants(db: Database, before: float) -> dict[str, int]:
    """Delete the grants that expired, and any revocation of them, before ``before``, once no
    code, refresh token, access token or delegated grant hangs from them (the audit retention,
    `bastion.audit.retention`; housekeeping deletes those first, `OAuthStore.purge_expired`).
    A person's grant is the record of their consent, kept as long as the audit trail; a new
    grant is made for every authorization, CIBA answer and ID-JAG, so kept for ever they grow
    without end. A self-registered client whose grants are all gone is then unused
    (`OAuthStore.forget_unused_clients`)."""
    return prune_rows(
        db,
        "oauth",
        "oauth_grants",
        "grant_id",
        "expires_at < ? AND COALESCE(revoked_at, 0) < ?"
        + "".join(
            f" AND NOT EXISTS (SELECT 1 FROM {table} t WHERE t.{column} = oauth_grants.grant_id)"
            for table, column in (
                ("oauth_codes", "grant_id"),
                ("oauth_refresh_tokens", "grant_id"),
                ("oauth_access_tokens", "grant_id"),
                ("oauth_grants", "parent_grant_id"),
            )
        ),
        (before, before),
    )


class OAuthStore:
    """Data access for the authorization server; one method per thing it needs to know or do."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self._revocation_subscribers: list[Callable[[str], None]] = []
        db.migrate("oauth", _MIGRATIONS)
        ensure_listener_marks(db)
        # The record of each change made here, written in the change's own transaction.
        self.audit = AuditLog(db, clock)

    # revocations: who must forget a token at once

    def on_revoked(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(grant_id)`` after each commit, through this store, that revokes an
        access token of the grant or the grant itself, and ``callback(USERS_CHANGED)`` after
        one that disables a user or revokes all their grants (other processes hear of both by
        NOTIFY)."""
        self._revocation_subscribers.append(callback)

    def off_revoked(self, callback: Callable[[str], None]) -> None:
        """Stop calling ``callback`` (a closed subscriber)."""
        if callback in self._revocation_subscribers:
            self._revocation_subscribers.remove(callback)

    def _announce_revocation(self, payload: str) -> None:
        """Inside the revoking transaction: NOTIFY at its commit, and tell subscribers after.
        ``payload`` is a grant_id, or `USERS_CHANGED`."""
        self.db.notify(REVOCATIONS_CHANNEL, payload)
        for callback in self._revocation_subscribers:
            self.db.after_commit(lambda callback=callback: callback(payload))
        # The commit returns once every process's token cache has heard of it.
        self.db.confirm_after_commit(REVOCATIONS_CHANNEL)

    # clients

    def register_client(self, client: Client, *, actor: str) -> None:
        """Save a client an administrator registers (`bastion clients create`), recorded as
        ``client.registered`` as a dynamic registration is."""
        with self.db.transaction():
            self.save_client(client)
            self.audit.record(
                "client.registered",
                client_id=client.client_id,
                client_name=client.client_name,
                auth_method=client.token_endpoint_auth_method,
                actor=actor,
            )

    def save_client(self, client: Client) -> None:
        """Insert a client, or replace the cached copy of a metadata-document client."""
        with self.db.transaction():
            self.db.execute(
                "DELETE FROM oauth_clients WHERE client_id = ? AND source = 'metadata_document'"
                " AND revoked_at IS NULL",
                (client.client_id,),
            )
            self.db.execute(
                f"INSERT INTO oauth_clients ({_CLIENT_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    client.client_id,
                    client.client_name,
                    json.dumps(list(client.redirect_uris)),
                    json.dumps(list(client.grant_types)),
                    client.token_endpoint_auth_method,
                    client.scope,
                    client.source,
                    int(client.may_introspect),
                    json.dumps(client.metadata, sort_keys=True),
                    client.created_at,
                    client.revoked_at,
                    client.secret_digest,
                    _introspection_json(client.introspection_resources),
                    int(client.introspection_kept_at_upgrade),
                ),
            )

    def save_open_registration(
        self,
        client: Client,
        address: str,
        now: float,
        *,
        window_seconds: float,
        max_per_address: int,
        max_unused: int,
    ) -> OpenRegistrationRefusal | None:
        """Save a client registered without an initial access token, unless ``address`` has
        registered ``max_per_address`` in the last ``window_seconds``, or ``max_unused`` open
        registrations have no grant yet; then save nothing and say which (and since when)."""
        with self.db.transaction():
            # Counted and inserted as one step, whatever the isolation level.
            self.db.lock("bastion:open_registration")
            count, oldest = self.db.execute(
                "SELECT COUNT(*), MIN(registered_at) FROM oauth_open_registrations"
                " WHERE address = ? AND registered_at > ?",
                (address, now - window_seconds),
            )[0]
            if count >= max_per_address:
                return OpenRegistrationRefusal("address", count, oldest)
            count, oldest = self.db.execute(
                "SELECT COUNT(*), MIN(r.registered_at) FROM oauth_open_registrations r"
                " WHERE NOT EXISTS (SELECT 1 FROM oauth_grants g WHERE g.client_id = r.client_id)"
            )[0]
            if count >= max_unused:
                return OpenRegistrationRefusal("unused", count, oldest)
            self.save_client(client)
            # A metadata document fetched twice at once is saved twice: counted once.
            self.db.execute(
                "INSERT INTO oauth_open_registrations (client_id, address, registered_at)"
                " VALUES (?, ?, ?) ON CONFLICT (client_id) DO NOTHING",
                (client.client_id, address, now),
            )
            return None

    def forget_unused_clients(self, created_before: float) -> int:
        """Delete the clients that registered themselves (open registration, or a metadata
        document's copy) before ``created_before`` and have no grant, no pending authorization
        and no revocation (a revoked client stays refused), and the consents given to them.
        Returns how many."""
        with self.db.transaction():
            rows = self.db.execute(
                "DELETE FROM oauth_clients WHERE revoked_at IS NULL AND created_at < ?"
                " AND (source = 'metadata_document'"
                " OR client_id IN (SELECT client_id FROM oauth_open_registrations))"
                " AND NOT EXISTS (SELECT 1 FROM oauth_grants g"
                " WHERE g.client_id = oauth_clients.client_id)"
                " AND NOT EXISTS (SELECT 1 FROM oauth_pending_authorizations p"
                " WHERE p.client_id = oauth_clients.client_id)"
                " RETURNING client_id",
                (created_before,),
            )
            self.db.execute(
                "DELETE FROM oauth_open_registrations WHERE NOT EXISTS"
                " (SELECT 1 FROM oauth_clients c WHERE c.client_id = oauth_open_registrations.client_id)"
            )
            # A client registered again under the same id (a metadata document's URL) is asked
            # for consent again, not given the forgotten one's.
            if rows:
                self.db.executemany("DELETE FROM oauth_consents WHERE client_id = ?", rows)
            return len(rows)

    def client(self, client_id: str) -> Client | None:
        rows = self.db.execute(
            f"SELECT {_CLIENT_COLUMNS} FROM oauth_clients WHERE client_id = ?", (client_id,)
        )
        return _client(rows[0]) if rows else None

    def clients(self) -> list[Client]:
        rows = self.db.execute(f"SELECT {_CLIENT_COLUMNS} FROM oauth_clients ORDER BY created_at")
        return [_client(r) for r in rows]

    def describe_client(
        self,
        client_id: str,
        *,
        name: str | None = None,
        purpose: str | None = None,
        actor: str,
    ) -> bool:
        """Change the client's name and (in its metadata) purpose, as an agent's description,
        recorded (``agent.updated``, the old and new values of what changed; nothing when
        nothing did); False when there is no such client."""
        with self.db.transaction():
            client = self.client(client_id)
            if client is None:
                return False
            metadata = dict(client.metadata)
            old = {"name": client.client_name, "purpose": metadata.get("purpose", "")}
            if purpose is not None:
                metadata["purpose"] = purpose
            new = {
                "name": name if name is not None else client.client_name,
                "purpose": metadata.get("purpose", ""),
            }
            self.db.execute(
                "UPDATE oauth_clients SET client_name = ?, metadata = ? WHERE client_id = ?",
                (new["name"], json.dumps(metadata, sort_keys=True), client_id),
            )
            changed = [field for field in new if new[field] != old[field]]
            if changed:
                self.audit.record(
                    "agent.updated",
                    client_id=client_id,
                    old={field: old[field] for field in changed},
                    new={field: new[field] for field in changed},
                    actor=actor,
                )
            return True

    def bind_introspection(self, client_id: str, resources: tuple[str, ...], *, actor: str) -> bool:
        """Set the protected resources whose tokens an active client may introspect (none: it
        may not introspect), recorded (``client.updated``, the old and new resources; nothing
        when nothing changed); False when there is no such active client. ``resources`` are
        checked by the caller (`bastion.oauth.introspection.introspection_resources`)."""
        with self.db.transaction():
            client = self.client(client_id)
            if client is None or client.revoked_at is not None:
                return False
            self.db.execute(
                "UPDATE oauth_clients SET introspection_resources = ?, may_introspect = ?,"
                " introspection_kept_at_upgrade = 0 WHERE client_id = ?",
                (_introspection_json(resources), int(bool(resources)), client_id),
            )
            if resources != client.introspection_resources or client.introspection_kept_at_upgrade:
                old: dict[str, object] = {
                    "introspection_resources": list(client.introspection_resources)
                }
                if client.introspection_kept_at_upgrade:
                    old["introspection_kept_at_upgrade"] = True
                self.audit.record(
                    "client.updated",
                    client_id=client_id,
                    old=old,
                    new={"introspection_resources": list(resources)},
                    actor=actor,
                )
            return True

    def revoke_client(self, client_id: str, now: float, *, actor: str) -> bool:
        """Revoke the client and every grant it holds, recorded (``client.revoked``); False
        when no such active client."""
        with self.db.transaction():
            rows = self.db.execute(
                "UPDATE oauth_clients SET revoked_at = ? WHERE client_id = ? AND revoked_at IS NULL"
                " RETURNING client_id",
                (now, client_id),
            )
            if not rows:
                return False
            revoked = 0
            for (grant_id,) in self.db.execute(
                "SELECT grant_id FROM oauth_grants WHERE client_id = ? AND revoked_at IS NULL",
                (client_id,),
            ):
                revoked += self.revoke_grant(grant_id, now, "client revoked", actor=actor)
            self.audit.record(
                "client.revoked", client_id=client_id, actor=actor, grants_revoked=revoked
            )
            return True

    # users

    def create_user(self, username: str, password_hash: str, now: float, *, actor: str) -> None:
        """Add a local user, recorded (``user.created``; never the hash)."""
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO oauth_users (username, password_hash, created_at) VALUES (?, ?, ?)",
                (username, password_hash, now),
            )
            self.audit.record("user.created", subject=username, actor=actor)
            self.user_made()

    def user_made(self) -> None:
        """Inside the transaction that made a user (here, or at a provider's
        first login): a trusted issuer's agent acting as itself under that name is refused from
        now on (`UserStanding.person`), so whoever remembers users' standing reads it again."""
        self._announce_revocation(USERS_CHANGED)

    def user_password_hash(self, username: str) -> str | None:
        """The stored hash of an enabled user, or None."""
        rows = self.db.execute(
            "SELECT password_hash FROM oauth_users WHERE username = ? AND disabled_at IS NULL",
            (username,),
        )
        return rows[0][0] if rows else None

    def user_name_problem(self, username: str) -> str | None:
        """Why ``username`` cannot name a person, or None: it is the id of a client (revoked
        ones too). A client credentials token's subject is its client id, so such a person
        would be the same ``User{<client id>}`` as the agent acting as itself: their roles,
        label sets, upstream connections and approvals shared, and the kill switch reading
        the person as the agent (`suspensions.has_person`). One rule for every place a user is
        named: `bastion users create`, a login through a provider, an ID-JAG, a trusted
        issuer's token (`UserStanding.client`)."""
        if self.db.execute("SELECT 1 FROM oauth_clients WHERE client_id = ?", (username,)):
            return _named_like_a_client(username)
        return None

    def user_state(self, username: str) -> str | None:
        """``"enabled"`` or ``"disabled"`` for one of bastion's users; None for a stranger."""
        rows = self.db.execute(
            "SELECT disabled_at FROM oauth_users WHERE username = ?", (username,)
        )
        if not rows:
            return None
        return "enabled" if rows[0][0] is None else "disabled"

    def owner_disabled(self, username: str) -> bool:
        """Whether ``username``, who owns an agent acting as itself, is disabled: read inside the
        transaction that issues the agent's token (or one of its own), after the owner's shared
        lock, so that `disable_user` either commits first and is seen here, or waits for that
        transaction and then finds the grant it made, and revokes it."""
        with self.db.transaction():
            self._lock_user(username, shared=True)
            lock = " FOR SHARE" if self.db.is_postgres else ""
            rows = self.db.execute(
                f"SELECT disabled_at FROM oauth_users WHERE username = ?{lock}", (username,)
            )
        return bool(rows) and rows[0][0] is not None

    def user_standing(self, username: str) -> UserStanding:
        """Whether ``username`` is disabled, when all their grants were last revoked, whether
        it is a client's id, and whether it is one of bastion's users."""
        disabled_at, revoked_at, client, person = self.db.execute(
            "SELECT (SELECT disabled_at FROM oauth_users WHERE username = ?),"
            " (SELECT revoked_at FROM oauth_user_revocations WHERE username = ?),"
            " (SELECT 1 FROM oauth_clients WHERE client_id = ?),"
            " (SELECT 1 FROM oauth_users WHERE username = ?)",
            (username, username, username, username),
        )[0]
        return UserStanding(
            disabled_at is not None, revoked_at, client is not None, person is not None
        )

    def rehash_password(self, username: str, password_hash: str) -> None:
        """Store the user's same password hashed again (under parameters that have grown): not
        a change of password, so nothing it let in ends (`change_password` is one)."""
        self.db.execute(
            "UPDATE oauth_users SET password_hash = ? WHERE username = ?", (password_hash, username)
        )

    def change_password(self, username: str, password_hash: str, now: float, *, actor: str) -> bool:
        """Give the user a new password and, in the same transaction, end everything the old
        one let in: their sessions, and every grant with its tokens, as a revocation of all
        their grants (`revoke_user_grants`, announced). A password is changed after a suspected
        takeover, and whoever took over holds those. Recorded (``user.password_changed``, with
        how many grants were revoked; never the hash). False when there is no such user."""
        with self.db.transaction():
            # The user's lock before their row, in the order `create_grant` takes them.
            self._lock_user(username, shared=False)
            rows = self.db.execute(
                "UPDATE oauth_users SET password_hash = ? WHERE username = ? RETURNING username",
                (password_hash, username),
            )
            if not rows:
                return False
            revoked = self.revoke_user_grants(username, now, "password changed", actor=actor)
            self.audit.record(
                "user.password_changed", subject=username, actor=actor, grants_revoked=revoked
            )
            return True

    def users(self) -> list[tuple[str, float, float | None]]:
        return [
            (r[0], r[1], r[2])
            for r in self.db.execute(
                "SELECT username, created_at, disabled_at FROM oauth_users ORDER BY username"
            )
        ]

    def disable_user(self, username: str, now: float, *, actor: str) -> bool:
        """Disable the user, end their sessions and revoke every grant they gave, recorded as a
        revocation of all their grants (as `revoke_user_grants`) and in the audit log
        (``user.disabled``). Ordered with every grant being made for them (`create_grant`):
        each is refused, or revoked here."""
        with self.db.transaction():
            self._lock_user(username, shared=False)
            rows = self.db.execute(
                "UPDATE oauth_users SET disabled_at = ? WHERE username = ? AND disabled_at IS NULL"
                " RETURNING username",
                (now, username),
            )
            if not rows:
                return False
            # Also a revocation of all their grants: what rests on a sign-in, an approval or a
            # token from before now stays refused if the user is enabled again.
            self._record_user_revocation(username, now)
            self.db.execute("DELETE FROM oauth_sessions WHERE username = ?", (username,))
            self.db.execute("DELETE FROM oauth_consents WHERE username = ?", (username,))
            revoked = 0
            for (grant_id,) in self.db.execute(
                "SELECT grant_id FROM oauth_grants WHERE username = ? AND revoked_at IS NULL",
                (username,),
            ):
                revoked += self.revoke_grant(grant_id, now, "user disabled", actor=actor)
            # An agent never outlasts its owner: the grants of the agents they own that act as
            # themselves (client credentials; what those delegated goes with them) are revoked
            # too. The token endpoint issues such an agent nothing while its owner is disabled.
            agents_revoked = 0
            for client_id in owned(FactStore(self.db), username):
                for (grant_id,) in self.db.execute(
                    "SELECT grant_id FROM oauth_grants WHERE client_id = ? AND username IS NULL"
                    " AND revoked_at IS NULL",
                    (client_id,),
                ):
                    agents_revoked += self.revoke_grant(
                        grant_id, now, "owner disabled", actor=actor
                    )
            self.audit.record(
                "user.disabled",
                subject=username,
                actor=actor,
                grants_revoked=revoked,
                agent_grants_revoked=agents_revoked,
            )
            return True

    def enable_user(self, username: str, *, actor: str) -> bool:
        """Let a disabled user sign in again; False unless they are one of bastion's users and
        disabled. Nothing issued before the disable comes back: it was recorded as a revocation
        of all their grants, which stays."""
        with self.db.transaction():
            self._lock_user(username, shared=False)
            rows = self.db.execute(
                "UPDATE oauth_users SET disabled_at = NULL"
                " WHERE username = ? AND disabled_at IS NOT NULL RETURNING username",
                (username,),
            )
            if not rows:
                return False
            # Whoever remembers users' standing reads it again (no longer disabled).
            self._announce_revocation(USERS_CHANGED)
            self.audit.record("user.enabled", subject=username, actor=actor)
            return True

    # consents

    def consented_scope(
        self, username: str, client_id: str, resource: str, redirect_uri: str
    ) -> set[str] | None:
        """The scope the person last consented to for this client and resource at exactly this
        redirect URI (port included), or None."""
        rows = self.db.execute(
            "SELECT scope FROM oauth_consents WHERE username = ? AND client_id = ?"
            " AND resource = ? AND redirect_uri = ?",
            (username, client_id, resource, redirect_uri),
        )
        return set(rows[0][0].split()) if rows else None

    def remember_consent(
        self,
        username: str,
        client_id: str,
        resource: str,
        redirect_uri: str,
        scope: str,
        now: float,
    ) -> None:
        with self.db.transaction():
            self.db.execute(
                "DELETE FROM oauth_consents WHERE username = ? AND client_id = ? AND resource = ?"
                " AND redirect_uri = ?",
                (username, client_id, resource, redirect_uri),
            )
            self.db.execute(
                "INSERT INTO oauth_consents"
                " (username, client_id, resource, redirect_uri, scope, granted_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (username, client_id, resource, redirect_uri, scope, now),
            )

    # pending authorization requests and login sessions

    def save_pending(self, pending: PendingAuthorization) -> None:
        self.db.execute(
            "INSERT INTO oauth_pending_authorizations (request_id, browser_digest, csrf_token,"
            " client_id, redirect_uri, state, resource, scope, code_challenge, expires_at,"
            " max_age) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                pending.request_id,
                pending.browser_digest,
                pending.csrf_token,
                pending.client_id,
                pending.redirect_uri,
                pending.state,
                pending.resource,
                pending.scope,
                pending.code_challenge,
                pending.expires_at,
                pending.max_age,
            ),
        )

    def pending(self, request_id: str, now: float) -> PendingAuthorization | None:
        rows = self.db.execute(
            "SELECT request_id, browser_digest, csrf_token, client_id, redirect_uri, state,"
            " resource, scope, code_challenge, expires_at, max_age FROM oauth_pending_authorizations"
            " WHERE request_id = ? AND expires_at > ?",
            (request_id, now),
        )
        return PendingAuthorization(*rows[0]) if rows else None

    def finish_pending(self, request_id: str) -> bool:
        """Consume a pending request; False if it was already consumed (a double submit)."""
        rows = self.db.execute(
            "DELETE FROM oauth_pending_authorizations WHERE request_id = ? RETURNING request_id",
            (request_id,),
        )
        return bool(rows)

    def use_login_attempt(self, request_id: str, most: int) -> int | None:
        """Count one sign-in attempt against a pending request; its number, or None when the
        request has used ``most`` already (or is gone). Counted before the password is checked,
        so attempts in parallel cannot exceed ``most`` either."""
        rows = self.db.execute(
            "UPDATE oauth_pending_authorizations SET login_attempts = login_attempts + 1"
            " WHERE request_id = ? AND login_attempts < ? RETURNING login_attempts",
            (request_id, most),
        )
        return rows[0][0] if rows else None

    # login failure counters ("user:<name>", "address:<ip>")

    def login_failures(self, counters: list[str], since: float) -> dict[str, tuple[int, float]]:
        """(failures, last_failure_at) of each counter whose last failure is at ``since`` or later."""
        marks = ", ".join("?" * len(counters))
        rows = self.db.execute(
            "SELECT counter, failures, last_failure_at FROM oauth_login_failures"
            f" WHERE counter IN ({marks}) AND last_failure_at >= ?",
            (*counters, since),
        )
        return {row[0]: (row[1], row[2]) for row in rows}

    def add_login_failure(self, counter: str, now: float, restart_before: float) -> None:
        """One more failure; a counter whose last failure is before ``restart_before`` restarts."""
        self.db.execute(
            "INSERT INTO oauth_login_failures (counter, failures, last_failure_at) VALUES (?, 1, ?)"
            " ON CONFLICT (counter) DO UPDATE SET failures = CASE"
            " WHEN oauth_login_failures.last_failure_at < ? THEN 1"
            " ELSE oauth_login_failures.failures + 1 END,"
            " last_failure_at = excluded.last_failure_at",
            (counter, now, restart_before),
        )

    def take_back_login_failure(self, counter: str) -> None:
        self.db.execute(
            "UPDATE oauth_login_failures SET failures = failures - 1"
            " WHERE counter = ? AND failures > 0",
            (counter,),
        )

    def clear_login_failures(self, counter: str) -> None:
        self.db.execute("DELETE FROM oauth_login_failures WHERE counter = ?", (counter,))

    def forget_login_failures_before(self, cutoff: float) -> None:
        self.db.execute("DELETE FROM oauth_login_failures WHERE last_failure_at < ?", (cutoff,))

    def create_session(
        self, username: str, now: float, seconds: int, sign_in: SignInContext = UNKNOWN
    ) -> str:
        """A new session of ``username``, who signed in at ``now`` as ``sign_in`` says."""
        session_id = new_secret()
        self.db.execute(
            "INSERT INTO oauth_sessions (session_digest, username, expires_at, authenticated_at,"
            " acr, amr) VALUES (?, ?, ?, ?, ?, ?)",
            (digest(session_id), username, now + seconds, now, sign_in.acr, sign_in.stored_amr()),
        )
        return session_id

    def end_session(self, session_id: str) -> str | None:
        """Delete the session (a sign-out); the user it was of, or None if there was none."""
        rows = self.db.execute(
            "DELETE FROM oauth_sessions WHERE session_digest = ? RETURNING username",
            (digest(session_id),),
        )
        return rows[0][0] if rows else None

    def session_login(self, session_id: str, now: float) -> SessionLogin | None:
        """The person signed in with this session, when and how they signed in."""
        rows = self.db.execute(
            "SELECT s.username, s.authenticated_at, s.acr, s.amr FROM oauth_sessions s"
            " JOIN oauth_users u ON u.username = s.username"
            " WHERE s.session_digest = ? AND s.expires_at > ? AND u.disabled_at IS NULL",
            (digest(session_id), now),
        )
        if not rows:
            return None
        username, authenticated_at, acr, amr = rows[0]
        return SessionLogin(username, authenticated_at, SignInContext.from_stored(acr, amr))

    def session_user(self, session_id: str, now: float) -> str | None:
        rows = self.db.execute(
            "SELECT s.username FROM oauth_sessions s JOIN oauth_users u ON u.username = s.username"
            " WHERE s.session_digest = ? AND s.expires_at > ? AND u.disabled_at IS NULL",
            (digest(session_id), now),
        )
        return rows[0][0] if rows else None

    # backchannel (CIBA) requests

    def save_backchannel_request(
        self, request: BackchannelRequest, auth_req_id: str, most_pending: int, now: float
    ) -> bool:
        """Keep a new request, unless its client has ``most_pending`` requests waiting for an
        answer already (then save nothing and return False)."""
        with self.db.transaction():
            # Counted and inserted as one step, whatever the isolation level.
            self.db.lock(f"bastion:backchannel:{request.client_id}")
            (waiting,) = self.db.execute(
                "SELECT COUNT(*) FROM oauth_backchannel_requests"
                " WHERE client_id = ? AND status = 'pending' AND expires_at > ?",
                (request.client_id, now),
            )[0]
            if waiting >= most_pending:
                return False
            self.db.execute(
                "INSERT INTO oauth_backchannel_requests (auth_req_digest, last_polled_at,"
                f" {_BACKCHANNEL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    digest(auth_req_id),
                    request.created_at,
                    request.request_id,
                    request.client_id,
                    request.username,
                    request.resource,
                    request.scope,
                    request.binding_message,
                    request.created_at,
                    request.expires_at,
                    request.interval_seconds,
                    request.status,
                    request.answered_at,
                    request.grant_id,
                    request.auth_time,
                    request.sign_in.acr,
                    request.sign_in.stored_amr(),
                ),
            )
            return True

    def backchannel_request(self, auth_req_id: str) -> BackchannelRequest | None:
        """The request an auth_req_id names, if it is still kept."""
        rows = self.db.execute(
            f"SELECT {_BACKCHANNEL_COLUMNS} FROM oauth_backchannel_requests"
            " WHERE auth_req_digest = ?",
            (digest(auth_req_id),),
        )
        return _backchannel(rows[0]) if rows else None

    def backchannel_request_by_id(self, request_id: str) -> BackchannelRequest | None:
        """The request shown on the page ``request_id`` names."""
        rows = self.db.execute(
            f"SELECT {_BACKCHANNEL_COLUMNS} FROM oauth_backchannel_requests WHERE request_id = ?",
            (request_id,),
        )
        return _backchannel(rows[0]) if rows else None

    def pending_backchannel_requests(self, username: str, now: float) -> list[BackchannelRequest]:
        """The requests waiting for ``username``'s answer, oldest first."""
        rows = self.db.execute(
            f"SELECT {_BACKCHANNEL_COLUMNS} FROM oauth_backchannel_requests"
            " WHERE username = ? AND status = 'pending' AND expires_at > ?"
            " ORDER BY created_at, request_id",
            (username, now),
        )
        return [_backchannel(row) for row in rows]

    def poll_backchannel_request(self, auth_req_id: str, now: float, step: int) -> int | None:
        """Count one poll of the token endpoint. None when it came at least the request's
        interval after the previous one (or its creation); else the interval, raised by
        ``step`` seconds for this and every later poll (the client polled too fast)."""
        with self.db.transaction():
            rows = self.db.execute(
                "UPDATE oauth_backchannel_requests SET last_polled_at = ?"
                " WHERE auth_req_digest = ? AND last_polled_at + interval_seconds <= ?"
                " RETURNING interval_seconds",
                (now, digest(auth_req_id), now),
            )
            if rows:
                return None
            rows = self.db.execute(
                "UPDATE oauth_backchannel_requests SET last_polled_at = ?,"
                " interval_seconds = interval_seconds + ? WHERE auth_req_digest = ?"
                " RETURNING interval_seconds",
                (now, step, digest(auth_req_id)),
            )
            return rows[0][0] if rows else None

    def answer_backchannel_request(
        self, request_id: str, login: SessionLogin, status: str, now: float
    ) -> bool:
        """Record the person's answer ("approved" or "denied"), given from the login session
        ``login`` (when and how they signed in is kept with it); False unless the request is
        theirs, still pending and not expired (exactly one answer ever counts)."""
        rows = self.db.execute(
            "UPDATE oauth_backchannel_requests SET status = ?, answered_at = ?, auth_time = ?,"
            " acr = ?, amr = ?"
            " WHERE request_id = ? AND username = ? AND status = 'pending' AND expires_at > ?"
            " RETURNING request_id",
            (
                status,
                now,
                login.authenticated_at,
                login.sign_in.acr,
                login.sign_in.stored_amr(),
                request_id,
                login.username,
                now,
            ),
        )
        return bool(rows)

    def spend_backchannel_request(
        self, auth_req_id: str, client_id: str, grant_id: str, now: float
    ) -> bool:
        """Mark an approved request's token delivered, under ``grant_id``; exactly one caller
        ever gets True for a given auth_req_id."""
        rows = self.db.execute(
            "UPDATE oauth_backchannel_requests SET status = 'issued', grant_id = ?"
            " WHERE auth_req_digest = ? AND client_id = ? AND status = 'approved'"
            " AND expires_at > ? RETURNING request_id",
            (grant_id, digest(auth_req_id), client_id, now),
        )
        return bool(rows)

    # grants, codes, refresh and access tokens

    def _lock_user(self, username: str, *, shared: bool) -> None:
        """Inside a transaction on PostgreSQL: order it with every other that makes a grant for
        ``username`` (``shared``: those run side by side) or takes their grants away (not
        shared). A lock on a name, not a row, so that users bastion does not hold (an identity
        provider's) are ordered too. SQLite's writers run one at a time (BEGIN IMMEDIATE)."""
        self.db.lock(f"bastion:user:{username}", shared=shared)

    def create_grant(
        self, grant: Grant, *, authorized_at: float | None = None, strangers: bool = False
    ) -> None:
        """Save a new grant, or raise `GrantRefused` and save nothing: the one way every grant
        is made. What may refuse it is read in the write transaction (the caller's, or its own),
        after the user's lock, so a disable or a revocation of the user's grants either commits
        first and is seen here, or waits for this commit and then finds the grant.

        A user's grant: the user must be one of bastion's (any name with ``strangers``: an
        identity provider's users) and not disabled, and ``authorized_at`` (when they signed in:
        for a consent or a CIBA approval, to the session they answered from; or when their
        provider vouched for them; None: not known) must come after the last revocation of all
        their grants. Its client must not be revoked (its row shared-
        locked on PostgreSQL, so that `revoke_client` either comes first or finds the grant). A
        delegated grant: its parent grant, and the access token it is exchanged from, must be
        live (their rows locked on PostgreSQL, so that no delegation outlives either)."""
        with self.db.transaction():
            lock = " FOR SHARE" if self.db.is_postgres else ""
            client = self.db.execute(
                f"SELECT revoked_at FROM oauth_clients WHERE client_id = ?{lock}",
                (grant.client_id,),
            )
            if client and client[0][0] is not None:
                raise ClientRevoked(f"client {grant.client_id!r} has been revoked")
            if grant.username is not None:
                self._lock_user(grant.username, shared=True)
                refusal = self._user_refusal(grant.username, authorized_at, strangers)
                if refusal is not None:
                    raise GrantRefused(refusal)
            if grant.parent_grant_id is not None and self._gone_or_revoked(
                "oauth_grants", "grant_id", grant.parent_grant_id
            ):
                raise GrantRefused("the grant it would be delegated from has been revoked")
            # A revocation of the token either comes first (refused here) or finds this grant
            # and revokes it (`revoke_access_token`).
            if grant.parent_jti is not None and self._gone_or_revoked(
                "oauth_access_tokens", "jti", grant.parent_jti
            ):
                raise GrantRefused("the access token it would be exchanged from is revoked")
            self.db.execute(
                f"INSERT INTO oauth_grants ({_GRANT_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    grant.grant_id,
                    grant.client_id,
                    grant.username,
                    grant.resource,
                    grant.scope,
                    grant.created_at,
                    grant.expires_at,
                    grant.revoked_at,
                    grant.auth_time,
                    grant.parent_grant_id,
                    grant.parent_jti,
                    grant.sign_in.acr,
                    grant.sign_in.stored_amr(),
                ),
            )

    def _user_refusal(
        self, username: str, authorized_at: float | None, strangers: bool
    ) -> str | None:
        """Inside `create_grant`'s transaction, after the user's lock: why ``username`` may not
        have a new grant, or None."""
        # FOR SHARE as well: under REPEATABLE READ a disable committed since this transaction's
        # snapshot is then a serialization failure, not a grant made on the older state.
        lock = " FOR SHARE" if self.db.is_postgres else ""
        rows = self.db.execute(
            f"SELECT disabled_at FROM oauth_users WHERE username = ?{lock}", (username,)
        )
        if rows and rows[0][0] is not None:
            return f"user {username!r} is disabled"
        if not rows and not strangers:
            return f"user {username!r} is not a user of this server"
        rows = self.db.execute(
            "SELECT revoked_at FROM oauth_user_revocations WHERE username = ?", (username,)
        )
        if rows and (authorized_at is None or authorized_at <= rows[0][0]):
            return (
                f"every grant of user {username!r} was revoked after the sign-in, approval or"
                " assertion this one rests on: it must be given again"
            )
        return None

    def grant(self, grant_id: str) -> Grant | None:
        rows = self.db.execute(
            f"SELECT {_GRANT_COLUMNS} FROM oauth_grants WHERE grant_id = ?", (grant_id,)
        )
        return _grant(rows[0]) if rows else None

    def revoke_grant(self, grant_id: str, now: float, reason: str, *, actor: str) -> bool:
        """Revoke a grant, every grant delegated from it (token exchange, at any depth) and
        everything issued under each; False if the grant itself was already revoked (nothing
        recorded then). Recorded as one ``grant.revoked`` with ``reason``, ``actor`` and how many
        delegated grants went with it: every revocation of a grant, whoever asks for it (a user
        disabled, a client revoked, a password changed, a signal, a task ended, a token reused),
        is recorded here and only here."""
        with self.db.transaction():
            rows = self.db.execute(
                "UPDATE oauth_grants SET revoked_at = ?, revoked_reason = ?"
                " WHERE grant_id = ? AND revoked_at IS NULL RETURNING username, client_id",
                (now, reason, grant_id),
            )
            self._revoke_issued(grant_id, now)
            delegated = 0
            # Read again until none is live: on PostgreSQL an exchange under a grant of the
            # tree (not this one) may have written its grant, uncommitted, as the tree was
            # read; revoking that parent waits for its commit, and the next read finds it.
            while live := self.db.execute(_LIVE_DELEGATIONS, (grant_id,)):
                for (child,) in live:
                    delegated += len(
                        self.db.execute(
                            "UPDATE oauth_grants SET revoked_at = ?, revoked_reason = ?"
                            " WHERE grant_id = ? AND revoked_at IS NULL RETURNING grant_id",
                            (now, f"parent grant revoked: {reason}", child),
                        )
                    )
                    self._revoke_issued(child, now)
            if not rows:
                return False
            username, client_id = rows[0]
            self.audit.record(
                "grant.revoked",
                subject=username,
                client_id=client_id,
                grant_id=grant_id,
                reason=reason,
                actor=actor,
                delegated_revoked=delegated,
            )
            return True

    def _revoke_issued(self, grant_id: str, now: float) -> None:
        """Inside a revoking transaction: the grant's access and refresh tokens, announced."""
        self.db.execute(
            "UPDATE oauth_access_tokens SET revoked_at = ? WHERE grant_id = ? AND revoked_at IS NULL",
            (now, grant_id),
        )
        self.db.execute(
            "UPDATE oauth_refresh_tokens SET used_at = ? WHERE grant_id = ? AND used_at IS NULL",
            (now, grant_id),
        )
        self._announce_revocation(grant_id)

    def revoke_user_grants(self, username: str, now: float, reason: str, *, actor: str) -> int:
        """Revoke every live grant of the user (and everything issued under each), announcing
        and recording each revocation (one ``grant.revoked`` per grant), and end their sessions;
        return how many grants were revoked. A grant
        being made for them meanwhile, or later, on a sign-in, approval or assertion from before
        ``now`` is refused (`create_grant`)."""
        with self.db.transaction():
            self._lock_user(username, shared=False)
            self._record_user_revocation(username, now)
            self.db.execute("DELETE FROM oauth_sessions WHERE username = ?", (username,))
            rows = self.db.execute(
                "SELECT grant_id FROM oauth_grants WHERE username = ? AND revoked_at IS NULL",
                (username,),
            )
            return sum(
                self.revoke_grant(grant_id, now, reason, actor=actor) for (grant_id,) in rows
            )

    def _record_user_revocation(self, username: str, now: float) -> None:
        """Inside a transaction holding the user's lock: all the user's grants are revoked as of
        ``now`` (the latest such time is kept), announced as a change of their standing."""
        self.db.execute(
            "INSERT INTO oauth_user_revocations (username, revoked_at) VALUES (?, ?)"
            " ON CONFLICT (username) DO UPDATE SET revoked_at = CASE"
            " WHEN excluded.revoked_at > oauth_user_revocations.revoked_at"
            " THEN excluded.revoked_at ELSE oauth_user_revocations.revoked_at END",
            (username, now),
        )
        # A trusted issuer's tokens of the user rest on no grant: whoever remembers users'
        # standing (`VerifiedTokens.user_standing`) reads it again.
        self._announce_revocation(USERS_CHANGED)

    def save_code(
        self, code: str, grant_id: str, redirect_uri: str, code_challenge: str, expires_at: float
    ) -> None:
        self.db.execute(
            "INSERT INTO oauth_codes (code_digest, grant_id, redirect_uri, code_challenge,"
            " expires_at) VALUES (?, ?, ?, ?, ?)",
            (digest(code), grant_id, redirect_uri, code_challenge, expires_at),
        )

    def code(self, code: str) -> tuple[str, str, str, float, float | None] | None:
        """(grant_id, redirect_uri, code_challenge, expires_at, used_at) of a code."""
        rows = self.db.execute(
            "SELECT grant_id, redirect_uri, code_challenge, expires_at, used_at FROM oauth_codes"
            " WHERE code_digest = ?",
            (digest(code),),
        )
        return rows[0] if rows else None

    def use_code(self, code: str, now: float) -> bool:
        """Mark a code used; exactly one caller ever gets True for a given code."""
        rows = self.db.execute(
            "UPDATE oauth_codes SET used_at = ? WHERE code_digest = ? AND used_at IS NULL"
            " RETURNING code_digest",
            (now, digest(code)),
        )
        return bool(rows)

    def save_refresh_token(self, token: str, grant_id: str, now: float, expires_at: float) -> None:
        self.db.execute(
            "INSERT INTO oauth_refresh_tokens (token_digest, grant_id, created_at, expires_at)"
            " VALUES (?, ?, ?, ?)",
            (digest(token), grant_id, now, expires_at),
        )

    def refresh_token(self, token: str) -> tuple[str, float, float | None] | None:
        """(grant_id, expires_at, used_at) of a refresh token."""
        rows = self.db.execute(
            "SELECT grant_id, expires_at, used_at FROM oauth_refresh_tokens WHERE token_digest = ?",
            (digest(token),),
        )
        return rows[0] if rows else None

    def use_refresh_token(self, token: str, now: float) -> bool:
        """Mark a refresh token rotated; exactly one caller ever gets True for a given token."""
        rows = self.db.execute(
            "UPDATE oauth_refresh_tokens SET used_at = ? WHERE token_digest = ? AND used_at IS NULL"
            " RETURNING token_digest",
            (now, digest(token)),
        )
        return bool(rows)

    def save_access_token(
        self, jti: str, grant_id: str, expires_at: float, token: str, kid: str
    ) -> bool:
        """Record an access token as issued: its ``jti``, the digest of the whole token (what
        the verifier compares, `AccessTokenState.token_digest`) and the ``kid`` that signed it.
        False, and nothing recorded, if ``kid`` is no longer a signing key (retired by another
        process since this one read it): the token would be refused everywhere, and its key
        may be stolen. On PostgreSQL the key's row is locked (FOR SHARE) until the token's
        transaction ends, so a retirement waits for it and then revokes it with the others."""
        lock = " FOR SHARE" if self.db.is_postgres else ""
        with self.db.transaction():
            if not self.db.execute(
                f"SELECT kid FROM oauth_signing_keys WHERE kid = ?{lock}", (kid,)
            ):
                return False
            self.db.execute(
                "INSERT INTO oauth_access_tokens (jti, grant_id, expires_at, token_digest, kid)"
                " VALUES (?, ?, ?, ?, ?)",
                (jti, grant_id, expires_at, digest(token), kid),
            )
        return True

    def access_token_state(self, jti: str) -> AccessTokenState | None:
        """What was stored of the access token issued under ``jti``; None if none was."""
        rows = self.db.execute(
            "SELECT t.grant_id, t.revoked_at, g.revoked_at, t.expires_at, t.token_digest"
            " FROM oauth_access_tokens t JOIN oauth_grants g ON g.grant_id = t.grant_id"
            " WHERE t.jti = ?",
            (jti,),
        )
        if not rows:
            return None
        grant_id, token_revoked, grant_revoked, expires_at, token_digest = rows[0]
        return AccessTokenState(
            grant_id=grant_id,
            revoked=token_revoked is not None or grant_revoked is not None,
            expires_at=expires_at,
            token_digest=token_digest,
        )

    def _gone_or_revoked(self, table: str, column: str, value: str) -> bool:
        """Whether the row of ``table`` whose ``column`` is ``value`` is missing or revoked;
        on PostgreSQL it stays locked (FOR UPDATE) until the transaction ends, so that nothing
        delegated from it outlives it."""
        lock = " FOR UPDATE" if self.db.is_postgres else ""
        rows = self.db.execute(f"SELECT revoked_at FROM {table} WHERE {column} = ?{lock}", (value,))
        return not rows or rows[0][0] is not None

    def revoke_access_token(self, jti: str, now: float, *, actor: str = SERVER) -> int:
        """Revoke one access token and every delegation exchanged from it (RFC 8693: the grants
        whose ``parent_jti`` it is, with all they issued and delegated further, recorded as
        `revoke_grant` records them); return how many such grants were revoked. Its own grant,
        and the grant's other tokens, live on."""
        with self.db.transaction():
            rows = self.db.execute(
                "UPDATE oauth_access_tokens SET revoked_at = ? WHERE jti = ? AND revoked_at IS NULL"
                " RETURNING grant_id",
                (now, jti),
            )
            if not rows:
                return 0
            self._announce_revocation(rows[0][0])
            reason = "the access token it was exchanged from was revoked"
            return sum(
                self.revoke_grant(child, now, reason, actor=actor)
                for (child,) in self.db.execute(
                    "SELECT grant_id FROM oauth_grants WHERE parent_jti = ? AND revoked_at IS NULL",
                    (jti,),
                )
            )

    def purge_expired(self, now: float, keep_seconds: float) -> None:
        """Forget rows that can no longer matter: expired pending requests and sessions, and
        codes and tokens expired for more than ``keep_seconds`` (kept a while so a late replay
        is still recognised as one). Grants a person consented to stay, as the record of it, as
        long as the audit trail (`prune_grants`)."""
        cutoff = now - keep_seconds
        with self.db.transaction():
            self.db.execute("DELETE FROM oauth_pending_authorizations WHERE expires_at < ?", (now,))
            self.db.execute("DELETE FROM oauth_sessions WHERE expires_at < ?", (now,))
            self.db.execute(
                "DELETE FROM oauth_backchannel_requests WHERE expires_at < ?", (cutoff,)
            )
            self.db.execute("DELETE FROM oauth_codes WHERE expires_at < ?", (cutoff,))
            self.db.execute("DELETE FROM oauth_refresh_tokens WHERE expires_at < ?", (cutoff,))
            self.db.execute("DELETE FROM oauth_access_tokens WHERE expires_at < ?", (cutoff,))
            # A client_credentials grant, or a delegated one (token exchange), records no
            # consent: forget it once it is spent.
            self.db.execute(
                "DELETE FROM oauth_grants WHERE (username IS NULL OR parent_grant_id IS NOT NULL)"
                " AND expires_at < ? AND NOT EXISTS"
                " (SELECT 1 FROM oauth_access_tokens t WHERE t.grant_id = oauth_grants.grant_id)",
                (cutoff,),
            )

    # signing keys (public halves only: private keys live in files under key_dir)

    def signing_keys(self) -> list[tuple[str, str, float, float | None]]:
        """(kid, public JWK JSON, created_at, retired_at), newest first."""
        return [
            tuple(r)
            for r in self.db.execute(
                "SELECT kid, public_jwk, created_at, retired_at FROM oauth_signing_keys"
                " ORDER BY created_at DESC, kid"
            )
        ]

    def add_signing_key(self, kid: str, public_jwk: str, now: float, *, actor: str) -> None:
        """Start signing with ``kid``; the key that signed until now is retired (it verifies
        until its tokens expire). Recorded (``signing_key.rotated``, the public kids only)."""
        with self.db.transaction():
            previous = self.db.execute(
                "UPDATE oauth_signing_keys SET retired_at = ? WHERE retired_at IS NULL"
                " RETURNING kid",
                (now,),
            )
            self.db.execute(
                "INSERT INTO oauth_signing_keys (kid, public_jwk, created_at) VALUES (?, ?, ?)",
                (kid, public_jwk, now),
            )
            self.audit.record(
                "signing_key.rotated",
                kid=kid,
                previous=sorted(row[0] for row in previous),
                actor=actor,
            )

    def retire_signing_key(self, kid: str, now: float, *, actor: str) -> int:
        """Withdraw the key ``kid`` at once (after its private half was stolen, say): its row
        goes, so it leaves the JWKS and every verifier's keys, and every access token it signed
        is revoked and announced as any revocation, so each replica refuses them on their next
        use; so are the tokens issued before bastion kept each token's kid, whose key is not
        known. Return how many tokens were revoked; recorded (``signing_key.retired``).
        `KeyRetirementRefused` for a key that is not in the table, or that is the one signing
        (nothing is changed)."""
        with self.db.transaction():
            rows = self.db.execute(
                "SELECT retired_at FROM oauth_signing_keys WHERE kid = ?", (kid,)
            )
            if not rows:
                raise KeyRetirementRefused(
                    f"no signing key {kid!r} (`bastion signing-keys list` shows the keys)"
                )
            if rows[0][0] is None:
                raise KeyRetirementRefused(
                    f"{kid} is the key that signs: start signing with a new one first"
                    f" (`bastion signing-keys rotate`), then retire {kid}"
                )
            self.db.execute("DELETE FROM oauth_signing_keys WHERE kid = ?", (kid,))
            revoked = self.db.execute(
                "UPDATE oauth_access_tokens SET revoked_at = ?"
                " WHERE (kid = ? OR kid IS NULL) AND revoked_at IS NULL RETURNING grant_id",
                (now, kid),
            )
            for grant_id in sorted({row[0] for row in revoked}):
                self._announce_revocation(grant_id)
            self.audit.record(
                "signing_key.retired", kid=kid, tokens_revoked=len(revoked), actor=actor
            )
            return len(revoked)

    def forget_signing_keys_retired_before(self, cutoff: float) -> None:
        self.db.execute(
            "DELETE FROM oauth_signing_keys WHERE retired_at IS NOT NULL AND retired_at < ?",
            (cutoff,),
        )
