"""``rate_limit`` counters shared through Redis (``gateway.redis_url``): two bastion apps on one
database count one window, and a gateway whose Redis is unreachable refuses limited calls."""

from __future__ import annotations

import socket
import uuid

import pytest

from tests.conftest import REDIS_URL, drop_redis_keys, require_service
from tests.oauth.support import free_socket

from .support import start

ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


def call_tool(http, base: str, token: str, name: str, arguments: dict) -> dict:
    response = http.post(
        f"{base}/mcp/deskhttp",
        json={
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": name, "arguments": arguments, "_meta": ENVELOPE},
        },
        headers={
            "authorization": f"Bearer {token}",
            "content-type": "application/json",
            # Answered as JSON however long it takes (httpx's default */* takes event streams).
            "accept": "application/json",
            "mcp-protocol-version": "2026-07-28",
            "mcp-method": "tools/call",
            "mcp-name": name,
        },
    )
    assert response.status_code == 200, response.text
    return response.json()


EMAIL = {"to": "a@example.com", "subject": "s", "body": "b"}


def test_two_gateways_share_one_rate_limit_through_redis(tmp_path):
    require_service("Redis", "127.0.0.1", 6379)

    prefix = f"bastion-test-{uuid.uuid4().hex[:12]}"
    settings = {"redis_url": REDIS_URL, "redis_prefix": prefix}
    try:
        with start(tmp_path, gateway=settings, replicas=1) as bastion:
            token = bastion.token("sam", "deskhttp")
            first, second = bastion.url, bastion.replicas[0]
            # The policy allows 5 emails a minute per agent; each app alone would allow 5.
            outcomes = [
                call_tool(bastion.http, base, token, "send_email", EMAIL)
                for base in (first, second, first, second, first, second, first)
            ]
            assert ["error" not in o for o in outcomes] == [True] * 5 + [False] * 2
            for refused in outcomes[5:]:
                assert refused["error"]["data"]["reason"] == "rate_limited"
                assert 0 < refused["error"]["data"]["retry_after"] <= 60
    finally:
        drop_redis_keys(prefix)


def test_unreachable_redis_refuses_rate_limited_calls_and_only_those(tmp_path, caplog):
    with free_socket() as closed:  # bound, never listening: connections are refused
        port = closed.getsockname()[1]
        settings = {"redis_url": f"redis://127.0.0.1:{port}/0"}
        with start(tmp_path, gateway=settings) as bastion:
            token = bastion.token("sam", "deskhttp")
            refused = call_tool(bastion.http, bastion.url, token, "send_email", EMAIL)
            assert refused["error"]["code"] == -32006
            assert refused["error"]["data"]["reason"] == "rate_limit_unavailable"
            assert "decision_id" in refused["error"]["data"]
            searched = call_tool(
                bastion.http, bastion.url, token, "search_customers", {"query": "a"}
            )
            assert "error" not in searched  # no rate limit applies: Redis is not needed
    assert any("rate limits cannot be checked" in r.getMessage() for r in caplog.records)


def test_a_redis_that_never_answers_refuses_rate_limited_calls_after_the_timeout_set(tmp_path):
    """A Redis that takes connections and says nothing (hung, or a dead peer behind a proxy):
    each call that needs it is refused once ``redis_timeout_seconds`` has passed, not held."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, accepts, never answers
        port = silent.getsockname()[1]
        settings = {"redis_url": f"redis://127.0.0.1:{port}/0", "redis_timeout_seconds": 0.2}
        with start(tmp_path, gateway=settings) as bastion:
            token = bastion.token("sam", "deskhttp")
            refused = call_tool(bastion.http, bastion.url, token, "send_email", EMAIL)
    assert refused["error"]["code"] == -32006
    assert refused["error"]["data"]["reason"] == "rate_limit_unavailable"


def test_redis_timeout_seconds_is_a_positive_number_of_seconds():
    from bastion.gateway.config import GatewayConfig
    from bastion.server.config import ConfigError

    assert GatewayConfig.from_mapping({}).redis_timeout_seconds == 1.0
    assert GatewayConfig.from_mapping({"redis_timeout_seconds": 0.25}).redis_timeout_seconds == 0.25
    for wrong in (0, -1, "1", True, float("inf")):
        with pytest.raises(ConfigError, match="redis_timeout_seconds"):
            GatewayConfig.from_mapping({"redis_timeout_seconds": wrong})


def test_redis_url_must_name_redis():
    from bastion.gateway.config import GatewayConfig
    from bastion.server.config import ConfigError

    with pytest.raises(ConfigError, match="redis_url"):
        GatewayConfig.from_mapping({"redis_url": "http://127.0.0.1:6379"})
    assert GatewayConfig.from_mapping({}).redis_url == ""
