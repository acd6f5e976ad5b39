"""bastion behind a reverse proxy that serves it under a path (``gateway.public_url`` such as
``https://host/bastion``): RFC 9728 §3.1 puts a resource's metadata at the well-known prefix of
the host followed by the resource's path, ``https://host/.well-known/oauth-protected-resource/
bastion/mcp/<server>``, and that is the URL a 401 names and the one a client that builds it itself
asks (MCP authorization, Protected Resource Metadata Discovery). The URL bastion named before, under
the prefix, keeps answering."""

from __future__ import annotations

import httpx
import pytest

from tests import clients
from tests.oauth.support import serve as serve_app

from .support import SERVERS, free_socket, start

PREFIX = "/bastion"
WELL_KNOWN = "/.well-known/oauth-protected-resource"


class PrefixProxy:
    """A reverse proxy as an operator would set one up in front of bastion at ``PREFIX``: a path
    under the prefix goes to bastion without it; one under ``/.well-known/`` goes as it is (the
    proxy routes RFC 9728's URL for the prefix to bastion); anything else is not bastion's (404).
    Streams the answer, so event streams pass through."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.seen: list[str] = []

    async def __call__(self, scope, receive, send) -> None:
        assert scope["type"] == "http"
        path = scope["path"]
        self.seen.append(path)
        if path.startswith(PREFIX + "/"):
            target = path[len(PREFIX) :]
        elif path.startswith("/.well-known/"):
            target = path
        else:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"not bastion's"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        query = scope.get("query_string", b"").decode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"host", b"content-length")]
        async with httpx.AsyncClient(timeout=None) as client:
            request = client.build_request(
                scope["method"],
                self.upstream + target + (f"?{query}" if query else ""),
                headers=headers,
                content=body,
            )
            response = await client.send(request, stream=True)
            try:
                kept = [
                    (k, v)
                    for k, v in response.headers.raw
                    if k.lower() not in (b"content-length", b"transfer-encoding", b"connection")
                ]
                await send(
                    {"type": "http.response.start", "status": response.status_code, "headers": kept}
                )
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                await response.aclose()


@pytest.fixture(scope="module")
def behind(tmp_path_factory):
    sock = free_socket()
    origin = f"http://127.0.0.1:{sock.getsockname()[1]}"
    public = origin + PREFIX
    resources = [
        {"uri": f"{public}/mcp/{name}", "scopes": ["customers:read", "customers:write"]}
        for name in SERVERS
    ]
    with start(
        tmp_path_factory.mktemp("prefixed"),
        gateway={"public_url": public},
        oauth={"resources": resources, "open_registration": {"max_per_address": 10_000}},
    ) as running:
        proxy = PrefixProxy(running.url)
        with serve_app(proxy, sock, lifespan="off"):
            yield running, origin, public, proxy


def test_the_401_names_rfc_9728_s_url_for_a_public_url_with_a_path(behind):
    _, origin, public, _ = behind
    refused = clients.post(f"{public}/mcp/desk", json={"jsonrpc": "2.0", "id": 1, "method": "x"})
    assert refused.status_code == 401
    challenge = refused.headers["www-authenticate"]
    expected = f"{origin}{WELL_KNOWN}{PREFIX}/mcp/desk"
    assert f'resource_metadata="{expected}"' in challenge, challenge


@pytest.mark.parametrize(
    "where",
    [
        f"{WELL_KNOWN}{PREFIX}/mcp/desk",  # RFC 9728 §3.1, as a client builds it
        f"{PREFIX}{WELL_KNOWN}/mcp/desk",  # what bastion named before the evening of 2026-12-06
    ],
)
def test_the_metadata_is_served_at_rfc_9728_s_url_and_at_the_old_one(behind, where):
    _, origin, public, _ = behind
    metadata = clients.get(origin + where)
    assert metadata.status_code == 200, metadata.text
    assert metadata.json()["resource"] == f"{public}/mcp/desk"


def test_another_path_under_the_well_known_prefix_is_not_a_resource(behind):
    _, origin, _, _ = behind
    for path in (f"{WELL_KNOWN}/other/mcp/desk", f"{WELL_KNOWN}{PREFIX}/mcp/nosuch"):
        assert clients.get(origin + path).status_code == 404, path


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_an_sdk_client_finds_the_metadata_and_calls_through_the_prefix(behind, mode):
    running, _, public, proxy = behind

    async def script(client, seen):
        result = await client.call_tool("search_customers", {"query": "ada"})
        seen["search"] = result.content[0].text

    before = len(proxy.seen)
    seen = running.sdk("avery", "desk", mode, script, url=f"{public}/mcp/desk")
    assert "ada@example.com" in seen["search"]
    assert len(seen["redirects"]) == 1
    assert f"{WELL_KNOWN}{PREFIX}/mcp/desk" in proxy.seen[before:]  # as the 401 named it
