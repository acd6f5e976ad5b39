"""RFC 7662 OAuth 2.0 Token Introspection.

Only confidential clients an admin allowed to introspect (``bastion clients create
--introspection``, typically a resource server) may call it. Revoked, expired, unknown or
malformed tokens are all simply ``{"active": false}``, and so is the token of a user or agent
(any agent of its chain) the kill switch holds, for as long as it holds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bastion.oauth.errors import InvalidRequest, InvalidToken, OAuthError
from bastion.oauth.store import Client

if TYPE_CHECKING:
    from bastion.oauth.server import AuthorizationServer

INACTIVE = {"active": False}


def introspect(
    server: AuthorizationServer, client: Client, form: Mapping[str, str]
) -> dict[str, Any]:
    if client.is_public or not client.may_introspect:
        raise OAuthError(
            "unauthorized_client",
            "this client may not introspect tokens; an admin allows it with"
            " `bastion clients create --introspection`",
            status=403,
        )
    token = form.get("token")
    if not token:
        raise InvalidRequest("token is required")
    found = server.store.refresh_token(token)
    if found is not None:
        grant_id, expires_at, used_at = found
        grant = server.store.grant(grant_id)
        if grant is None or grant.revoked_at is not None or used_at is not None:
            return INACTIVE
        if expires_at <= server.clock():
            return INACTIVE
        if server.suspended(grant.username or grant.client_id, (grant.client_id,)) is not None:
            return INACTIVE
        return {
            "active": True,
            "token_type": "refresh_token",
            "client_id": grant.client_id,
            "sub": grant.username or grant.client_id,
            "aud": grant.resource,
            "scope": grant.scope,
            "exp": int(expires_at),
            "iss": server.settings.issuer,
        }
    try:
        verified = server.verifier.verify(token, resource=None, audit=False)
    except InvalidToken:
        return INACTIVE
    if server.suspended(verified.subject, verified.agents or (verified.client_id,)) is not None:
        return INACTIVE
    claims = verified.claims
    answer = {
        "active": True,
        "token_type": "Bearer",
        "client_id": verified.client_id,
        "sub": verified.subject,
        "aud": claims["aud"],
        "scope": claims.get("scope", ""),
        "iss": claims["iss"],
        "exp": verified.expires_at,
        "iat": verified.issued_at,
        "jti": verified.jti,
    }
    # A delegated token's chain (RFC 8693 §4.1 allows ``act`` in the answer) and its task.
    if verified.agents:
        answer["act"] = claims["act"]
    if verified.task is not None:
        answer["task"] = verified.task
    # A DPoP-bound token says so, with its key's thumbprint (RFC 9449 §6.2).
    if verified.jkt is not None:
        answer["token_type"] = "DPoP"
        answer["cnf"] = {"jkt": verified.jkt}
    return answer
