"""The official MCP Python SDK client performs the whole authorization flow against bastion:
protected-resource metadata from a real MCP server (built with the SDK, guarded by bastion's
token verifier), AS metadata, registration (dynamic, or a client ID metadata document served on
https loopback), PKCE, login and consent, token, an authenticated MCP call, and refresh."""

from __future__ import annotations

import json
import time
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import httpx2
import pytest
from mcp.client.client import Client as McpClient
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.oauth import InvalidToken, TokenVerifier

from .support import (
    MemoryStorage,
    free_socket,
    running_bastion,
    sdk_auth,
    self_signed_certificate,
    serve,
)

REDIRECT_URI = "http://127.0.0.1:9/callback"


class BastionTokenVerifier:
    """The SDK's TokenVerifier protocol, answered by bastion's verifier for one resource."""

    def __init__(self, verifier: TokenVerifier, resource: str) -> None:
        self.verifier = verifier
        self.resource = resource

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            verified = await anyio.to_thread.run_sync(self.verifier.verify, token, self.resource)
        except InvalidToken:
            return None
        return AccessToken(
            token=token,
            client_id=verified.client_id,
            scopes=sorted(verified.scopes),
            expires_at=verified.expires_at,
            resource=self.resource,
            subject=verified.subject,
        )


def mcp_app(bastion, resource: str) -> Starlette:
    server = MCPServer(
        "bastion-test",
        token_verifier=BastionTokenVerifier(bastion.server.verifier, resource),
        auth=AuthSettings(
            issuer_url=bastion.url,
            resource_server_url=resource,
            required_scopes=["tools:read"],
            validate_token_resource=False,  # bastion's verifier checks aud itself
        ),
    )

    @server.tool()
    def echo(text: str) -> str:
        """Say it back."""
        return text

    return server.streamable_http_app(streamable_http_path="/mcp")


def run_sdk_client(bastion, mcp_url: str, client_metadata_url: str | None = None) -> dict:
    """Connect with the SDK's OAuthClientProvider; return what happened, for the assertions."""
    seen: dict = {"redirects": []}
    storage = MemoryStorage()
    provider = sdk_auth(
        mcp_url,
        bastion.log_in_and_consent,
        storage,
        seen["redirects"],
        client_name="SDK test agent",
        redirect_uri=REDIRECT_URI,
        client_metadata_url=client_metadata_url,
    )

    async def main() -> None:
        async with (
            httpx2.AsyncClient(auth=provider, timeout=20) as http,
            McpClient(streamable_http_client(mcp_url, http_client=http)) as client,
        ):
            tools = await client.list_tools()
            seen["tools"] = [tool.name for tool in tools.tools]
            result = await client.call_tool("echo", {"text": "hello"})
            seen["echo"] = result.content[0].text
            seen["first_tokens"] = storage.tokens
            # The access token is now stale for the client: it must refresh, not re-authorize.
            provider.context.token_expiry_time = time.time() - 1
            tools = await client.list_tools()
            seen["tools_after_refresh"] = [tool.name for tool in tools.tools]
            seen["second_tokens"] = storage.tokens
        seen["client_info"] = storage.client_info

    anyio.run(main)
    return seen


def test_sdk_client_registers_dynamically_authorizes_calls_and_refreshes(sqlite_url, tmp_path):
    mcp_sock = free_socket()
    mcp_base = f"http://127.0.0.1:{mcp_sock.getsockname()[1]}"
    resource = f"{mcp_base}/mcp"
    with running_bastion(sqlite_url, tmp_path, resource=resource) as bastion:
        with serve(mcp_app(bastion, resource), mcp_sock):
            seen = run_sdk_client(bastion, resource)
        assert seen["tools"] == ["echo"]
        assert seen["echo"] == "hello"
        assert seen["tools_after_refresh"] == ["echo"]
        assert len(seen["redirects"]) == 1  # the refresh needed no person
        authorize = parse_qs(urlsplit(seen["redirects"][0]).query)
        assert authorize["code_challenge_method"] == ["S256"]
        assert authorize["resource"] == [resource]
        first, second = seen["first_tokens"], seen["second_tokens"]
        assert first.access_token != second.access_token
        assert first.refresh_token != second.refresh_token  # rotated
        client_id = seen["client_info"].client_id
        assert bastion.server.store.client(client_id).source == "dynamic"
        kinds = [e.kind for e in bastion.server.audit.events()]
        assert {"client.registered", "code.issued", "token.issued", "token.refreshed"} <= set(kinds)
        # The token the SDK holds is bound to this MCP server and to nothing else.
        verified = bastion.server.verifier.verify(second.access_token, resource)
        assert verified.subject == "alice" and verified.client_id == client_id


@pytest.fixture
def metadata_document_host(tmp_path):
    """An https server on loopback serving a client ID metadata document."""
    cert, key = self_signed_certificate(tmp_path)
    sock = free_socket()
    url = f"https://127.0.0.1:{sock.getsockname()[1]}/agents/sdk-test.json"
    document = {
        "client_id": url,
        "client_name": "SDK agent by metadata document",
        "redirect_uris": [REDIRECT_URI],
        "grant_types": ["authorization_code", "refresh_token"],
        "token_endpoint_auth_method": "none",
    }
    fetches = []

    async def serve_document(request):
        fetches.append(request.url.path)
        return JSONResponse(document)

    app = Starlette(routes=[Route("/agents/sdk-test.json", serve_document)])
    with serve(app, sock, ssl_certfile=cert, ssl_keyfile=key):
        yield {"url": url, "ca_file": cert, "fetches": fetches, "document": document}


def test_sdk_client_uses_a_client_id_metadata_document(
    sqlite_url, tmp_path, metadata_document_host
):
    mcp_sock = free_socket()
    resource = f"http://127.0.0.1:{mcp_sock.getsockname()[1]}/mcp"
    client_metadata = {
        "allow_private_addresses": True,
        "ca_file": metadata_document_host["ca_file"],
    }
    with running_bastion(
        sqlite_url, tmp_path, resource=resource, client_metadata=client_metadata
    ) as bastion:
        with serve(mcp_app(bastion, resource), mcp_sock):
            seen = run_sdk_client(
                bastion, resource, client_metadata_url=metadata_document_host["url"]
            )
        assert seen["tools"] == ["echo"] and seen["tools_after_refresh"] == ["echo"]
        url = metadata_document_host["url"]
        assert seen["client_info"].client_id == url
        stored = bastion.server.store.client(url)
        assert stored.source == "metadata_document"
        assert stored.client_name == "SDK agent by metadata document"
        # No dynamic registration happened, and the document was fetched once (then cached).
        assert "client.registered" not in [e.kind for e in bastion.server.audit.events()]
        assert metadata_document_host["fetches"] == ["/agents/sdk-test.json"]
        assert json.loads(json.dumps(stored.redirect_uris)) == [REDIRECT_URI]


def test_the_mcp_server_refuses_tokens_for_another_resource_revoked_or_expired(
    sqlite_url, tmp_path
):
    mcp_sock = free_socket()
    resource = f"http://127.0.0.1:{mcp_sock.getsockname()[1]}/mcp"
    with (
        running_bastion(sqlite_url, tmp_path, resource=resource) as bastion,
        serve(mcp_app(bastion, resource), mcp_sock),
    ):
        client = bastion.register()

        def token_for(target: str) -> dict:
            code, verifier = bastion.code_for(client, resource=target)
            return bastion.token(
                grant_type="authorization_code",
                code=code,
                redirect_uri=client["redirect_uris"][0],
                code_verifier=verifier,
                client_id=client["client_id"],
            ).json()

        def list_tools(token: str) -> httpx.Response:
            return httpx.post(
                resource,
                json={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}},
                headers={
                    "Authorization": f"Bearer {token}",
                    "Accept": "application/json, text/event-stream",
                    "MCP-Protocol-Version": "2025-11-25",
                },
            )

        good = token_for(resource)
        # Past authentication (without an initialize the server may still answer 400).
        assert list_tools(good["access_token"]).status_code != 401
        other = token_for(bastion.other_resource)
        refused = list_tools(other["access_token"])
        assert refused.status_code == 401
        assert "resource_metadata=" in refused.headers["www-authenticate"]
        bastion.http.post(
            f"{bastion.url}/revoke",
            data={"token": good["access_token"], "client_id": client["client_id"]},
        )
        assert list_tools(good["access_token"]).status_code == 401
        fresh = token_for(resource)
        bastion.clock.advance(3600)
        assert list_tools(fresh["access_token"]).status_code == 401
