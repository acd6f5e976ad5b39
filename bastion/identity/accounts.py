"""Which account of an identity provider (its ``sub``) each of bastion's users belongs to: the
``identity`` schema, the binding of a user name to the first ``sub`` that used it, and its release.

A provider's ``user_claim`` other than ``sub`` (an email address, a login name) can pass to
another person: the address of someone who moved to another given to a new hire. The user it
names stays the first person's, for sign-in (`bastion.identity.oidc_login`), trusted issuers'
access tokens (`bastion.identity.trusted_issuers`) and ID-JAGs (`bastion.oauth.jwt_bearer`),
each under its own name for the provider, until an administrator releases it
(`release_account`, ``bastion users unlink``). This module needs only the database and the audit
log, so that oauth/ may use it.
"""

from __future__ import annotations

from bastion.audit.log import AuditLog
from bastion.db import Database

# The longest account id (OpenID Connect's bound on ``sub``) a user is bound to.
MAX_ACCOUNT_CHARS = 255

# Claims that name a person in words an identity provider may give to another person later (an
# address, a login name): a ``user_claim`` among them is bound to ``sub`` unless the provider's
# ``account_claim`` says otherwise. Any other ``user_claim`` (``sub``, Entra's ``oid``, Okta's
# ``uid``, an employee number) is taken to name one account for good: bound to itself, that is,
# not bound, as before the binding existed (an existing configuration keeps its meaning).
REASSIGNABLE_CLAIMS = frozenset(
    {"email", "preferred_username", "upn", "unique_name", "login", "username", "name", "nickname"}
)


def default_account_claim(user_claim: str) -> str:
    """The ``account_claim`` of a provider that names none: ``sub`` for a ``user_claim`` a
    provider may give to another person (`REASSIGNABLE_CLAIMS`), else the ``user_claim``."""
    return "sub" if user_claim in REASSIGNABLE_CLAIMS else user_claim


MIGRATIONS = [
    """
    CREATE TABLE identity_login_states (
        state_digest TEXT PRIMARY KEY,
        provider TEXT NOT NULL,
        browser_digest TEXT NOT NULL,
        nonce TEXT NOT NULL,
        code_verifier TEXT NOT NULL,
        request_id TEXT,
        next_path TEXT,
        expires_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE identity_accounts (
        provider TEXT NOT NULL,
        subject TEXT NOT NULL,
        username TEXT NOT NULL,
        facts TEXT NOT NULL,
        last_login_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (provider, subject)
    );
    """,
    # Which sub of a provider a user id is bound to (`bound_elsewhere`).
    "CREATE INDEX identity_accounts_username ON identity_accounts (username, provider);",
    # Every user id a sub of a provider signed in to, kept when that sub later signs in under
    # another (identity_accounts holds only its latest): one sub per user id of a provider.
    # The WHERE is SQLite's: without it, ON CONFLICT after a SELECT reads as a join's ON.
    """
    CREATE TABLE identity_user_bindings (
        provider TEXT NOT NULL,
        username TEXT NOT NULL,
        subject TEXT NOT NULL,
        bound_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (provider, username)
    );
    INSERT INTO identity_user_bindings (provider, username, subject, bound_at)
        SELECT provider, username, subject, last_login_at FROM identity_accounts WHERE 1 = 1
        ON CONFLICT (provider, username) DO NOTHING;
    """,  # The max_age a login asked of the provider (OpenID Connect Core 1.0 §3.1.2.1), checked
    # against the ID token's auth_time.
    "ALTER TABLE identity_login_states ADD COLUMN max_age INTEGER;",
]


def gateway_issuer(issuer: str) -> str:
    """The name a trusted issuer's access tokens bind users under (never a login provider's
    id, which has no space)."""
    return f"gateway {issuer}"


def id_jag_issuer(issuer: str) -> str:
    """The name an ID-JAG provider's assertions bind users under."""
    return f"id-jag {issuer}"


def account_taken(username: str, provider: str, claim: str = "sub") -> str:
    """What a person refused by `bound_elsewhere` is told, and how an administrator ends it."""
    return (
        f"The user {username} belongs to another account of {provider} (another {claim}): an"
        " administrator must release it (bastion users unlink) before this account can use it."
    )


def bound_elsewhere(
    db: Database, provider: str, username: str, subject: str, now: float
) -> str | None:
    """Bind ``username`` to ``subject`` of ``provider`` if no sub of it is bound yet; None when
    the user is ``subject``'s, else a sub it belongs to. Read first (on SQLite without the write
    lock: a user seen before costs no write); bound, then read again, in one transaction: of
    two first uses at once, the key lets one bind and the other find it bound. Inside a
    caller's transaction it joins it. Never on the event loop: it reads the database."""
    with db.transaction(read_only=True):
        bound = db.execute(
            "SELECT subject FROM identity_user_bindings WHERE provider = ? AND username = ?",
            (provider, username),
        )
    if not bound:
        with db.transaction():
            db.execute(
                "INSERT INTO identity_user_bindings (provider, username, subject, bound_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (provider, username) DO NOTHING",
                (provider, username, subject, now),
            )
            bound = db.execute(
                "SELECT subject FROM identity_user_bindings WHERE provider = ? AND username = ?",
                (provider, username),
            )
    other = next((s for (s,) in bound if s != subject), None)
    if other is not None:
        return other
    # identity_accounts too: two subs that signed in to one user before the bindings were kept
    # are both refused.
    with db.transaction(read_only=True):
        earlier = db.execute(
            "SELECT subject FROM identity_accounts WHERE provider = ? AND username = ?"
            " AND subject <> ?",
            (provider, username, subject),
        )
    return earlier[0][0] if earlier else None


def release_account(db: Database, username: str, *, actor: str) -> list[tuple[str, str]]:
    """Unbind ``username`` from the provider accounts (sub) that signed in to it or used it in
    a trusted issuer's token or an ID-JAG, so that the next account of a provider whose
    ``user_claim`` names it gets it (the one that had it was deleted at the provider, or its
    email or login name given to someone else). The user, their grants and facts stay; the
    facts the login kept in step with the claims are the next login's to put in step. Audited
    as ``user.unlinked``. Returns the accounts unbound: (provider, sub) each."""
    db.migrate("identity", MIGRATIONS)
    with db.transaction():
        rows = db.execute(
            "DELETE FROM identity_accounts WHERE username = ? RETURNING provider, subject",
            (username,),
        )
        rows += db.execute(
            "DELETE FROM identity_user_bindings WHERE username = ? RETURNING provider, subject",
            (username,),
        )
        released = sorted({(p, sub) for p, sub in rows})
        if released:
            AuditLog(db).record(
                "user.unlinked",
                subject=username,
                actor=actor,
                accounts=[{"provider": p, "sub": sub} for p, sub in released],
            )
    return released
