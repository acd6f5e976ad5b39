"""RFC 8414 OAuth 2.0 Authorization Server Metadata, served at
``/.well-known/oauth-authorization-server`` (path-inserted when the issuer has a path, §3.1)."""

from __future__ import annotations

from typing import Any

from bastion.oauth import ciba
from bastion.oauth.client_assertion import METHOD as PRIVATE_KEY_JWT
from bastion.oauth.jwt_bearer import ID_JAG_PROFILE
from bastion.oauth.registration import AUTH_METHODS, grant_types_supported
from bastion.oauth.settings import OAuthSettings

WELL_KNOWN = "/.well-known/oauth-authorization-server"


def metadata_path(settings: OAuthSettings) -> str:
    """Where the metadata is served: the well-known prefix, then the issuer's path."""
    return WELL_KNOWN + settings.issuer_path


def authorization_server_metadata(settings: OAuthSettings) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "issuer": settings.issuer,
        "authorization_endpoint": settings.endpoint("authorize"),
        "token_endpoint": settings.endpoint("token"),
        "jwks_uri": settings.endpoint("jwks.json"),
        "revocation_endpoint": settings.endpoint("revoke"),
        "introspection_endpoint": settings.endpoint("introspect"),
        "scopes_supported": settings.scopes_supported,
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": grant_types_supported(settings),
        "token_endpoint_auth_methods_supported": list(AUTH_METHODS),
        "revocation_endpoint_auth_methods_supported": list(AUTH_METHODS),
        "introspection_endpoint_auth_methods_supported": [
            PRIVATE_KEY_JWT,
            "client_secret_basic",
            "client_secret_post",
        ],
        # private_key_jwt (RFC 8414 §2): the algorithms a client assertion may be signed with.
        "token_endpoint_auth_signing_alg_values_supported": list(
            settings.client_assertion.algorithms
        ),
        "revocation_endpoint_auth_signing_alg_values_supported": list(
            settings.client_assertion.algorithms
        ),
        "introspection_endpoint_auth_signing_alg_values_supported": list(
            settings.client_assertion.algorithms
        ),
        # DPoP (RFC 9449 §5.1): the algorithms a proof may be signed with.
        "dpop_signing_alg_values_supported": list(settings.dpop.algorithms),
        "code_challenge_methods_supported": ["S256"],
        "authorization_response_iss_parameter_supported": True,
        "client_id_metadata_document_supported": settings.client_metadata.enabled,
        **ciba.metadata_fields(settings.endpoint),
    }
    if settings.id_jag.enabled:
        # MCP's enterprise-managed authorization (§6) and the ID-JAG draft (§7.2).
        metadata["authorization_grant_profiles_supported"] = [ID_JAG_PROFILE]
    if settings.registration != "closed":
        metadata["registration_endpoint"] = settings.endpoint("register")
    return metadata
