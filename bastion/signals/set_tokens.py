"""Security Event Token verification (RFC 8417, as profiled by OpenID SSF 1.0 §4 and §10).

A SET is accepted only if it is a JWS signed with an allowed public-key algorithm by a key of the
transmitter's JWKS, has ``typ`` ``secevent+jwt``, the configured ``iss``, an ``aud`` that holds
bastion's audience, an ``iat`` neither stale nor in the future, a ``jti``, and ``events``, and no
``exp`` nor ``sub`` (SSF 1.0 §4.1.2-§4.1.3 and §4.1.7: they tell a SET from other JWTs). Each
refusal is the RFC 8935 §2.4 error code (``invalid_request``, ``invalid_key``, ``invalid_issuer``,
``invalid_audience``) with a sentence for the transmitter's operator. Replay (``jti``) is checked
by the receiver, which stores the jtis.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any

from joserfc.jwk import KeySet

from bastion import untrusted_json
from bastion.oauth.client_assertion import jwks_problem
from bastion.oauth.jwks import SignatureRefused, typ_is, verified_claims
from bastion.oauth.numeric_date import numeric_date

SET_TYPE = "secevent+jwt"
MAX_JTI = 256


class SetRefused(Exception):  # noqa: N818 - the RFC's word is "error"; this is a refusal
    """A SET refused, with the RFC 8935 ``err`` code and a ``description``."""

    def __init__(self, err: str, description: str) -> None:
        super().__init__(f"{err}: {description}")
        self.err = err
        self.description = description

    def as_dict(self) -> dict[str, str]:
        return {"err": self.err, "description": self.description}


@dataclass(frozen=True)
class VerifiedSet:
    jti: str
    issuer: str
    iat: float
    events: dict[str, dict[str, Any]]
    sub_id: Any = None
    txn: str | None = None
    claims: dict[str, Any] = field(default_factory=dict, repr=False)


def transmitter_jwks_problem(document: Any, max_keys: int) -> str | None:
    """Why a transmitter's JWKS cannot be used, or None: 1 to ``max_keys`` public keys
    (`bastion.oauth.client_assertion.jwks_problem`: no secret or private key material)."""
    problem = jwks_problem(document, max_keys)
    return None if problem is None else f"the transmitter's {problem}"


def unverified_kid(token: str) -> str | None:
    """The ``kid`` of a SET's header, before anything is checked (to fetch its key set)."""
    kid = _header(token).get("kid")
    if kid is not None and not isinstance(kid, str):
        raise SetRefused("invalid_request", "kid must be a string")
    return kid


def _header(token: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        raise SetRefused(
            "invalid_request", "a SET must be a compact JWS (three dot-separated parts)"
        )
    try:
        header = untrusted_json.loads(
            base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4))
        )
    except untrusted_json.JsonRefused as e:
        raise SetRefused("invalid_request", f"the SET's JOSE header is refused: {e}") from None
    except ValueError:
        raise SetRefused("invalid_request", "the SET's JOSE header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise SetRefused("invalid_request", "the SET's JOSE header must be a JSON object")
    return header


def verify_set(
    token: str,
    *,
    keys: KeySet,
    issuer: str,
    audience: str,
    algorithms: tuple[str, ...],
    clock_skew_seconds: float,
    max_age_seconds: float,
    now: float | None = None,
) -> VerifiedSet:
    """The SET's claims once every check passed; `SetRefused` for the first that fails. ``keys``
    is the transmitter's key set (`bastion.oauth.jwks.RemoteKeySets`, fetched for the kid)."""
    now = time.time() if now is None else now
    header = _header(token)
    alg = header.get("alg")
    if alg not in algorithms:
        raise SetRefused(
            "invalid_request",
            f"alg {alg!r} is not accepted; sign SETs with one of {', '.join(algorithms)}",
        )
    if not typ_is(header.get("typ"), SET_TYPE):
        raise SetRefused(
            "invalid_request",
            f"typ must be {SET_TYPE!r} or application/{SET_TYPE} (SSF 1.0, RFC 8417 §2.3)",
        )
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise SetRefused("invalid_request", "kid must be a string")
    try:
        claims = verified_claims(token, keys, kid, alg)
    except SignatureRefused as refused:
        # RFC 8935 §2.3: a key not found or a signature not verified is invalid_key.
        code = "invalid_request" if refused.reason == "claims" else "invalid_key"
        raise SetRefused(code, refused.said_of("the SET", "the transmitter")) from None
    if claims.get("iss") != issuer:
        raise SetRefused("invalid_issuer", f"iss must be {issuer!r}")
    aud = claims.get("aud")
    auds = aud if isinstance(aud, list) else [aud]
    if audience not in auds:
        raise SetRefused("invalid_audience", f"aud must hold {audience!r}")
    iat = numeric_date(claims.get("iat"))
    if iat is None:
        raise SetRefused("invalid_request", "iat (a number of seconds) is required")
    if iat > now + clock_skew_seconds:
        raise SetRefused("invalid_request", "iat is in the future; check the transmitter's clock")
    if iat < now - max_age_seconds:
        raise SetRefused(
            "invalid_request", f"the SET is stale: issued more than {max_age_seconds:g} s ago"
        )
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI:
        raise SetRefused("invalid_request", f"jti must be a string of 1 to {MAX_JTI} characters")
    events = claims.get("events")
    if (
        not isinstance(events, dict)
        or not events
        or not all(isinstance(v, dict) for v in events.values())
    ):
        raise SetRefused("invalid_request", "events must be an object of event type -> object")
    for claim, section, hint in (
        ("exp", "§4.1.7", ""),
        ("sub", "§4.1.2", "; name the subject in sub_id"),
    ):
        # SSF 1.0 §4.1.3: a SET carries neither, so an ID token or access token of the same
        # issuer, which carries both, is never taken for one.
        if claim in claims:
            raise SetRefused(
                "invalid_request", f"a SET must not carry {claim} (SSF 1.0 {section}){hint}"
            )
    txn = claims.get("txn") if isinstance(claims.get("txn"), str) else None
    return VerifiedSet(jti, issuer, float(iat), events, claims.get("sub_id"), txn, claims)
