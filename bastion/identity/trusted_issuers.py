"""Access tokens from trusted issuers: JWT access tokens (RFC 9068, RFC 7519) signed by an
identity provider the deployment names, accepted by the gateway next to bastion's own.

A token is taken to this module only when its (unverified) ``iss`` is a configured issuer; it is
then checked against that issuer alone: an asymmetric ``alg`` of the issuer's list (never
``none``, never an HMAC), the signature by the issuer's key set (``jwks_uri``, given or found
through OpenID Connect Discovery / RFC 8414 metadata, read again when its lifetime ends; a
``kid`` not in the cached set fetches it again), ``iss`` exactly, ``aud`` the value configured for the MCP server called, ``exp``,
``nbf`` and ``iat`` with the issuer's leeway, ``typ`` ``at+jwt`` when required, and, where the
issuer offers it, RFC 7662 introspection (a revoked token is refused once the short cache of its
answer ends; an introspection endpoint that cannot be reached refuses every token of the issuer:
fail closed). Claims map to the user, the agent and the scopes the policy sees. Where a claim
other than ``account_claim`` (``sub``) names the user, the user stays bound to the first account
that named it (`bastion.identity.accounts`), checked once per token verified, never per call.

An issuer of many tenants (Entra ID's ``/organizations``: its metadata's ``issuer`` a template
holding ``{tenantid}``) is taken only with ``tenants`` listed (`bastion.identity.tenants`): a token
whose ``iss`` is not a configured issuer is routed to such an issuer at the same origin, and taken
only when its ``tid`` is listed and its ``iss`` is exactly the template with that ``tid``; its
person's account is (tenant, ``sub``), every user bound to one, and its user is named per tenant
(``user_prefix`` ``{tenant}:`` by default), so that one ``sub`` of two tenants is two users.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
import httpx
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from bastion import untrusted_json
from bastion.audit.refusals import RefusalLog
from bastion.egress import PrivateAllowance, private_allowance
from bastion.environment import expand
from bastion.http_caching import KeptAnswers
from bastion.http_fields import field_value_problem
from bastion.identity.accounts import (
    MAX_ACCOUNT_CHARS,
    account_taken,
    default_account_claim,
    gateway_issuer,
)
from bastion.identity.tenants import (
    TENANT_IN_PREFIX,
    TenantRefused,
    issuer_template,
    tenant_account,
    tenant_issuer,
    tenant_settings,
    token_tenant,
    user_name,
)
from bastion.names import UNVERIFIED_EMAIL, readable, user_prefix_problem, vouched_for
from bastion.oauth.access_token import TOKEN_TYPE
from bastion.oauth.client_assertion import algorithms_problem, jwks_problem, url_problem
from bastion.oauth.client_metadata_document import MAX_CLIENT_ID_URL
from bastion.oauth.dpop import token_key
from bastion.oauth.errors import InvalidToken
from bastion.oauth.jwks import (
    FetchLimits,
    HeaderRefused,
    RemoteDocumentError,
    RemoteKeySets,
    SignatureRefused,
    fetch,
    issuer_metadata,
    protected_header,
    typ_is,
    verified_claims,
)
from bastion.oauth.numeric_date import numeric_date
from bastion.oauth.remote_metadata import (
    METADATA_CACHE_SECONDS,
    METADATA_STALE_SECONDS,
    RemoteMetadata,
)
from bastion.oauth.store import UserStanding
from bastion.oauth.verifier import VerifiedToken, token_sign_in

ISSUERS_TABLE = "[[gateway.trusted_issuers]]"
MAX_TOKEN_CHARS = 16_384
# The most characters of the user a token names (OpenID Connect's bound on ``sub``); its agent's
# client ID is bounded as bastion's own are (`MAX_CLIENT_ID_URL`), counted in UTF-8 bytes (bastion's
# own are ASCII). Both are stored in indexed columns (alerts, approvals), where PostgreSQL takes no
# entry over 2,704 bytes.
MAX_USER_CHARS = 255
_KEYS = {
    "issuer",
    "jwks_uri",
    "audiences",
    "user_claim",
    "user_prefix",
    "account_claim",
    "agent_claims",
    "algorithms",
    "require_typ",
    "leeway_seconds",
    "introspection_endpoint",
    "introspection_client_id",
    "introspection_client_secret",
    "introspection_cache_seconds",
    "timeout_seconds",
    "max_document_bytes",
    "jwks_cache_seconds",
    "jwks_refetch_seconds",
    "metadata_cache_seconds",
    "metadata_stale_seconds",
    "allow_private_addresses",
    "tenants",
}


class IssuerUnavailable(Exception):
    """A trusted issuer's keys, metadata or introspection cannot be had now: its tokens are
    refused until they can (answer 503, as when bastion's token store is down)."""


@dataclass(frozen=True)
class TrustedIssuer:
    """One ``[[gateway.trusted_issuers]]`` table (docs/identity.md)."""

    issuer: str
    # MCP server name -> the ``aud`` this issuer puts in tokens for it. A server not named here
    # accepts no token of this issuer.
    audiences: Mapping[str, str]
    jwks_uri: str = ""  # "": found through the issuer's metadata
    user_claim: str = "sub"
    # The user is this then the claim's value; "" (as before the setting): bastion's users of
    # the same name, local ones included.
    user_prefix: str = ""
    # The claim naming the person's account at the issuer, never given to another person: the
    # user ``user_claim`` names is bound to its first value (`bastion.identity.accounts`), unless
    # both are the same claim. Unset: `default_account_claim` of the ``user_claim``.
    account_claim: str = "sub"
    agent_claims: tuple[str, ...] = ("client_id", "azp")
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256", "EdDSA")
    require_typ: bool = False
    leeway_seconds: int = 30
    introspection_endpoint: str = ""
    introspection_client_id: str = ""
    introspection_client_secret: str = field(default="", repr=False)
    introspection_cache_seconds: int = 30
    timeout_seconds: int = 5
    max_document_bytes: int = 65536
    jwks_cache_seconds: int = 300
    jwks_refetch_seconds: int = 30
    # Its metadata is read again after at most this long (less when its headers say), and the
    # last good one is used this long past that while a new one cannot be had.
    metadata_cache_seconds: int = METADATA_CACHE_SECONDS
    metadata_stale_seconds: int = METADATA_STALE_SECONDS
    # The non-public addresses the jwks_uri and introspection endpoint its metadata names may be
    # reached at (`bastion.egress.private_allowance`); None: all if the issuer is itself on one,
    # else none (`bastion.egress.metadata_allowance`). Those configured here are fetched as given.
    allow_private_addresses: PrivateAllowance | None = None
    # The tenants of an issuer of many tenants (Entra ID's /organizations) whose tokens are
    # taken: its metadata's issuer is a template holding {tenantid}, and a token is taken only
    # when its tid is one of these and its iss the template with that tid
    # (`bastion.identity.tenants`). (): one tenant, the issuer as configured.
    tenants: tuple[str, ...] = ()

    @property
    def introspects(self) -> bool:
        return bool(self.introspection_client_id)

    @property
    def binds_accounts(self) -> bool:
        """Whether a user is bound to the first account that named it: where the user's name
        is not its account's own, or one ``sub`` may be two people (of two tenants)."""
        return self.user_claim != self.account_claim or bool(self.tenants)

    @classmethod
    def from_mapping(
        cls, where: str, table: Any, servers: set[str], env: Mapping[str, str]
    ) -> TrustedIssuer:
        """Read one table; ``ValueError`` names the key at fault. ``servers`` are the upstreams'
        names (an audience for a server that does not exist is a mistake); ``${NAME}`` in the
        introspection secret is taken from ``env``."""
        if not isinstance(table, Mapping):
            raise ValueError(f"{where}: a table with issuer and audiences")
        unknown = sorted(set(table) - _KEYS)
        if unknown:
            raise ValueError(
                f"unknown key {where}.{unknown[0]}; known keys: {', '.join(sorted(_KEYS))}"
            )
        issuer = table.get("issuer")
        problem = url_problem(issuer)
        if problem:
            raise ValueError(f"{where}.issuer: {problem}")
        audiences = table.get("audiences")
        if (
            not isinstance(audiences, Mapping)
            or not audiences
            or not all(isinstance(v, str) and v for v in audiences.values())
        ):
            raise ValueError(
                f"{where}.audiences: a table of MCP server name = the aud this issuer uses for"
                ' it, e.g. { desk = "api://desk" }'
            )
        strangers = sorted(set(audiences) - servers)
        if strangers:
            raise ValueError(f"{where}.audiences names {strangers[0]!r}, not a gateway upstream")
        tenants = tenant_settings(where, table)
        values: dict[str, Any] = {"issuer": issuer, "audiences": dict(audiences)}
        if tenants:
            values["tenants"] = tenants
            # One sub of two tenants is two users (`bastion.identity.tenants.user_name`).
            values["user_prefix"] = f"{TENANT_IN_PREFIX}:"
        for name in ("jwks_uri", "introspection_endpoint"):
            if name in table:
                problem = url_problem(table[name])
                if problem:
                    raise ValueError(f"{where}.{name}: {problem}")
                values[name] = table[name]
        for name in (
            "user_claim",
            "account_claim",
            "introspection_client_id",
            "introspection_client_secret",
        ):
            if name in table:
                if not isinstance(table[name], str) or not table[name]:
                    raise ValueError(f"{where}.{name} must be a non-empty string")
                values[name] = table[name]
        if "introspection_client_secret" in values:
            values["introspection_client_secret"] = secret = expand(
                values["introspection_client_secret"], env, f"{where}.introspection_client_secret"
            )
            if problem := field_value_problem(secret):
                raise ValueError(f"{where}.introspection_client_secret {problem}")
        if "user_prefix" in table:
            if problem := user_prefix_problem(table["user_prefix"]):
                raise ValueError(f"{where}.user_prefix: {problem}")
            values["user_prefix"] = table["user_prefix"]
        if "agent_claims" in table:
            claims = table["agent_claims"]
            if (
                not isinstance(claims, list)
                or not claims
                or not all(isinstance(c, str) and c for c in claims)
            ):
                raise ValueError(f"{where}.agent_claims must be a non-empty list of claim names")
            values["agent_claims"] = tuple(claims)
        if "algorithms" in table:
            if problem := algorithms_problem(table["algorithms"]):
                raise ValueError(f"{where}.algorithms: {problem}")
            values["algorithms"] = tuple(table["algorithms"])
        if "require_typ" in table:
            if not isinstance(table["require_typ"], bool):
                raise ValueError(f"{where}.require_typ must be true or false")
            values["require_typ"] = table["require_typ"]
        for name in (
            "leeway_seconds",
            "introspection_cache_seconds",
            "timeout_seconds",
            "max_document_bytes",
            "jwks_cache_seconds",
            "jwks_refetch_seconds",
            "metadata_cache_seconds",
            "metadata_stale_seconds",
        ):
            if name in table:
                value = table[name]
                zero = ("leeway_seconds", "introspection_cache_seconds", "metadata_stale_seconds")
                least = 0 if name in zero else 1
                if isinstance(value, bool) or not isinstance(value, int) or value < least:
                    raise ValueError(f"{where}.{name} must be a whole number >= {least}")
                values[name] = value
        if "allow_private_addresses" in table:
            values["allow_private_addresses"] = private_allowance(
                table["allow_private_addresses"], f"{where}.allow_private_addresses"
            )
        if "account_claim" not in values:
            values["account_claim"] = default_account_claim(values.get("user_claim", "sub"))
        found = cls(**values)
        has_id = bool(found.introspection_client_id)
        if has_id != bool(found.introspection_client_secret):
            raise ValueError(
                f"{where}: introspection needs both introspection_client_id and"
                " introspection_client_secret"
            )
        if found.introspection_endpoint and not has_id:
            raise ValueError(f"{where}.introspection_endpoint needs client credentials")
        return found


def parse_trusted_issuers(
    value: Any, servers: set[str], env: Mapping[str, str]
) -> tuple[TrustedIssuer, ...]:
    """The ``[[gateway.trusted_issuers]]`` array; ``ValueError`` on any mistake."""
    if not isinstance(value, list):
        raise ValueError("gateway.trusted_issuers must be an array of tables")
    issuers = tuple(
        TrustedIssuer.from_mapping(f"gateway.trusted_issuers[{i}]", t, servers, env)
        for i, t in enumerate(value)
    )
    names = [i.issuer for i in issuers]
    if len(set(names)) != len(names):
        raise ValueError("[[gateway.trusted_issuers]]: each issuer may appear only once")
    return issuers


def _configured(issuer: TrustedIssuer) -> bool:
    """Whether the settings name every endpoint of ``issuer`` bastion uses: its metadata is
    then never read. That of an issuer of many tenants always is: it names the template."""
    return (
        bool(issuer.jwks_uri)
        and bool(issuer.introspection_endpoint or not issuer.introspects)
        and not issuer.tenants
    )


@dataclass(frozen=True)
class _Endpoints:
    """What an issuer's settings and metadata name: its key set, its introspection endpoint
    ("": none), and the issuer template of an issuer of many tenants (None: one tenant)."""

    jwks_uri: str
    introspection_endpoint: str
    template: str | None = None


def _origin(url: str) -> tuple[str, str] | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return parts.scheme, parts.netloc


def _another_kind(typ: object) -> bool:
    """Whether a header's ``typ`` names a kind of JWT of its own (``oauth-id-jag+jwt``,
    ``secevent+jwt``, ``dpop+jwt``, ``logout+jwt``: RFC 8725 §3.11), which is never an access
    token, whatever ``require_typ`` says; a plain ``JWT`` or none says nothing."""
    return isinstance(typ, str) and typ.strip(" \t").lower().endswith("+jwt")


# Claims only an ID token holds (OpenID Connect Core §3.1.3.6, §3.3.2.11; FAPI 1.0 §5.1's s_hash):
# the hashes of the access token, code and state issued beside it.
_ID_TOKEN_HASHES = ("at_hash", "c_hash", "s_hash")


def _id_token_mark(claims: Mapping[str, Any]) -> str | None:
    """What shows ``claims`` to be an ID token's, whatever its header's ``typ``: a hash of what
    was issued beside it, or Keycloak's ``typ`` claim ``ID`` (its access tokens say ``Bearer``);
    None when nothing does. An ID token is for the client that signed the person in (its
    ``aud``), never a credential for a server (RFC 8725 §3.11), though its issuer signs it with
    the keys of its access tokens, typed plain ``JWT``."""
    held = next((c for c in _ID_TOKEN_HASHES if c in claims), None)
    if held is not None:
        return f"it holds {held}"
    typ = claims.get("typ")
    if isinstance(typ, str) and typ.strip().lower() == "id":
        return f"its typ claim is {typ!r}"
    return None


def _unverified_claims(token: str) -> dict[str, Any] | None:
    """The claims a compact JWS holds, before anything is checked (to route it): none (``{}``)
    when it is no compact JWS of a JSON object, None when its claims are JSON no reader may take
    (`bastion.untrusted_json`: a claim named twice...)."""
    if len(token) > MAX_TOKEN_CHARS:
        return {}
    try:
        compact = jws.extract_compact(token.encode("ascii"))
        claims = untrusted_json.loads(compact.payload)
    except untrusted_json.JsonRefused:
        return None
    except (JoseError, UnicodeError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


@dataclass
class _Remembered:
    verified: VerifiedToken
    introspected_at: float
    issuer: TrustedIssuer


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    seconds = numeric_date(value)
    if seconds is None:
        raise InvalidToken(f"claim {name!r} is not a number", "claims")
    return seconds


class TrustedIssuers:
    """Verifies the access tokens of the configured issuers for the gateway's servers."""

    def __init__(
        self,
        issuers: tuple[TrustedIssuer, ...],
        *,
        refusals: RefusalLog | None = None,
        clock: Callable[[], float] = time.time,
        max_tokens: int = 10_000,
        transport: httpx.AsyncBaseTransport | None = None,
        user_standing: Callable[..., UserStanding | Literal["off_loop"]] | None = None,
        owners: Callable[[str], Sequence[str]] | None = None,
        bound_elsewhere: Callable[[str, str, str], str | None] | None = None,
    ) -> None:
        self.issuers = {i.issuer: i for i in issuers}
        # origin -> the issuers of many tenants there, in the order configured: a token whose
        # iss is no configured issuer may be of one of their tenants (`_issuer_of`).
        self._many_tenants: dict[tuple[str, str] | None, tuple[TrustedIssuer, ...]] = {}
        for i in issuers:
            if i.tenants:
                origin = _origin(i.issuer)
                self._many_tenants[origin] = (*self._many_tenants.get(origin, ()), i)
        # (provider, username, account) -> None when the user is that account's (bound now if
        # it was nobody's), else the account it belongs to (`bastion.identity.accounts.
        # bound_elsewhere`, a database read: in a worker thread). Needed by an issuer whose
        # user_claim is not its account_claim: without it, a name the issuer gives to another
        # person would be theirs.
        self.bound_elsewhere = bound_elsewhere
        if bound_elsewhere is None and any(i.binds_accounts for i in issuers):
            raise ValueError(
                "a trusted issuer naming users by a claim other than its account_claim, or of"
                " many tenants, needs bound_elsewhere"
            )
        self.refusals = refusals
        # (username, on_loop) -> whether bastion has disabled the user, and when it last revoked
        # all their grants (`VerifiedTokens.user_standing`); None: not asked.
        self.user_standing = user_standing
        # client id -> the users that own the agent (this replica's view, in memory); None:
        # owners are not asked.
        self.owners = owners
        self.clock = clock
        self.max_tokens = max_tokens
        self.transport = transport
        # A jwks_uri configured is the operator's choice, fetched as given; one the issuer's
        # metadata names is reached only where its allow_private_addresses allows.
        self._key_sets = {
            i.issuer: RemoteKeySets(
                FetchLimits.of_issuer(i, ISSUERS_TABLE)
                if i.jwks_uri
                else FetchLimits.of_issuer_metadata(i, ISSUERS_TABLE),
                check=jwks_problem,
                clock=clock,
                transport=transport,
            )
            for i in issuers
        }
        # issuer -> its jwks_uri and introspection endpoint from its metadata, where they are
        # not both configured
        self._metadata = {
            i.issuer: RemoteMetadata.of(
                i,
                FetchLimits.of_issuer(i, ISSUERS_TABLE),
                partial(self._find_endpoints, i),
                table=ISSUERS_TABLE,
                peer=i.issuer,
                clock=clock,
            )
            for i in issuers
            if not _configured(i)
        }
        # (token digest, server) -> what verifying it found, until it expires
        self._tokens: dict[tuple[bytes, str], _Remembered] = {}
        self._lock = threading.Lock()

    def issuers_for(self, server: str) -> tuple[str, ...]:
        """The issuers whose tokens ``server`` accepts (for its protected-resource metadata)."""
        return tuple(i.issuer for i in self.issuers.values() if server in i.audiences)

    def claims_issuer(self, token: str) -> bool:
        """Whether ``token`` says it comes from one of the trusted issuers (unverified): its
        ``iss`` is one, or at the origin of one of many tenants."""
        claims = _unverified_claims(token)
        if claims is None:
            # Claims no reader may take are no token of bastion's (it writes none): `verify`
            # refuses them, saying why, where bastion's own verifier could only name the kid.
            return bool(self.issuers)
        issuer = claims.get("iss")
        return bool(self._candidates(issuer if isinstance(issuer, str) else None))

    def _candidates(self, claimed: str | None) -> tuple[TrustedIssuer, ...]:
        """The issuers a token claiming ``claimed`` (its ``iss``) may be of: the one configured
        as exactly that, else those of many tenants at its origin (each tenant its own issuer)."""
        if claimed is None:
            return ()
        exact = self.issuers.get(claimed)
        if exact is not None:
            return (exact,)
        return self._many_tenants.get(_origin(claimed), ()) if self._many_tenants else ()

    async def verify(self, token: str, server: str, address: str | None = None) -> VerifiedToken:
        """The token's facts for a call to ``server``; `InvalidToken` saying why it is refused,
        or `IssuerUnavailable` when its issuer's keys or introspection cannot be reached."""
        try:
            verified = await self._verify(token, server)
            await self._refuse_a_revoked_user(verified)
            return verified
        except InvalidToken as refused:
            if self.refusals is not None:
                # Its row is a database write: never on the event loop (anyone can send one).
                record = partial(
                    self.refusals.record,
                    "token.refused",
                    address=address,
                    reason=refused.check,
                    resource=server,
                    description=refused.reason,
                )
                await anyio.to_thread.run_sync(record)
            raise

    async def _refuse_a_revoked_user(self, verified: VerifiedToken) -> None:
        """On every use, not only the first: a user bastion holds and has disabled (`bastion
        users disable`, an SSF signal) is refused, as their grants are; so is a token issued
        (``iat``; none: 0) at or before the last revocation of all of its user's grants (an SSF
        ``session-revoked``, a password changed, a disable), as a grant resting on a sign-in
        from before it is. A user bastion neither holds nor revoked is the provider's to vouch
        for. A token of an agent acting as itself (its subject is its client id) is refused
        while its name is one of bastion's users, and while an owner of the agent (`owners`)
        is disabled."""
        user_standing = self.user_standing
        if user_standing is None:
            return
        user = verified.subject
        standing = user_standing(user, True)
        if standing == "off_loop":
            standing = await anyio.to_thread.run_sync(user_standing, user)
        refusal = standing.refusal(user, verified.issued_at)
        if refusal is not None:
            check, reason = refusal
            raise InvalidToken(reason, check)
        if user != verified.client_id:
            return  # a person's token: that person bounds the agent
        if standing.person:
            # Its name is the agent's, unprefixed (`_read`): as one of bastion's users, the
            # agent would be that person, with their roles, label sets and upstream connections.
            raise InvalidToken(
                f"the agent {user!r} acts as itself (its subject is its client id) and names one"
                " of bastion's users: an agent cannot be a person",
                "claims",
            )
        if self.owners is None:
            return
        # An agent acting as itself never outlasts its owner: a disabled owner refuses it.
        for owner in self.owners(user):
            standing = user_standing(owner, True)
            if standing == "off_loop":
                standing = await anyio.to_thread.run_sync(user_standing, owner)
            if standing.disabled:
                raise InvalidToken(
                    f"user {owner!r}, the owner of agent {user!r} (which acts as itself), is"
                    " disabled in bastion",
                    "disabled",
                )

    async def _refuse_another_person(self, verified: VerifiedToken, issuer: TrustedIssuer) -> None:
        """Once per token verified (a remembered one is not asked again): with a ``user_claim``
        other than the ``account_claim`` (an email, a login name, which the issuer may give to
        another person: a moved person's old address to a new hire), the user is the person's
        whose account (``sub`` by default) first named it, until an administrator releases it
        (``bastion users unlink``). A token of another account is refused; so is every later
        use of it, as it is not remembered."""
        claim = issuer.account_claim
        if not issuer.binds_accounts or self.bound_elsewhere is None:
            return  # the user's name is its account's: no other account can name it
        # Of an issuer of many tenants, the account is the tenant's (`_read` checked its tid).
        tenant = verified.claims["tid"] if issuer.tenants else None
        check = partial(
            self.bound_elsewhere,
            gateway_issuer(issuer.issuer),
            verified.subject,
            tenant_account(verified.claims[claim], tenant),
        )
        if await anyio.to_thread.run_sync(check) is not None:
            told = f"tid and {claim}" if issuer.tenants else claim
            raise InvalidToken(
                account_taken(verified.subject, issuer.issuer, told), "account_taken"
            )

    async def _verify(self, token: str, server: str) -> VerifiedToken:
        key = (hashlib.sha256(token.encode()).digest(), server)
        now = self.clock()
        remembered = self._tokens.get(key)
        if remembered is not None:
            issuer = remembered.issuer
            if now > remembered.verified.expires_at + issuer.leeway_seconds:
                with self._lock:
                    self._tokens.pop(key, None)
                raise InvalidToken("the token has expired", "expired")
            if not issuer.introspects or (
                now - remembered.introspected_at < issuer.introspection_cache_seconds
            ):
                return remembered.verified
            try:
                await self._introspect(issuer, token)
            except InvalidToken:
                with self._lock:
                    self._tokens.pop(key, None)
                raise
            remembered.introspected_at = self.clock()
            return remembered.verified
        verified, issuer = await self._check(token, server)
        if issuer.introspects:
            await self._introspect(issuer, token)
        await self._refuse_another_person(verified, issuer)
        with self._lock:
            if len(self._tokens) >= self.max_tokens:
                self._tokens.pop(next(iter(self._tokens)))
            self._tokens[key] = _Remembered(verified, self.clock(), issuer)
        return verified

    async def _check(self, token: str, server: str) -> tuple[VerifiedToken, TrustedIssuer]:
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidToken(f"the token is longer than {MAX_TOKEN_CHARS} characters", "format")
        try:
            compact = jws.extract_compact(token.encode("ascii"))
            header = protected_header(compact)
            unverified = untrusted_json.loads(compact.payload)
        except HeaderRefused as exc:
            raise InvalidToken(f"the token's {exc}", "format") from None
        except untrusted_json.JsonRefused as exc:
            raise InvalidToken(f"the token's claims are refused: {exc}", "claims") from None
        except (JoseError, UnicodeError, ValueError):
            raise InvalidToken("not a compact JWS", "format") from None
        if not isinstance(unverified, dict):
            unverified = {}
        claimed = unverified.get("iss")
        candidates = self._candidates(claimed if isinstance(claimed, str) else None)
        if not candidates:
            raise InvalidToken(f"iss {claimed!r} is not a trusted issuer", "iss")
        issuer, tenant, iss = await self._issuer_of(candidates, unverified, server)
        audience = issuer.audiences.get(server)
        if audience is None:
            raise InvalidToken(
                f"tokens of {issuer.issuer} are not accepted for server {server!r}", "aud"
            )
        alg = header.get("alg")
        if alg not in issuer.algorithms:
            raise InvalidToken(
                f"alg {alg!r} is not accepted for {issuer.issuer}; one of"
                f" {list(issuer.algorithms)}",
                "alg",
            )
        typ = header.get("typ")
        if (issuer.require_typ or _another_kind(typ)) and not typ_is(typ, TOKEN_TYPE):
            raise InvalidToken(f"typ {typ!r} is not {TOKEN_TYPE!r}", "typ")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("the header's kid is not a string", "kid")
        jwks_uri = (await self._endpoints_of(issuer)).jwks_uri
        try:
            keys = await self._key_sets[issuer.issuer].keys(jwks_uri, kid)
        except RemoteDocumentError as exc:
            raise IssuerUnavailable(f"the key set of {issuer.issuer} {exc}") from None
        claims = await anyio.to_thread.run_sync(self._signed_claims, token, keys, kid, alg)
        return self._read(claims, issuer, audience, iss, tenant), issuer

    async def _issuer_of(
        self, candidates: tuple[TrustedIssuer, ...], claims: Mapping[str, Any], server: str
    ) -> tuple[TrustedIssuer, str | None, str]:
        """Of the ``candidates`` for the unverified ``claims``, the issuer the token is of, its
        tenant (None: an issuer of one tenant) and the ``iss`` it must name: exactly the
        configured issuer's; or, of an issuer of many tenants, the template its metadata names
        with the token's ``tid`` put for ``{tenantid}``, that ``tid`` one of its ``tenants`` (a
        ``sub`` names a person only within its tenant, and another company's tenant at the same
        issuer is anyone). Of several issuers of many tenants taking that tenant's issuer, the
        first for ``server``. The tid is read before the signature is checked only to know
        which issuer and keys to take: the claims are checked again after it (`_read`)."""
        first = candidates[0]
        if not first.tenants:
            return first, None, first.issuer
        taken = tuple(t for i in candidates for t in i.tenants)
        try:
            tid = token_tenant(claims, taken, "the token", first.issuer, ISSUERS_TABLE)
        except TenantRefused as refused:
            raise InvalidToken(refused.reason, "tenant") from None
        listing = [i for i in candidates if tid in i.tenants]
        claimed = claims.get("iss")
        taking = []
        for each in listing:
            template = (await self._endpoints_of(each)).template
            if template is not None and claimed == tenant_issuer(template, tid):
                taking.append(each)
        if not taking:
            template = (await self._endpoints_of(listing[0])).template
            expected = tenant_issuer(template, tid) if template is not None else listing[0].issuer
            raise InvalidToken(
                f"iss {readable(repr(claimed))} is not the issuer of tenant '{tid}' at"
                f" {listing[0].issuer}, {expected}",
                "iss",
            )
        issuer = next((i for i in taking if server in i.audiences), taking[0])
        return issuer, tid, claimed

    def _signed_claims(self, token: str, keys: KeySet, kid: str | None, alg: str) -> dict:
        """In a worker thread: the claims once the signature is checked with the one key the
        header names, or the issuer's only key (`bastion.oauth.jwks.verified_claims`)."""
        try:
            return verified_claims(token, keys, kid, alg)
        except SignatureRefused as refused:
            raise InvalidToken(refused.said_of("the token", "the issuer"), refused.reason) from None

    def _read(
        self,
        claims: dict[str, Any],
        issuer: TrustedIssuer,
        audience: str,
        iss: str,
        tenant: str | None,
    ) -> VerifiedToken:
        # The issuer was found by ``iss`` (and ``tid``) in this very payload, whose signature
        # its keys have just verified: checked again, so that no other reading can differ.
        if claims.get("iss") != iss or (tenant is not None and claims.get("tid") != tenant):
            raise InvalidToken(f"the token is not of {iss}", "iss")
        aud = claims.get("aud")
        audiences = tuple(aud) if isinstance(aud, list) else (aud,)
        if audience not in audiences:
            raise InvalidToken(f"the token is for {aud!r}, not for {audience!r}", "aud")
        now, leeway = self.clock(), issuer.leeway_seconds
        expires_at = _number(claims, "exp")
        if expires_at is None:
            raise InvalidToken("claim 'exp' is missing", "claims")
        if now > expires_at + leeway:
            raise InvalidToken("the token has expired", "expired")
        issued_at = _number(claims, "iat")
        if issued_at is not None and issued_at > now + leeway:
            raise InvalidToken("the token is issued in the future", "iat")
        not_before = _number(claims, "nbf")
        if not_before is not None and not_before > now + leeway:
            raise InvalidToken("the token is not valid yet (nbf)", "nbf")
        if (mark := _id_token_mark(claims)) is not None:
            raise InvalidToken(
                f"the token is an ID token ({mark}), for the client that signed its person in:"
                " not an access token for this server",
                "typ",
            )
        if "act" in claims:
            # Every call is decided for the user through the agent the token names: the actor
            # would be left out of that chain (delegation chains come from bastion's exchange).
            raise InvalidToken(
                "the token names an actor (act), which bastion would leave out of the chain its"
                " calls are decided for: get the agent a token of its own, or exchange at bastion",
                "claims",
            )
        if claims.get("authorization_details") not in (None, []):
            # RFC 9396 §5: details narrow the scope; bastion does not read them, and would
            # allow what the scope alone allows.
            raise InvalidToken(
                "the token carries authorization_details (RFC 9396), which bastion does not read:"
                " it would allow more than they do",
                "claims",
            )
        user = claims.get(issuer.user_claim)
        if not isinstance(user, str) or not user:
            raise InvalidToken(f"claim {issuer.user_claim!r} (the user) is missing", "claims")
        if not vouched_for(claims, issuer.user_claim):
            raise InvalidToken(UNVERIFIED_EMAIL, "claims")
        account = claims.get(issuer.account_claim)
        if issuer.binds_accounts and (
            not isinstance(account, str) or not account or len(account) > MAX_ACCOUNT_CHARS
        ):
            # The user is bound to the account (`_refuse_another_person`): with none, the
            # issuer could give the name to another person unseen.
            raise InvalidToken(
                f"claim {issuer.account_claim!r} is missing or longer than {MAX_ACCOUNT_CHARS}"
                f" characters: the user {issuer.user_claim!r} names is bound to it",
                "claims",
            )
        agent = next(
            (a for c in issuer.agent_claims if isinstance(a := claims.get(c), str) and a), None
        )
        if agent is None:
            raise InvalidToken(
                f"none of the claims {list(issuer.agent_claims)} names the agent", "claims"
            )
        if len(agent.encode("utf-8", "surrogatepass")) > MAX_CLIENT_ID_URL:
            raise InvalidToken(
                f"the agent's client ID is longer than {MAX_CLIENT_ID_URL} bytes (UTF-8)", "claims"
            )
        if user != agent:
            # A person: in the issuer's namespace. An agent acting as itself (its client
            # credentials token names its own client id) stays its agent's name, as bastion's
            # own client credentials tokens do, so that its owners bound it.
            user = user_name(issuer.user_prefix, tenant, user)
        if len(user) > MAX_USER_CHARS:
            raise InvalidToken(
                f"claim {issuer.user_claim!r} (the user) is longer than {MAX_USER_CHARS}"
                " characters",
                "claims",
            )
        scope, scp = claims.get("scope"), claims.get("scp")
        if isinstance(scope, str):
            scopes = frozenset(scope.split())
        elif isinstance(scp, list) and all(isinstance(s, str) for s in scp):
            scopes = frozenset(scp)
        elif isinstance(scp, str):
            scopes = frozenset(scp.split())
        else:
            scopes = frozenset()
        jti = claims.get("jti")
        try:
            # A token the issuer bound to a DPoP key (RFC 9449 §6.1) is taken only with a proof
            # of that key, never as a Bearer token: the gateway checks it as for its own.
            jkt = token_key(claims)
        except ValueError as e:
            raise InvalidToken(str(e), "claims") from None
        sign_in = token_sign_in(claims, None)
        return VerifiedToken(
            subject=user,
            client_id=agent,
            scopes=scopes,
            audience=tuple(a for a in audiences if isinstance(a, str)),
            jti=jti if isinstance(jti, str) else "",
            issued_at=int(issued_at or 0),
            expires_at=int(expires_at),
            grant_id="",
            claims=claims,
            sign_in=sign_in,
            jkt=jkt,
        )

    # -- the issuer's endpoints ----------------------------------------------------------------

    async def _endpoints_of(self, issuer: TrustedIssuer) -> _Endpoints:
        """The issuer's jwks_uri and introspection endpoint, and the template of an issuer of
        many tenants: configured, or from its OpenID Connect Discovery document, else its RFC
        8414 metadata, read again when its lifetime ends and the last good one kept through a
        short outage (`RemoteMetadata`: one read at a time, a failure not tried again for
        ``jwks_refetch_seconds``)."""
        if _configured(issuer):
            return _Endpoints(issuer.jwks_uri, issuer.introspection_endpoint)
        try:
            return await self._metadata[issuer.issuer].get()
        except RemoteDocumentError as exc:
            raise IssuerUnavailable(str(exc)) from None

    async def _find_endpoints(
        self, issuer: TrustedIssuer, answers: KeptAnswers
    ) -> tuple[_Endpoints, float | None]:
        """What the issuer's metadata names (those configured win), each checked, and the
        lifetime its headers give; `RemoteDocumentError` when it cannot be had or fails a
        check (it then never replaces a good one). Its ``issuer`` is the configured one, or,
        for an issuer with ``tenants`` and only then, a template (`issuer_template`)."""
        limits = FetchLimits.of_issuer(issuer, ISSUERS_TABLE)
        names_issuer = partial(issuer_template, issuer.issuer, issuer.tenants, table=ISSUERS_TABLE)
        metadata, lifetime = await issuer_metadata(
            issuer.issuer, limits, self.transport, answers, names_issuer
        )
        jwks_uri = issuer.jwks_uri or metadata.get("jwks_uri")
        endpoint = issuer.introspection_endpoint or metadata.get("introspection_endpoint", "")
        for name, value in (("jwks_uri", jwks_uri), ("introspection_endpoint", endpoint)):
            if (value or name == "jwks_uri") and url_problem(value):
                raise RemoteDocumentError(
                    f"the metadata of {issuer.issuer} has no usable {name}: {value!r}"
                )
        if issuer.introspects and not endpoint:
            raise RemoteDocumentError(
                f"{issuer.issuer} offers no introspection_endpoint; configure one"
            )
        # `issuer_template` took it: the template where tenants are listed, else the issuer.
        template = metadata["issuer"] if issuer.tenants else None
        return _Endpoints(jwks_uri, endpoint, template), lifetime

    async def _introspect(self, issuer: TrustedIssuer, token: str) -> None:
        """RFC 7662: refuse a token its issuer says is not active; `IssuerUnavailable` when the
        answer cannot be had (fail closed)."""
        endpoint = (await self._endpoints_of(issuer)).introspection_endpoint
        limits = (
            FetchLimits.of_issuer(issuer, ISSUERS_TABLE)
            if issuer.introspection_endpoint  # configured: fetched as given
            else FetchLimits.of_issuer_metadata(issuer, ISSUERS_TABLE)
        )
        try:
            status, content = await fetch(
                "POST",
                endpoint,
                limits,
                self.transport,
                only=(200,),
                data={"token": token, "token_type_hint": "access_token"},
                auth=(issuer.introspection_client_id, issuer.introspection_client_secret),
                headers={"Accept": "application/json"},
            )
        except RemoteDocumentError as exc:
            raise IssuerUnavailable(
                f"the introspection endpoint of {issuer.issuer} {exc}"
            ) from None
        if status != 200:
            raise IssuerUnavailable(
                f"the introspection endpoint of {issuer.issuer} answered HTTP {status}"
            )
        try:
            answer = untrusted_json.loads(content)
        except untrusted_json.JsonRefused as exc:
            raise IssuerUnavailable(
                f"the introspection endpoint of {issuer.issuer} sent no JSON: {exc}"
            ) from None
        if not isinstance(answer, dict) or answer.get("active") is not True:
            raise InvalidToken("the issuer says the token is not active (revoked)", "revoked")
