"""CORS (the Fetch standard's CORS protocol) for the web origins ``[gateway] allowed_origins``
lists, over raw HTTP: a browser-based MCP client on another origin (the MCP Inspector's web UI, a
company's agent console) reaches ``/mcp/<server>`` and the OAuth endpoints it calls during
discovery and authorization without a proxy. A preflight from a listed origin is answered before
any token is read; a preflight from any other origin gets no CORS headers; answers to a listed
origin carry them whatever their status and whichever layer makes them (the body limits, a
fault, bastion's HTTP protocol and its direct call path), once; a request without ``Origin``
(every non-browser client) gets none (docs/gateway.md, Origin; docs/oauth.md, Browser-based
clients)."""

from __future__ import annotations

import json
import logging
import re
import socket
from unittest import mock
from urllib.parse import urlsplit

import pytest

from bastion.gateway.transport import StreamableHttpEndpoint
from bastion.server.config import ServerConfig
from tests.oauth.support import pkce_pair
from tests.security.test_edge import answers_on, status_of
from tests.waits import PATIENCE

from . import support
from .streams import legacy_session, modern_headers, modern_request
from .support import start

# The MCP Inspector's web UI: the page of another origin the operator lists.
APP = "http://localhost:6274"
EVIL = "http://evil.example.com"
MCP_REQUEST_HEADERS = (
    "authorization",
    "content-type",
    "accept",
    "mcp-protocol-version",
    "mcp-session-id",
    "last-event-id",
    "mcp-method",
    "mcp-name",
    "dpop",
)


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    with start(tmp_path_factory.mktemp("cors"), gateway={"allowed_origins": [APP]}) as running:
        yield running


def listed(value: str | None) -> set[str]:
    """The names of a comma-separated header value, in lower case."""
    return {v.strip().lower() for v in (value or "").split(",") if v.strip()}


def cors_headers(response) -> dict[str, str]:
    return {k.lower(): v for k, v in response.headers.items() if k.lower().startswith("access-")}


def preflight(bastion, url: str, origin: str, method: str = "POST", headers=MCP_REQUEST_HEADERS):
    return bastion.http.options(
        url,
        headers={
            "origin": origin,
            "access-control-request-method": method,
            "access-control-request-headers": ",".join(headers),
        },
    )


def answered_to(response, origin: str, exposed: set[str]) -> None:
    """``response`` carries what a browser needs to let a page of ``origin`` read it."""
    assert response.headers["access-control-allow-origin"] == origin
    assert "origin" in listed(response.headers.get("vary"))
    assert exposed <= listed(response.headers.get("access-control-expose-headers"))
    # Bearer tokens, not cookies: a browser must send no credentials of the user's.
    assert "access-control-allow-credentials" not in response.headers


def test_a_preflight_from_a_listed_origin_is_answered_before_any_token(bastion):
    before = len(bastion.recorder.requests)
    for server in ("deskhttp", "desk", "no-such-server"):
        for method in ("POST", "GET", "DELETE"):
            answer = preflight(bastion, bastion.mcp_url(server), APP, method)
            assert answer.status_code == 204, answer.text
            assert answer.content == b""
            assert answer.headers["access-control-allow-origin"] == APP
            assert {"get", "post", "delete"} <= listed(
                answer.headers["access-control-allow-methods"]
            )
            assert set(MCP_REQUEST_HEADERS) <= listed(
                answer.headers["access-control-allow-headers"]
            )
            assert int(answer.headers["access-control-max-age"]) > 0
            assert "origin" in listed(answer.headers.get("vary"))
            assert "access-control-allow-credentials" not in answer.headers
            assert "www-authenticate" not in answer.headers
    # The spelling a browser sends is echoed as sent, never "*".
    answer = preflight(bastion, bastion.mcp_url("deskhttp"), "http://LOCALHOST:6274")
    assert answer.status_code == 204
    assert answer.headers["access-control-allow-origin"] == "http://LOCALHOST:6274"
    assert len(bastion.recorder.requests) == before


def test_a_preflight_from_another_origin_is_refused_with_no_cors(bastion):
    for origin in (EVIL, "null", bastion.url, "http://localhost:6275"):
        answer = preflight(bastion, bastion.mcp_url("deskhttp"), origin)
        assert answer.status_code == 403, origin
        assert answer.json()["error"]["code"] == -32600
        assert "[gateway] allowed_origins" in answer.json()["error"]["message"]
        assert cors_headers(answer) == {}, origin


def test_an_options_request_that_is_no_preflight_is_not_answered_as_one(bastion):
    # Without Access-Control-Request-Method it is a plain OPTIONS: a token first, as before.
    plain = bastion.http.options(bastion.mcp_url("deskhttp"), headers={"origin": APP})
    assert plain.status_code == 401
    answered_to(plain, APP, {"www-authenticate"})
    assert "access-control-allow-methods" not in plain.headers


def test_every_answer_to_a_listed_origin_carries_cors(bastion):
    url = bastion.mcp_url("deskhttp")
    page = {"origin": APP}
    call = modern_request(1, "tools/list", {})
    # 401 and its challenge, which the client must read to find the metadata.
    challenged = bastion.http.post(url, json=call, headers=page)
    assert challenged.status_code == 401
    assert "resource_metadata=" in challenged.headers["www-authenticate"]
    answered_to(challenged, APP, {"www-authenticate"})
    token = bastion.token("sam", "deskhttp")
    wrong = bastion.http.post(url, json=call, headers={**page, "authorization": "Bearer nope"})
    assert wrong.status_code == 401
    answered_to(wrong, APP, {"www-authenticate"})
    # 2026-07-28: a call, and a refusal of a bad one.
    listed_tools = bastion.http.post(
        url, json=call, headers={**modern_headers(token, "tools/list"), **page}
    )
    assert listed_tools.status_code == 200
    answered_to(listed_tools, APP, {"mcp-session-id", "mcp-protocol-version"})
    mismatch = bastion.http.post(
        url, json=call, headers={**modern_headers(token, "tools/call"), **page}
    )
    assert mismatch.status_code == 400
    answered_to(mismatch, APP, set())
    # 2025-11-25: initialize's Mcp-Session-Id, the GET stream, DELETE.
    opened = bastion.http.post(
        url,
        json={
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "page", "version": "1"},
            },
        },
        headers={**page, "authorization": f"Bearer {token}", "mcp-protocol-version": "2025-11-25"},
    )
    assert opened.status_code == 200 and opened.headers["mcp-session-id"]
    answered_to(opened, APP, {"mcp-session-id"})
    session = {
        "authorization": f"Bearer {token}",
        "accept": "text/event-stream",
        "mcp-protocol-version": "2025-11-25",
        "mcp-session-id": opened.headers["mcp-session-id"],
        **page,
    }
    with bastion.http.stream("GET", url, headers=session) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        answered_to(stream, APP, {"mcp-session-id"})
    ended = bastion.http.delete(url, headers=session)
    assert ended.status_code == 204
    answered_to(ended, APP, set())
    unknown = bastion.http.post(bastion.mcp_url("no-such-server"), json=call, headers=page)
    assert unknown.status_code == 404
    answered_to(unknown, APP, set())


def test_requests_without_origin_get_no_cors(bastion):
    url = bastion.mcp_url("deskhttp")
    call = modern_request(1, "tools/list", {})
    token = bastion.token("sam", "deskhttp")
    session = legacy_session(bastion, token, "deskhttp")
    answers = [
        bastion.http.post(url, json=call),
        bastion.http.post(url, json=call, headers=modern_headers(token, "tools/list")),
        bastion.http.options(url, headers={"access-control-request-method": "POST"}),
        bastion.http.delete(url, headers=session),
    ]
    assert [a.status_code for a in answers] == [401, 200, 401, 204]
    for answer in answers:
        assert cors_headers(answer) == {}
        assert "origin" not in listed(answer.headers.get("vary"))


# -- the OAuth endpoints a browser client calls -----------------------------------------------


def oauth_urls(bastion) -> dict[str, str]:
    return {
        "protected resource metadata": (
            f"{bastion.url}/.well-known/oauth-protected-resource/mcp/deskhttp"
        ),
        "authorization server metadata": f"{bastion.url}/.well-known/oauth-authorization-server",
        "jwks": f"{bastion.url}/jwks.json",
        "register": f"{bastion.url}/register",
        "token": f"{bastion.url}/token",
        "revoke": f"{bastion.url}/revoke",
    }


def test_the_oauth_endpoints_answer_a_listed_origins_preflight(bastion):
    for name, url in oauth_urls(bastion).items():
        method = "GET" if "metadata" in name or name == "jwks" else "POST"
        # What the MCP SDK's browser client sends: its protocol version to the metadata, a
        # JSON body to /register, Basic client credentials or a DPoP proof to /token.
        asked = ("mcp-protocol-version",) if method == "GET" else ("content-type", "authorization")
        answer = preflight(bastion, url, APP, method, (*asked, "dpop"))
        assert answer.status_code == 204, name
        assert answer.headers["access-control-allow-origin"] == APP, name
        assert method.lower() in listed(answer.headers["access-control-allow-methods"]), name
        assert {*asked, "dpop"} <= listed(answer.headers["access-control-allow-headers"]), name
        assert "origin" in listed(answer.headers.get("vary")), name
        assert "access-control-allow-credentials" not in answer.headers
        foreign = preflight(bastion, url, EVIL, method, asked)
        assert foreign.status_code == 403, name
        assert "[oauth] allowed_origins" in foreign.json()["error_description"], name
        assert cors_headers(foreign) == {}, name


def test_the_oauth_endpoints_answers_to_a_listed_origin_carry_cors(bastion):
    urls = oauth_urls(bastion)
    page = {"origin": APP}
    for name in ("protected resource metadata", "authorization server metadata", "jwks"):
        answer = bastion.http.get(urls[name], headers=page)
        assert answer.status_code == 200, name
        answered_to(answer, APP, set())
    registered = bastion.http.post(
        urls["register"],
        json={
            "client_name": "page",
            "redirect_uris": [f"{APP}/oauth/callback"],
            "token_endpoint_auth_method": "none",
        },
        headers=page,
    )
    assert registered.status_code == 201, registered.text
    answered_to(registered, APP, set())
    refused = bastion.http.post(
        urls["token"],
        data={
            "grant_type": "authorization_code",
            "code": "not-a-code",
            "code_verifier": pkce_pair()[0],
            "client_id": registered.json()["client_id"],
            "redirect_uri": f"{APP}/oauth/callback",
        },
        headers=page,
    )
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"
    answered_to(refused, APP, {"www-authenticate", "retry-after", "dpop-nonce"})
    revoked = bastion.http.post(
        urls["revoke"],
        data={"token": "x", "client_id": registered.json()["client_id"]},
        headers=page,
    )
    assert revoked.status_code == 200
    answered_to(revoked, APP, set())
    # Another origin's page is answered as before, with nothing that lets it read the answer.
    foreign = bastion.http.get(urls["authorization server metadata"], headers={"origin": EVIL})
    assert foreign.status_code == 200 and cors_headers(foreign) == {}
    # No Origin, no CORS; the answers that caches may keep still vary by Origin.
    for name in ("protected resource metadata", "authorization server metadata", "jwks"):
        answer = bastion.http.get(urls[name])
        assert answer.status_code == 200 and cors_headers(answer) == {}, name
        assert "origin" in listed(answer.headers.get("vary")), name


def test_the_pages_and_the_other_apis_do_no_cors(bastion):
    # The login and consent pages are navigations, not fetches; /introspect is for resource
    # servers; /v1 is the decision API.
    for path in ("/authorize", "/authorize/login", "/sign-in", "/introspect", "/v1/decide"):
        answer = preflight(bastion, f"{bastion.url}{path}", APP, "POST", ("content-type",))
        assert answer.status_code != 204, path
        assert cors_headers(answer) == {}, path
        posted = bastion.http.post(f"{bastion.url}{path}", headers={"origin": APP})
        assert cors_headers(posted) == {}, path


def test_the_posture_headers_bastion_reads_are_allowed(tmp_path):
    signals = {
        "posture": {
            "trusted_proxies": ["192.0.2.10/32"],
            "device_header": "X-Device-Id",
            "posture_header": "X-Device-Posture",
        }
    }
    with start(tmp_path, gateway={"allowed_origins": [APP]}, signals=signals) as running:
        answer = preflight(running, running.mcp_url("deskhttp"), APP, "POST", ("x-device-id",))
        assert answer.status_code == 204
        assert {"x-device-id", "x-device-posture", *MCP_REQUEST_HEADERS} <= listed(
            answer.headers["access-control-allow-headers"]
        )


# -- answers made outside the routes: a fault, the body limits ---------------------------------


def failing(*args, **kwargs):
    raise RuntimeError("a fault of the test's")


async def failing_coroutine(*args, **kwargs):
    raise RuntimeError("a fault of the test's")


def test_a_fault_on_an_oauth_endpoint_is_answered_to_a_listed_origin_with_cors(
    bastion, monkeypatch
):
    """An unexpected exception is answered 500 by Starlette's ServerErrorMiddleware, outside
    every middleware of bastion's: the page reads the server's error, not "Failed to fetch"."""
    urls = oauth_urls(bastion)
    monkeypatch.setattr(bastion.app.state.oauth.keys, "jwks", failing)
    monkeypatch.setattr(bastion.app.state.gateway, "metadata", failing)
    for name in ("jwks", "protected resource metadata"):
        failed = bastion.http.get(urls[name], headers={"origin": APP})
        assert failed.status_code == 500, name
        answered_to(failed, APP, set())
        foreign = bastion.http.get(urls[name], headers={"origin": EVIL})
        assert foreign.status_code == 500 and cors_headers(foreign) == {}, name
        assert "origin" in listed(foreign.headers.get("vary")), name
    assert bastion.http.get(urls["jwks"], headers={"origin": APP}).json()["error"] == "server_error"


def test_a_body_over_the_limit_is_refused_to_a_listed_origin_with_cors(bastion):
    """RequestBodyLimits answers 413 before the route is reached (max_oauth_body_bytes)."""
    large = {"grant_type": "authorization_code", "code": "x" * (65 * 1024)}
    for name in ("token", "register", "revoke"):
        url = oauth_urls(bastion)[name]
        refused = bastion.http.post(url, data=large, headers={"origin": APP})
        assert refused.status_code == 413, name
        assert "max_oauth_body_bytes" in refused.json()["error_description"], name
        answered_to(refused, APP, {"www-authenticate", "retry-after", "dpop-nonce"})
        foreign = bastion.http.post(url, data=large, headers={"origin": EVIL})
        assert foreign.status_code == 413 and cors_headers(foreign) == {}, name
    # Nor does a page's preflight with a body skip the limits: no browser sends one.
    with_body = bastion.http.request(
        "OPTIONS",
        oauth_urls(bastion)["token"],
        content=b"x" * (65 * 1024),
        headers={"origin": APP, "access-control-request-method": "POST"},
    )
    assert with_body.status_code == 413


def test_oauth_allowed_origins_add_pages_to_the_oauth_endpoints_not_to_mcp(tmp_path):
    """With both lists, the OAuth endpoints answer the pages of either (a page that calls /mcp/
    signs in there too); /mcp/ only the gateway's."""
    spa = "https://spa.example.com"
    with start(
        tmp_path, gateway={"allowed_origins": [APP]}, oauth={"allowed_origins": [spa]}
    ) as running:
        for name, url in oauth_urls(running).items():
            method = "GET" if "metadata" in name or name == "jwks" else "POST"
            for origin in (APP, spa):
                answer = preflight(running, url, origin, method, ("content-type",))
                assert answer.status_code == 204, (name, origin)
                assert answer.headers["access-control-allow-origin"] == origin, (name, origin)
        assert preflight(running, running.mcp_url("deskhttp"), APP).status_code == 204
        refused = preflight(running, running.mcp_url("deskhttp"), spa)
        assert refused.status_code == 403 and cors_headers(refused) == {}


# -- /mcp/: answers made before the gateway's own CORS ------------------------------------------

# A page of an origin only [oauth] allowed_origins lists: it may sign in, never call /mcp/.
SPA = "https://spa.example.com"
BODY_TIMEOUT = 1


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """This module's bastion as `bastion serve` serves it (bastion's HTTP protocol, whose direct
    path runs an exact ``POST /mcp/<server>`` past Starlette), with a page of [oauth]
    allowed_origins too."""
    from tests.gateway.test_direct_gateway import ServedLikeBastionServe

    def config(**settings):
        return ServerConfig(**settings, body_timeout=BODY_TIMEOUT)

    # As `bastion serve` without access_log (whose lines the protocol leaves to the
    # application), whatever handlers pytest's log capture puts on the access logger.
    quiet = mock.patch.object(logging.getLogger("uvicorn.access"), "hasHandlers", lambda: False)
    with (
        mock.patch.object(support, "ServerConfig", config),
        mock.patch.object(support, "Servers", ServedLikeBastionServe),
        start(
            tmp_path_factory.mktemp("cors-served"),
            gateway={"allowed_origins": [APP]},
            oauth={"allowed_origins": [SPA]},
        ) as running,
        quiet,
    ):
        yield running


def direct_requests(bastion) -> int:
    text = bastion.http.get(f"{bastion.url}/metrics").text
    found = re.search(r"^bastion_direct_gateway_requests_total (\S+)$", text, re.M)
    return int(float(found[1])) if found else 0


def answered_once_to(response, origin: str) -> None:
    """`answered_to`, with one ``Access-Control-Allow-Origin`` (a browser refuses two) and the
    gateway's exposed headers, whichever layer answered."""
    assert response.headers.get_list("access-control-allow-origin") == [origin], response.headers
    answered_to(response, origin, {"mcp-session-id", "www-authenticate", "retry-after"})


def test_a_body_over_the_limit_on_mcp_is_refused_to_a_listed_page_with_cors(bastion, served):
    """The body limits' 413 ([gateway] max_body_bytes), made before the gateway is reached, on
    the application's path (uvicorn's own protocol) and on bastion serve's (which hands a body
    over the limit to the application): the page reads the refusal, not "Failed to fetch"."""
    large = json.dumps(modern_request(1, "tools/list", {"pad": "x" * 65536})).encode()
    for running in (bastion, served):
        url = running.mcp_url("deskhttp")
        sent = {"content-type": "application/json"}
        refused = running.http.post(url, content=large, headers={**sent, "origin": APP})
        assert refused.status_code == 413, refused.text
        assert "gateway.max_body_bytes" in refused.json()["error"]["message"]
        answered_once_to(refused, APP)
        for other in (EVIL, SPA):
            foreign = running.http.post(url, content=large, headers={**sent, "origin": other})
            assert foreign.status_code == 413 and cors_headers(foreign) == {}, other
        plain = running.http.post(url, content=large, headers=sent)
        assert plain.status_code == 413 and cors_headers(plain) == {}
        assert "origin" not in listed(plain.headers.get("vary"))


def test_a_fault_on_mcp_is_answered_to_a_listed_page_with_cors(bastion, served, monkeypatch):
    """An unexpected exception past the gateway's Origin check: Starlette's 500 on the
    application's path, the direct path's own 500 on bastion serve's; a page reads either."""
    monkeypatch.setattr(StreamableHttpEndpoint, "_authenticate", failing_coroutine)
    call = modern_request(1, "tools/list", {})
    for running in (bastion, served):
        url = running.mcp_url("deskhttp")
        before = direct_requests(running)
        failed = running.http.post(url, json=call, headers={"origin": APP})
        assert failed.status_code == 500, failed.text
        assert failed.json()["error"]["code"] == -32603
        answered_once_to(failed, APP)
        streamed = running.http.get(url, headers={"origin": APP})  # never the direct path
        assert streamed.status_code == 500
        answered_once_to(streamed, APP)
        assert direct_requests(running) == before + (running is served)
        for other in (EVIL, SPA):
            # Refused 403 by the Origin check before the fault, with no CORS, as before.
            foreign = running.http.post(url, json=call, headers={"origin": other})
            assert foreign.status_code == 403 and cors_headers(foreign) == {}, other
        plain = running.http.post(url, json=call)
        assert plain.status_code == 500 and cors_headers(plain) == {}
        assert "origin" not in listed(plain.headers.get("vary"))


def test_a_body_that_stops_coming_on_the_direct_path_is_refused_to_a_listed_page_with_cors(
    served,
):
    """The direct path's own 408 (body_timeout), written by bastion's HTTP protocol."""
    url = urlsplit(served.mcp_url("deskhttp"))
    body = json.dumps(modern_request(1, "tools/list", {})).encode()
    for origin, expected in ((APP, [f"access-control-allow-origin: {APP}"]), (SPA, [])):
        head = (
            f"POST {url.path} HTTP/1.1\r\nhost: {url.netloc}\r\norigin: {origin}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        with socket.create_connection((url.hostname, url.port), timeout=30) as s:
            s.sendall(head.encode() + body[:-5])
            (answer,) = answers_on(s, 1, wait=BODY_TIMEOUT + 10)
        assert status_of(answer) == 408, answer
        lines = answer.partition(b"\r\n\r\n")[0].decode("latin-1").lower().split("\r\n")
        assert [line for line in lines if line.startswith("access-control-allow-origin")] == (
            expected
        ), lines
        if expected:
            assert "vary: origin" in lines, lines


def test_a_token_sent_twice_by_a_listed_page_is_refused_with_cors(bastion, served):
    """Refused before any token is read, by the transport, on either path: with CORS, once."""
    call = modern_request(1, "tools/list", {})
    for running in (bastion, served):
        token = running.token("sam", "deskhttp")
        twice = [("origin", APP), ("authorization", f"Bearer {token}")]
        twice.append(("authorization", "Bearer another"))
        refused = running.http.post(running.mcp_url("deskhttp"), json=call, headers=twice)
        assert refused.status_code == 400 and "sent twice" in refused.text
        answered_once_to(refused, APP)


# Connections the crowded bastion takes (its [server] max_connections); one more is answered 503.
CROWD = 8


@pytest.fixture
def crowded(tmp_path):
    """`served`, as `bastion serve` serves it, taking `CROWD` connections at once, whose held
    connections are not cut off for their unfinished heads while a test lasts."""
    from tests.gateway.test_direct_gateway import ServedLikeBastionServe

    def config(**settings):
        return ServerConfig(**settings, max_connections=CROWD, header_timeout=PATIENCE)

    quiet = mock.patch.object(logging.getLogger("uvicorn.access"), "hasHandlers", lambda: False)
    with (
        mock.patch.object(support, "ServerConfig", config),
        mock.patch.object(support, "Servers", ServedLikeBastionServe),
        start(
            tmp_path, gateway={"allowed_origins": [APP]}, oauth={"allowed_origins": [SPA]}
        ) as running,
        quiet,
    ):
        yield running


def test_the_503_past_max_connections_is_answered_to_a_listed_page_with_cors(crowded):
    """uvicorn's 503 past max_connections, made before the application and its CORS: a page
    of an origin listed for the route reads it (on /mcp/ the gateway's origins, with the
    headers it exposes, Retry-After among them; on the OAuth endpoints those and [oauth]
    allowed_origins'), with one Access-Control-Allow-Origin; another page's, and a request
    without Origin, get none."""
    url = urlsplit(crowded.url)
    requests = {
        "gateway": ("POST", urlsplit(crowded.mcp_url("deskhttp")).path, (APP,)),
        "token endpoint": ("POST", "/token", (APP, SPA)),
        "OAuth metadata": ("GET", "/.well-known/oauth-authorization-server", (APP, SPA)),
    }
    held = []
    faults = {}
    try:
        # Connections whose heads never end: each counts until it closes.
        for _ in range(CROWD):
            s = socket.create_connection((url.hostname, url.port), timeout=PATIENCE)
            s.sendall(f"GET /healthz HTTP/1.1\r\nhost: {url.netloc}\r\n".encode())
            held.append(s)
        for route, (method, path, listed_origins) in requests.items():
            for origin in (APP, SPA, EVIL, None):
                sent = f"{method} {path} HTTP/1.1\r\nhost: {url.netloc}\r\ncontent-length: 0\r\n"
                if origin is not None:
                    sent += f"origin: {origin}\r\n"
                with socket.create_connection((url.hostname, url.port), timeout=PATIENCE) as s:
                    s.sendall(f"{sent}\r\n".encode())
                    (answer,) = answers_on(s, 1, wait=PATIENCE)
                lines = answer.partition(b"\r\n\r\n")[0].decode("latin-1").lower().split("\r\n")
                cors = [line for line in lines if line.startswith("access-control-allow-origin")]
                expected = []
                if origin in listed_origins:
                    expected = [f"access-control-allow-origin: {origin.lower()}"]
                exposed = [line for line in lines if line.startswith("access-control-expose")]
                if status_of(answer) != 503 or cors != expected:
                    faults[f"{route} from {origin}"] = lines
                elif expected and not (
                    "vary: origin" in lines and exposed and "retry-after" in exposed[0]
                ):
                    faults[f"{route} from {origin}: Vary, exposed"] = lines
    finally:
        for s in held:
            s.close()
    assert not faults, faults
