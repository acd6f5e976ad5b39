"""Redirect URIs: only RFC 3986 URIs are registered (by /register, by a metadata document, by the
admin CLI), matched exactly at /authorize and /token, except the port of a loopback IP literal
(RFC 8252 §7.3); ``localhost`` is accepted but matched exactly (RFC 8252 §8.3)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from bastion.oauth.redirect_uris import (
    is_claimed_https,
    redirect_uri_allowed,
    redirect_uri_problem,
)

from .support import Bastion, pkce_pair

# Each is refused by every way of registering a client.
OUTSIDE_RFC_3986 = [
    "https://example.com/cb\x00",
    "https://example.com/c\nb",
    "https://example.com/c\rb",
    "https://example.com/c\tb",
    "https://example.com/c\x7fb",
    "https://example.com/c b",
    "https://example.com/caf\u00e9",
    "https://ex\u00e4mple.com/cb",
    "https://example.com\\@evil.example/cb",
    "https://example.com/cb\\",
    'https://example.com/"cb"',
    "https://example.com/<cb>",
    "https://example.com/{cb}",
    "https://example.com/c|b",
    "https://example.com/c^b",
    "https://example.com/c`b",
    "https://example.com/cb%",
    "https://example.com/cb%4",
    "https://example.com/cb%zz",
    "https://example.com/cb?x=%g0",
    "https://example.com/[cb]",
    "http://127.0.0.1:9/cb\u2028",
    "http://@127.0.0.1/cb",
]


@pytest.mark.parametrize("uri", OUTSIDE_RFC_3986)
def test_uris_outside_rfc_3986_cannot_be_registered(bastion: Bastion, uri):
    assert redirect_uri_problem(uri) is not None
    before = bastion.rows()
    body = {"redirect_uris": [uri], "token_endpoint_auth_method": "none"}
    response = bastion.http.post(f"{bastion.url}/register", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_redirect_uri"
    assert bastion.rows() == before


@pytest.mark.parametrize(
    "uri, words",
    [
        ("https://example.com/" + "a" * 1981, "at most 2000 characters"),
        ("https:///cb", "must be https"),
        ("https:cb", "must be https"),
    ],
    ids=["over-2000-characters", "https-without-host", "https-without-authority"],
)
def test_an_overlong_or_hostless_redirect_uri_cannot_be_registered(bastion: Bastion, uri, words):
    before = bastion.rows()
    body = {"redirect_uris": [uri], "token_endpoint_auth_method": "none"}
    response = bastion.http.post(f"{bastion.url}/register", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_redirect_uri"
    assert words in response.json()["error_description"]
    assert bastion.rows() == before
    # At 2000 characters a URI is still taken.
    assert redirect_uri_problem("https://example.com/" + "a" * 1980) is None


@pytest.mark.parametrize(
    "uri",
    [
        "https://example.com/cb",
        "https://example.com/cb?x=%20y&z=a%2Fb",
        "https://example.com:8443/a/b;c=d/~e!$&'()*+,",
        "http://127.0.0.1/callback",
        "http://127.0.0.1:7777/callback",
        "http://[::1]:7777/callback",
        "http://localhost:7777/callback",
    ],
)
def test_rfc_3986_uris_can_be_registered(uri):
    assert redirect_uri_problem(uri) is None


@pytest.mark.parametrize(
    ("registered", "presented", "allowed"),
    [
        ("http://127.0.0.1/callback", "http://127.0.0.1:54321/callback", True),
        ("http://127.0.0.1:7777/callback", "http://127.0.0.1:54321/callback", True),
        ("http://127.0.0.1:7777/callback", "http://127.0.0.1/callback", True),
        ("http://[::1]/callback", "http://[::1]:54321/callback", True),
        ("http://127.0.0.1/cb?a=1", "http://127.0.0.1:5/cb?a=1", True),
        ("http://127.0.0.1/callback", "http://127.0.0.1:54321/callbacK", False),
        ("http://127.0.0.1/callback", "http://127.0.0.1:54321/callback/", False),
        ("http://127.0.0.1/callback", "http://127.0.0.1:54321/callback?x=1", False),
        ("http://127.0.0.1/callback", "http://127.0.0.1:54321/callback#x", False),
        ("http://127.0.0.1/callback", "http://127.0.0.2:54321/callback", False),
        ("http://127.0.0.1/callback", "https://127.0.0.1:54321/callback", False),
        ("http://127.0.0.1/callback", "HTTP://127.0.0.1:54321/callback", False),
        ("http://127.0.0.1/callback", "http://evil@127.0.0.1:54321/callback", False),
        ("http://127.0.0.1/callback", "http://127.0.0.1:99999/callback", False),
        ("http://127.0.0.1/callback", "http://127.0.0.1:0/callback", False),
        ("http://127.0.0.1/callback", "http://127.0.0.1:/callback", False),
        ("http://127.0.0.1/callback", "http://localhost:54321/callback", False),
        ("http://127.0.0.1/callback", "http://[::1]:54321/callback", False),
        ("http://localhost:7777/callback", "http://localhost:7777/callback", True),
        ("http://localhost:7777/callback", "http://localhost:7778/callback", False),
        ("http://localhost/callback", "http://localhost:7777/callback", False),
        ("https://example.com/cb", "https://example.com:443/cb", False),
        ("https://example.com:8443/cb", "https://example.com:9443/cb", False),
    ],
)
def test_only_the_port_of_a_loopback_ip_literal_may_differ(registered, presented, allowed):
    assert redirect_uri_allowed([registered], presented) is allowed


@pytest.mark.parametrize(
    ("uri", "claimed"),
    [
        ("https://agent.example/callback", True),
        ("https://agent.example:8443/callback?x=1", True),
        ("https://agent.example./callback", True),
        ("http://agent.example/callback", False),
        ("https://127.0.0.1/callback", False),
        ("https://10.0.0.5/callback", False),
        ("https://2130706433/callback", False),  # 127.0.0.1 to a browser
        ("https://0x7f.1/callback", False),
        ("https://127.1/callback", False),
        ("https://[::1]/callback", False),
        ("https://[::ffff:127.0.0.1]/callback", False),
        ("https://localhost/callback", False),
        ("https://LOCALHOST./callback", False),
        ("https://agent.localhost/callback", False),
    ],
)
def test_only_https_on_a_name_of_its_own_is_a_claimed_redirect(uri, claimed):
    """RFC 8252 §8.6: what a public client's remembered consent may rest on (docs/oauth.md)."""
    assert is_claimed_https(uri) is claimed


def _authorize(bastion: Bastion, client: dict, redirect_uri: str):
    verifier, challenge = pkce_pair()
    params = bastion.authorize_params(client, challenge, redirect_uri=redirect_uri)
    return bastion.log_in_and_consent(f"{bastion.url}/authorize?{urlencode(params)}"), verifier


def test_a_loopback_client_may_come_back_on_any_port_at_authorize_and_token(bastion: Bastion):
    client = bastion.register(redirect_uris=["http://127.0.0.1/callback"])
    used = "http://127.0.0.1:54321/callback"
    response, verifier = _authorize(bastion, client, used)
    assert response.status_code in (302, 303), response.text
    location = response.headers["location"]
    assert location.startswith(used + "?")
    code = parse_qs(urlsplit(location).query)["code"][0]
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "code_verifier": verifier,
        "client_id": client["client_id"],
    }
    # /token wants the very URI of the authorization request, port included.
    refused = bastion.token(**form, redirect_uri="http://127.0.0.1:54322/callback")
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"
    assert bastion.token(**form, redirect_uri=used).status_code == 200


@pytest.mark.parametrize(
    "presented",
    [
        "http://127.0.0.1:54321/callback/",
        "http://127.0.0.2:54321/callback",
        "http://localhost:54321/callback",
        "http://evil@127.0.0.1:54321/callback",
        "http://127.0.0.1:54321/callback?next=https://evil.example",
    ],
)
def test_anything_but_the_port_differing_is_refused_without_redirecting(
    bastion: Bastion, presented
):
    client = bastion.register(redirect_uris=["http://127.0.0.1/callback"])
    _, challenge = pkce_pair()
    params = bastion.authorize_params(client, challenge, redirect_uri=presented)
    response = bastion.http.get(f"{bastion.url}/authorize?{urlencode(params)}")
    assert response.status_code == 400 and "location" not in response.headers


def test_localhost_is_registered_and_matched_exactly(bastion: Bastion):
    client = bastion.register(redirect_uris=["http://localhost:7777/callback"])
    _, challenge = pkce_pair()
    other_port = bastion.authorize_params(
        client, challenge, redirect_uri="http://localhost:7778/callback"
    )
    response = bastion.http.get(f"{bastion.url}/authorize?{urlencode(other_port)}")
    assert response.status_code == 400 and "location" not in response.headers
    response, _ = _authorize(bastion, client, "http://localhost:7777/callback")
    assert response.headers["location"].startswith("http://localhost:7777/callback?code=")


@pytest.mark.parametrize(
    "presented",
    [
        "https://app.example.com/cb/",  # a trailing slash
        "https://APP.example.com/cb",  # the host in another case
        "https://app.example.com:443/cb",  # the default port spelt out
        "https://app.example.com./cb",  # the host with its trailing dot
        "https://u@app.example.com/cb",  # user information
        "https://app.example.com@evil.example/cb",  # user information, another host
        "https://app.example.com/cb#x",  # a fragment
        "https://app.example.com/cb?x=1",  # a query
        "https://app.example.com/%63b",  # a percent-encoded unreserved character
        "https://app.example.com/cb%2F",  # a percent-encoded slash
        "https://app.example.com:8443/cb",  # another port: only a loopback IP literal's may vary
    ],
)
def test_an_https_redirect_uri_matches_character_for_character(bastion: Bastion, presented):
    """Each of these names, to some browser or server, the registered URI or another one of
    the same host: none is the registered string, so none is honoured (RFC 9700 §4.1.3), and
    the refusal is a page of bastion's, not a redirect."""
    client = bastion.register(redirect_uris=["https://app.example.com/cb"])
    _, challenge = pkce_pair()
    params = bastion.authorize_params(client, challenge, redirect_uri=presented)
    response = bastion.http.get(f"{bastion.url}/authorize?{urlencode(params)}")
    assert response.status_code == 400 and "location" not in response.headers
    assert "does not exactly match" in response.text
    exact = bastion.authorize_params(client, challenge, redirect_uri="https://app.example.com/cb")
    assert bastion.http.get(f"{bastion.url}/authorize?{urlencode(exact)}").status_code == 200
