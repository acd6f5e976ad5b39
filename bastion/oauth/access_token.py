"""RFC 9068 JWT profile for OAuth 2.0 access tokens: minting (``typ: at+jwt``, signed ES256).

``auth_time`` (RFC 9068 §2.2.1, as OpenID Connect Core 1.0 defines it) is when the person last
typed their password for the grant; a resource may ask for a fresher one (RFC 9470). ``acr`` and
``amr`` (§2.2.1 too) say how they signed in for it (`bastion.oauth.sign_in_context`): each token
of a grant carries the grant's, so neither a refresh nor an exchange ever changes them."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from joserfc import jwt

from bastion.oauth.keys import ALGORITHM, KeyRing
from bastion.oauth.sign_in_context import UNKNOWN, SignInContext

TOKEN_TYPE = "at+jwt"


@dataclass(frozen=True)
class IssuedAccessToken:
    token: str
    jti: str
    expires_at: int
    scope: str
    kid: str  # the key that signed it


def sign_in_claims(auth_time: float | None, sign_in: SignInContext) -> dict[str, Any]:
    """The claims that say when (``auth_time``, whole seconds) and how (``acr``, ``amr``) the
    person signed in for a grant, those known only: what each of its access tokens carries and
    what introspection answers of it and of its refresh token (RFC 9470 §3)."""
    said: dict[str, Any] = {} if auth_time is None else {"auth_time": int(auth_time)}
    said.update(sign_in.claims())
    return said


def mint_access_token(
    keys: KeyRing,
    *,
    issuer: str,
    subject: str,
    client_id: str,
    resource: str,
    scope: str,
    now: float,
    seconds: int,
    auth_time: float | None = None,
    sign_in: SignInContext = UNKNOWN,
    extra: Mapping[str, Any] | None = None,
) -> IssuedAccessToken:
    """Sign an access token for one resource (``aud``), per RFC 9068 §2.2. ``extra`` claims
    (a delegation's ``act`` and ``task``, RFC 8693 §4) are added; they never replace these."""
    signer = keys.signer()
    jti = uuid.uuid4().hex
    issued_at = int(now)
    claims = {
        "iss": issuer,
        "sub": subject,
        "aud": resource,
        "client_id": client_id,
        "scope": scope,
        "jti": jti,
        "iat": issued_at,
        "exp": issued_at + seconds,
    }
    claims.update(sign_in_claims(auth_time, sign_in))
    for name, value in (extra or {}).items():
        claims.setdefault(name, value)
    header = {"alg": ALGORITHM, "typ": TOKEN_TYPE, "kid": signer.kid}
    token = jwt.encode(header, claims, signer, algorithms=[ALGORITHM])
    return IssuedAccessToken(token, jti, issued_at + seconds, scope, signer.kid)
