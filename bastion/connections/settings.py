"""The ``oauth`` table of an upstream that needs each user's own OAuth token (``auth =
"per_user"`` in ``[[gateway.upstreams]]``; docs/identity.md, "Per-user credentials toward
upstream servers")."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bastion.egress import PrivateAllowance, cleartext_problem, private_allowance
from bastion.http_fields import field_value_problem
from bastion.oauth.remote_metadata import METADATA_CACHE_SECONDS, METADATA_STALE_SECONDS

KNOWN = {
    "issuer",
    "client_id",
    "client_secret",
    "scopes",
    "refresh_ahead_seconds",
    "flow_seconds",
    "timeout_seconds",
    "cache_seconds",
    "allow_private_addresses",
    "revocation_retry_seconds",
    "metadata_cache_seconds",
    "metadata_stale_seconds",
}


class ConnectionSettingsError(ValueError):
    """An ``oauth`` table that cannot be used: the message names the key."""


@dataclass(frozen=True)
class UpstreamOAuth:
    """How bastion is the OAuth client of one upstream's authorization server."""

    # The upstream's authorization server; "" = the first one its protected-resource metadata
    # (RFC 9728) names.
    issuer: str = ""
    # A client registered with it by an administrator; "" = dynamic registration (RFC 7591).
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    scopes: tuple[str, ...] = ()
    # An access token this close to its expiry is refreshed before it is sent.
    refresh_ahead_seconds: float = 60.0
    # A started connection (the person at the upstream's pages) must come back within this.
    flow_seconds: float = 600.0
    # Each request to the upstream's authorization server (metadata, token, revocation).
    timeout_seconds: float = 10.0
    # A process may use an opened access token this long without reading its row again; 0: read
    # on every call. A revocation made in another process applies after at most this long.
    cache_seconds: float = 0.0
    # A user's tokens that the server could not revoke when their connection ended (unreachable,
    # 5xx, no answer) are tried again, with backoff, this long at most (7 days).
    revocation_retry_seconds: float = 604800.0
    # The upstream's protected-resource metadata and its server's metadata are read again after
    # at most this long (less when their headers say), and the last good ones are used this
    # long past that while new ones cannot be had (`bastion.oauth.remote_metadata`).
    metadata_cache_seconds: float = float(METADATA_CACHE_SECONDS)
    metadata_stale_seconds: float = float(METADATA_STALE_SECONDS)
    # The loopback, private and other non-public addresses bastion's requests to the
    # authorization server (its metadata, token, registration and revocation endpoints, all
    # named by the upstream's own metadata) may go to: none, all (true), or those of the
    # networks listed (`bastion.egress.private_allowance`); None: all if the upstream's own url
    # is on one, else none.
    allow_private_addresses: PrivateAllowance | None = None

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], where: str) -> UpstreamOAuth:
        if not isinstance(table, Mapping):
            raise ConnectionSettingsError(f"{where} must be a table")
        unknown = sorted(set(table) - KNOWN)
        if unknown:
            raise ConnectionSettingsError(
                f"unknown key {where}.{unknown[0]}; known keys: {', '.join(sorted(KNOWN))}"
            )
        issuer = table.get("issuer", "")
        if not isinstance(issuer, str) or (
            issuer and not issuer.startswith(("http://", "https://"))
        ):
            raise ConnectionSettingsError(f"{where}.issuer must be an http(s) URL")
        if issuer and (problem := cleartext_problem(issuer)):
            raise ConnectionSettingsError(f"{where}.issuer {problem}")
        for key in ("client_id", "client_secret"):
            if not isinstance(table.get(key, ""), str):
                raise ConnectionSettingsError(f"{where}.{key} must be a string")
        if problem := field_value_problem(table.get("client_secret", "")):
            raise ConnectionSettingsError(f"{where}.client_secret {problem}")
        if table.get("client_secret") and not table.get("client_id"):
            raise ConnectionSettingsError(f"{where}.client_secret needs {where}.client_id")
        scopes = table.get("scopes", [])
        if not isinstance(scopes, list) or not all(
            isinstance(s, str) and s and " " not in s for s in scopes
        ):
            raise ConnectionSettingsError(f"{where}.scopes must be a list of scope names")
        numbers = {}
        for key, default in (
            ("refresh_ahead_seconds", 60),
            ("flow_seconds", 600),
            ("timeout_seconds", 10),
            ("revocation_retry_seconds", 604800),
            ("metadata_cache_seconds", METADATA_CACHE_SECONDS),
        ):
            value = table.get(key, default)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 < value < math.inf
            ):
                raise ConnectionSettingsError(f"{where}.{key} must be a positive number")
            numbers[key] = float(value)
        stale = table.get("metadata_stale_seconds", METADATA_STALE_SECONDS)
        if (
            isinstance(stale, bool)
            or not isinstance(stale, int | float)
            or not 0 <= stale < math.inf
        ):
            raise ConnectionSettingsError(
                f"{where}.metadata_stale_seconds must be 0 or a positive number"
            )
        cache = table.get("cache_seconds", 0)
        if isinstance(cache, bool) or not isinstance(cache, int | float) or not 0 <= cache <= 300:
            raise ConnectionSettingsError(f"{where}.cache_seconds must be between 0 and 300")
        private = table.get("allow_private_addresses")
        if private is not None:
            try:
                private = private_allowance(private, f"{where}.allow_private_addresses")
            except ValueError as e:
                raise ConnectionSettingsError(str(e)) from None
        return cls(
            cache_seconds=float(cache),
            allow_private_addresses=private,
            issuer=issuer.rstrip("/"),
            client_id=table.get("client_id", ""),
            client_secret=table.get("client_secret", ""),
            scopes=tuple(scopes),
            refresh_ahead_seconds=numbers["refresh_ahead_seconds"],
            flow_seconds=numbers["flow_seconds"],
            timeout_seconds=numbers["timeout_seconds"],
            revocation_retry_seconds=numbers["revocation_retry_seconds"],
            metadata_cache_seconds=numbers["metadata_cache_seconds"],
            metadata_stale_seconds=float(stale),
        )
