"""Many tenants behind one issuer (Entra ID's ``/common`` and ``/organizations``), for login
providers (`bastion.identity.oidc_login`) and trusted issuers' access tokens
(`bastion.identity.trusted_issuers`) alike: the ``tenants`` setting, the issuer template a
multi-tenant issuer's metadata names, the issuer a token of one tenant must name, and the account
and user name of its person.

Entra ID's multi-tenant endpoints publish metadata whose ``issuer`` is the template
``https://login.microsoftonline.com/{tenantid}/v2.0`` (which OpenID Connect Discovery §4.3 and
RFC 8414 §3.3 do not allow), and each token names its tenant (``tid``) and that tenant's own
issuer (``iss``). A ``sub`` (or ``oid``) is unique only within its issuer, that is its tenant, and
anyone of any organization can get a token of a multi-tenant app: a token is taken only of a
tenant the configuration lists, its ``iss`` exactly the template with that ``tid``."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from bastion.names import readable
from bastion.oauth.client_assertion import url_problem
from bastion.oauth.jwks import RemoteDocumentError

# A tenant id (Entra ID's tid, a GUID): it is put into the template of the issuer (a URL's path)
# and into user names, so only a URL's unreserved characters (RFC 3986 §2.3).
MAX_TENANT_CHARS = 128
_TENANT = re.compile(rf"[A-Za-z0-9._~-]{{1,{MAX_TENANT_CHARS}}}")
# What stands for the tenant in the ``issuer`` of a multi-tenant issuer's metadata, and in a
# ``user_prefix``.
TENANT_TEMPLATE = "{tenantid}"
TENANT_IN_PREFIX = "{tenant}"


class TenantRefused(Exception):
    """A token names no tenant, or one not listed; ``reason`` says which, for the person."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def tenant_settings(
    where: str, table: Mapping[str, Any], error: type[ValueError] = ValueError
) -> tuple[str, ...]:
    """A table's ``tenants``: the tenant ids of a multi-tenant issuer whose tokens are taken,
    each listed (never "any tenant"); () when unset (one tenant, the issuer as configured, as
    before the setting). Also refused, as ``error`` naming the key: an ``issuer`` that is a
    template rather than the URL its metadata is read from, and a ``{tenant}`` in the
    ``user_prefix`` of a table without tenants, or twice."""
    tenants: tuple[str, ...] = ()
    if "tenants" in table:
        listed = table["tenants"]
        if (
            not isinstance(listed, list)
            or not listed
            or not all(isinstance(t, str) and _TENANT.fullmatch(t) for t in listed)
        ):
            raise error(
                f"{where}.tenants: a list of 1 to {MAX_TENANT_CHARS} letters, digits, '-', '.',"
                f" '_' or '~' each, the ids of the tenants taken, got {listed!r}"
            )
        if len(set(listed)) != len(listed):
            raise error(f"{where}.tenants: a tenant appears more than once")
        tenants = tuple(listed)
    issuer = table.get("issuer")
    if tenants and isinstance(issuer, str) and ("{" in issuer or "}" in issuer):
        raise error(
            f"{where}.issuer: the URL its discovery document is read from (Entra ID's for many"
            " tenants: https://login.microsoftonline.com/organizations/v2.0), not the template"
            f" its metadata names, got {issuer!r}"
        )
    prefix = table.get("user_prefix")
    count = prefix.count(TENANT_IN_PREFIX) if isinstance(prefix, str) else 0
    if count and not tenants:
        raise error(f"{where}.user_prefix: {TENANT_IN_PREFIX} is only for a table with tenants")
    if count > 1:
        raise error(f"{where}.user_prefix: {TENANT_IN_PREFIX} at most once")
    return tenants


def issuer_template(
    issuer: str, tenants: tuple[str, ...], uri: str, named: Any, table: str
) -> str | None:
    """The issuer template of a multi-tenant issuer's metadata (read at ``uri``, naming
    ``named``), taken only where ``tenants`` are listed, holding ``{tenantid}`` once, each
    tenant's issuer a URL at the configured ``issuer``'s own origin; else None, the metadata
    naming the very ``issuer`` configured (OpenID Connect Discovery §4.3, RFC 8414 §3.3).
    `RemoteDocumentError` for any other, and for one issuer where ``tenants`` are listed (a
    mistake of the configuration, told rather than ignored)."""
    if isinstance(named, str) and TENANT_TEMPLATE in named:
        if not tenants:
            raise RemoteDocumentError(
                f"{uri} names the issuer {readable(named)}, a template for many tenants"
                f" ({TENANT_TEMPLATE}): list the tenants taken in tenants ({table}), or use a"
                " tenant's own issuer"
            )
        origin = urlsplit(issuer)[:2]
        if named.count(TENANT_TEMPLATE) != 1 or any(
            url_problem(each) or urlsplit(each)[:2] != origin
            for each in (tenant_issuer(named, t) for t in tenants)
        ):
            raise RemoteDocumentError(
                f"{uri} names the issuer template {readable(named)}, which is not one URL per"
                f" tenant at {issuer}'s own origin"
            )
        return named
    if named != issuer:
        raise RemoteDocumentError(f"{uri} is not the metadata of {issuer}")
    if tenants:
        raise RemoteDocumentError(
            f"{uri} names one issuer, {issuer}, not a template for many tenants"
            f" ({TENANT_TEMPLATE}): remove tenants ({table}), or set issuer to the issuer's"
            " endpoint for many tenants"
        )
    return None


def token_tenant(
    claims: Mapping[str, Any], tenants: tuple[str, ...], token: str, taker: str, table: str
) -> str:
    """The tenant (``tid``) ``token`` ("The ID token", "the token") is of, one of ``tenants``
    of ``taker`` (the provider or issuer, as people know it); `TenantRefused` saying why not.
    Read before the signature is checked only to know which issuer the token must name: every
    claim is checked after it."""
    tid = claims.get("tid")
    if not isinstance(tid, str) or not tid:
        raise TenantRefused(
            f"{token} names no tenant (tid): {taker} is taken for the tenants this server lists"
            f" only ({table} tenants)"
        )
    if tid not in tenants:
        raise TenantRefused(
            f"{token} is from tenant '{readable(tid)}', which is not one of the tenants this"
            f" server takes through {taker} ({table} tenants)"
        )
    return tid


def tenant_issuer(template: str, tenant: str) -> str:
    """The issuer of ``tenant``: the ``template`` with it put for ``{tenantid}``, nothing else
    substituted. A listed tenant holds only letters, digits and '-._~' (`tenant_settings`)."""
    return template.replace(TENANT_TEMPLATE, tenant)


def tenant_account(account: str, tenant: str | None) -> str:
    """A person's account at a provider or issuer, as bound and kept
    (`bastion.identity.accounts`): its ``account`` (``sub``); of a multi-tenant one, its tenant
    and ``account``, unambiguous whatever the two hold (a tenant "a b" and "a", "b c" differ)."""
    return account if tenant is None else json.dumps([tenant, account], ensure_ascii=False)


def user_name(prefix: str, tenant: str | None, value: str) -> str:
    """The bastion user of a person ``value`` names: the ``prefix`` (its ``{tenant}`` the
    person's tenant), then ``value``."""
    return prefix.replace(TENANT_IN_PREFIX, tenant or "") + value
