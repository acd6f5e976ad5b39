"""RFC 7591 OAuth 2.0 Dynamic Client Registration: validate client metadata and register clients.

Who may register is the ``registration`` policy: ``open`` lets anyone register a *public* client
(``token_endpoint_auth_method: none``) whose redirect URIs are https or loopback http; confidential
clients and the ``client_credentials`` grant need an initial access token (RFC 7591 §3), as does
every registration under ``initial_access_token``; ``closed`` leaves registration to the admin CLI.
Open registrations are limited per address and in number (``[oauth.open_registration]``), and an
open-registered client that has had no grant after ``unused_client_seconds`` is deleted.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from bastion import untrusted_json
from bastion.constant_time import same
from bastion.names import lookalike_problem, plain
from bastion.oauth.ciba import CIBA_GRANT_TYPE
from bastion.oauth.client_assertion import key_metadata
from bastion.oauth.dpop import CLIENT_METADATA as DPOP_REQUIRED
from bastion.oauth.errors import InvalidClientMetadata, InvalidRedirectUri, OAuthError
from bastion.oauth.jwt_bearer import JWT_BEARER_GRANT_TYPE
from bastion.oauth.redirect_uris import redirect_uri_problem
from bastion.oauth.settings import OAuthSettings, OpenRegistrationSettings
from bastion.oauth.store import Client, OpenRegistrationRefusal, digest, new_secret
from bastion.oauth.token_exchange import TOKEN_EXCHANGE_GRANT_TYPE

AUTH_METHODS = ("private_key_jwt", "none", "client_secret_basic", "client_secret_post")
# The methods that authenticate with a secret bastion issues (shown once, kept as a digest).
SECRET_METHODS = ("client_secret_basic", "client_secret_post")
GRANT_TYPES = (
    "authorization_code",
    "refresh_token",
    "client_credentials",
    CIBA_GRANT_TYPE,
    TOKEN_EXCHANGE_GRANT_TYPE,
    JWT_BEARER_GRANT_TYPE,
)
MAX_REDIRECT_URIS = 10
_DESCRIPTIVE = (
    "client_uri",
    "logo_uri",
    "tos_uri",
    "policy_uri",
    "software_id",
    "software_version",
)


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
            **{
                k: v for k, v in client.metadata.items() if k in ("jwks", "jwks_uri", DPOP_REQUIRED)
            },
        }
        if client.scope is not None:
            body["scope"] = client.scope
        if CIBA_GRANT_TYPE in client.grant_types:
            body["backchannel_token_delivery_mode"] = "poll"
        if self.client_secret is not None:
            body["client_secret"] = self.client_secret
            body["client_secret_expires_at"] = 0
        return body


def _http_url(value: str) -> bool:
    """Whether ``value`` is an http(s) URL (one urlsplit refuses, "https://[x", is not)."""
    try:
        return urlsplit(value).scheme in ("https", "http")
    except ValueError:
        return False


def grant_types_supported(settings: OAuthSettings) -> list[str]:
    """The grant types this server offers: the JWT bearer grant only with identity providers
    to take ID-JAGs from (``[[oauth.id_jag.issuers]]``)."""
    return [g for g in GRANT_TYPES if g != JWT_BEARER_GRANT_TYPE or settings.id_jag.enabled]


def client_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a client's name, or None. The consent page shows it to people:
    nothing that does not show as itself (`bastion.names.plain`: a right-to-left override would
    turn round the warning that follows it, a line break would fake a line of the page, a
    zero-width character or a Hangul filler would make ``Trusted Bot`` of another name), and
    nothing that reads as another name (`bastion.names.lookalike_problem`: ``Trusted Вot`` with
    a Cyrillic В, fullwidth letters, a spelling not in NFC). Surrounding spaces are taken off
    when it is stored."""
    if not isinstance(name, str) or len(name) > 200:
        return "client_name must be a string of at most 200 characters"
    if not plain(name.strip()):
        return (
            "client_name must be printable text: no control, format, bidirectional-override,"
            " zero-width or other invisible characters, and no two spaces in a row"
        )
    if problem := lookalike_problem(name):
        return f"client_name {problem}"
    return None


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
    supported = grant_types_supported(settings)
    unknown = [g for g in grant_types if g not in supported]
    if unknown:
        raise InvalidClientMetadata(f"grant_types {unknown} are not supported; use {supported}")
    if JWT_BEARER_GRANT_TYPE in grant_types and method == "none":
        raise InvalidClientMetadata(
            f"{JWT_BEARER_GRANT_TYPE} needs a confidential client: the ID-JAG is checked against"
            " the client that authenticates"
        )
    if "client_credentials" in grant_types and method == "none":
        raise InvalidClientMetadata(
            "client_credentials needs a confidential client (a client secret)"
        )
    if CIBA_GRANT_TYPE in grant_types and method == "none":
        raise InvalidClientMetadata(
            f"{CIBA_GRANT_TYPE} needs a confidential client (a client secret): CIBA requires"
            " client authentication"
        )
    mode = metadata.get("backchannel_token_delivery_mode")
    if mode is not None and (mode != "poll" or CIBA_GRANT_TYPE not in grant_types):
        raise InvalidClientMetadata(
            f"backchannel_token_delivery_mode {mode!r} is not supported: only 'poll', and only"
            f" with the {CIBA_GRANT_TYPE} grant"
        )
    if "refresh_token" in grant_types and not {"authorization_code", CIBA_GRANT_TYPE} & set(
        grant_types
    ):
        raise InvalidClientMetadata(
            f"refresh_token is only issued with authorization_code or {CIBA_GRANT_TYPE}"
        )
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
    problem = client_name_problem(name)
    if problem:
        raise InvalidClientMetadata(problem)
    descriptive = {}
    for key in _DESCRIPTIVE:
        value = metadata.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > 2000:
            raise InvalidClientMetadata(f"{key} must be a string of at most 2000 characters")
        if key.endswith("_uri") and not _http_url(value):
            raise InvalidClientMetadata(f"{key} must be an http(s) URL")
        descriptive[key] = value
    descriptive.update(key_metadata(metadata, method))
    dpop_bound = metadata.get(DPOP_REQUIRED, False)
    if not isinstance(dpop_bound, bool):
        raise InvalidClientMetadata(f"{DPOP_REQUIRED} must be true or false (RFC 9449 §5.2)")
    if dpop_bound:
        descriptive[DPOP_REQUIRED] = True
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
) -> bool:
    """Apply the registration policy; raise when this registration is not open to the caller.
    Returns whether it is an open one (no initial access token), which `open_registration`
    limits."""
    if settings.registration == "closed":
        raise OAuthError(
            "access_denied",
            "dynamic client registration is closed on this server; an admin registers clients"
            " with `bastion clients create`",
            status=403,
        )
    token_ok = initial_access_token is not None and any(
        same(initial_access_token, t) for t in settings.initial_access_tokens
    )
    if initial_access_token is not None and not token_ok:
        raise OAuthError("invalid_token", "the initial access token is not valid", status=401)
    if token_ok:
        return False
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
    return True


class RegistrationLimited(InvalidClientMetadata):
    """An open registration over a limit of ``[oauth.open_registration]``: 429 with Retry-After.
    RFC 7591 defines no error for it; its generic ``invalid_client_metadata`` is used."""

    def __init__(self, description: str, retry_after: int) -> None:
        super().__init__(description)
        self.status = 429
        self.retry_after = retry_after


def open_registration_refused(
    refusal: OpenRegistrationRefusal, settings: OpenRegistrationSettings, now: float
) -> RegistrationLimited:
    """The error for an open registration the store refused, saying when to try again."""
    if refusal.limit == "address":
        retry = refusal.oldest + settings.window_seconds - now
        description = (
            f"too many clients registered from your address ({refusal.count} in the last"
            f" {settings.window_seconds} s, at most {settings.max_per_address}); try again"
            f" in {math.ceil(max(retry, 1))} s, or reuse a client you registered"
        )
    else:
        retry = refusal.oldest + settings.unused_client_seconds - now
        description = (
            f"this server holds {refusal.count} open registrations that have not been used yet"
            f" (at most {settings.max_unused_clients}); try again later"
        )
    return RegistrationLimited(description, math.ceil(max(retry, 1)))


def new_client(
    values: Mapping[str, Any],
    *,
    source: str,
    now: float,
    introspection_resources: tuple[str, ...] = (),
) -> Registration:
    """Create (not store) a client from validated metadata, with a secret when confidential;
    ``introspection_resources``: the resources it may introspect for, as
    `bastion.oauth.introspection.introspection_resources` checked them (none: it may not)."""
    secret = new_secret() if values["token_endpoint_auth_method"] in SECRET_METHODS else None
    client = Client(
        client_id=uuid.uuid4().hex,
        client_name=values["client_name"],
        redirect_uris=tuple(values["redirect_uris"]),
        grant_types=tuple(values["grant_types"]),
        token_endpoint_auth_method=values["token_endpoint_auth_method"],
        scope=values["scope"],
        source=source,
        metadata=dict(values["metadata"]),
        created_at=now,
        revoked_at=None,
        secret_digest=digest(secret) if secret else None,
        introspection_resources=introspection_resources,
    )
    return Registration(client, secret)


def parse_registration_body(
    body: bytes, max_depth: int = untrusted_json.DEFAULT_MAX_DEPTH
) -> dict[str, Any]:
    try:
        metadata = untrusted_json.loads(body, max_depth=max_depth, unique_keys=True)
    except untrusted_json.JsonRefused as exc:
        if exc.path.startswith("redirect_uris["):
            # A redirect URI that is not text (a NUL, half a surrogate pair) is an invalid one.
            raise InvalidRedirectUri(f"a redirect URI is not a URI: {exc}") from None
        raise InvalidClientMetadata(
            f"the request body must be a JSON object of client metadata: {exc}"
        ) from None
    if not isinstance(metadata, dict):
        raise InvalidClientMetadata("the request body must be a JSON object of client metadata")
    return metadata
