"""A browser-based MCP client on another origin, in a real browser (Debian's chromium, driven by
Playwright: `tests.browser`): a page of an origin ``[gateway] allowed_origins`` lists runs the
fetch() calls such a client makes (the 401's challenge, the RFC 9728 and RFC 8414 metadata,
/register, /token with a code of the normal flow, then ``initialize`` and ``tools/list`` at
/mcp/<server>, reading the Mcp-Session-Id header), with no proxy in front of bastion; the same
page from an origin not listed is stopped by the browser, and bastion decides nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from tests.browser import ClientSite, Tab, browser_fixture, tab_fixture  # noqa: F401 (fixtures)
from tests.oauth.support import pkce_pair

from .support import start

# Each is a page's script: the functions a browser-based client runs, returning what it read.
DISCOVER = """async (mcp) => {
  const challenged = await fetch(mcp, {method: "POST", headers: {"content-type":
    "application/json"}, body: JSON.stringify({jsonrpc: "2.0", id: 0, method: "ping"})});
  const challenge = challenged.headers.get("www-authenticate");
  await challenged.text();
  const metadataUrl = /resource_metadata="([^"]*)"/.exec(challenge)[1];
  const asked = {headers: {"mcp-protocol-version": "2025-11-25"}};
  const resource = await (await fetch(metadataUrl, asked)).json();
  const issuer = resource.authorization_servers[0];
  const server = await (await fetch(
    issuer + "/.well-known/oauth-authorization-server", asked)).json();
  const registered = await fetch(server.registration_endpoint, {method: "POST",
    headers: {"content-type": "application/json"},
    body: JSON.stringify({client_name: "page", redirect_uris: [location.origin + "/callback"],
                          token_endpoint_auth_method: "none"})});
  return {status: challenged.status, challenge, resource: resource.resource,
          token_endpoint: server.token_endpoint, registered: registered.status,
          client_id: (await registered.json()).client_id};
}"""
EXCHANGE = """async ([tokenEndpoint, form]) => {
  const refused = await fetch(tokenEndpoint, {method: "POST",
    body: new URLSearchParams({...form, code: "not-a-code"})});
  const issued = await fetch(tokenEndpoint, {method: "POST", body: new URLSearchParams(form)});
  return {refused: refused.status, error: (await refused.json()).error,
          issued: issued.status, access_token: (await issued.json()).access_token};
}"""
CALL = """async ([mcp, token]) => {
  const read = async (response) => {
    const text = await response.text();
    if (!(response.headers.get("content-type") || "").startsWith("text/event-stream"))
      return JSON.parse(text);
    const data = text.split("\\n").filter((l) => l.startsWith("data: "));
    return JSON.parse(data[data.length - 1].slice(6));
  };
  const headers = {"authorization": "Bearer " + token, "content-type": "application/json",
                   "accept": "application/json, text/event-stream",
                   "mcp-protocol-version": "2025-11-25"};
  const opened = await fetch(mcp, {method: "POST", headers, body: JSON.stringify({
    jsonrpc: "2.0", id: 1, method: "initialize", params: {protocolVersion: "2025-11-25",
    capabilities: {}, clientInfo: {name: "page", version: "1"}}})});
  const session = opened.headers.get("mcp-session-id");
  const initialized = await read(opened);
  const inSession = {...headers, "mcp-session-id": session};
  const acknowledged = await fetch(mcp, {method: "POST", headers: inSession,
    body: JSON.stringify({jsonrpc: "2.0", method: "notifications/initialized"})});
  await acknowledged.text();
  const listed = await fetch(mcp, {method: "POST", headers: inSession, body: JSON.stringify({
    jsonrpc: "2.0", id: 2, method: "tools/list"})});
  return {session, server: initialized.result.serverInfo.name, acknowledged: acknowledged.status,
          tools: (await read(listed)).result.tools.map((t) => t.name)};
}"""
# From a page whose origin is not listed: each fetch, and whether the browser let it through.
ATTEMPT = """async ([url, init]) => {
  try {
    const response = await fetch(url, init);
    return "answered " + response.status;
  } catch (e) {
    return e.name;
  }
}"""


@pytest.fixture(scope="module")
def sites() -> Iterator[tuple[ClientSite, ClientSite]]:
    listed, foreign = ClientSite(), ClientSite()
    yield listed, foreign
    listed.close()
    foreign.close()


@pytest.fixture(scope="module")
def bastion(tmp_path_factory, sites):
    listed, _ = sites
    with start(
        tmp_path_factory.mktemp("cors-browser"), gateway={"allowed_origins": [listed.url]}
    ) as running:
        yield running


def test_a_page_of_a_listed_origin_discovers_authorizes_and_calls(bastion, sites, tab: Tab):
    listed, _ = sites
    mcp = bastion.mcp_url("deskhttp")
    tab.page.goto(f"{listed.url}/plain")
    found = tab.page.evaluate(DISCOVER, mcp)
    assert found["status"] == 401 and found["challenge"].startswith("Bearer ")
    assert found["resource"] == mcp
    assert found["token_endpoint"] == f"{bastion.url}/token"
    assert found["registered"] == 201
    # The person signs in and consents at bastion (a navigation, not a fetch: no CORS there);
    # the page's redirect URI receives the code.
    verifier, challenge = pkce_pair()
    redirect_uri = f"{listed.url}/callback"
    params = {
        "response_type": "code",
        "client_id": found["client_id"],
        "redirect_uri": redirect_uri,
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": mcp,
        "scope": "customers:read",
    }
    back = bastion.log_in_and_consent(f"{bastion.url}/authorize?{urlencode(params)}", "sam")
    code = parse_qs(urlsplit(back.headers["location"]).query)["code"][0]
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "code_verifier": verifier,
        "client_id": found["client_id"],
        "redirect_uri": redirect_uri,
        "resource": mcp,
    }
    exchanged = tab.page.evaluate(EXCHANGE, [found["token_endpoint"], form])
    assert exchanged["refused"] == 400 and exchanged["error"] == "invalid_grant"
    assert exchanged["issued"] == 200 and exchanged["access_token"]
    called = tab.page.evaluate(CALL, [mcp, exchanged["access_token"]])
    assert called["session"] and called["server"] and called["acknowledged"] == 202
    assert "search_customers" in called["tools"]
    assert tab.failed_requests == []


def test_a_page_of_another_origin_is_stopped_by_the_browser_and_nothing_is_decided(
    bastion, sites, tab: Tab
):
    _, foreign = sites
    mcp = bastion.mcp_url("deskhttp")
    token = bastion.token("sam", "deskhttp")
    bastion.flush()
    seq = bastion.records.last_seq()
    before = len(bastion.recorder.requests)
    tab.page.goto(f"{foreign.url}/plain")
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "page", "version": "1"},
        },
    }
    attempts = {
        "call": (
            mcp,
            {
                "method": "POST",
                "headers": {
                    "authorization": f"Bearer {token}",
                    "content-type": "application/json",
                    "mcp-protocol-version": "2025-11-25",
                },
                "body": json.dumps(initialize),
            },
        ),
        "metadata": (
            f"{bastion.url}/.well-known/oauth-protected-resource/mcp/deskhttp",
            {"headers": {"mcp-protocol-version": "2025-11-25"}},
        ),
        # A simple request (no preflight): sent and answered, but not given to the page.
        "plain metadata": (f"{bastion.url}/.well-known/oauth-authorization-server", {}),
        "register": (
            f"{bastion.url}/register",
            {
                "method": "POST",
                "headers": {"content-type": "application/json"},
                "body": json.dumps({"redirect_uris": [f"{foreign.url}/callback"]}),
            },
        ),
    }
    for name, (url, init) in attempts.items():
        assert tab.page.evaluate(ATTEMPT, [url, init]) == "TypeError", name
    bastion.flush()
    assert list(bastion.records.after(seq)) == []
    assert len(bastion.recorder.requests) == before


def test_a_page_of_a_listed_origin_reads_a_fault_and_a_refusal_of_its_body(
    bastion, sites, tab: Tab, monkeypatch
):
    """Answered outside the routes (Starlette's 500, the body limits' 413), each is read by the
    page, not "Failed to fetch": it can tell a fault of the server's from a refusal."""
    listed, _ = sites

    def failing():
        raise RuntimeError("a fault of the test's")

    monkeypatch.setattr(bastion.app.state.oauth.keys, "jwks", failing)
    tab.page.goto(f"{listed.url}/plain")
    fault = tab.page.evaluate(ATTEMPT, [f"{bastion.url}/jwks.json", {}])
    large = {"method": "POST", "body": "grant_type=x&code=" + "x" * (65 * 1024)}
    large["headers"] = {"content-type": "application/x-www-form-urlencoded"}
    refused = tab.page.evaluate(ATTEMPT, [f"{bastion.url}/token", large])
    assert (fault, refused) == ("answered 500", "answered 413")
