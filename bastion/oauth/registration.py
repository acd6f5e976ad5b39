"""RFC 7591 OAuth 2.0 Dynamic Client Registration: validate client metadata and register clients.

Who may register is the ``registration`` policy: ``open`` lets anyone register a *public* client
(``token_endpoint_auth_method: none``) whose redirect URIs are https or loopback http; confidential
clients and the ``client_credentials`` grant need an initial access token (RFC 7591 §3), as does
every registration under ``initial_access_token``; ``closed`` leaves registration to the admin CLI.
"""

from __future__ import annotations

import hmac
import ipaddress
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from bastion import untrusted_json
from bastion.oauth.errors import InvalidClientMetadata, InvalidRedirectUri, OAuthError
from bastion.oauth.settings import OAuthSettings
from bastion.oauth.store import Client, digest, new_secret

AUTH_METHODS = ("none", "client_secret_basic", "client_secret_post")
GRANT_TYPES = ("authorization_code", "refresh_token", "client_credentials")
MAX_REDIRECT_URIS = 10
_DESCRIPTIVE = (
    "client_uri",
    "logo_uri",
    "tos_uri",
    "policy_uri",
    "software_id",
    "software_version",
)


def is_loopback_host(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def redirect_uri_problem(uri: Any) -> str | None:
    """Why a redirect URI cannot be registered, or None when it can (RFC 6749 §3.1.2, RFC 8252)."""
    if not isinstance(uri, str) or not uri or len(uri) > 2000:
        return "a redirect URI must be a non-empty string of at most 2000 characters"
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        return f"redirect URI {uri!r} is not a valid URL"
    if parts.fragment or "#" in uri:
        return f"redirect URI {uri!r} must not have a fragment"
    if parts.username or parts.password:
        return f"redirect URI {uri!r} must not carry user information"
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and is_loopback_host(parts.hostname):
        return None
    return f"redirect URI {uri!r} must be https, or http on a loopback address (RFC 8252 §7.3)"


@dataclass(frozen=True)
class Registration:
    """A registered client and, for a confidential client, its secret (shown only once)."""

    client: Client
    client_secret: str | None

    def response(self) -> dict[str, Any]:
        """The client information response of RFC 7591 §3.2.1."""
        client = self.client
        body: dict[str, Any] = {
            "client_id": client.client_id,
            "client_id_issued_at": int(client.created_at),
            "client_name": client.client_name,
            "redirect_uris": list(client.redirect_uris),
            "grant_types": list(client.grant_types),
            "response_types": ["code"] if "authorization_code" in client.grant_types else [],
            "token_endpoint_auth_method": client.token_endpoint_auth_method,
            **{k: v for k, v in client.metadata.items() if k in _DESCRIPTIVE},
        }
        if client.scope is not None:
            body["scope"] = client.scope
        if self.client_secret is not None:
            body["client_secret"] = self.client_secret
            body["client_secret_expires_at"] = 0
        return body


def validate_client_metadata(
    metadata: Mapping[str, Any], settings: OAuthSettings
) -> dict[str, Any]:
    """Check RFC 7591 §2 client metadata; return the normalised values or raise the RFC's error."""
    method = metadata.get("token_endpoint_auth_method", "none")
    if method not in AUTH_METHODS:
        raise InvalidClientMetadata(
            f"token_endpoint_auth_method {method!r} is not supported; use one of {list(AUTH_METHODS)}"
        )
    grant_types = metadata.get("grant_types", ["authorization_code"])
    if (
        not isinstance(grant_types, list)
        or not grant_types
        or not all(isinstance(g, str) for g in grant_types)
    ):
        raise InvalidClientMetadata("grant_types must be a non-empty list of strings")
    unknown = [g for g in grant_types if g not in GRANT_TYPES]
    if unknown:
        raise InvalidClientMetadata(
            f"grant_types {unknown} are not supported; use {list(GRANT_TYPES)}"
        )
    if "client_credentials" in grant_types and method == "none":
        raise InvalidClientMetadata(
            "client_credentials needs a confidential client (a client secret)"
        )
    if "refresh_token" in grant_types and "authorization_code" not in grant_types:
        raise InvalidClientMetadata("refresh_token is only issued with authorization_code")
    response_types = metadata.get(
        "response_types", ["code"] if "authorization_code" in grant_types else []
    )
    expected_response_types = ["code"] if "authorization_code" in grant_types else []
    if response_types != expected_response_types:
        raise InvalidClientMetadata(
            f"response_types must be {expected_response_types} for grant_types {grant_types}"
        )
    redirect_uris = metadata.get("redirect_uris", [])
    if not isinstance(redirect_uris, list) or len(redirect_uris) > MAX_REDIRECT_URIS:
        raise InvalidRedirectUri(
            f"redirect_uris must be a list of at most {MAX_REDIRECT_URIS} URIs"
        )
    if "authorization_code" in grant_types and not redirect_uris:
        raise InvalidRedirectUri("redirect_uris is required for the authorization_code grant")
    for uri in redirect_uris:
        problem = redirect_uri_problem(uri)
        if problem:
            raise InvalidRedirectUri(problem)
    scope = metadata.get("scope")
    if scope is not None:
        if not isinstance(scope, str):
            raise InvalidClientMetadata("scope must be a space-separated string")
        unknown_scopes = sorted(set(scope.split()) - set(settings.scopes_supported))
        if unknown_scopes:
            raise InvalidClientMetadata(
                f"scopes {unknown_scopes} are not offered; this server offers {settings.scopes_supported}"
            )
        scope = " ".join(dict.fromkeys(scope.split()))
    name = metadata.get("client_name", "")
    if not isinstance(name, str) or len(name) > 200:
        raise InvalidClientMetadata("client_name must be a string of at most 200 characters")
    descriptive = {}
    for key in _DESCRIPTIVE:
        value = metadata.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > 2000:
            raise InvalidClientMetadata(f"{key} must be a string of at most 2000 characters")
        if key.endswith("_uri") and urlsplit(value).scheme not in ("https", "http"):
            raise InvalidClientMetadata(f"{key} must be an http(s) URL")
        descriptive[key] = value
    return {
        "token_endpoint_auth_method": method,
        "grant_types": tuple(dict.fromkeys(grant_types)),
        "redirect_uris": tuple(redirect_uris),
        "scope": scope,
        "client_name": name.strip() or "unnamed client",
        "metadata": descriptive,
    }


def check_registration_allowed(
    settings: OAuthSettings, values: Mapping[str, Any], initial_access_token: str | None
) -> None:
    """Apply the registration policy; raise when this registration is not open to the caller."""
    if settings.registration == "closed":
        raise OAuthError(
            "access_denied",
            "dynamic client registration is closed on this server; an admin registers clients"
            " with `bastion clients create`",
            status=403,
        )
    token_ok = initial_access_token is not None and any(
        hmac.compare_digest(initial_access_token, t) for t in settings.initial_access_tokens
    )
    if initial_access_token is not None and not token_ok:
        raise OAuthError("invalid_token", "the initial access token is not valid", status=401)
    if token_ok:
        return
    if settings.registration == "initial_access_token":
        raise OAuthError(
            "invalid_token",
            "registration needs an initial access token (Authorization: Bearer ...)",
            status=401,
        )
    if (
        values["token_endpoint_auth_method"] != "none"
        or "client_credentials" in values["grant_types"]
    ):
        raise OAuthError(
            "invalid_token",
            "open registration is for public clients (token_endpoint_auth_method none) only;"
            " a confidential client needs an initial access token",
            status=401,
        )


def new_client(
    values: Mapping[str, Any], *, source: str, now: float, may_introspect: bool = False
) -> Registration:
    """Create (not store) a client from validated metadata, with a secret when confidential."""
    secret = new_secret() if values["token_endpoint_auth_method"] != "none" else None
    client = Client(
        client_id=uuid.uuid4().hex,
        client_name=values["client_name"],
        redirect_uris=tuple(values["redirect_uris"]),
        grant_types=tuple(values["grant_types"]),
        token_endpoint_auth_method=values["token_endpoint_auth_method"],
        scope=values["scope"],
        source=source,
        may_introspect=may_introspect,
        metadata=dict(values["metadata"]),
        created_at=now,
        revoked_at=None,
        secret_digest=digest(secret) if secret else None,
    )
    return Registration(client, secret)


def parse_registration_body(
    body: bytes, max_depth: int = untrusted_json.DEFAULT_MAX_DEPTH
) -> dict[str, Any]:
    try:
        metadata = untrusted_json.loads(body, max_depth=max_depth)
    except untrusted_json.JsonRefused as exc:
        raise InvalidClientMetadata(
            f"the request body must be a JSON object of client metadata: {exc}"
        ) from None
    if not isinstance(metadata, dict):
        raise InvalidClientMetadata("the request body must be a JSON object of client metadata")
    return metadata
