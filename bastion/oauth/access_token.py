"""RFC 9068 JWT profile for OAuth 2.0 access tokens: minting (``typ: at+jwt``, signed ES256)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from joserfc import jwt

from bastion.oauth.keys import ALGORITHM, KeyRing

TOKEN_TYPE = "at+jwt"


@dataclass(frozen=True)
class IssuedAccessToken:
    token: str
    jti: str
    expires_at: int
    scope: str


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
) -> IssuedAccessToken:
    """Sign an access token for one resource (``aud``), per RFC 9068 §2.2."""
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
    header = {"alg": ALGORITHM, "typ": TOKEN_TYPE, "kid": signer.kid}
    token = jwt.encode(header, claims, signer, algorithms=[ALGORITHM])
    return IssuedAccessToken(token, jti, issued_at + seconds, scope)
