"""``private_key_jwt`` client authentication: a client proves itself with a JWT it signed with its
own private key (RFC 7523 §2.2 and §3, as profiled by OpenID Connect Core §9 and by MCP's client
credentials extension), checked against the public keys it registered (``jwks``) or publishes
(``jwks_uri``). No secret is shared with bastion.

The assertion's ``iss`` and ``sub`` are the client_id; ``aud`` is this server's issuer identifier
(what the MCP SDK sends, and what draft-ietf-oauth-rfc7523bis requires) or its token endpoint URL
(RFC 7523 §3), a single value; ``exp`` is at most ``max_lifetime_seconds`` after ``iat`` and after
now; ``jti`` is used once: every accepted ``(client_id, jti)`` is written to the database, which
every replica shares, until the assertion has expired, and a second use is refused. Only the
asymmetric algorithms of ``[oauth.client_assertion].algorithms`` are accepted (never ``none``,
never an HMAC keyed with a public key). Signatures are checked in a worker thread; a ``jwks_uri``
is fetched without blocking the event loop, with a timeout, a size cap and a cache, and, for a
client registered at /register (its registrant chose the URL), from public addresses and the
non-public ones ``allow_private_addresses`` allows (none by default; `bastion.egress`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from bastion import untrusted_json
from bastion.db import Database
from bastion.egress import cleartext_problem
from bastion.oauth.errors import InvalidClient, InvalidClientMetadata, InvalidRequest
from bastion.oauth.jwks import (
    FetchLimits,
    HeaderRefused,
    RemoteDocumentError,
    RemoteKeySets,
    SignatureRefused,
    protected_header,
    verified_claims,
)
from bastion.oauth.numeric_date import numeric_date
from bastion.oauth.settings import ClientAssertionSettings
from bastion.oauth.spent_jtis import SpentJtis
from bastion.oauth.store import Client

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
METHOD = "private_key_jwt"
# Asymmetric algorithms only: the server holds public keys, never a shared secret.
ASYMMETRIC_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
MAX_KEYS = 20
MAX_JTI_CHARS = 256
MAX_ASSERTION_CHARS = 8192
# Members of a JWK that only a private (or symmetric) key has: never registered with bastion.
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


def jwks_problem(jwks: Any, max_keys: int = MAX_KEYS) -> str | None:
    """Why ``jwks`` cannot be a client's registered key set, or None: a JSON Web Key Set of 1 to
    ``max_keys`` public asymmetric keys, each with a distinct ``kid`` when there are several."""
    if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list):
        return 'jwks must be a JSON Web Key Set: {"keys": [...]}'
    keys = jwks["keys"]
    if not 1 <= len(keys) <= max_keys:
        return f"jwks must hold 1 to {max_keys} keys"
    kids = []
    for i, key in enumerate(keys):
        if not isinstance(key, Mapping):
            return f"jwks.keys[{i}] must be a JSON object"
        if key.get("kty") not in ("RSA", "EC", "OKP"):
            return f"jwks.keys[{i}]: kty must be RSA, EC or OKP (a public key; no shared secrets)"
        private = [m for m in _PRIVATE_MEMBERS if m in key]
        if private:
            return (
                f"jwks.keys[{i}] holds private key material ({', '.join(private)}): register"
                " only the public key"
            )
        kid = key.get("kid")
        if kid is not None and not isinstance(kid, str):
            return f"jwks.keys[{i}]: kid must be text"
        kids.append(kid)
    if len(keys) > 1 and (None in kids or len(set(kids)) != len(kids)):
        return "jwks with several keys: each key needs a distinct kid"
    try:
        KeySet.import_key_set(json.loads(json.dumps(jwks)))
    except (JoseError, ValueError, TypeError, KeyError) as exc:  # KeyError: a curve unknown
        return f"jwks cannot be read as keys: {exc}"
    return None


def algorithms_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a setting's list of signing algorithms, or None: a non-empty list
    of asymmetric ones (never ``none``, never an HMAC keyed with a public key)."""
    if isinstance(value, list) and value and all(a in ASYMMETRIC_ALGORITHMS for a in value):
        return None
    return f"a non-empty list of {list(ASYMMETRIC_ALGORITHMS)} (asymmetric only), got {value!r}"


def url_problem(value: Any) -> str | None:
    """Why ``value`` cannot be an issuer's URL (or another of its endpoints), or None: https, or
    http to a loopback address; no fragment."""
    problem = jwks_uri_problem(value)
    return problem.removeprefix("jwks_uri ") if problem else None


def jwks_uri_problem(uri: Any) -> str | None:
    """Why ``uri`` cannot be a client's jwks_uri, or None: https, or http to a loopback address."""
    if not isinstance(uri, str) or len(uri) > 2000:
        return "jwks_uri must be a URL of at most 2000 characters"
    try:
        parts = urlsplit(uri)
    except ValueError:  # "https://[x": an IPv6 host not closed
        return "jwks_uri must be a valid URL"
    if parts.fragment or not parts.hostname:
        return "jwks_uri must be an absolute URL without a fragment"
    problem = cleartext_problem(uri)
    return f"jwks_uri {problem}" if problem else None


def key_metadata(metadata: Mapping[str, Any], method: str) -> dict[str, Any]:
    """The ``jwks`` or ``jwks_uri`` of client metadata (RFC 7591 §2), checked: exactly one for
    ``private_key_jwt``, neither for any other method. Raises `InvalidClientMetadata`."""
    jwks, uri = metadata.get("jwks"), metadata.get("jwks_uri")
    if method != METHOD:
        if jwks is not None or uri is not None:
            raise InvalidClientMetadata(
                f"jwks and jwks_uri are for token_endpoint_auth_method {METHOD!r} only"
            )
        return {}
    if (jwks is None) == (uri is None):
        raise InvalidClientMetadata(f"{METHOD} needs exactly one of jwks or jwks_uri")
    problem = jwks_problem(jwks) if jwks is not None else jwks_uri_problem(uri)
    if problem:
        raise InvalidClientMetadata(problem)
    return {"jwks": jwks} if jwks is not None else {"jwks_uri": uri}


class ClientAssertions:
    """Authenticates clients by ``private_key_jwt`` for one authorization server."""

    def __init__(
        self,
        settings: ClientAssertionSettings,
        db: Database,
        audiences: tuple[str, ...],
        leeway_seconds: int,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.audiences = audiences
        self.leeway = leeway_seconds
        self.clock = clock
        limits = FetchLimits(
            timeout_seconds=settings.jwks_timeout_seconds,
            max_bytes=settings.jwks_max_bytes,
            cache_seconds=settings.jwks_cache_seconds,
            refetch_seconds=settings.jwks_refetch_seconds,
            max_cached=settings.jwks_max_cached,
            time_setting="[oauth.client_assertion] jwks_timeout_seconds",
            bytes_setting="[oauth.client_assertion] jwks_max_bytes",
            refetch_setting="[oauth.client_assertion] jwks_refetch_seconds",
            private_setting="[oauth.client_assertion] allow_private_addresses",
        )
        # An administrator's client: its jwks_uri is the deployment's choice, fetched as given.
        self.key_sets = RemoteKeySets(limits, jwks_problem, clock, transport)
        # A client registered at /register: its registrant chose the jwks_uri, and anyone who
        # knows the client_id makes bastion fetch it, so only from public addresses (SSRF).
        self.registered_key_sets = RemoteKeySets(
            replace(limits, private_addresses=settings.allow_private_addresses),
            jwks_problem,
            clock,
            transport,
        )
        self.spent = SpentJtis(db)

    async def authenticate(
        self,
        assertion: str,
        client_id: str | None,
        find_client: Callable[[str], Awaitable[Client | None]],
    ) -> Client:
        """The client the assertion proves, or `InvalidClient` saying what is wrong with it.
        ``client_id`` is the request's own client_id parameter, if it sent one."""
        if len(assertion) > MAX_ASSERTION_CHARS:
            raise InvalidClient(f"client_assertion is longer than {MAX_ASSERTION_CHARS} characters")
        header, claims = _unverified(assertion)
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or not issuer:
            raise InvalidClient("the client assertion must name the client in iss")
        if claims.get("sub") != issuer:
            raise InvalidClient("the client assertion's sub must equal its iss (the client_id)")
        if client_id not in (None, issuer):
            raise InvalidRequest("client_id differs from the client assertion's iss")
        algorithm = header.get("alg")
        if algorithm not in self.settings.algorithms:
            raise InvalidClient(
                f"the client assertion's alg {algorithm!r} is not accepted; use one of"
                f" {list(self.settings.algorithms)}"
            )
        client = await find_client(issuer)
        if client is None or client.revoked_at is not None:
            raise InvalidClient(f"client {issuer!r} is unknown or revoked")
        if client.token_endpoint_auth_method != METHOD:
            raise InvalidClient(
                f"client {issuer!r} is registered for {client.token_endpoint_auth_method!r},"
                f" not {METHOD!r}"
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidClient("the client assertion's kid must be a string")
        keys = await self._keys(client, kid)
        verified = await anyio.to_thread.run_sync(self._verify, assertion, keys, kid, algorithm)
        expires_at = self._check_claims(verified)
        fresh = await anyio.to_thread.run_sync(
            self.spent.use_once, client.client_id, verified["jti"], expires_at
        )
        if not fresh:
            raise InvalidClient("this client assertion was already used (its jti is spent)")
        return client

    # -- keys ------------------------------------------------------------------------------

    async def _keys(self, client: Client, kid: str | None) -> KeySet:
        registered = client.metadata.get("jwks")
        if registered is not None:
            return await anyio.to_thread.run_sync(KeySet.import_key_set, registered)
        uri = client.metadata.get("jwks_uri")
        if not isinstance(uri, str):
            raise InvalidClient(f"client {client.client_id!r} has no registered keys")
        key_sets = self.key_sets if client.vouched_for else self.registered_key_sets
        try:
            return await key_sets.keys(uri, kid)
        except RemoteDocumentError as exc:
            raise InvalidClient(f"the client's jwks_uri {exc}") from None

    # -- the assertion ---------------------------------------------------------------------

    def _verify(self, assertion: str, keys: KeySet, kid: str | None, alg: str) -> dict[str, Any]:
        """In a worker thread: the claims, once the signature is checked with the one key the
        header names, or the only key (`bastion.oauth.jwks.verified_claims`)."""
        try:
            return verified_claims(assertion, keys, kid, alg)
        except SignatureRefused as refused:
            raise InvalidClient(refused.said_of("the client assertion", "the client")) from None

    def _check_claims(self, claims: Mapping[str, Any]) -> float:
        """The time until which the assertion's jti must be remembered; `InvalidClient` when a
        claim is missing or out of bounds."""
        now, leeway = self.clock(), self.leeway
        aud = claims.get("aud")
        if isinstance(aud, list) and len(aud) == 1:
            aud = aud[0]
        if aud not in self.audiences:
            raise InvalidClient(
                f"the client assertion's aud must be this server's issuer {self.audiences[0]!r}"
                f" (or its token endpoint {self.audiences[1]!r}), one value"
            )
        exp, iat = numeric_date(claims.get("exp")), numeric_date(claims.get("iat"))
        for name, value in (("exp", exp), ("iat", iat)):
            if value is None:
                raise InvalidClient(f"the client assertion needs {name}, a time in seconds")
        if exp <= now - leeway:
            raise InvalidClient("the client assertion has expired")
        if iat > now + leeway:
            raise InvalidClient("the client assertion was issued in the future (iat)")
        most = self.settings.max_lifetime_seconds
        if exp - iat > most or exp - now > most + leeway:
            raise InvalidClient(
                f"the client assertion lives longer than {most} s"
                " ([oauth.client_assertion].max_lifetime_seconds); sign one that expires sooner"
            )
        if "nbf" in claims:
            nbf = numeric_date(claims["nbf"])
            if nbf is None:
                raise InvalidClient("the client assertion's nbf must be a time in seconds")
            if nbf > now + leeway:
                raise InvalidClient("the client assertion is not valid yet (nbf)")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 1 <= len(jti) <= MAX_JTI_CHARS:
            raise InvalidClient(
                f"the client assertion needs jti, a unique string of 1 to {MAX_JTI_CHARS}"
                " characters"
            )
        return float(exp) + leeway

    def forget_expired(self, now: float) -> None:
        """Delete spent jtis whose assertions can no longer be accepted anyway."""
        self.spent.forget_expired(now)


def _unverified(assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and claims, before the signature is checked: only to find the client and
    its key. Nothing read here is trusted until `_verify`."""
    try:
        compact = jws.extract_compact(assertion.encode("ascii"))
        header = protected_header(compact)
        claims = untrusted_json.loads(compact.payload)
    except HeaderRefused as e:
        raise InvalidClient(f"the client assertion's {e}") from None
    except untrusted_json.JsonRefused as e:
        raise InvalidClient(f"the client assertion's claims are refused: {e}") from None
    except (JoseError, UnicodeError, ValueError):
        raise InvalidClient(
            "client_assertion is not a signed JWT (compact serialization)"
        ) from None
    if not isinstance(claims, dict):
        raise InvalidClient("the client assertion's payload must be a JSON object of claims")
    return header, claims
