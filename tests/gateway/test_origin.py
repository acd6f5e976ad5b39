"""MCP's transport (Security): a request whose ``Origin`` is not allowed gets 403 whatever its
method and era, before anything else is looked at; no ``Origin`` (not a browser page) is fine."""

from __future__ import annotations

import pytest

from bastion.gateway.config import GatewayConfig
from bastion.origins import normalized_origin
from bastion.server.config import ConfigError

from .streams import legacy_session, modern_headers, modern_request
from .support import start

EVIL = "http://evil.example.com"


def _modern_call(bastion, token: str, origin: str | None):
    headers = modern_headers(token, "tools/call", "search_customers")
    if origin is not None:
        headers["origin"] = origin
    return bastion.http.post(
        bastion.mcp_url("deskhttp"),
        json=modern_request(1, "tools/call", {"name": "search_customers", "arguments": {}}),
        headers=headers,
    )


def test_a_page_of_another_origin_is_refused_in_every_method_and_era(bastion):
    token = bastion.token("sam", "deskhttp")
    before = len(bastion.recorder.requests)
    refused = _modern_call(bastion, token, EVIL)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == -32600 and refused.json()["id"] is None

    session = legacy_session(bastion, token, "deskhttp")
    evil = {**session, "origin": EVIL}
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    url = bastion.mcp_url("deskhttp")
    assert bastion.http.post(url, json=call, headers=evil).status_code == 403
    assert bastion.http.get(url, headers=evil).status_code == 403
    assert bastion.http.delete(url, headers=evil).status_code == 403
    # Refused before the token is even read: a page gets no 401 challenge either.
    assert bastion.http.post(url, json=call, headers={"origin": EVIL}).status_code == 403
    # Spellings of the same foreign origin, and the opaque origin of sandboxed pages.
    for origin in ("HTTP://EVIL.EXAMPLE.COM", "http://evil.example.com:80", "null", "x"):
        assert (
            bastion.http.post(url, json=call, headers={**session, "origin": origin}).status_code
            == 403
        )
    # The session was not ended by the refused DELETE, and nothing reached the upstream.
    assert bastion.http.post(url, json=call, headers=session).status_code == 200
    assert not any(b'"tools/call"' in r["body"] for r in bastion.recorder.requests[before:])


def test_requests_without_origin_or_from_the_gateways_own_origin_are_served(bastion):
    token = bastion.token("sam", "deskhttp")
    assert _modern_call(bastion, token, None).status_code == 200
    answered = _modern_call(bastion, token, bastion.url)
    assert answered.status_code == 200 and "result" in answered.json()
    assert (
        _modern_call(bastion, token, bastion.url.upper().replace("HTTP", "http")).status_code == 200
    )


def test_configured_origins_replace_the_default(tmp_path):
    app = "https://kiosk.example.com"
    with start(tmp_path, gateway={"allowed_origins": [app]}) as bastion:
        token = bastion.token("sam", "deskhttp")
        assert _modern_call(bastion, token, app).status_code == 200
        assert _modern_call(bastion, token, "https://KIOSK.example.com:443").status_code == 200
        assert _modern_call(bastion, token, bastion.url).status_code == 403
        assert _modern_call(bastion, token, EVIL).status_code == 403
        # The Kelvin sign (U+212A), which Python lowers to "k", in UTF-8: another origin.
        kelvin = "https://\u212aiosk.example.com".encode()
        assert _modern_call(bastion, token, kelvin).status_code == 403


@pytest.mark.parametrize(
    "value",
    [["https://app.example.com/"], ["https://app.example.com/path"], ["null"], ["*"], "x", [1]],
)
def test_allowed_origins_must_be_origins(value):
    with pytest.raises(ConfigError, match="allowed_origins"):
        GatewayConfig.from_mapping({"allowed_origins": value})


@pytest.mark.parametrize("letter", ["\u212a", "\u0130"], ids=["kelvin-sign", "capital-i-with-dot"])
def test_an_origin_spelt_with_a_letter_that_is_not_ascii_is_no_origin(letter):
    """A serialised origin is ASCII (RFC 6454 §6.2: an international host in its A-label form),
    and Python lowers the Kelvin sign (U+212A) to "k": such text is no origin, never the ASCII
    one it lowers to, in a request's ``Origin`` or in ``allowed_origins``."""
    spelt = f"https://{letter}iosk.example.com"
    assert normalized_origin(spelt) is None
    with pytest.raises(ConfigError, match="allowed_origins"):
        GatewayConfig.from_mapping({"allowed_origins": [spelt]})


def test_origins_are_compared_as_browsers_send_them():
    assert normalized_origin("HTTPS://Example.COM:443") == "https://example.com"
    assert normalized_origin("http://[::1]:8000") == "http://[::1]:8000"
    assert normalized_origin("http://u:p@example.com") is None
    assert normalized_origin("file://x") is None
    assert normalized_origin("http://example.com:99999") is None


def test_a_preflight_from_the_gateways_own_origin_is_answered_and_a_foreign_one_refused(bastion):
    # CORS for the origins allowed (by default the gateway's own): tests/gateway/test_cors.py.
    url = bastion.mcp_url("deskhttp")
    preflight = {"access-control-request-method": "POST"}
    foreign = bastion.http.options(url, headers={**preflight, "origin": EVIL})
    assert foreign.status_code == 403
    assert not any(h.lower().startswith("access-control-") for h in foreign.headers)
    own = bastion.http.options(url, headers={**preflight, "origin": bastion.url})
    assert own.status_code == 204
    assert own.headers["access-control-allow-origin"] == bastion.url
