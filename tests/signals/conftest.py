"""One running bastion (decision service, authorization server, gateway, the quickstart's MCP
server upstream) for the signals tests, with [signals.posture] configured and rules that read
signals and posture. Loopback has a whole /8: a client connecting from 127.0.0.1 is the trusted
proxy, one from 127.0.0.2 is on the corporate network, 127.0.0.3 on the VPN."""

from __future__ import annotations

import httpx
import pytest

from tests import clients
from tests.gateway.streams import call_tool as modern_call
from tests.gateway.streams import messages, modern_headers, modern_request
from tests.gateway.support import start

PROXY, CORP, VPN = "127.0.0.1", "127.0.0.2", "127.0.0.3"
SIGNALS = {
    "posture": {
        "zones": {"corp": [f"{CORP}/32", "10.0.0.0/8"], "vpn": [f"{VPN}/32"]},
        "trusted_proxies": [f"{PROXY}/32"],
        "device_header": "X-Device-Id",
        "posture_header": "X-Device-Posture",
    }
}
RULES = """
# tests/signals: what live signals and the request's posture do to calls.
declare signal(User, String, Boolean, String, Integer);
# A device out of compliance keeps its user's reads and loses their writes.
deny(user: User, "call", _tool: Tool) if
  signal(user, "device_compliant", false, "mdm", _set_at) and
  not context.annotations.readOnlyHint = true;
# A search that needs a risk check of the last two minutes.
requires_signal(_user: User, "risk_checked", 120) if context.arguments.query = "fresh-only";
# Searches that need a posture.
deny(_user: User, "call", _tool: Tool) if
  context.arguments.query = "corp-only" and not context.network.zone = "corp";
deny(_user: User, "call", _tool: Tool) if
  context.arguments.query = "vpn-only" and not context.network.zone = "vpn";
deny(_user: User, "call", _tool: Tool) if
  context.arguments.query = "managed-only" and not context.device.posture = "compliant";
deny(_user: User, "call", _tool: Tool) if
  context.arguments.query = "laptop-7-only" and not context.device.id = "laptop-7";
deny(_user: User, "call", _tool: Tool) if
  context.arguments.query = "new-token-only" and not context.token.age_seconds < 600;
# The device the call comes from, reported not compliant, loses access (not its user's others).
resource Device {}
deny(_user: User, "call", _tool: Tool) if
  device_compliance(Device{context.device.id}, "not-compliant");
"""


@pytest.fixture(scope="module")
def signals_gateway(tmp_path_factory):
    with start(
        tmp_path_factory.mktemp("signals-gateway"), policy_extra=RULES, signals=SIGNALS
    ) as running:
        key, _ = running.app.state.keys.create("mdm", ["signals"], created_by="test")
        running.signals_key = key
        yield running


def set_signal(bastion, user: str, name: str, value, source: str = "mdm", ttl: int = 3600):
    """POST /v1/signals as the MDM would, over HTTP."""
    response = bastion.http.post(
        f"{bastion.url}/v1/signals",
        json={
            "subject": {"type": "User", "id": user},
            "name": name,
            "value": value,
            "source": source,
            "ttl_seconds": ttl,
        },
        headers={"authorization": f"Bearer {bastion.signals_key}"},
    )
    assert response.status_code == 200, response.text
    return response.json()


def search(bastion, token: str, query: str, source: str = PROXY, headers: dict | None = None):
    """search_customers on deskhttp (read-only) in 2026-07-28, from ``source``; the JSON-RPC
    answer."""
    if source == PROXY and not headers:
        return modern_call(bastion, token, "deskhttp", "search_customers", {"query": query})
    transport = httpx.HTTPTransport(local_address=source, verify=clients.TRUST)
    with httpx.Client(transport=transport, timeout=20) as http:
        response = http.post(
            bastion.mcp_url("deskhttp"),
            json=modern_request(
                1, "tools/call", {"name": "search_customers", "arguments": {"query": query}}
            ),
            headers={**modern_headers(token, "tools/call", "search_customers"), **(headers or {})},
        )
    assert response.status_code == 200, response.text
    return messages(response)[-1]


def refusal(answer: dict) -> str | None:
    """The reason bastion refused with, or None when the call went through."""
    if "error" in answer:
        return answer["error"]["data"]["reason"]
    return None


@pytest.fixture(scope="module")
def bastion(signals_gateway):
    return signals_gateway
