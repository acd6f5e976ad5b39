"""Logging in to bastion through a certified OpenID provider: the npm package oidc-provider, run
with Node (`oidc_provider.mjs`), with a person in Debian's chromium (Playwright). The official
MCP SDK client runs the whole MCP OAuth flow with bastion (registration, PKCE, the person's login
done at the provider, consent at bastion, token) and calls a tool; the person's groups at the
provider become facts, in step at each login."""

from __future__ import annotations

import json
import queue
import threading
from urllib.parse import urlencode

import anyio
import httpx2
import pytest
from mcp.client.auth import OAuthClientProvider
from mcp.client.client import Client as McpClient
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientMetadata

from bastion.facts.model import Entity
from tests.browser import browser_fixture, tab_fixture  # noqa: F401 (fixtures)
from tests.oauth.support import (
    AuthorizationCodeResult,
    MemoryStorage,
    free_socket,
    pkce_pair,
    serve,
)
from tests.oauth.test_mcp_sdk import mcp_app
from tests.waits import PATIENCE

from .oidc_provider import oidc_provider
from .oidc_support import REDIRECT_URI, bastion_with_providers, log_in_at_the_provider

PASSWORD = "ada-at-the-provider"
ADA = Entity("User", "corp:ada")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """oidc-provider, bastion with it as provider ``corp``, and an MCP server bastion guards."""
    directory = tmp_path_factory.mktemp("oidc")
    people = directory / "people.json"
    people.write_text(
        json.dumps({"ada": {"password": PASSWORD, "email": "ada@acme.test", "groups": ["admins"]}})
    )
    bastion_sock, mcp_sock, provider_sock = free_socket(), free_socket(), free_socket()
    bastion_url = f"http://127.0.0.1:{bastion_sock.getsockname()[1]}"
    port = provider_sock.getsockname()[1]
    provider_sock.close()  # Node binds it
    resource = f"http://127.0.0.1:{mcp_sock.getsockname()[1]}/mcp"
    with oidc_provider(
        port,
        client_id="bastion",
        client_secret="a-client-secret-for-bastion-0123456789",
        redirect_uris=[f"{bastion_url}/login/corp/callback"],
        users_file=people,
    ) as issuer:
        identity = {
            "providers": [
                {
                    "id": "corp",
                    "name": "Acme SSO",
                    "issuer": issuer,
                    "client_id": "bastion",
                    "client_secret": "${CORP_SECRET}",
                    "scopes": ["openid", "email", "groups"],
                    # oidc-provider puts the claims of scopes in UserInfo, not the ID token.
                    "userinfo": True,
                    "facts": [
                        {
                            "claim": "groups",
                            "predicate": "has_role",
                            "name": "{value}",
                            "resource": "Org:acme",
                        }
                    ],
                }
            ]
        }
        env = {"CORP_SECRET": "a-client-secret-for-bastion-0123456789"}
        with (
            bastion_with_providers(
                str(directory / "bastion.db"),
                str(directory / "keys"),
                bastion_sock,
                identity,
                resource=resource,
                env=env,
            ) as bastion,
            serve(mcp_app(bastion, resource), mcp_sock),
        ):
            yield {"bastion": bastion, "people": people, "issuer": issuer, "resource": resource}


def test_mcp_sdk_client_authorizes_with_the_login_done_at_the_provider(world, tab):
    bastion, resource = world["bastion"], world["resource"]
    urls: queue.Queue[str] = queue.Queue()
    answers: queue.Queue[dict] = queue.Queue()
    seen: dict = {}
    storage = MemoryStorage()

    async def redirect_handler(url: str) -> None:
        urls.put(url)

    async def callback_handler() -> AuthorizationCodeResult:
        query = await anyio.to_thread.run_sync(answers.get, True, 60)
        return AuthorizationCodeResult(
            code=query["code"][0], state=query["state"][0], iss=query["iss"][0]
        )

    auth = OAuthClientProvider(
        server_url=resource,
        client_metadata=OAuthClientMetadata(
            client_name="SDK agent",
            redirect_uris=[REDIRECT_URI],
            token_endpoint_auth_method="none",
            grant_types=["authorization_code", "refresh_token"],
        ),
        storage=storage,
        redirect_handler=redirect_handler,
        callback_handler=callback_handler,
    )

    async def agent() -> None:
        async with (
            httpx2.AsyncClient(auth=auth, timeout=60) as http,
            McpClient(streamable_http_client(resource, http_client=http)) as client,
        ):
            seen["tools"] = [t.name for t in (await client.list_tools()).tools]
            seen["echo"] = (await client.call_tool("echo", {"text": "hi"})).content[0].text

    def run_agent() -> None:
        try:
            anyio.run(agent)
        except BaseException as exc:  # reported below, in the test's thread
            seen["error"] = exc
            urls.put("")

    thread = threading.Thread(target=run_agent, daemon=True)
    thread.start()
    authorize_url = urls.get(timeout=60)
    assert authorize_url, seen.get("error")
    answers.put(log_in_at_the_provider(tab, authorize_url, "Acme SSO", "ada", PASSWORD, "corp:ada"))
    thread.join(PATIENCE)
    assert "error" not in seen, seen["error"]
    assert seen["tools"] == ["echo"] and seen["echo"] == "hi"
    verified = bastion.server.verifier.verify(storage.tokens.access_token, resource)
    assert verified.subject == "corp:ada"
    assert verified.client_id == storage.client_info.client_id
    roles = bastion.server.facts.get(("has_role", ADA, None, Entity("Org", "acme")))
    assert [f.fact[2] for f in roles] == ["admins"]
    assert all(f.expires_at is not None for f in roles)
    events = [e for e in bastion.server.audit.events() if e.kind == "login.succeeded"]
    assert events[-1].subject == "corp:ada"


def test_groups_follow_the_provider_at_the_next_login(world, tab):
    bastion = world["bastion"]
    people = json.loads(world["people"].read_text())
    people["ada"]["groups"] = ["devs", "support"]
    world["people"].write_text(json.dumps(people))
    client = bastion.register(redirect_uris=[REDIRECT_URI])
    _, challenge = pkce_pair()
    params = bastion.authorize_params(client, challenge, resource=bastion.resource)
    query = log_in_at_the_provider(
        tab, f"{bastion.url}/authorize?{urlencode(params)}", "Acme SSO", "ada", PASSWORD, "corp:ada"
    )
    assert "code" in query
    roles = bastion.server.facts.get(("has_role", ADA, None, Entity("Org", "acme")))
    assert sorted(f.fact[2] for f in roles) == ["devs", "support"]
