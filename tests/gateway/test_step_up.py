"""Step-up with a client that registered itself, as MCP clients do.

The SDK's `OAuthClientProvider` registers the client with the scope of the first 401 challenge
(``customers:read``), and on a 403 ``insufficient_scope`` asks for the union with the scope
demanded. A self-registered client's registered scope cannot limit that: it could have registered
every scope. These tests run the whole flow with nothing registered beforehand.
"""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_a_self_registered_sdk_client_steps_up_and_deletes(bastion, mode):
    async def script(client, seen):
        result = await client.call_tool("search_customers", {"query": "ada"})
        seen["search"] = json.loads(result.content[0].text)
        result = await client.call_tool("delete_customer", {"customer_id": "c-100"})
        seen["delete"] = result.content[0].text

    seen = bastion.sdk("avery", "desk", mode, script)  # the SDK registers the client itself
    assert seen["search"]["customers"][0]["email"] == "ada@example.com"
    assert seen["delete"] == "deleted c-100"
    assert len(seen["redirects"]) == 2  # one login, then one step-up
    first, second = seen["redirects"]
    assert "scope=customers%3Aread&" in first + "&"  # registered with the first challenge's scope
    assert "customers%3Awrite" in second
    assert set(seen["tokens"].scope.split()) == {"customers:read", "customers:write"}


def test_a_client_registered_by_an_admin_with_a_scope_cannot_ask_for_more(bastion):
    from bastion.oauth import registration

    from .support import REDIRECT_URI

    oauth = bastion.app.state.oauth
    values = registration.validate_client_metadata(
        {
            "client_name": "read-only agent",
            "redirect_uris": [REDIRECT_URI],
            "token_endpoint_auth_method": "none",
            "scope": "customers:read",
        },
        oauth.settings,
    )
    client = registration.new_client(values, source="admin", now=0).client
    oauth.store.save_client(client)
    response = bastion.http.get(
        f"{bastion.url}/authorize",
        params={
            "response_type": "code",
            "client_id": client.client_id,
            "redirect_uri": REDIRECT_URI,
            "state": "s",
            "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
            "code_challenge_method": "S256",
            "resource": bastion.mcp_url("desk"),
            "scope": "customers:read customers:write",
        },
    )
    assert response.status_code in (302, 303), response.text
    location = response.headers["location"]
    assert "error=invalid_scope" in location and "code=" not in location


def test_a_challenge_scope_its_resource_does_not_offer_stops_the_server_at_start(tmp_path):
    """The 401's ``scope`` is what an MCP client asks for first (MCP authorization, Scope
    Selection Strategy: "Use scope parameter from the initial WWW-Authenticate header"). A scope
    the resource's ``[[oauth.resources]]`` entry lacks is refused at /authorize (invalid_scope),
    so every client that follows the challenge failed; the server started all the same."""
    from bastion.server.app import create_app
    from bastion.server.config import ConfigError, ServerConfig

    base = "http://127.0.0.1:9"
    config = ServerConfig(
        database=str(tmp_path / "bastion.db"),
        oauth={
            "issuer": base,
            "key_dir": str(tmp_path / "keys"),
            "resources": [{"uri": f"{base}/mcp/desk", "scopes": ["customers:read"]}],
        },
        gateway={
            "upstreams": [
                {
                    "name": "desk",
                    "url": "http://127.0.0.1:9/mcp",
                    "scopes": ["customers:read", "customer:write"],
                }
            ]
        },
    )
    with pytest.raises(ConfigError, match=r"'customer:write'.*\[\[oauth.resources\]\]"):
        create_app(config)
