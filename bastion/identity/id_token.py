"""Checking an ID token (OpenID Connect Core 1.0 §3.1.3.7) with joserfc: the ``alg`` among those
the provider announces and bastion accepts (`signing_algorithms`, step 7), the signature by the
one key of the provider's key set the header names, then the claims ``iss``, ``aud``, ``azp``,
``exp``, ``iat``, ``nbf`` when present (RFC 7519 §4.1.5), ``nonce`` and ``sub``; ``auth_time``
when a recent sign-in was asked for; ``acr`` when ``required_acr`` is set; ``acr`` and ``amr``,
when present, well formed (`sign_in_context`); and ``at_hash`` when the token holds one
(§3.1.3.8). The caller checks the ``alg`` before any key is fetched. Of a multi-tenant provider (Entra ID's
``/organizations``, whose metadata names an issuer template), ``iss`` must be the template with
the token's ``tid``, one of the provider's ``tenants`` (`expected_issuer`)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from typing import Any

from joserfc.jwk import KeySet

from bastion.constant_time import same
from bastion.identity.providers import PROVIDERS_TABLE, LoginRefused, OpenIDProvider
from bastion.identity.tenants import TenantRefused, tenant_issuer, token_tenant
from bastion.names import readable
from bastion.oauth.jwks import RemoteDocumentError, SignatureRefused, verified_claims
from bastion.oauth.numeric_date import numeric_date
from bastion.oauth.sign_in_context import SignInContext, SignInContextError, read_sign_in_context

ANNOUNCED = "id_token_signing_alg_values_supported"
# OpenID Connect Core §3.1.3.7 step 7: an ID token is signed with RS256 unless the client
# registered another alg; a provider that announces no list is held to it.
DEFAULT_ALGORITHM = "RS256"


def signing_algorithms(metadata: Mapping[str, Any], accepted: tuple[str, ...]) -> tuple[str, ...]:
    """The algorithms an ID token of the provider whose discovery document is ``metadata`` may
    be signed with: those of ``accepted`` (its ``algorithms``, asymmetric only) that the
    provider announces (OpenID Connect Discovery 1.0 §3, REQUIRED; RS256 when left out).
    `RemoteDocumentError` when the list is not a list of names, or shares none with
    ``accepted``: no ID token of the provider could be taken, whatever it is signed with."""
    announced = metadata.get(ANNOUNCED, [DEFAULT_ALGORITHM])
    if (
        not isinstance(announced, list)
        or not announced
        or not all(isinstance(a, str) for a in announced)
    ):
        raise RemoteDocumentError(
            f"its metadata's {ANNOUNCED} is not a list of algorithm names:"
            f" {readable(repr(announced))}"
        )
    usable = tuple(a for a in accepted if a in announced)
    if not usable:
        shown = readable(repr(announced[:10]))
        raise RemoteDocumentError(
            f"it signs ID tokens only with {shown} ({ANNOUNCED}), none of {list(accepted)}"
            " ([[identity.providers]] algorithms)"
        )
    return usable


def signed_claims(token: str, keys: KeySet, kid: str | None, alg: str) -> dict[str, Any]:
    """In a worker thread: the claims once the signature is checked with the one key the
    header names, or the provider's only key (`bastion.oauth.jwks.verified_claims`)."""
    try:
        return verified_claims(token, keys, kid, alg)
    except SignatureRefused as refused:
        if refused.reason == "kid":
            raise LoginRefused(
                "kid", "The ID token is not signed by a key of the provider."
            ) from None
        if refused.reason == "signature":
            raise LoginRefused(
                "signature", "The ID token's signature is not the provider's."
            ) from None
        raise LoginRefused(
            "claims", f"The ID token's claims cannot be taken: {refused.detail}"
        ) from None


def _number(claims: Mapping[str, Any], name: str) -> float:
    value = numeric_date(claims.get(name))
    if value is None:
        raise LoginRefused("claims", f"The ID token's {name!r} is missing or not a number.")
    return value


def expected_issuer(
    claims: Mapping[str, Any], provider: OpenIDProvider, template: str | None
) -> tuple[str, str | None]:
    """The issuer the ID token must name (OpenID Connect Core §3.1.3.7 step 2: "MUST exactly
    match"), and the tenant it is of: the provider's own issuer, and none; or, where the
    provider's metadata names the ``template`` of a multi-tenant provider, the template with
    the token's ``tid`` put for ``{tenantid}``, that ``tid`` being one of the provider's
    ``tenants`` (a ``sub`` names a person only within its tenant, and another company's tenant
    at the same provider is anyone). The tid is read before the signature is checked only to
    know which issuer to expect: every claim is checked after it."""
    if template is None:
        return provider.issuer, None
    try:
        tid = token_tenant(
            claims, provider.tenants, "The ID token", provider.shown_name, PROVIDERS_TABLE
        )
    except TenantRefused as refused:
        raise LoginRefused("tenant", f"{refused.reason}.", 403) from None
    return tenant_issuer(template, tid), tid


def check_claims(
    claims: dict[str, Any],
    provider: OpenIDProvider,
    nonce: str,
    now: float,
    login_seconds: int,
    issuer: str | None = None,
) -> None:
    """OpenID Connect Core §3.1.3.7, steps 2 to 11 that apply to the code flow; ``iss`` must be
    ``issuer`` (`expected_issuer`), by default the provider's."""
    expected = issuer or provider.issuer
    if claims.get("iss") != expected:
        told = "the provider" if expected == provider.issuer else f"its tenant's, {expected}"
        shown = readable(repr(claims.get("iss")))
        raise LoginRefused("iss", f"The ID token is from {shown}, not {told}.")
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if provider.client_id not in audiences:
        raise LoginRefused("aud", "The ID token is not for bastion (aud).")
    azp = claims.get("azp")
    if (len(audiences) > 1 or azp is not None) and azp != provider.client_id:
        raise LoginRefused("azp", "The ID token is for several parties and azp is not bastion.")
    # Core §3.1.3.7 step 3: refused if it "contains additional audiences not trusted by the
    # Client", whatever azp says; those the provider always adds are named in the settings.
    others = [
        a for a in audiences if a != provider.client_id and a not in provider.trusted_audiences
    ]
    if others:
        raise LoginRefused(
            "aud",
            f"The ID token is also for '{readable(str(others[0]))}', an audience bastion does not"
            f" trust (identity.providers trusted_audiences).",
        )
    leeway = provider.leeway_seconds
    if now > _number(claims, "exp") + leeway:
        raise LoginRefused("expired", "The ID token has expired.")
    issued_at = _number(claims, "iat")
    if issued_at > now + leeway or issued_at < now - login_seconds - leeway:
        raise LoginRefused("iat", "The ID token was not issued during this login (iat).")
    # RFC 7519 §4.1.5: a JWT "MUST NOT be accepted for processing" before its nbf (OPTIONAL in
    # an ID token, and Entra ID sends it), as a trusted issuer's access token or an ID-JAG is not.
    if "nbf" in claims and _number(claims, "nbf") > now + leeway:
        raise LoginRefused("nbf", "The ID token is not valid yet (nbf).")
    got = claims.get("nonce")
    if not isinstance(got, str) or not same(got, nonce):
        raise LoginRefused("nonce", "The ID token's nonce is not this login's.")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 255:
        raise LoginRefused("claims", "The ID token has no usable sub.")


def check_auth_time(
    claims: Mapping[str, Any], max_age: int | None, now: float, leeway: int
) -> None:
    """OpenID Connect Core §3.1.3.7 step 13: when the login asked the provider for ``max_age``
    (bastion's client asked for a recent sign-in), the ID token must say when the person
    signed in (``auth_time``, REQUIRED then, §2) and it must be that recent: a provider that
    took its own older session for the answer signs nobody in."""
    given = claims.get("auth_time")
    if given is None and max_age is None:
        return
    value = numeric_date(given)
    if value is None:
        raise LoginRefused(
            "auth_time",
            "A recent sign-in was asked for, and the provider did not say when you signed in"
            " (auth_time)."
            if given is None
            else "The ID token's 'auth_time' is not a number.",
        )
    if value > now + leeway:
        raise LoginRefused("auth_time", "The ID token's auth_time is in the future.")
    if max_age is not None and now - value > max_age + leeway:
        raise LoginRefused(
            "auth_time",
            f"A sign-in within {max_age} s was asked for, and the provider used one from"
            f" {int(now - value)} s ago: sign in there again.",
        )


def check_acr(claims: Mapping[str, Any], required: tuple[str, ...]) -> None:
    """OpenID Connect Core §3.1.3.7 step 11 ("the Client SHOULD check that the asserted acr
    Claim Value is appropriate"): with ``required_acr`` set, the ID token's ``acr`` must be one
    of it. A provider that left it out, or asserts another, signs nobody in: ``acr_values`` is
    only a request (§5.5.1.1, a voluntary claim), which a provider may answer with less."""
    if not required:
        return
    acr = claims.get("acr")
    if not isinstance(acr, str) or acr not in required:
        shown = "none" if acr is None else f"'{readable(str(acr))}'"
        raise LoginRefused(
            "acr",
            f"The provider signed you in with authentication context (acr) {shown}, and this"
            f" server requires one of {list(required)}: sign in there with a stronger method"
            " ([[identity.providers]] required_acr).",
            403,
        )


def sign_in_context(claims: Mapping[str, Any]) -> SignInContext:
    """How the provider says the person signed in: the ID token's ``acr`` and ``amr`` (Core
    §2), kept with the session and the grant for the policy (`bastion.oauth.sign_in_context`).
    A malformed one signs nobody in: a policy would read it as nothing said."""
    try:
        return read_sign_in_context(claims)
    except SignInContextError as e:
        raise LoginRefused(
            e.claim, f"The provider's ID token is refused: its {e}. Nobody is signed in."
        ) from None


# OpenID Connect Core §3.1.3.6: the hash of the alg's own hash function (for EdDSA, SHA-512, the
# hash of Ed25519 as the OpenID Foundation's implementers use it).
_HASHES = {"256": hashlib.sha256, "384": hashlib.sha384, "512": hashlib.sha512}


def access_token_hash(access_token: str, alg: str) -> str:
    """``at_hash`` of ``access_token`` for an ID token signed with ``alg`` (Core §3.1.3.6): the
    left half of its hash, base64url-encoded without padding."""
    digest = _HASHES["512" if alg == "EdDSA" else alg[-3:]](access_token.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=").decode("ascii")


def check_at_hash(claims: Mapping[str, Any], access_token: Any, alg: str) -> None:
    """OpenID Connect Core §3.1.3.8: in the code flow ``at_hash`` is OPTIONAL and the client MAY
    check it; bastion does whenever the ID token holds one, since the access token goes on to
    the UserInfo endpoint: an ID token that names another access token than the one sent with
    it signs nobody in."""
    given = claims.get("at_hash")
    if given is None:
        return
    if not isinstance(access_token, str) or not access_token.isascii():
        raise LoginRefused(
            "at_hash", "The ID token has an at_hash, and the provider sent no usable access token."
        )
    if not isinstance(given, str) or not same(given, access_token_hash(access_token, alg)):
        raise LoginRefused(
            "at_hash", "The ID token's at_hash is not that of the access token sent with it."
        )
