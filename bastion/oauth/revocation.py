"""RFC 7009 OAuth 2.0 Token Revocation.

Revoking a refresh token revokes its whole grant (every access token issued under it, §2.1);
revoking an access token revokes that token (its ``jti``). A client may revoke only its own
tokens; an unknown or foreign token is answered 200 all the same, as §2.2 requires.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from bastion.oauth.errors import InvalidRequest, InvalidToken
from bastion.oauth.store import Client

if TYPE_CHECKING:
    from bastion.oauth.server import AuthorizationServer

TOKEN_TYPE_HINTS = ("access_token", "refresh_token")


def revoke(server: AuthorizationServer, client: Client, form: Mapping[str, str]) -> None:
    token = form.get("token")
    if not token:
        raise InvalidRequest("token is required")
    hint = form.get("token_type_hint")
    # §2.1: an unknown hint is ignored and the server searches every kind of token it has.
    order = (
        ("access_token", "refresh_token")
        if hint == "access_token"
        else ("refresh_token", "access_token")
    )
    now = server.clock()
    for kind in order:
        if kind == "refresh_token":
            found = server.store.refresh_token(token)
            if found is None:
                continue
            grant = server.store.grant(found[0])
            mine = grant is not None and grant.client_id == client.client_id
            if mine:
                server.revoke_grant(
                    grant, "refresh token revoked by client", actor=f"client:{client.client_id}"
                )
            return
        try:
            verified = server.verifier.verify(token, resource=None, audit=False)
        except InvalidToken:
            continue
        if verified.client_id == client.client_id:
            server.store.revoke_access_token(verified.jti, now)
            server.audit.record(
                "token.revoked",
                subject=verified.subject,
                client_id=client.client_id,
                jti=verified.jti,
                grant_id=verified.grant_id,
            )
        return
