"""A revoked client gets no new grant, however its request and the revocation interleave: a
request authenticated just before an administrator revoked the client (its key set still being
fetched, an identity provider's keys, a policy asked) is refused when its grant would be made,
on either database. Revoking a client revokes the grants it holds (`OAuthStore.revoke_client`);
this is the other half, the grants it would hold next."""

from __future__ import annotations

import time

import anyio
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.db import Database
from bastion.oauth.store import Grant, GrantRefused, OAuthStore
from tests.delegation.agent_support import ASSERTION_TYPE, assertion, new_key, public_jwks
from tests.oauth.support import free_socket, running_bastion, serve


def test_a_client_revoked_while_its_token_request_is_under_way_gets_no_token(
    database_url, tmp_path
):
    """The client's jwks_uri is fetched after the client was read and before its grant is
    made; the administrator revokes the client while that fetch is answered. The request
    proved a key the client held, but by the time a grant would be made the client is revoked:
    ``invalid_grant``, no grant, no token."""
    key = new_key("k1")
    revoking: dict = {}

    async def jwks(request):
        # The administrator revokes the client (`bastion clients revoke`: another connection).
        await anyio.to_thread.run_sync(revoking["now"])
        return JSONResponse(public_jwks(key))

    with (
        serve(Starlette(routes=[Route("/jwks.json", jwks)]), free_socket()) as keys_url,
        running_bastion(database_url, tmp_path) as bastion,
    ):
        client = bastion.register_as_admin(
            client_name="Nightly agent",
            redirect_uris=[],
            grant_types=["client_credentials"],
            token_endpoint_auth_method="private_key_jwt",
            jwks_uri=f"{keys_url}/jwks.json",
            scope="tools:read",
        )
        client_id = client["client_id"]

        def revoke() -> None:
            admin = Database(database_url)
            try:
                assert OAuthStore(admin).revoke_client(client_id, time.time(), actor="cli:admin")
            finally:
                admin.close()

        revoking["now"] = revoke
        response = bastion.token(
            grant_type="client_credentials",
            resource=bastion.resource,
            client_assertion_type=ASSERTION_TYPE,
            client_assertion=assertion(key, client_id, bastion.url),
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "invalid_grant"
        assert "revoked" in response.json()["error_description"]
        grants = bastion.db.execute(
            "SELECT grant_id FROM oauth_grants WHERE client_id = ?", (client_id,)
        )
        assert grants == []


def test_no_grant_is_made_for_a_revoked_client(database_url, tmp_path):
    """`OAuthStore.create_grant`, the one way every grant is made, reads the client in its
    transaction: a revoked one is refused there, and nothing is saved."""
    with running_bastion(database_url, tmp_path) as bastion:
        client = bastion.register()
        store = bastion.server.store
        assert store.revoke_client(client["client_id"], bastion.clock(), actor="test")
        now = bastion.clock()
        grant = Grant(
            grant_id="g-after-revocation",
            client_id=client["client_id"],
            username="alice",
            resource=bastion.resource,
            scope="tools:read",
            created_at=now,
            expires_at=now + 3600,
            revoked_at=None,
        )
        with pytest.raises(GrantRefused, match="revoked"):
            store.create_grant(grant, authorized_at=now)
        assert store.grant("g-after-revocation") is None
