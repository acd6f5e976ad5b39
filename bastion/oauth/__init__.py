"""bastion's OAuth 2.1 authorization server for MCP clients, one module per standard:

metadata (RFC 8414), registration (RFC 7591), client_metadata_document (client ID metadata
documents), authorize (RFC 6749 §4.1, RFC 8707, RFC 9207), pkce (RFC 7636), tokens (RFC 6749
token endpoint), access_token (RFC 9068), keys (RFC 7517/7518), revocation (RFC 7009),
introspection (RFC 7662), verifier (RFC 9068 §4 for resource servers), ciba (OpenID CIBA Core 1.0,
poll mode).
"""

from bastion.oauth.errors import InvalidToken, OAuthError
from bastion.oauth.server import AuthorizationServer
from bastion.oauth.settings import OAuthSettings, ProtectedResource, SettingsError
from bastion.oauth.verifier import TokenVerifier, VerifiedToken

__all__ = [
    "AuthorizationServer",
    "InvalidToken",
    "OAuthError",
    "OAuthSettings",
    "ProtectedResource",
    "SettingsError",
    "TokenVerifier",
    "VerifiedToken",
]
