"""RFC 7009 OAuth 2.0 Token Revocation.

Revoking a refresh token revokes its whole grant (every access token issued under it, §2.1);
revoking an access token revokes that token (its ``jti``) and every delegation exchanged from it
(RFC 8693, `bastion.oauth.token_exchange`), not the rest of its grant. A client may revoke only its own
tokens; an unknown or foreign token is answered 200 all the same, as §2.2 requires. A client
holding another client's token is a stolen token's trace: that is audited (``revocation.refused``,
reason ``not_its_token``, aggregated), never told to the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from bastion.oauth.errors import InvalidRequest, InvalidToken
from bastion.oauth.store import Client

if TYPE_CHECKING:
    from bastion.oauth.server import AuthorizationServer

TOKEN_TYPE_HINTS = ("access_token", "refresh_token")


def revoke(
    server: AuthorizationServer,
    client: Client,
    form: Mapping[str, str],
    address: str | None = None,
) -> None:
    """Revoke ``form``'s token if it is ``client``'s (the request came from ``address``)."""

    def not_its_own(owner: str, subject: str | None) -> None:
        server.refusals.record(
            "revocation.refused",
            address=address,
            reason="not_its_token",
            client_id=client.client_id,
            subject=subject,
            token_client_id=owner,
        )

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
            elif grant is not None:
                not_its_own(grant.client_id, grant.username)
            return
        try:
            verified = server.verifier.verify(token, resource=None, audit=False)
        except InvalidToken:
            continue
        if verified.client_id == client.client_id:
            delegated = server.store.revoke_access_token(
                verified.jti, now, actor=f"client:{client.client_id}"
            )
            server.audit.record(
                "token.revoked",
                subject=verified.subject,
                client_id=client.client_id,
                jti=verified.jti,
                grant_id=verified.grant_id,
                delegated_revoked=delegated,
            )
        else:
            not_its_own(verified.client_id, verified.subject)
        return
