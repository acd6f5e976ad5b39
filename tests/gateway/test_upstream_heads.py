"""What an HTTP upstream's POSTs carry, with each POST's head kept from the last one: the user's
current token, the current protocol version and session, the configured headers, and never a
header that could start another one."""

from __future__ import annotations

import asyncio

import pytest

from bastion.gateway.config import UpstreamConfig
from bastion.gateway.jsonrpc import RpcError
from bastion.gateway.upstream import HttpUpstream
from tests.gateway.test_http1 import serving

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


def test_each_post_carries_the_token_version_and_session_of_its_moment():
    async def main():
        server, url, seen = await serving([OK] * 7)
        upstream = HttpUpstream(UpstreamConfig(name="u", url=url, headers={"x-api-key": "k1"}))
        message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {}}
        # Each moment changes one thing (or nothing) from the one before.
        moments = [
            {"bearer": "one"},
            {},
            {"bearer": "two"},
            {"_protocol_version": "2025-11-25"},
            {"_session_id": "s1"},
            {"_session_id": "s2"},
            {"bearer": None},
        ]
        try:
            for moment in moments:
                for name, value in moment.items():
                    setattr(upstream, name, value)
                response = await upstream._post(message)
                await response.read()
                response.close()
        finally:
            await upstream._http.aclose()
            server.close()
        return [head for _, head in seen]

    heads = asyncio.run(main())
    assert len(heads) == 7
    assert all(b"\r\nx-api-key: k1\r\n" in head for head in heads)
    tokens = [
        h.split(b"authorization: ")[1].split(b"\r\n")[0] if b"author" in h else None for h in heads
    ]
    assert tokens == [b"Bearer one", b"Bearer one", *[b"Bearer two"] * 4, None]
    versions = [b"mcp-protocol-version: 2025-11-25\r\n" in head for head in heads]
    assert versions == [False, False, False, True, True, True, True]
    sessions = [
        h.split(b"mcp-session-id: ")[1].split(b"\r\n")[0] if b"mcp-session-id" in h else None
        for h in heads
    ]
    assert sessions == [None, None, None, None, b"s1", b"s2", b"s2"]


def test_each_2026_post_names_its_own_method_and_tool():
    async def main():
        server, url, seen = await serving([OK] * 6)
        upstream = HttpUpstream(UpstreamConfig(name="u", url=url))
        upstream._modern, upstream._protocol_version = True, "2026-07-28"
        calls = [
            ("tools/call", {"name": "a"}),
            ("tools/call", {"name": "a"}),
            ("tools/call", {"name": "b"}),
            ("prompts/get", {"name": "b"}),
            ("tools/call", {"name": "é"}),
            ("tools/list", {}),
        ]
        try:
            for i, (method, params) in enumerate(calls):
                message = {"jsonrpc": "2.0", "id": i, "method": method, "params": params}
                response = await upstream._post(message)
                await response.read()
                response.close()
        finally:
            await upstream._http.aclose()
            server.close()
        return [head for _, head in seen]

    heads = asyncio.run(main())
    methods = [h.split(b"mcp-method: ")[1].split(b"\r\n")[0] for h in heads]
    assert methods == [b"tools/call"] * 3 + [b"prompts/get", b"tools/call", b"tools/list"]
    names = [
        h.split(b"mcp-name: ")[1].split(b"\r\n")[0] if b"mcp-name" in h else None for h in heads
    ]
    assert names == [b"a", b"a", b"b", b"b", b"=?base64?w6k=?=", None]


def test_a_token_that_would_start_another_header_is_never_sent():
    async def main():
        upstream = HttpUpstream(UpstreamConfig(name="u", url="http://127.0.0.1:9/mcp"))
        upstream.bearer = "good"
        upstream._post_head()
        upstream.bearer = "bad\r\nx-injected: 1"
        try:
            for _ in range(2):  # refused each time, not remembered
                with pytest.raises(RpcError, match="HTTP does not allow in a header value"):
                    await upstream._post({"jsonrpc": "2.0", "id": 1, "method": "ping"})
        finally:
            await upstream._http.aclose()

    asyncio.run(main())


def test_a_name_that_reads_as_encoded_goes_upstream_encoded():
    """MCP 2026-07-28: a plain name that looks like the base64 form (``=?base64?...?=``) is
    sent encoded too, else the upstream (and any reader before it) decodes it and reads another
    name: ``=?base64?YQ==?=`` went as it is, read upstream as the tool ``a``."""

    async def main():
        server, url, seen = await serving([OK])
        upstream = HttpUpstream(UpstreamConfig(name="u", url=url))
        upstream._modern, upstream._protocol_version = True, "2026-07-28"
        message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call"}
        message["params"] = {"name": "=?base64?YQ==?="}
        try:
            response = await upstream._post(message)
            await response.read()
            response.close()
        finally:
            await upstream._http.aclose()
            server.close()
        return seen[0][1]

    head = asyncio.run(main())
    assert b"\r\nmcp-name: =?base64?PT9iYXNlNjQ/WVE9PT89?=\r\n" in head, head
