"""What one protocol era allows is not taken from the other's, and what bastion reads of a
request (its headers, its body) is what every other reader of it reads: a request bastion would
read one way while a proxy in front of it, or the upstream behind it, reads another is refused
before anything reaches the upstream."""

from __future__ import annotations

import base64

import pytest

from .streams import legacy_session, modern_headers, modern_request


@pytest.fixture(scope="module")
def token(bastion):
    return bastion.token("sam", "deskhttp")


def _refused(bastion, response, status: int, code: int, before: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert len(bastion.recorder.requests) == before  # the upstream saw nothing
    return error


@pytest.mark.parametrize("method", ["notifications/cancelled", "notifications/initialized"])
@pytest.mark.parametrize("era", ["2025-11-25", "2026-07-28"])
def test_a_notification_sent_with_an_id_is_refused_and_nothing_is_forwarded(
    bastion, token, method, era
):
    """A notification's method with an id is a request no MCP revision defines. Both of these are
    in the default pass_methods (for their notifications, which are never forwarded), so it went
    upstream as a request, decided as ``connect`` only: an upstream that reads the method alone
    cancels its request ``requestId`` (bastion's id upstream, on a session shared by every user)."""
    params = {"requestId": 1, "reason": "x"}
    if era == "2026-07-28":
        body, headers = modern_request(5, method, params), modern_headers(token, method)
    else:
        headers = legacy_session(bastion, token, "deskhttp")
        body = {"jsonrpc": "2.0", "id": 5, "method": method, "params": params}
    before = len(bastion.recorder.requests)
    response = bastion.http.post(bastion.mcp_url("deskhttp"), json=body, headers=headers)
    error = _refused(bastion, response, 400, -32600, before)
    assert "notification" in error["message"]
    # Sent as the notification it is, it is acknowledged.
    del body["id"]
    response = bastion.http.post(bastion.mcp_url("deskhttp"), json=body, headers=headers)
    assert response.status_code == 202, response.text


def test_initialize_is_no_2026_method_and_opens_no_session(bastion, token):
    """2026-07-28 has no initialize (versioning: "initialize is an unknown method"): a request
    carrying that era's header and envelope is served statelessly, or not at all. It opened a
    2025-11-25 session, answered in 2026-07-28's shape, for a request whose every header said
    the stateless era."""
    body = modern_request(
        0,
        "initialize",
        {
            "protocolVersion": "2025-11-25",
            "capabilities": {"sampling": {}},
            "clientInfo": {"name": "x", "version": "1"},
        },
    )
    before = len(bastion.recorder.requests)
    response = bastion.http.post(
        bastion.mcp_url("deskhttp"), json=body, headers=modern_headers(token, "initialize")
    )
    assert "mcp-session-id" not in response.headers
    error = _refused(bastion, response, 400, -32601, before)
    assert error["data"]["supported"] == ["2026-07-28", "2025-11-25", "2025-06-18"]
    assert "server/discover" in error["message"]


CALL = {"name": "search_customers", "arguments": {"query": "a"}}


def _encoded(name: str) -> str:
    return f"=?base64?{base64.b64encode(name.encode()).decode()}?="


@pytest.mark.parametrize(
    "routing",
    [
        {"mcp-method": "tools/list"},
        {"mcp-method": "Tools/call"},
        {"mcp-name": "delete_customer"},
        {"mcp-method": "tools/call", "mcp-name": _encoded("delete_customer")},
    ],
)
def test_a_routing_header_a_session_request_sends_must_agree_with_its_body(bastion, token, routing):
    """A 2025-11-25 request needs no Mcp-Method or Mcp-Name, and bastion reads neither: it
    decides and forwards the body. One that sends them is read by a proxy in front, a load
    balancer or a log as 2026-07-28 defines them (routing, counting by method or tool), so a
    pair that disagrees is one request read as two, refused as a header sent twice is
    (`test_bad_input`), in either era. Sent in agreement they are served as before."""
    session = legacy_session(bastion, token, "deskhttp")
    body = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": CALL}
    url = bastion.mcp_url("deskhttp")
    before = len(bastion.recorder.requests)
    response = bastion.http.post(url, json=body, headers={**session, **routing})
    _refused(bastion, response, 400, -32020, before)
    agreeing = {"mcp-method": "tools/call", "mcp-name": "search_customers"}
    for headers in (agreeing, {**agreeing, "mcp-name": _encoded("search_customers")}, {}):
        response = bastion.http.post(url, json=body, headers={**session, **headers})
        assert response.status_code == 200 and "result" in response.json(), response.text


@pytest.mark.parametrize(
    "junk",
    [
        # Characters outside base64's alphabet (a strict decoder refuses them; Python's
        # default skips them), the URL-safe alphabet, and whitespace.
        lambda text: text[:4] + "!!" + text[4:],
        lambda text: text[:4] + "-_" + text[4:],
        lambda text: text[:4] + " " + text[4:],
    ],
)
@pytest.mark.parametrize("era", ["2025-11-25", "2026-07-28"])
def test_an_encoded_mcp_name_is_read_only_in_base64s_own_alphabet(bastion, token, junk, era):
    """2026-07-28 refuses "a header value that contains invalid characters". Python's b64decode
    skips what is not in the alphabet, so ``=?base64?c2Vh!!cmNo...?=`` read as search_customers
    for bastion, and as something else (or as no name) for a reader that decodes strictly."""
    encoded = base64.b64encode(b"search_customers").decode()
    name = f"=?base64?{junk(encoded)}?="
    if era == "2026-07-28":
        headers = modern_headers(token, "tools/call", name)
        body = modern_request(4, "tools/call", CALL)
    else:
        headers = {**legacy_session(bastion, token, "deskhttp"), "mcp-name": name}
        body = {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": CALL}
    before = len(bastion.recorder.requests)
    response = bastion.http.post(bastion.mcp_url("deskhttp"), json=body, headers=headers)
    _refused(bastion, response, 400, -32020, before)
