"""Request posture in ``context``: network zones from CIDR lists, the device from token claims or
from a trusted proxy's headers (anyone else's are ignored), the token's age and auth_time; then
the same through a running gateway, where the policy decides on them."""

from __future__ import annotations

from dataclasses import replace

import httpx
import pytest

import bastion.signals.posture as posture_module
from bastion.gateway.mount import posture_settings
from bastion.server.config import ConfigError, ServerConfig
from bastion.signals.posture import PostureError, PostureSettings, RequestPosture
from tests.gateway.streams import modern_headers, modern_request
from tests.signals.conftest import CORP, PROXY, VPN, refusal, search

SETTINGS = PostureSettings.from_mapping(
    {
        "zones": {"corp": ["10.0.0.0/8", "2001:db8::/32"], "vpn": ["100.64.0.0/10", "10.9.0.0/16"]},
        "trusted_proxies": ["192.0.2.10/32"],
        "device_header": "X-Device-Id",
        "posture_header": "X-Device-Posture",
        "device_claim": "device_id",
        "posture_claim": "device_posture",
    }
)
HEADERS = {"x-device-id": "laptop-7", "x-device-posture": "compliant"}


def test_zones_are_resolved_first_match_wins_else_public():
    assert SETTINGS.read("10.1.2.3", {}, {}).zone == "corp"
    # 10.9.0.0/16 is in vpn too, but corp is listed first.
    assert SETTINGS.read("10.9.1.1", {}, {}).zone == "corp"
    assert SETTINGS.read("100.64.0.1", {}, {}).zone == "vpn"
    assert SETTINGS.read("2001:db8::1", {}, {}).zone == "corp"
    assert SETTINGS.read("::ffff:10.0.0.1", {}, {}).zone == "corp"
    assert SETTINGS.read("8.8.8.8", {}, {}).zone == "public"
    # No address (a Unix socket) is no zone of the lists.
    assert SETTINGS.read("", {}, {}).zone == "public"
    posture = SETTINGS.read("100.64.0.1", {}, {})
    assert posture.context(0)["network"] == {"ip": "100.64.0.1", "zone": "vpn"}


def read_claims(settings: PostureSettings, address: str, claims: dict) -> RequestPosture:
    """The posture of a request from ``address`` whose token has ``claims`` (None: not there)."""
    return settings.read(address, {}, {k: v for k, v in claims.items() if v is not None})


def test_a_posture_read_again_with_the_same_fields_is_the_one_made_before(monkeypatch):
    """Made once per set of fields (it is frozen), another for a field that differs, and
    kept for a bounded number of them."""
    settings = PostureSettings.from_mapping({"zones": {"corp": ["10.0.0.0/8"]}})
    claims = {"iat": 100, "auth_time": 90}
    first = settings.read("10.1.2.3", {}, claims)
    assert settings.read("10.1.2.3", {}, dict(claims)) is first
    assert first == RequestPosture("10.1.2.3", "corp", issued_at=100, auth_time=90)
    others = {
        ("10.1.2.4", 100, 90): RequestPosture("10.1.2.4", "corp", issued_at=100, auth_time=90),
        ("8.8.8.8", 100, 90): RequestPosture("8.8.8.8", "public", issued_at=100, auth_time=90),
        ("10.1.2.3", 101, 90): RequestPosture("10.1.2.3", "corp", issued_at=101, auth_time=90),
        ("10.1.2.3", 100, 91): RequestPosture("10.1.2.3", "corp", issued_at=100, auth_time=91),
        ("10.1.2.3", 100, None): RequestPosture("10.1.2.3", "corp", issued_at=100),
        ("10.1.2.3", True, 90): RequestPosture("10.1.2.3", "corp", auth_time=90),
    }
    for (address, iat, auth_time), expected in others.items():
        got = read_claims(settings, address, {"iat": iat, "auth_time": auth_time})
        assert got == expected and got is not first
    device = SETTINGS.read("10.1.2.3", {}, {**claims, "device_id": "phone-2"})
    assert device.device_id == "phone-2" and SETTINGS.read("10.1.2.3", {}, claims) != device
    monkeypatch.setattr(posture_module, "_REMEMBERED", 3)
    for i in range(10):
        assert settings.read(f"10.0.0.{i}", {}, claims).ip == f"10.0.0.{i}"
    assert len(settings._postures) <= 3


def test_a_trusted_proxy_s_device_headers_are_honoured():
    device = SETTINGS.read("192.0.2.10", HEADERS, {}).context(0)["device"]
    assert device == {"id": "laptop-7", "posture": "compliant", "source": "proxy"}


@pytest.mark.parametrize("address", ["192.0.2.11", "10.0.0.1", "", "not an address"])
def test_device_headers_from_anyone_else_are_ignored(address):
    assert SETTINGS.read(address, HEADERS, {}).context(0)["device"] == {}


def test_the_token_s_claims_come_before_the_proxy_s_headers():
    claims = {"device_id": "phone-2", "device_posture": "unknown", "iat": 100}
    device = SETTINGS.read("192.0.2.10", HEADERS, claims).context(0)["device"]
    assert device == {"id": "phone-2", "posture": "unknown", "source": "token"}


def test_unusable_claim_and_header_values_are_ignored():
    claims = {"device_id": {"nested": 1}, "device_posture": "x" * 257}
    headers = {"x-device-id": "bad\nvalue", "x-device-posture": ""}
    assert SETTINGS.read("192.0.2.10", headers, claims).context(0)["device"] == {}


def test_the_token_s_age_and_auth_time():
    token = SETTINGS.read("10.0.0.1", {}, {"iat": 1000, "auth_time": 900}).context(1060.7)["token"]
    assert token == {"issued_at": 1000, "age_seconds": 60, "auth_time": 900}
    # No auth_time claim (bastion's own tokens carry none): none in the context.
    assert SETTINGS.read("10.0.0.1", {}, {"iat": 1000}).context(1000)["token"] == {
        "issued_at": 1000,
        "age_seconds": 0,
    }
    assert SETTINGS.read("10.0.0.1", {}, {"iat": "1000"}).context(1000)["token"] == {}


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({"zones": {"corp": ["10.0.0.1/8"]}}, "not a CIDR block"),
        ({"zones": {"corp": "10.0.0.0/8"}}, "list of CIDR blocks"),
        ({"zones": ["10.0.0.0/8"]}, "table of CIDR lists"),
        ({"zones": {"bad zone": ["10.0.0.0/8"]}}, "zone name"),
        ({"trusted_proxies": ["proxy.example"]}, "not a CIDR block"),
        ({"device_header": "X-Device-Id"}, "trusted_proxies"),
        ({"device_header": "X Device"}, "header or claim name"),
        ({"zone": {}}, "unknown key"),
    ],
)
def test_settings_that_cannot_be_used_are_refused(table, words):
    with pytest.raises(PostureError, match=words):
        PostureSettings.from_mapping(table)


def test_proxy_headers_and_posture_headers_together_are_refused():
    # uvicorn would put the forwarded address in place of the proxy's own: no proxy to trust.
    posture = {"trusted_proxies": ["127.0.0.1/32"], "device_header": "X-D"}
    config = ServerConfig(proxy_headers=True, forwarded_allow_ips="127.0.0.1")
    with pytest.raises(ConfigError, match="proxy_headers"):
        posture_settings(replace(config, signals={"posture": posture}))
    assert posture_settings(replace(config, proxy_headers=False, signals={"posture": posture}))
    with pytest.raises(ConfigError, match="not a CIDR block"):
        posture_settings(replace(config, signals={"posture": {"trusted_proxies": ["x"]}}))


# -- through the gateway ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def token(bastion):
    return bastion.token("sam", "deskhttp")


def test_the_network_zone_decides_through_the_gateway(bastion, token):
    assert refusal(search(bastion, token, "corp-only", source=CORP)) is None
    assert refusal(search(bastion, token, "corp-only", source=VPN)) == "not_permitted"
    assert refusal(search(bastion, token, "vpn-only", source=VPN)) is None
    assert refusal(search(bastion, token, "corp-only", source=PROXY)) == "not_permitted"


def test_a_trusted_proxy_s_posture_header_counts(bastion, token):
    headers = {"X-Device-Posture": "compliant", "X-Device-Id": "laptop-7"}
    assert refusal(search(bastion, token, "managed-only", headers=headers)) is None
    assert refusal(search(bastion, token, "laptop-7-only", headers=headers)) is None
    assert refusal(search(bastion, token, "managed-only")) == "not_permitted"


def test_a_spoofed_posture_header_from_an_untrusted_address_is_ignored(bastion, token):
    headers = {"X-Device-Posture": "compliant", "X-Device-Id": "laptop-7"}
    answer = search(bastion, token, "managed-only", CORP, headers)
    assert refusal(answer) == "not_permitted"
    assert refusal(search(bastion, token, "laptop-7-only", CORP, headers)) == "not_permitted"
    # The decision record shows what the policy saw: a corporate address, no device.
    bastion.flush()
    record = bastion.records.get(answer["error"]["data"]["decision_id"])
    assert record.context["network"] == {"ip": CORP, "zone": "corp"}
    assert record.context["device"] == {}


@pytest.mark.parametrize("header", ["X-Device-Id", "X-Device-Posture"])
@pytest.mark.parametrize("order", [("laptop-7", "phone-2"), ("phone-2", "laptop-7")])
def test_a_device_or_posture_header_sent_twice_is_refused_and_nothing_is_forwarded(
    bastion, token, header, order
):
    """Read into a dict, the last copy won: behind a proxy that appends its own, a client's copy
    sent first was dropped, and behind one that prepends, the client's came last and won. Which
    copy is the proxy's cannot be told, so the request is refused, audited, whoever sends it."""
    before = len(bastion.recorder.requests)
    with httpx.Client(timeout=20) as http:
        response = http.post(
            bastion.mcp_url("deskhttp"),
            json=modern_request(
                1, "tools/call", {"name": "search_customers", "arguments": {"query": "a"}}
            ),
            headers=[
                *modern_headers(token, "tools/call", "search_customers").items(),
                *((header, value) for value in order),
            ],
        )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == -32020 and header.lower() in error["message"]
    assert len(bastion.recorder.requests) == before  # the upstream saw nothing


def test_the_token_s_age_reaches_the_policy(bastion, token):
    assert refusal(search(bastion, token, "new-token-only")) is None


def test_a_device_reported_not_compliant_is_refused_and_its_user_s_other_device_is_not(
    bastion, token
):
    """The guardrail reads the fact about the device the trusted proxy names, not one about the
    user: writing it refuses that device's next call and leaves the same user's phone alone."""
    laptop, phone = {"X-Device-Id": "laptop-9"}, {"X-Device-Id": "phone-9"}
    assert refusal(search(bastion, token, "anything", headers=laptop)) is None
    key, _ = bastion.app.state.keys.create("fleet", ["facts:write"], created_by="test")
    fact = {
        "predicate": "device_compliance",
        "args": [{"type": "Device", "id": "laptop-9"}, "not-compliant"],
    }
    written = bastion.http.post(
        f"{bastion.url}/v1/facts",
        json={"facts": [fact]},
        headers={"authorization": f"Bearer {key}"},
    )
    assert written.status_code == 200, written.text
    answer = search(bastion, token, "anything", headers=laptop)
    assert refusal(answer) == "not_permitted"
    assert refusal(search(bastion, token, "anything", headers=phone)) is None
    # From an address that is not the proxy, the header names no device: nothing to refuse.
    assert refusal(search(bastion, token, "anything", CORP, laptop)) is None
    bastion.flush()
    record = bastion.records.get(answer["error"]["data"]["decision_id"])
    assert any("device_compliance(Device{context.device.id}" in rule for rule in record.rules)
