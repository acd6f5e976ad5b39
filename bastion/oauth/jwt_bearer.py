"""The JWT bearer authorization grant (RFC 7523 §2.1, §3, §3.1; RFC 7521 §4.1, §5.2) for
Identity Assertion JWT Authorization Grants (ID-JAG, draft-ietf-oauth-identity-assertion-authz-grant
§3, §4.4), as MCP's enterprise-managed authorization extension profiles them: an agent signed in
to a company's identity provider presents an ID-JAG that provider issued for bastion, and gets an
access token for one MCP server with no consent screen (the provider's policy decided that).

An ID-JAG is accepted only from a configured identity provider (``[[oauth.id_jag.issuers]]``),
signed with an asymmetric algorithm of its list by a key of its key set (``jwks_uri``, given or
found through its metadata), with ``typ`` ``oauth-id-jag+jwt``, ``aud`` bastion's issuer alone,
``client_id`` the client that authenticated at ``/token`` (a confidential one), ``exp``, ``iat`` (at
most ``max_lifetime_seconds`` apart), ``sub`` and a ``jti`` used once (kept per provider in the
database every replica shares), no ``act`` (an actor bastion's token would drop), and, with a
``cnf``, a DPoP proof of its key (``jkt``); a ``tenant`` only from a provider that lists it
(``tenants``: one issuer for many tenants, whose ``sub`` is a person only within its tenant), and an
``aud_tenant`` only bastion's own at the provider (``aud_tenant``). ``resource`` names bastion's
protected resource (of several, the one the request's ``resource`` names; absent, the request's own
``resource``), which the response names; ``scope`` holds only that resource's scopes. The token
carries the scopes of the ID-JAG that the request asked for and the client is registered for. The
user is the provider's ``user_prefix`` then the value of its ``user_claim``: a bastion user (a
disabled one is refused; never a client's id, which names an agent acting as itself), and the policy
decides every call of the token as for any other. With a ``user_claim`` other than its
``account_claim`` (``sub``; an email, which the provider may give to another person), the user stays
bound to the first account that got a token for it (`bastion.identity.accounts`), as every user of a
provider with ``tenants`` is to its tenant's account. An ``aud_sub``, the user's id at bastion, must
be that user. Every refusal is ``invalid_grant`` (RFC 7521 §5.2) but a request that asks for more
than the ID-JAG grants (``invalid_scope``) or another resource (``invalid_target``). The ID-JAG's
``acr`` and ``amr``, how the person signed in at the provider, are checked as an ID token's are
(`bastion.oauth.sign_in_context`: a malformed one is refused) and carried by the grant and its
token. No refresh token is issued: the client asks its provider for a fresh ID-JAG, so the provider
stays in charge.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from bastion import untrusted_json
from bastion.egress import PrivateAllowance, private_allowance
from bastion.http_caching import KeptAnswers
from bastion.identity.accounts import (
    MAX_ACCOUNT_CHARS,
    account_taken,
    bound_elsewhere,
    default_account_claim,
    id_jag_issuer,
)
from bastion.identity.accounts import MIGRATIONS as IDENTITY_MIGRATIONS
from bastion.identity.tenants import tenant_account
from bastion.names import MAX_NAME_LENGTH, UNVERIFIED_EMAIL, user_prefix_problem, vouched_for
from bastion.oauth.client_assertion import (
    algorithms_problem,
    jwks_problem,
    jwks_uri_problem,
    url_problem,
)
from bastion.oauth.dpop import token_key
from bastion.oauth.errors import InvalidGrant, InvalidScope, InvalidTarget, OAuthError
from bastion.oauth.jwks import (
    FetchLimits,
    HeaderRefused,
    RemoteDocumentError,
    RemoteKeySets,
    SignatureRefused,
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
from bastion.oauth.settings import ProtectedResource, same_resource
from bastion.oauth.sign_in_context import SignInContext, SignInContextError, read_sign_in_context
from bastion.oauth.spent_jtis import SpentJtis
from bastion.oauth.store import Client, Grant

if TYPE_CHECKING:
    from bastion.oauth.server import AuthorizationServer

JWT_BEARER_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ID_JAG_TYPE = "oauth-id-jag+jwt"
# How an authorization server says it accepts ID-JAGs (the draft's §7.2, MCP's extension §6).
ID_JAG_PROFILE = "urn:ietf:params:oauth:grant-profile:id-jag"
ID_JAG_TABLE = "[[oauth.id_jag.issuers]]"
MAX_ASSERTION_CHARS = 16_384
MAX_JTI_CHARS = 256
USER_MODES = ("existing", "any")
_ISSUER_KEYS = {
    "issuer",
    "jwks_uri",
    "user_claim",
    "user_prefix",
    "account_claim",
    "users",
    "algorithms",
    "timeout_seconds",
    "max_document_bytes",
    "jwks_cache_seconds",
    "jwks_refetch_seconds",
    "metadata_cache_seconds",
    "metadata_stale_seconds",
    "allow_private_addresses",
    "tenants",
    "aud_tenant",
}
# The longest tenant id taken (as the longest account id: OpenID Connect's bound on sub).
MAX_TENANT_CHARS = MAX_ACCOUNT_CHARS


@dataclass(frozen=True)
class TrustedIdp:
    """One ``[[oauth.id_jag.issuers]]`` table: an identity provider whose ID-JAGs are taken."""

    issuer: str
    jwks_uri: str = ""  # "": found through the provider's metadata
    user_claim: str = "sub"
    # The user is this then the claim's value; "" (as before the setting): bastion's users of
    # the same name, local ones included.
    user_prefix: str = ""
    # The claim naming the person's account at the provider, never given to another person: the
    # user ``user_claim`` names is bound to its first value (`bastion.identity.accounts`), unless
    # both are the same claim. Unset: `default_account_claim` of the ``user_claim``.
    account_claim: str = "sub"
    # "existing": the user must be one of bastion's (created by an admin or at first sign-in);
    # "any": the claim's value is the user whether bastion knows them or not.
    users: str = "existing"
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256", "EdDSA")
    timeout_seconds: int = 5
    max_document_bytes: int = 65536
    jwks_cache_seconds: int = 300
    jwks_refetch_seconds: int = 30
    # Its metadata is read again after at most this long (less when its headers say), and the
    # last good one is used this long past that while a new one cannot be had.
    metadata_cache_seconds: int = METADATA_CACHE_SECONDS
    metadata_stale_seconds: int = METADATA_STALE_SECONDS
    # The non-public addresses the jwks_uri its metadata names may be reached at
    # (`bastion.egress.private_allowance`); None: all if the issuer is itself on one, else none
    # (`bastion.egress.metadata_allowance`). A jwks_uri configured here is fetched as given.
    allow_private_addresses: PrivateAllowance | None = None
    # The provider's tenants whose ID-JAGs are taken (the draft's ``tenant``: one issuer for
    # many tenants, whose ``sub`` names a person only within its tenant); () : the provider is
    # one tenant, and an ID-JAG naming a tenant is refused.
    tenants: tuple[str, ...] = ()
    # bastion's tenant at the provider (the draft's ``aud_tenant``); None: bastion is none, and
    # an ID-JAG naming one is refused.
    aud_tenant: str | None = None

    @property
    def binds_accounts(self) -> bool:
        """Whether a user is bound to the first account that named it
        (`IdentityAssertionGrant._bound_to_its_account`): the ``user_claim`` is not the account's
        own, or one ``sub`` may be two people (of two tenants)."""
        return self.user_claim != self.account_claim or bool(self.tenants)

    @classmethod
    def from_mapping(cls, where: str, table: Any) -> TrustedIdp:
        """Read one table; ``ValueError`` names the key at fault."""
        if not isinstance(table, Mapping):
            raise ValueError(f"{where}: a table with issuer")
        unknown = sorted(set(table) - _ISSUER_KEYS)
        if unknown:
            raise ValueError(
                f"unknown key {where}.{unknown[0]}; known keys: {', '.join(sorted(_ISSUER_KEYS))}"
            )
        values: dict[str, Any] = {}
        for name in ("issuer", "jwks_uri"):
            if name in table or name == "issuer":
                if problem := url_problem(table.get(name)):
                    raise ValueError(f"{where}.{name}: {problem}")
                values[name] = table[name]
        for name in ("user_claim", "account_claim"):
            if name in table:
                if not isinstance(table[name], str) or not table[name]:
                    raise ValueError(f"{where}.{name} must be a claim name")
                values[name] = table[name]
        if "user_prefix" in table:
            if problem := user_prefix_problem(table["user_prefix"]):
                raise ValueError(f"{where}.user_prefix: {problem}")
            values["user_prefix"] = table["user_prefix"]
        if "users" in table:
            if table["users"] not in USER_MODES:
                raise ValueError(f"{where}.users must be one of {list(USER_MODES)}")
            values["users"] = table["users"]
        if "algorithms" in table:
            if problem := algorithms_problem(table["algorithms"]):
                raise ValueError(f"{where}.algorithms: {problem}")
            values["algorithms"] = tuple(table["algorithms"])
        for name in (
            "timeout_seconds",
            "max_document_bytes",
            "jwks_cache_seconds",
            "jwks_refetch_seconds",
            "metadata_cache_seconds",
            "metadata_stale_seconds",
        ):
            if name in table:
                value = table[name]
                least = 0 if name == "metadata_stale_seconds" else 1
                if isinstance(value, bool) or not isinstance(value, int) or value < least:
                    raise ValueError(f"{where}.{name} must be a whole number >= {least}")
                values[name] = value
        if "allow_private_addresses" in table:
            values["allow_private_addresses"] = private_allowance(
                table["allow_private_addresses"], f"{where}.allow_private_addresses"
            )
        if "tenants" in table:
            tenants = table["tenants"]
            if (
                not isinstance(tenants, list)
                or not tenants
                or any(_tenant_problem(t) for t in tenants)
            ):
                raise ValueError(
                    f"{where}.tenants must be a list of tenant ids (printable strings of 1 to"
                    f" {MAX_TENANT_CHARS} characters), the tenants of the issuer taken"
                )
            if len(set(tenants)) != len(tenants):
                raise ValueError(f"{where}.tenants: a tenant appears more than once")
            values["tenants"] = tuple(tenants)
        if "aud_tenant" in table:
            if _tenant_problem(table["aud_tenant"]):
                raise ValueError(
                    f"{where}.aud_tenant must be bastion's tenant id at the issuer (a printable"
                    f" string of 1 to {MAX_TENANT_CHARS} characters)"
                )
            values["aud_tenant"] = table["aud_tenant"]
        if "account_claim" not in values:
            values["account_claim"] = default_account_claim(values.get("user_claim", "sub"))
        return cls(**values)


def _tenant_problem(value: Any) -> bool:
    return (
        not isinstance(value, str)
        or not 1 <= len(value) <= MAX_TENANT_CHARS
        or not value.isprintable()
    )


@dataclass(frozen=True)
class IdJagSettings:
    """The ``[oauth.id_jag]`` table (docs/identity.md, "Enterprise-managed authorization")."""

    issuers: tuple[TrustedIdp, ...] = ()
    # The most an ID-JAG may live (exp - iat): its jti is kept that long.
    max_lifetime_seconds: int = 600

    @property
    def enabled(self) -> bool:
        return bool(self.issuers)

    @classmethod
    def from_mapping(cls, table: Any) -> IdJagSettings:
        if not isinstance(table, Mapping):
            raise ValueError("oauth.id_jag: a table")
        unknown = sorted(set(table) - {"issuers", "max_lifetime_seconds"})
        if unknown:
            raise ValueError(
                f"oauth.id_jag: unknown keys {unknown}; known keys are"
                " ['issuers', 'max_lifetime_seconds']"
            )
        issuers = table.get("issuers", [])
        if not isinstance(issuers, list):
            raise ValueError("oauth.id_jag.issuers: an array of tables ([[oauth.id_jag.issuers]])")
        found = tuple(
            TrustedIdp.from_mapping(f"oauth.id_jag.issuers[{i}]", t) for i, t in enumerate(issuers)
        )
        if len({i.issuer for i in found}) != len(found):
            raise ValueError("oauth.id_jag.issuers: each issuer may appear only once")
        lifetime = table.get("max_lifetime_seconds", 600)
        if isinstance(lifetime, bool) or not isinstance(lifetime, int) or not 1 <= lifetime <= 3600:
            raise ValueError("oauth.id_jag.max_lifetime_seconds: a whole number from 1 to 3600")
        return cls(issuers=found, max_lifetime_seconds=lifetime)


@dataclass(frozen=True)
class IdJag:
    """What a verified ID-JAG asserts."""

    issuer: str
    client_id: str
    # The resources it names (the draft's ``resource``: one URI or an array); () for none.
    resources: tuple[str, ...]
    scopes: tuple[str, ...]
    jti: str
    expires_at: float
    # The thumbprint of the DPoP key it is bound to (``cnf.jkt``), or None.
    jkt: str | None = None
    # The provider's tenant it names (``tenant``), one of the provider's ``tenants``; or None.
    tenant: str | None = None
    claims: dict[str, Any] = field(repr=False, default_factory=dict)


class IdentityAssertionGrant:
    """The ``jwt-bearer`` grant of the token endpoint (`bastion.oauth.tokens.TokenEndpoint`)."""

    def __init__(
        self,
        server: AuthorizationServer,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.server = server
        self.settings = server.settings
        self.id_jag = server.settings.id_jag
        self.idps = {i.issuer: i for i in self.id_jag.issuers}
        self.clock: Callable[[], float] = server.clock
        self.transport = transport
        # The jtis of client assertions and DPoP proofs live there too, under other signers.
        self.spent: SpentJtis = server.assertions.spent
        # A jwks_uri configured is the operator's choice, fetched as given; one the provider's
        # metadata names is reached only where its allow_private_addresses allows.
        self._key_sets = {
            i.issuer: RemoteKeySets(
                FetchLimits.of_issuer(i, ID_JAG_TABLE)
                if i.jwks_uri
                else FetchLimits.of_issuer_metadata(i, ID_JAG_TABLE),
                check=jwks_problem,
                clock=self.clock,
                transport=transport,
            )
            for i in self.id_jag.issuers
        }
        # The jwks_uri of each provider that has none configured, from its metadata.
        self._metadata = {
            i.issuer: RemoteMetadata.of(
                i,
                FetchLimits.of_issuer(i, ID_JAG_TABLE),
                partial(self._find_jwks_uri, i),
                table=ID_JAG_TABLE,
                peer=i.issuer,
                clock=self.clock,
            )
            for i in self.id_jag.issuers
            if not i.jwks_uri
        }
        if any(i.binds_accounts for i in self.id_jag.issuers):
            server.db.migrate("identity", IDENTITY_MIGRATIONS)  # `_bound_to_its_account`

    # -- the grant (a worker thread: `TokenEndpoint.exchange`) ---------------------------------

    def exchange(
        self,
        client: Client,
        form: Mapping[str, str],
        issue: Callable[..., dict[str, Any]],
        jkt: str | None = None,
    ) -> dict[str, Any]:
        """Answer one ``jwt-bearer`` request of the authenticated ``client``, or raise;
        ``issue(grant, authorized_at=, strangers=)`` saves the new grant (refused, as
        `OAuthStore.create_grant` says, if its user was disabled or their grants revoked since
        the ID-JAG was issued) and mints its access token (no refresh token), bound to ``jkt``,
        the key the request's DPoP proof proved (checked already), if any."""
        if client.is_public:
            # draft §8.1: public clients use the authorization code flow and its consent.
            raise OAuthError(
                "unauthorized_client",
                "the jwt-bearer grant needs a confidential client (one that authenticates)",
            )
        assertion = form.get("assertion")
        if not assertion:
            raise OAuthError("invalid_request", "assertion is required: the ID-JAG")
        header, unverified = _unverified(assertion)
        idp, keys = anyio.from_thread.run(self._keys, header, unverified)
        claims = self._verified(assertion, keys, header)
        found = self._check(idp, claims, client)
        sign_in = _sign_in(claims)  # before its jti is spent: a refused ID-JAG spends nothing
        if found.jkt is not None and jkt != found.jkt:
            # The draft's "ID-JAG Contains cnf Claim": no proof, or one of another key, is
            # invalid_grant; a thief holding the ID-JAG (and the client's secret) gets nothing.
            raise InvalidGrant(
                "the ID-JAG is bound to a DPoP key (cnf.jkt): send a DPoP proof made with that"
                " key" + ("" if jkt is None else ", not with another")
            )
        resource = self._resource(form, found)
        scope = self._scope(form, found, resource.scopes, client)
        user = self._user(idp, found)
        self._bound_to_its_account(idp, user, found)
        now = self.clock()
        if not self.spent.use_once(
            f"id-jag {idp.issuer}", found.jti, found.expires_at + self.settings.leeway_seconds
        ):
            raise InvalidGrant("this ID-JAG was already used (its jti is spent); ask for another")
        grant = Grant(
            grant_id=uuid.uuid4().hex,
            client_id=client.client_id,
            username=user,
            resource=resource.uri,
            scope=" ".join(scope),
            created_at=now,
            expires_at=now + self.settings.access_token_seconds,
            revoked_at=None,
            auth_time=_auth_time(claims),
            sign_in=sign_in,
        )
        response = issue(grant, authorized_at=float(claims["iat"]), strangers=idp.users == "any")
        # The draft (Access Token Request, Processing Rules): the server "MUST include the
        # granted resource ... in the access token response"; of several, the one granted.
        response["resource"] = resource.uri
        self.server.audit.record(
            "token.issued",
            subject=user,
            client_id=client.client_id,
            grant_id=grant.grant_id,
            grant_type=JWT_BEARER_GRANT_TYPE,
            idp=idp.issuer,
            idp_subject=claims.get("sub"),
            idp_tenant=found.tenant,
            resource=grant.resource,
            requested_scope=form.get("scope"),
            scope=grant.scope,
        )
        return response

    # -- keys (on the event loop) -------------------------------------------------------------

    async def _keys(
        self, header: Mapping[str, Any], claims: Mapping[str, Any]
    ) -> tuple[TrustedIdp, KeySet]:
        typ = header.get("typ")
        if not typ_is(typ, ID_JAG_TYPE):
            raise InvalidGrant(f"the assertion's typ is {typ!r}, not {ID_JAG_TYPE!r} (an ID-JAG)")
        issuer = claims.get("iss")
        idp = self.idps.get(issuer) if isinstance(issuer, str) else None
        if idp is None:
            raise InvalidGrant(f"iss {issuer!r} is not a trusted identity provider")
        alg = header.get("alg")
        if alg not in idp.algorithms:
            raise InvalidGrant(
                f"alg {alg!r} is not accepted for {idp.issuer}; one of {list(idp.algorithms)}"
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidGrant("the assertion's kid is not a string")
        try:
            uri = await self._jwks_uri(idp)
            return idp, await self._key_sets[idp.issuer].keys(uri, kid)
        except RemoteDocumentError as exc:
            raise OAuthError(
                "temporarily_unavailable",
                f"the key set of {idp.issuer} cannot be had now: {exc}",
                503,
            ) from None

    async def _jwks_uri(self, idp: TrustedIdp) -> str:
        """The provider's jwks_uri: configured, or from its metadata, read again when its
        lifetime ends and the last good one kept through a short outage (`RemoteMetadata`: one
        read at a time, a failure not tried again for ``jwks_refetch_seconds``)."""
        if idp.jwks_uri:
            return idp.jwks_uri
        return await self._metadata[idp.issuer].get()

    async def _find_jwks_uri(
        self, idp: TrustedIdp, answers: KeptAnswers
    ) -> tuple[str, float | None]:
        limits = FetchLimits.of_issuer(idp, ID_JAG_TABLE)
        metadata, lifetime = await issuer_metadata(idp.issuer, limits, self.transport, answers)
        uri = metadata.get("jwks_uri")
        problem = jwks_uri_problem(uri)
        if problem:
            raise RemoteDocumentError(f"its metadata has no usable jwks_uri: {problem}")
        return uri, lifetime

    # -- checks (a worker thread) -------------------------------------------------------------

    def _verified(self, assertion: str, keys: KeySet, header: Mapping[str, Any]) -> dict[str, Any]:
        kid = header.get("kid")
        try:
            return verified_claims(assertion, keys, kid, header["alg"])
        except SignatureRefused as refused:
            raise InvalidGrant(refused.said_of("the ID-JAG", "the identity provider")) from None

    def _check(self, idp: TrustedIdp, claims: Mapping[str, Any], client: Client) -> IdJag:
        # ``iss`` is ``idp.issuer``: the provider was found by it in the payload its key signed.
        aud = claims.get("aud")
        # The draft: an array "MUST contain exactly one element", bastion's issuer; an ID-JAG
        # for several audiences would be redeemable at each of them (audience injection).
        if aud != self.settings.issuer and aud != [self.settings.issuer]:
            raise InvalidGrant(
                f"the ID-JAG is for {aud!r}, not for this authorization server"
                f" {self.settings.issuer!r} alone (aud)"
            )
        if "act" in claims:
            # bastion's token would act for the user through the client alone: the actor the
            # provider names would be dropped from the chain every call is decided for.
            raise InvalidGrant(
                "the ID-JAG names an actor (act); bastion takes none: its token acts for the"
                " user through the client alone, and would drop the actor"
            )
        if claims.get("authorization_details") not in (None, []):
            # RFC 9396 §5: details narrow what the provider authorized; bastion does not read
            # them, and its token, granted the scope alone, would allow more than they do.
            raise InvalidGrant(
                "the ID-JAG carries authorization_details (RFC 9396), which bastion does not"
                " read: its token would allow more than they do; ask the provider for scopes"
                " alone"
            )
        jkt = self._bound_key(claims)
        now, leeway = self.clock(), self.settings.leeway_seconds
        exp, iat = numeric_date(claims.get("exp")), numeric_date(claims.get("iat"))
        for name, value in (("exp", exp), ("iat", iat)):
            if value is None:
                raise InvalidGrant(f"the ID-JAG needs {name}, a time in seconds")
        if exp <= now - leeway:
            raise InvalidGrant("the ID-JAG has expired")
        if iat > now + leeway:
            raise InvalidGrant("the ID-JAG is issued in the future (iat)")
        most = self.id_jag.max_lifetime_seconds
        if exp - iat > most:
            raise InvalidGrant(
                f"the ID-JAG lives longer than {most} s (oauth.id_jag.max_lifetime_seconds)"
            )
        if "nbf" in claims:
            nbf = numeric_date(claims["nbf"])
            if nbf is None:
                raise InvalidGrant("the ID-JAG's nbf must be a time in seconds")
            if nbf > now + leeway:
                raise InvalidGrant("the ID-JAG is not valid yet (nbf)")
        sub, jti = claims.get("sub"), claims.get("jti")
        if not isinstance(sub, str) or not sub:
            raise InvalidGrant("the ID-JAG needs sub, the user")
        if not isinstance(jti, str) or not 1 <= len(jti) <= MAX_JTI_CHARS:
            raise InvalidGrant(f"the ID-JAG needs jti, a string of 1 to {MAX_JTI_CHARS} characters")
        tenant = self._tenant(idp, claims)
        if claims.get("client_id") != client.client_id:
            raise InvalidGrant(
                f"the ID-JAG was issued to client {claims.get('client_id')!r}, not to"
                f" {client.client_id!r}, the client that authenticated"
            )
        resource = claims.get("resource")
        if isinstance(resource, str):
            resources: tuple[str, ...] = (resource,)
        elif resource is None:
            resources = ()
        elif isinstance(resource, list) and resource and all(isinstance(r, str) for r in resource):
            resources = tuple(dict.fromkeys(resource))
        else:
            raise InvalidGrant("the ID-JAG's resource must be a URI or an array of URIs")
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise InvalidGrant("the ID-JAG's scope must be a space-separated string")
        return IdJag(
            issuer=idp.issuer,
            client_id=client.client_id,
            resources=resources,
            scopes=tuple(dict.fromkeys(scope.split())),
            jti=jti,
            expires_at=float(exp),
            jkt=jkt,
            tenant=tenant,
            claims=dict(claims),
        )

    @staticmethod
    def _tenant(idp: TrustedIdp, claims: Mapping[str, Any]) -> str | None:
        """The provider's tenant the ID-JAG names, one of its ``tenants`` (the draft's
        "Tenant Relationships": a multi-tenant issuer "MUST include the tenant claim", and its
        ``sub`` is unique only "scoped with issuer and tenant"); and ``aud_tenant``, the tenant
        of the resource side it is for, bastion's own at the provider. Each is refused, not
        ignored, where bastion has not been told of it: the tenant of another company at the
        same issuer could name any of bastion's users, and an ID-JAG for another tenant of the
        resource side is not for bastion."""
        tenant = claims.get("tenant")
        if tenant is not None and not isinstance(tenant, str):
            raise InvalidGrant("the ID-JAG's tenant must be a string")
        if not idp.tenants:
            if tenant is not None:
                raise InvalidGrant(
                    f"the ID-JAG names tenant {tenant!r} of {idp.issuer}, which takes none: its"
                    " sub names a person only within that tenant; list the tenants taken in"
                    f" tenants of its {ID_JAG_TABLE} table"
                )
        elif tenant is None:
            raise InvalidGrant(
                f"the ID-JAG names no tenant: {idp.issuer} is taken for tenants"
                f" {list(idp.tenants)} only ({ID_JAG_TABLE} tenants)"
            )
        elif tenant not in idp.tenants:
            raise InvalidGrant(
                f"the ID-JAG's tenant {tenant!r} is not one of {list(idp.tenants)}, the tenants"
                f" of {idp.issuer} taken ({ID_JAG_TABLE} tenants)"
            )
        aud_tenant = claims.get("aud_tenant")
        if aud_tenant is not None and not isinstance(aud_tenant, str):
            raise InvalidGrant("the ID-JAG's aud_tenant must be a string")
        if aud_tenant != idp.aud_tenant:
            if aud_tenant is None:
                raise InvalidGrant(
                    f"the ID-JAG names no aud_tenant: bastion is tenant {idp.aud_tenant!r} at"
                    f" {idp.issuer} ({ID_JAG_TABLE} aud_tenant)"
                )
            bastions = (
                "bastion is no tenant at it"
                if idp.aud_tenant is None
                else f"bastion is {idp.aud_tenant!r}"
            )
            raise InvalidGrant(
                f"the ID-JAG is for aud_tenant {aud_tenant!r} of the resource side: {bastions}"
                f" ({ID_JAG_TABLE} aud_tenant)"
            )
        return tenant

    @staticmethod
    def _bound_key(claims: Mapping[str, Any]) -> str | None:
        """The DPoP key thumbprint the ID-JAG is bound to (``cnf.jkt``, RFC 9449 §6.1), or
        None; a ``cnf`` bastion cannot check (another confirmation method, RFC 8705's
        certificate) is refused rather than ignored."""
        try:
            return token_key(claims)
        except ValueError:
            raise InvalidGrant(
                "the ID-JAG's confirmation (cnf) is not a DPoP key's alone ({\"jkt\": ...}):"
                " bastion cannot check it"
            ) from None

    def _resource(self, form: Mapping[str, str], found: IdJag) -> ProtectedResource:
        """The protected resource the token is for (one: a bastion token has one ``aud``): the
        ID-JAG's ``resource``, or of several the one the request's ``resource`` names (the
        draft lets the server grant a subset); the request's when the ID-JAG names none."""
        requested = form.get("resource")
        if not found.resources:
            return self.settings.requested_resource(form)
        if requested is not None and not any(same_resource(requested, r) for r in found.resources):
            raise InvalidTarget(
                f"resource {requested!r} is not one of the ID-JAG's resources"
                f" {list(found.resources)}"
            )
        if requested is None and len(found.resources) > 1:
            raise InvalidTarget(
                f"the ID-JAG names several resources {list(found.resources)}: name one in"
                " resource (a token is for one resource)"
            )
        uri = requested if requested is not None else found.resources[0]
        resource = self.settings.resource(uri)
        if resource is None:
            raise InvalidGrant(
                f"the ID-JAG's resource {uri!r} is not a protected resource of this server"
            )
        return resource

    def _scope(
        self,
        form: Mapping[str, str],
        found: IdJag,
        offered: tuple[str, ...],
        client: Client,
    ) -> list[str]:
        """The ID-JAG's scopes (all of them the resource's: MCP's extension §7.6.2) that the
        request asks for (all, when it names none) and the client is registered for."""
        foreign = [s for s in found.scopes if s not in offered]
        if foreign:
            raise InvalidGrant(f"the ID-JAG grants scopes {foreign} the resource does not have")
        if form.get("scope"):
            wanted = list(dict.fromkeys(form["scope"].split()))
            wider = [s for s in wanted if s not in found.scopes]
            if wider:
                raise InvalidScope(
                    f"scopes {wider} are more than the ID-JAG grants: {list(found.scopes)}"
                )
        else:
            wanted = list(found.scopes)
        registered = set(client.scope.split()) if client.scope is not None else None
        scopes = [s for s in wanted if registered is None or s in registered]
        if not scopes:
            raise InvalidScope(
                f"no scope remains: the ID-JAG grants {list(found.scopes)}, the client is"
                f" registered for {sorted(registered or ())}"
            )
        return scopes

    def _user(self, idp: TrustedIdp, found: IdJag) -> str:
        claimed = found.claims.get(idp.user_claim)
        if not isinstance(claimed, str) or not claimed:
            raise InvalidGrant(f"the ID-JAG's {idp.user_claim!r} claim names no user")
        user = idp.user_prefix + claimed
        if len(user) > MAX_NAME_LENGTH or not user.isprintable():
            raise InvalidGrant(f"the ID-JAG's {idp.user_claim!r} claim names no user")
        if not vouched_for(found.claims, idp.user_claim):
            raise InvalidGrant(UNVERIFIED_EMAIL)
        if "aud_sub" in found.claims and idp.user_claim != "aud_sub":
            # The draft's aud_sub is the user's id at bastion: one naming another user than
            # the user_claim does is a provider contradicting itself, and bastion would pick.
            aud_sub = found.claims["aud_sub"]
            if not isinstance(aud_sub, str):
                raise InvalidGrant(
                    "the ID-JAG's aud_sub must be a string, the user's id at bastion"
                )
            if aud_sub != user:
                raise InvalidGrant(
                    f"the ID-JAG's aud_sub {aud_sub!r} is not {user!r}, the user its"
                    f" {idp.user_claim!r} claim names (with user_prefix {idp.user_prefix!r})"
                )
        if problem := self.server.store.user_name_problem(user):
            raise InvalidGrant(f"the ID-JAG's {idp.user_claim!r} claim: {problem}")
        state = self.server.store.user_state(user)
        if state == "disabled":
            raise InvalidGrant(f"user {user!r} is disabled")
        if state is None and idp.users == "existing":
            raise InvalidGrant(
                f"user {user!r} (claim {idp.user_claim!r} of {idp.issuer}) is not a user of bastion"
            )
        return user

    def _bound_to_its_account(self, idp: TrustedIdp, user: str, found: IdJag) -> None:
        """With a ``user_claim`` other than the ``account_claim`` (an email, a login name, which
        the provider may give to another person: a moved person's old address to a new hire),
        the user is the person's whose account (``sub`` by default) first got a token for it,
        until an administrator releases it (``bastion users unlink``); another is refused. Of
        a provider taken for ``tenants``, the account is the tenant's (a ``sub`` is unique only
        within its tenant), and every user is bound, even one named by its account."""
        claim = idp.account_claim
        if not idp.binds_accounts:
            return  # the user's name is its account's: no other account can name it
        account = found.claims.get(claim)
        if not isinstance(account, str) or not account or len(account) > MAX_ACCOUNT_CHARS:
            raise InvalidGrant(
                f"the ID-JAG's {claim!r} claim names no account of at most {MAX_ACCOUNT_CHARS}"
                " characters (the user is bound to it)"
            )
        if idp.tenants:
            account = tenant_account(account, found.tenant)
        provider = id_jag_issuer(idp.issuer)
        if bound_elsewhere(self.server.db, provider, user, account, self.clock()) is not None:
            raise InvalidGrant(account_taken(user, idp.issuer, claim))


def _auth_time(claims: Mapping[str, Any]) -> float | None:
    value = numeric_date(claims.get("auth_time"))
    return None if value is None else float(value)


def _sign_in(claims: Mapping[str, Any]) -> SignInContext:
    """How the provider says the person signed in (the ID-JAG's ``acr`` and ``amr``), checked
    as an ID token's are: a malformed one is refused, never read as nothing said."""
    try:
        return read_sign_in_context(claims)
    except SignInContextError as e:
        raise InvalidGrant(f"the ID-JAG's {e}") from None


def _unverified(assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and claims before the signature is checked: only to find the provider and
    its key. Nothing read here is trusted until `IdentityAssertionGrant._verified`."""
    if len(assertion) > MAX_ASSERTION_CHARS:
        raise InvalidGrant(f"the assertion is longer than {MAX_ASSERTION_CHARS} characters")
    try:
        compact = jws.extract_compact(assertion.encode("ascii"))
        header = protected_header(compact)
        claims = untrusted_json.loads(compact.payload)
    except HeaderRefused as e:
        raise InvalidGrant(f"the assertion's {e}") from None
    except untrusted_json.JsonRefused as e:
        raise InvalidGrant(f"the assertion's claims are refused: {e}") from None
    except (JoseError, UnicodeError, ValueError):
        raise InvalidGrant("the assertion is not a signed JWT (compact serialization)") from None
    if not isinstance(claims, dict):
        raise InvalidGrant("the assertion's payload must be a JSON object of claims")
    return header, claims
