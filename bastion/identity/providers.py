"""The ``[identity]`` table of bastion.toml: the OpenID providers people log in through
(`bastion.identity.oidc_login`), how their claims map to the user and to facts, and the errors a
provider login can end with. Every wrong value is refused at start, naming its key."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from bastion.egress import PrivateAllowance, private_allowance
from bastion.environment import expand
from bastion.facts.model import Entity
from bastion.http_fields import field_value_problem
from bastion.identity.client_key import AUDIENCES, ClientKey, ClientKeyError, load_client_key
from bastion.identity.tenants import TENANT_IN_PREFIX, tenant_settings, user_name
from bastion.names import user_prefix_problem
from bastion.oauth.client_assertion import algorithms_problem, url_problem
from bastion.oauth.remote_metadata import METADATA_CACHE_SECONDS, METADATA_STALE_SECONDS

PROVIDERS_TABLE = "[[identity.providers]]"
_PROVIDER_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
# Values of one claim turned into facts at one login; more are refused (a claim this large is a
# mistake of the mapping or of the provider).
MAX_FACT_VALUES = 500
_PREDICATES = ("has_role", "has_relation")
_PROVIDER_KEYS = {
    "id",
    "name",
    "issuer",
    "client_id",
    "client_secret",
    "scopes",
    "user_claim",
    "user_prefix",
    "algorithms",
    "token_endpoint_auth_method",
    "client_key_file",
    "client_key_id",
    "client_assertion_alg",
    "client_assertion_audience",
    "leeway_seconds",
    "timeout_seconds",
    "max_document_bytes",
    "jwks_cache_seconds",
    "jwks_refetch_seconds",
    "metadata_cache_seconds",
    "metadata_stale_seconds",
    "acr_values",
    "required_acr",
    "userinfo",
    "facts",
    "allow_private_addresses",
    "trusted_audiences",
    "tenants",
}
_IDENTITY_KEYS = {"providers", "local_passwords", "fact_seconds", "login_seconds"}
_FACT_MAPPING_KEYS = {"claim", "predicate", "name", "resource", "values"}


class IdentityConfigError(ValueError):
    """A value of the ``[identity]`` table that cannot be used; the message names its key."""


class ProviderUnavailable(Exception):
    """The provider's metadata, keys or token endpoint cannot be had now: nobody logs in."""


class LoginRefused(Exception):
    """A provider login that must not succeed: ``reason`` is recorded, ``message`` shown."""

    def __init__(self, reason: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status


@dataclass(frozen=True)
class FactMapping:
    """One ``[[identity.providers.facts]]`` table: each value of ``claim`` (a string or a list
    of strings) becomes ``has_role(User, name, resource)`` or ``has_relation(resource, name,
    User)``; ``{value}`` in ``name`` or in the resource's id stands for the claim's value."""

    claim: str
    predicate: str
    name: str
    resource_type: str
    resource_id: str
    values: tuple[str, ...] | None = None  # None: every value; else only these

    def facts(self, user: Entity, claims: Mapping[str, Any]) -> list[tuple]:
        found = claims.get(self.claim)
        if isinstance(found, str):
            found = [found]
        if not isinstance(found, list):
            return []
        values = [v for v in found if isinstance(v, str) and v]
        if len(values) > MAX_FACT_VALUES:
            raise LoginRefused(
                "claims",
                f"the claim {self.claim!r} holds more than {MAX_FACT_VALUES} values",
            )
        if self.values is not None:
            values = [v for v in values if v in self.values]
        out = []
        for value in dict.fromkeys(values):
            name = self.name.replace("{value}", value)
            resource = Entity(self.resource_type, self.resource_id.replace("{value}", value))
            if self.predicate == "has_role":
                out.append(("has_role", user, name, resource))
            else:
                out.append(("has_relation", resource, name, user))
        return out


@dataclass(frozen=True)
class OpenIDProvider:
    """One ``[[identity.providers]]`` table (docs/identity.md)."""

    id: str
    issuer: str
    client_id: str
    client_secret: str = field(default="", repr=False)
    name: str = ""
    scopes: tuple[str, ...] = ("openid",)
    user_claim: str = "sub"
    user_prefix: str = ""
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256", "EdDSA")
    # How bastion authenticates at the token endpoint (`bastion.identity.oidc_login`); None:
    # client_secret_basic, or client_secret_post for a provider that announces only that.
    token_endpoint_auth_method: str | None = None
    # private_key_jwt: the file of the key bastion signs its assertions with, its kid and alg
    # when set, the assertions' aud; and the key, read at start (`IdentitySettings.with_keys`).
    client_key_file: str = ""
    client_key_id: str | None = None
    client_assertion_alg: str | None = None
    client_assertion_audience: str = "token_endpoint"
    client_key: ClientKey | None = field(default=None, repr=False)
    leeway_seconds: int = 30
    timeout_seconds: int = 5
    max_document_bytes: int = 65536
    jwks_cache_seconds: int = 300
    jwks_refetch_seconds: int = 30
    # The discovery document is read again after at most this long (less when its headers say),
    # and the last good one is used this long past that while a new one cannot be had.
    metadata_cache_seconds: int = METADATA_CACHE_SECONDS
    metadata_stale_seconds: int = METADATA_STALE_SECONDS
    # Authentication context classes asked of the provider (OpenID Connect Core §3.1.2.1
    # ``acr_values``), and those the ID token's ``acr`` must be one of (§3.1.3.7 step 11); (): none.
    acr_values: tuple[str, ...] = ()
    required_acr: tuple[str, ...] = ()
    # Read the UserInfo endpoint too (its claims complete the ID token's).
    userinfo: bool = False
    # Audiences besides client_id an ID token may hold (OpenID Connect Core §3.1.3.7 step 3:
    # any other refuses it): those a provider adds to every token, e.g. a project's other apps.
    trusted_audiences: tuple[str, ...] = ()
    facts: tuple[FactMapping, ...] = ()
    # The non-public addresses the endpoints its discovery document names (token, UserInfo,
    # key set) may be reached at (`bastion.egress.private_allowance`): none, all (true), or those
    # of the networks listed; None: all if the issuer is itself on one, else none
    # (`bastion.egress.metadata_allowance`).
    allow_private_addresses: PrivateAllowance | None = None
    # The tenants of a multi-tenant provider (Entra ID's /organizations) whose people sign in:
    # its discovery document's issuer is a template holding {tenantid}, and an ID token is taken
    # only when its tid is one of these and its iss the template with that tid
    # (`bastion.identity.id_token.expected_issuer`). (): one tenant, the issuer as configured.
    tenants: tuple[str, ...] = ()

    @property
    def shown_name(self) -> str:
        return self.name or self.id

    def user_name(self, value: str, tenant: str | None) -> str:
        """The bastion user a person named ``value`` by its ``user_claim`` signs in as: the
        ``user_prefix`` (its ``{tenant}`` the person's tenant) then ``value``."""
        return user_name(self.user_prefix, tenant, value)


@dataclass(frozen=True)
class IdentitySettings:
    """The ``[identity]`` table: the providers, whether local passwords are kept beside them,
    how long facts from claims last after the last login, and how long a login may take."""

    providers: tuple[OpenIDProvider, ...] = ()
    local_passwords: bool = True
    fact_seconds: int = 7 * 24 * 3600
    login_seconds: int = 600

    def provider(self, provider_id: str) -> OpenIDProvider | None:
        return next((p for p in self.providers if p.id == provider_id), None)

    def with_keys(self) -> IdentitySettings:
        """These settings with the private key of each provider's ``client_key_file`` read
        (`bastion.identity.client_key.load_client_key`): at start, before the event loop
        runs. `IdentityConfigError` names the provider's key and the file at fault."""
        providers = []
        for index, provider in enumerate(self.providers):
            if provider.client_key_file:
                try:
                    key = load_client_key(
                        provider.client_key_file,
                        provider.client_key_id,
                        provider.client_assertion_alg,
                    )
                except ClientKeyError as e:
                    raise IdentityConfigError(
                        f"identity.providers[{index}].client_key_file: {e}"
                    ) from None
                provider = replace(provider, client_key=key)
            providers.append(provider)
        return replace(self, providers=tuple(providers))

    @classmethod
    def from_mapping(cls, table: Any, env: Mapping[str, str]) -> IdentitySettings:
        """Read ``[identity]``; `IdentityConfigError` names the key at fault. ``${NAME}`` in a
        client secret is taken from ``env``."""
        if not isinstance(table, Mapping):
            raise IdentityConfigError("identity: a table")
        unknown = sorted(set(table) - _IDENTITY_KEYS)
        if unknown:
            raise IdentityConfigError(
                f"unknown key identity.{unknown[0]}; known keys: {', '.join(sorted(_IDENTITY_KEYS))}"
            )
        raw = table.get("providers", [])
        if not isinstance(raw, list):
            raise IdentityConfigError("identity.providers must be an array of tables")
        providers = tuple(_provider(i, p, env) for i, p in enumerate(raw))
        ids = [p.id for p in providers]
        if len(set(ids)) != len(ids):
            raise IdentityConfigError("identity.providers: each id may appear only once")
        local = table.get("local_passwords", not providers)
        if not isinstance(local, bool):
            raise IdentityConfigError("identity.local_passwords: true or false")
        if not local and not providers:
            raise IdentityConfigError(
                "identity.local_passwords = false needs at least one provider: nobody could log in"
            )
        numbers = {
            key: _whole(f"identity.{key}", table.get(key, default), 1)
            for key, default in (("fact_seconds", 7 * 24 * 3600), ("login_seconds", 600))
        }
        return cls(providers=providers, local_passwords=local, **numbers)


def _whole(where: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= 2**31:
        raise IdentityConfigError(f"{where}: a whole number from {minimum} to 2**31, got {value!r}")
    return value


def _text(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise IdentityConfigError(f"{where} must be a non-empty string")
    return value


def _expand(where: str, value: str, env: Mapping[str, str]) -> str:
    return expand(value, env, where, IdentityConfigError)


def _provider(index: int, table: Any, env: Mapping[str, str]) -> OpenIDProvider:
    where = f"identity.providers[{index}]"
    if not isinstance(table, Mapping):
        raise IdentityConfigError(f"{where}: a table with id, issuer and client_id")
    unknown = sorted(set(table) - _PROVIDER_KEYS)
    if unknown:
        raise IdentityConfigError(
            f"unknown key {where}.{unknown[0]}; known keys: {', '.join(sorted(_PROVIDER_KEYS))}"
        )
    provider_id = table.get("id")
    if not isinstance(provider_id, str) or not _PROVIDER_ID.fullmatch(provider_id):
        raise IdentityConfigError(
            f"{where}.id: 1 to 32 lowercase letters, digits or '-' (it is in the redirect URI),"
            f" got {provider_id!r}"
        )
    issuer = table.get("issuer")
    problem = url_problem(issuer)
    if problem:
        raise IdentityConfigError(f"{where}.issuer: {problem}")
    tenants = tenant_settings(where, table, IdentityConfigError)
    values: dict[str, Any] = {
        "id": provider_id,
        "issuer": issuer,
        "client_id": _text(f"{where}.client_id", table.get("client_id")),
        "user_prefix": f"{provider_id}:{TENANT_IN_PREFIX}:" if tenants else f"{provider_id}:",
        "tenants": tenants,
    }
    if "client_secret" in table:
        values["client_secret"] = _expand(
            f"{where}.client_secret", _text(f"{where}.client_secret", table["client_secret"]), env
        )
        if problem := field_value_problem(values["client_secret"]):
            raise IdentityConfigError(f"{where}.client_secret {problem}")
    for key in ("name", "user_claim"):
        if key in table:
            values[key] = _text(f"{where}.{key}", table[key])
    if "user_prefix" in table:
        if problem := user_prefix_problem(table["user_prefix"]):
            raise IdentityConfigError(f"{where}.user_prefix: {problem}")
        values["user_prefix"] = table["user_prefix"]
    scopes = table.get("scopes", ["openid"])
    if (
        not isinstance(scopes, list)
        or "openid" not in scopes
        or not all(isinstance(s, str) and s and " " not in s for s in scopes)
    ):
        raise IdentityConfigError(
            f'{where}.scopes: a list of scope names holding "openid", got {scopes!r}'
        )
    values["scopes"] = tuple(dict.fromkeys(scopes))
    algorithms = table.get("algorithms", list(OpenIDProvider.algorithms))
    if problem := algorithms_problem(algorithms):
        raise IdentityConfigError(f"{where}.algorithms: {problem}")
    values["algorithms"] = tuple(algorithms)
    values.update(_client_authentication(where, table, values, env))
    for key in (
        "leeway_seconds",
        "timeout_seconds",
        "max_document_bytes",
        "jwks_cache_seconds",
        "jwks_refetch_seconds",
        "metadata_cache_seconds",
        "metadata_stale_seconds",
    ):
        if key in table:
            least = 0 if key in ("leeway_seconds", "metadata_stale_seconds") else 1
            values[key] = _whole(f"{where}.{key}", table[key], least)
    for key in ("acr_values", "required_acr"):
        if key in table:
            values[key] = _acr_list(f"{where}.{key}", table[key])
    audiences = table.get("trusted_audiences", [])
    if not isinstance(audiences, list) or not all(isinstance(a, str) and a for a in audiences):
        raise IdentityConfigError(f"{where}.trusted_audiences: a list of audience values")
    values["trusted_audiences"] = tuple(audiences)
    userinfo = table.get("userinfo", False)
    if not isinstance(userinfo, bool):
        raise IdentityConfigError(f"{where}.userinfo: true or false")
    values["userinfo"] = userinfo
    if "allow_private_addresses" in table:
        try:
            values["allow_private_addresses"] = private_allowance(
                table["allow_private_addresses"], f"{where}.allow_private_addresses"
            )
        except ValueError as e:
            raise IdentityConfigError(str(e)) from None
    raw = table.get("facts", [])
    if not isinstance(raw, list):
        raise IdentityConfigError(f"{where}.facts must be an array of tables")
    values["facts"] = tuple(_fact_mapping(f"{where}.facts[{i}]", m) for i, m in enumerate(raw))
    return OpenIDProvider(**values)


def _acr_list(where: str, value: Any) -> tuple[str, ...]:
    """A non-empty list of authentication context class references (OpenID Connect Core §2
    ``acr``): each a non-empty string of printable characters without spaces (``acr_values``
    is sent space-separated, §3.1.2.1)."""
    if (
        not isinstance(value, list)
        or not value
        or not all(
            isinstance(v, str) and v and v.isprintable() and not any(c.isspace() for c in v)
            for v in value
        )
    ):
        raise IdentityConfigError(
            f'{where}: a list of acr values without spaces, e.g. ["phr", "urn:example:mfa"]'
            f" (leave it out for none), got {value!r}"
        )
    return tuple(dict.fromkeys(value))


_AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt", "none")


def _client_authentication(
    where: str, table: Mapping[str, Any], values: Mapping[str, Any], env: Mapping[str, str]
) -> dict[str, Any]:
    """``token_endpoint_auth_method`` and what it needs: a ``client_secret``, or for
    ``private_key_jwt`` a ``client_key_file`` (read by `IdentitySettings.with_keys`)."""
    method = table.get("token_endpoint_auth_method")
    if method is not None and method not in _AUTH_METHODS:
        raise IdentityConfigError(
            f"{where}.token_endpoint_auth_method: one of {', '.join(_AUTH_METHODS)}, got {method!r}"
        )
    key_keys = [
        k
        for k in (
            "client_key_file",
            "client_key_id",
            "client_assertion_alg",
            "client_assertion_audience",
        )
        if k in table
    ]
    if method != "private_key_jwt":
        if key_keys:
            raise IdentityConfigError(
                f"{where}.{key_keys[0]} is used only with token_endpoint_auth_method ="
                ' "private_key_jwt"'
            )
        if method != "none" and not values.get("client_secret"):
            raise IdentityConfigError(
                f"{where}.client_secret is required with {method or 'client_secret_basic'}"
                ' (e.g. client_secret = "${IDP_SECRET}"), or set token_endpoint_auth_method ='
                ' "private_key_jwt" with client_key_file'
            )
        return {"token_endpoint_auth_method": method}
    if values.get("client_secret"):
        raise IdentityConfigError(
            f"{where}.client_secret is not used with private_key_jwt: remove it (bastion"
            " authenticates with client_key_file)"
        )
    path = _expand(
        f"{where}.client_key_file",
        _text(f"{where}.client_key_file", table.get("client_key_file")),
        env,
    )
    kid = table.get("client_key_id")
    if kid is not None:
        kid = _text(f"{where}.client_key_id", kid)
    alg = table.get("client_assertion_alg")
    if alg is not None:
        alg = _text(f"{where}.client_assertion_alg", alg)
    audience = table.get("client_assertion_audience", "token_endpoint")
    if audience not in AUDIENCES:
        raise IdentityConfigError(
            f"{where}.client_assertion_audience: token_endpoint or issuer, got {audience!r}"
        )
    return {
        "token_endpoint_auth_method": method,
        "client_key_file": path,
        "client_key_id": kid,
        "client_assertion_alg": alg,
        "client_assertion_audience": audience,
    }


def _fact_mapping(where: str, table: Any) -> FactMapping:
    if not isinstance(table, Mapping):
        raise IdentityConfigError(f"{where}: a table with claim, predicate, name and resource")
    unknown = sorted(set(table) - _FACT_MAPPING_KEYS)
    if unknown:
        raise IdentityConfigError(
            f"unknown key {where}.{unknown[0]}; known: {sorted(_FACT_MAPPING_KEYS)}"
        )
    predicate = table.get("predicate", "has_role")
    if predicate not in _PREDICATES:
        raise IdentityConfigError(f"{where}.predicate: one of {list(_PREDICATES)}")
    resource = _text(f"{where}.resource", table.get("resource"))
    kind, colon, ident = resource.partition(":")
    if not (colon and re.fullmatch(r"[A-Z][A-Za-z0-9_]*", kind) and ident):
        raise IdentityConfigError(
            f'{where}.resource: "Type:id", e.g. "Org:acme" or "Group:{{value}}", got {resource!r}'
        )
    values = table.get("values")
    if values is not None and (
        not isinstance(values, list) or not all(isinstance(v, str) and v for v in values)
    ):
        raise IdentityConfigError(f"{where}.values: a list of claim values")
    return FactMapping(
        claim=_text(f"{where}.claim", table.get("claim")),
        predicate=predicate,
        name=_text(f"{where}.name", table.get("name")),
        resource_type=kind,
        resource_id=ident,
        values=tuple(values) if values is not None else None,
    )
