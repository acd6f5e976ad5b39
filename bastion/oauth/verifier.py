"""Access token verification for resource servers (RFC 9068 §4, RFC 6750).

Checks, in order: the JOSE header (``alg`` ES256 only, ``typ`` ``at+jwt``, a known ``kid``), the
signature, ``iss``, ``aud`` (the resource this server is), ``exp``/``iat``/``nbf`` with a small
leeway, that the token is the very one issued under its ``jti`` (the digest stored at issue, so a
token signed with a stolen key under a live ``jti`` but with other claims is refused), and
revocation: a token whose ``jti`` or grant was revoked is refused on its next use.
Every refusal is an audit event: a token this server signed gets a row naming its user and
client; a forged or malformed one is aggregated with its like (`bastion.audit.refusals`).
`VerifiedTokens` remembers verified tokens for a resource server's per-request path (the MCP
gateway) without weakening the revocation rule.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from joserfc import jwt
from joserfc.errors import JoseError

from bastion import untrusted_json
from bastion.audit import AuditLog
from bastion.audit.refusals import RefusalLog
from bastion.constant_time import same
from bastion.db import Database, Listener
from bastion.oauth.access_token import TOKEN_TYPE
from bastion.oauth.dpop import token_key
from bastion.oauth.errors import InvalidToken
from bastion.oauth.jwks import typ_is
from bastion.oauth.keys import ALGORITHM, KeyRing
from bastion.oauth.numeric_date import numeric_date
from bastion.oauth.sign_in_context import (
    UNKNOWN,
    SignInContext,
    SignInContextError,
    read_sign_in_context,
)
from bastion.oauth.store import (
    REVOCATIONS_CHANNEL,
    USERS_CHANGED,
    AccessTokenState,
    OAuthStore,
    UserStanding,
    digest,
)

log = logging.getLogger("bastion.oauth.verifier")


@dataclass(frozen=True)
class VerifiedToken:
    """What a resource server learns from a valid access token."""

    subject: str
    client_id: str
    scopes: frozenset[str]
    audience: tuple[str, ...]
    jti: str
    issued_at: int
    expires_at: int
    grant_id: str
    claims: dict[str, Any]
    # When the person typed their password for this token's grant (``auth_time``), if known.
    auth_time: int | None = None
    # How the person signed in (``acr``, ``amr``), checked (`token_sign_in`); unknown when the
    # token says nothing of it.
    sign_in: SignInContext = UNKNOWN
    # A delegated token's agents (RFC 8693 ``act``), from the first one the user let act to
    # ``client_id``; empty for a token without ``act``.
    agents: tuple[str, ...] = ()
    task: str | None = None  # the task the token is bound to (its ``task`` claim)
    # The task whose session labels its calls read and record ("" for none), where that is not
    # ``task``: a delegation bound to a task its subject token was not keeps the subject's
    # labels (the ``labels_task`` claim, docs/delegation.md).
    labels_task: str | None = None
    # The thumbprint of the DPoP key the token is bound to (``cnf.jkt``, RFC 9449 §6.1): it is
    # then accepted only with a proof of that key (`bastion.oauth.dpop`).
    jkt: str | None = None

    @property
    def label_set_task(self) -> str:
        """The task whose session labels this token's calls read and record ("" for none)."""
        return self.labels_task if self.labels_task is not None else self.task or ""


def _header(token: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("not a compact JWS (three dot-separated parts)", "format")
    try:
        raw = base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4))
        # Read before any signature is checked: anyone's JSON, so nesting is bounded (JsonRefused
        # is a ValueError), never a RecursionError.
        header = untrusted_json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidToken("the JOSE header is not base64url JSON", "format") from exc
    if not isinstance(header, dict):
        raise InvalidToken("the JOSE header is not a JSON object", "format")
    return header


def _number(claims: dict[str, Any], name: str) -> int:
    value = numeric_date(claims.get(name))
    if value is None:
        raise InvalidToken(f"claim {name!r} is missing or not a number", "claims", claims)
    return int(value)


class TokenVerifier:
    """Verifies bastion access tokens against the issuer's keys and revocation state."""

    def __init__(
        self,
        *,
        issuer: str,
        keys: KeyRing,
        store: OAuthStore,
        audit: AuditLog,
        clock: Callable[[], float],
        leeway_seconds: int = 30,
        refusals: RefusalLog | None = None,
    ) -> None:
        self.issuer = issuer
        self.keys = keys
        self.store = store
        self.audit = audit
        self.refusals = refusals or RefusalLog(audit, clock=clock)
        self.clock = clock
        self.leeway = leeway_seconds

    def verify(
        self, token: str, resource: str | None, audit: bool = True, address: str | None = None
    ) -> VerifiedToken:
        """Return the token's facts, or raise `InvalidToken` saying why it is refused.

        ``resource`` is the URI this resource server is known by; the token's ``aud`` must name
        it. ``None`` skips only the audience check (for introspection, which reports ``aud``).
        ``audit=False`` is for the server's own look-ups (introspection, revocation), which are
        not uses of the token. ``address`` is the caller's, for the audit of a refusal.
        """
        try:
            return self._verify(token, resource)
        except InvalidToken as refused:
            if audit:
                self._record_refusal(refused, resource, address)
            raise

    def _record_refusal(
        self, refused: InvalidToken, resource: str | None, address: str | None
    ) -> None:
        """A token this server signed keeps a row of its own, naming its user and client; any
        other (forged, malformed, from another issuer) proves nothing and is aggregated."""
        claims = refused.claims
        if claims is None:
            self.refusals.record(
                "token.refused",
                address=address,
                reason=refused.check,
                resource=resource,
                description=refused.reason,
            )
            return
        text = {k: v if isinstance(v, str) else None for k, v in claims.items()}
        self.audit.record(
            "token.refused",
            subject=text.get("sub"),
            client_id=text.get("client_id"),
            address=address,
            reason=refused.check,
            resource=resource,
            description=refused.reason,
        )

    def _verify(self, token: str, resource: str | None) -> VerifiedToken:
        header = _header(token)
        if header.get("alg") != ALGORITHM:
            raise InvalidToken(
                f"alg {header.get('alg')!r} is not accepted; tokens are {ALGORITHM}", "alg"
            )
        if not typ_is(header.get("typ"), TOKEN_TYPE):
            raise InvalidToken(
                f"typ {header.get('typ')!r} is not {TOKEN_TYPE!r} (RFC 9068 §4)", "typ"
            )
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise InvalidToken("the header has no kid", "kid")
        keys = self.keys.public_keys()
        if not _has_kid(keys, kid):
            keys = self.keys.public_keys(refresh=True)
            if not _has_kid(keys, kid):
                raise InvalidToken(f"kid {kid!r} is not a key of issuer {self.issuer}", "kid")
        try:
            claims = jwt.decode(token, keys, algorithms=[ALGORITHM]).claims
        except (JoseError, ValueError) as exc:
            raise InvalidToken(f"signature or encoding is invalid: {exc}", "signature") from exc
        # From here on the token is one this server signed: a refusal concerns its client and user.
        claims = dict(claims)
        if claims.get("iss") != self.issuer:
            raise InvalidToken(f"iss {claims.get('iss')!r} is not {self.issuer!r}", "iss", claims)
        audience = claims.get("aud")
        audiences = tuple(audience) if isinstance(audience, list) else (audience,)
        if resource is not None and resource not in audiences:
            raise InvalidToken(
                f"the token is for {audience!r}, not for {resource!r}", "aud", claims
            )
        now = self.clock()
        expires_at = _number(claims, "exp")
        issued_at = _number(claims, "iat")
        if now > expires_at + self.leeway:
            raise InvalidToken("the token has expired", "expired", claims)
        if issued_at > now + self.leeway:
            raise InvalidToken("the token is issued in the future", "iat", claims)
        if "nbf" in claims and _number(claims, "nbf") > now + self.leeway:
            raise InvalidToken("the token is not valid yet (nbf)", "nbf", claims)
        for name in ("sub", "client_id", "jti"):
            if not isinstance(claims.get(name), str):
                raise InvalidToken(f"claim {name!r} is missing", "claims", claims)
        state = self.store.access_token_state(claims["jti"])
        if state is None:
            raise InvalidToken(
                "the token was not issued by this server (unknown jti)", "jti", claims
            )
        if not _as_issued(token, expires_at, state):
            # Well signed, yet not what was issued: made with bastion's signing key elsewhere.
            log.warning(
                "refused an access token signed with bastion's key whose claims differ from"
                " those issued under its jti %s: a signing key may be stolen (docs/security.md)",
                claims["jti"],
            )
            raise InvalidToken(
                "the token was not issued by this server (not the token issued under its jti)",
                "jti",
                claims,
            )
        if state.revoked:
            raise InvalidToken("the token or its grant has been revoked", "revoked", claims)
        agents = delegation_chain(claims)
        task = claims.get("task")
        if task is not None and (not isinstance(task, str) or not task):
            raise InvalidToken("claim 'task' is not a task id", "claims", claims)
        labels_task = claims.get("labels_task")
        if labels_task is not None and not isinstance(labels_task, str):
            raise InvalidToken("claim 'labels_task' is not a task id", "claims", claims)
        try:
            jkt = token_key(claims)
        except ValueError as e:
            raise InvalidToken(str(e), "claims", claims) from None
        sign_in = token_sign_in(claims, claims)
        scope = claims.get("scope", "")
        return VerifiedToken(
            subject=claims["sub"],
            client_id=claims["client_id"],
            scopes=frozenset(scope.split()) if isinstance(scope, str) else frozenset(),
            audience=audiences,
            jti=claims["jti"],
            issued_at=issued_at,
            expires_at=int(state.expires_at),  # as stored: what `VerifiedTokens` keeps it until
            grant_id=state.grant_id,
            claims=dict(claims),
            auth_time=_auth_time(claims),
            sign_in=sign_in,
            agents=agents,
            task=task,
            labels_task=labels_task,
            jkt=jkt,
        )


def token_sign_in(claims: dict[str, Any], recorded: dict[str, Any] | None) -> SignInContext:
    """A token's ``acr`` and ``amr`` (`bastion.oauth.sign_in_context`); `InvalidToken` for a
    malformed one, which a policy would otherwise read as nothing said (``recorded``: the claims
    the refusal's audit row names, None for a token whose issuer is not bastion)."""
    try:
        return read_sign_in_context(claims)
    except SignInContextError as e:
        raise InvalidToken(f"the token's {e}", "claims", recorded) from None


def _as_issued(token: str, expires_at: int, state: AccessTokenState) -> bool:
    """Whether ``token`` is the one stored as issued under its ``jti``: the same digest, every
    claim and the header compared at once. A row from before digests were kept can only be
    compared by its expiry; such tokens end within ``access_token_seconds`` of the upgrade."""
    if state.token_digest is None:
        return expires_at == int(state.expires_at)
    return same(state.token_digest, digest(token))


# More nested ``act`` claims than any chain bastion issues (``max_delegation_depth`` is at most
# 16): a token with more is malformed, and is not walked further.
MAX_ACT_NESTING = 17


def delegation_chain(claims: dict[str, Any]) -> tuple[str, ...]:
    """The agents of a delegated token, oldest first, from its ``act`` claim (RFC 8693 §4.1:
    the top-level ``act`` is the current actor, each nested ``act`` the one before it); empty
    without ``act``. Raise `InvalidToken` for a malformed one: not an object, a ``sub`` that is
    not a non-empty string, nesting past `MAX_ACT_NESTING`, or a current actor that is not the
    token's ``client_id``."""
    act = claims.get("act")
    if act is None:
        return ()
    actors: list[str] = []
    while act is not None:
        if not isinstance(act, dict) or not isinstance(act.get("sub"), str) or not act["sub"]:
            raise InvalidToken("claim 'act' is malformed (RFC 8693 §4.1)", "claims", claims)
        if len(actors) >= MAX_ACT_NESTING:
            raise InvalidToken("claim 'act' nests too deep", "claims", claims)
        actors.append(act["sub"])
        act = act.get("act")
    if actors[0] != claims.get("client_id"):
        raise InvalidToken(
            "the current actor (act.sub) is not the token's client_id", "claims", claims
        )
    return tuple(reversed(actors))


# How long a use waits for the revocation listener to handle a notice that has reached this
# process before reading the token's state instead.
CATCH_UP = 0.1


class VerifiedTokens:
    """Tokens `TokenVerifier` accepted, remembered until they expire, for per-request use.

    A token's signature and claims are checked once; after that only its revocation matters, and
    how that is learnt depends on the database:

    - SQLite: the state is read again whenever ``PRAGMA data_version`` (on a connection of this
      object's own) has moved, which it does on every commit by any other connection or process.
      A revocation committed anywhere is refused on the token's next use; uses in between read
      no rows.
    - PostgreSQL: each revocation NOTIFYs `REVOCATIONS_CHANNEL` in its transaction, and a
      `Listener` of this object's own forgets the grant's tokens when it hears it. While that
      listener is healthy a remembered token is checked in memory, once the listener has
      handled every notice that reached this process (`Listener.caught_up`: one can wait for
      the GIL while a call is decided); while it is not healthy (starting, reconnecting,
      silent) or does not catch up within `CATCH_UP` seconds, every use reads the state as
      before, and once it is back every remembered token is forgotten, since a revocation may
      have been missed meanwhile.

    Either way a revocation through ``verifier.store`` (this process) forgets the grant's tokens
    as soon as it commits. On the event loop `remembered` is asked with ``on_loop``: where it
    would wait or read it says so, and is asked again from a worker thread.

    The same rules keep `user_standing` current, for the tokens of trusted issuers, which rest on
    no grant of bastion's: a user disabled anywhere, or all of whose grants were revoked
    (`USERS_CHANGED`, sent by `OAuthStore.disable_user` and `OAuthStore.revoke_user_grants` in
    their transactions), is known on the next use.
    """

    def __init__(self, verifier: TokenVerifier, database_url: str, max_tokens: int = 10_000):
        self.verifier = verifier
        self.max_tokens = max_tokens
        self.db = Database(database_url, role="bastion-tokens")
        self._store = OAuthStore(self.db)
        # (token, resource) -> [VerifiedToken, change marker when its state was last read]
        self._tokens: dict[tuple[str, str | None], list] = {}
        # grant_id -> the keys of ``_tokens`` it issued, so a revocation finds them at once
        self._grants: dict[str, set[tuple[str, str | None]]] = {}
        # Moves at every forgetting: a `verify` that overlapped one does not remember its token.
        self._forgotten = 0
        self._lock = threading.Lock()
        self._forget_callbacks: list[Callable[[str], None]] = []
        # username -> [UserStanding, change marker when read] (`user_standing`)
        self._users: dict[str, list] = {}
        self._users_forgotten = 0  # as ``_forgotten``, for ``_users``
        verifier.store.on_revoked(self._heard)
        self.listener: Listener | None = None
        if self.db.is_postgres:
            self.listener = Listener(
                database_url,
                REVOCATIONS_CHANNEL,
                on_notify=self._notified,
                on_listening=self._forget_all,
                name="bastion-revocations",
                confirms=True,
            )
            self.listener.start()

    @property
    def local(self) -> bool:
        """True when `remembered` would answer at once, on the event loop too: always on SQLite,
        and on PostgreSQL while the revocation listener is healthy and not behind."""
        listener = self.listener
        return listener is None or (listener.healthy and not listener.behind())

    def remembered(
        self, token: str, resource: str | None, on_loop: bool = False
    ) -> VerifiedToken | None | Literal["off_loop"]:
        """The token's facts if it was verified before and is still valid; None means: call
        `verify` (a token not seen yet, expired, revoked, or forgotten). ``on_loop``: the caller
        is the event loop, so instead of waiting for the listener or reading the token's state
        (on SQLite: after another commit, which may have revoked it) this answers
        ``"off_loop"``: ask again from a worker thread."""
        key = (token, resource)
        entry = self._tokens.get(key)
        if entry is None:
            return None
        verified, seen = entry
        if self.verifier.clock() > verified.expires_at + self.verifier.leeway:
            with self._lock:
                self._drop(key)
            return None
        listener = self.listener
        if listener is not None:
            # A revocation the listener has handled has removed the entry (looked up again: it
            # may have done so since the first look).
            if listener.healthy and not listener.behind():
                return verified if self._tokens.get(key) is entry else None
            if on_loop:
                return "off_loop"
            if listener.healthy and listener.caught_up(CATCH_UP):
                return verified if self._tokens.get(key) is entry else None
        # SQLite, or PostgreSQL without a healthy listener (or one that did not catch up).
        marker = self.db.data_version(wait=not on_loop)
        if marker is None or marker != seen:
            if on_loop:
                return "off_loop"  # the token's state is read in a worker thread, not here
            state = self._store.access_token_state(verified.jti)
            if state is None or state.revoked:
                with self._lock:
                    self._drop(key)
                return None
            entry[1] = marker
        return verified

    def verify(self, token: str, resource: str | None, address: str | None = None) -> VerifiedToken:
        """`TokenVerifier.verify` (every check, refusals audited), then remember the token."""
        # Both read before the state, so a revocation in between is seen.
        marker = self.db.data_version()
        forgotten = self._forgotten
        verified = self.verifier.verify(token, resource, address=address)
        with self._lock:
            if self._forgotten != forgotten:
                return verified  # valid when read, but not remembered: the next use verifies
            if len(self._tokens) >= self.max_tokens:
                now = self.verifier.clock()
                for key, (known, _) in list(self._tokens.items()):
                    if now > known.expires_at + self.verifier.leeway:
                        self._drop(key)
                while len(self._tokens) >= self.max_tokens:
                    self._drop(next(iter(self._tokens)))
            key = (token, resource)
            self._tokens[key] = [verified, marker]
            self._grants.setdefault(verified.grant_id, set()).add(key)
        return verified

    def user_standing(
        self, username: str, on_loop: bool = False
    ) -> UserStanding | Literal["off_loop"]:
        """Whether ``username`` is one of bastion's users and disabled, and when all their
        grants were last revoked (for any name). Remembered, and read again as a remembered
        token's revocation state is: on SQLite once ``data_version`` has moved; on PostgreSQL
        once a user's standing changed anywhere (`USERS_CHANGED`), or on every use while the
        listener is not healthy. ``on_loop`` as for `remembered`."""
        entry = self._users.get(username)
        listener = self.listener
        if entry is not None:
            if listener is None:
                if self.db.data_version(wait=not on_loop) == entry[1]:
                    return entry[0]
            elif (
                listener.healthy
                and (not listener.behind() or (not on_loop and listener.caught_up(CATCH_UP)))
                # A notice the listener has handled has removed the entry (looked up again).
                and self._users.get(username) is entry
            ):
                return entry[0]
        if on_loop:
            return "off_loop"
        # Both read before the standing, so a change in between is seen.
        marker = self.db.data_version()
        forgotten = self._users_forgotten
        standing = self._store.user_standing(username)
        with self._lock:
            if self._users_forgotten == forgotten:
                if len(self._users) >= self.max_tokens:
                    self._users.pop(next(iter(self._users)))
                self._users[username] = [standing, marker]
        return standing

    def _drop(self, key: tuple[str, str | None]) -> None:
        """Under the lock: forget one remembered token."""
        entry = self._tokens.pop(key, None)
        if entry is not None:
            keys = self._grants.get(entry[0].grant_id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._grants[entry[0].grant_id]

    def on_forget(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(grant_id)`` whenever a grant's tokens are forgotten because it, or one
        of its tokens, was revoked, and ``callback(USERS_CHANGED)`` whenever a user's standing
        changed (disabled, or all their grants revoked: what the tokens of trusted issuers rest
        on), on the thread that learnt of it: the revoking one, or the listener's."""
        self._forget_callbacks.append(callback)

    def _forget_grant(self, grant_id: str) -> None:
        """A token of the grant, or the grant, was revoked: forget every token it issued."""
        with self._lock:
            self._forgotten += 1
            for key in self._grants.pop(grant_id, ()):
                self._tokens.pop(key, None)
        self._tell(grant_id)

    def _tell(self, payload: str) -> None:
        """Tell `on_forget`'s callbacks of ``payload`` (a grant_id, or `USERS_CHANGED`)."""
        for callback in list(self._forget_callbacks):
            try:
                callback(payload)
            except Exception:  # a subscriber's failure must not undo or break a revocation
                log.exception("a subscriber to revocations failed")

    def _notified(self, payload: str) -> None:
        """A revocation or a change of a user's standing, committed by any process (this one
        included), has been announced."""
        self._heard(payload)

    def _heard(self, payload: str) -> None:
        """A revocation (a grant_id) or a change of a user's standing (`USERS_CHANGED`) has
        committed, told by NOTIFY or by this process's store."""
        if payload == USERS_CHANGED:
            with self._lock:
                self._users_forgotten += 1
                self._users.clear()
            self._tell(payload)
        else:
            self._forget_grant(payload)

    def _forget_all(self) -> None:
        with self._lock:
            self._forgotten += 1
            self._tokens.clear()
            self._grants.clear()
            self._users_forgotten += 1
            self._users.clear()

    def close(self) -> None:
        self.verifier.store.off_revoked(self._heard)
        self._forget_callbacks.clear()
        if self.listener is not None:
            self.listener.stop()
        self.db.close()


def _has_kid(keys: Any, kid: str) -> bool:
    return any(key.kid == kid for key in keys.keys)


def _auth_time(claims: dict[str, Any]) -> int | None:
    """The ``auth_time`` claim as a whole number of seconds; None when absent or malformed (a
    resource that needs it then asks the person to sign in again: fail closed)."""
    value = claims.get("auth_time")
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value
