"""Step-up on risk: ``requires_recent_auth(actor, action, resource, seconds)``. A token whose
sign-in is older than the policy accepts is answered with RFC 9470's 401
``insufficient_user_authentication`` challenge; the official SDK client follows it, the person
signs in again (the password, really asked), and the call goes through. The authorization server
honours ``prompt=login`` and ``max_age`` and puts ``auth_time`` in every access token, kept
across refreshes."""

from __future__ import annotations

import base64
import json
import time
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from bastion.oauth.authorize import MAX_AGE_LIMIT
from tests import clients
from tests.gateway.streams import modern_headers, modern_request
from tests.gateway.support import REDIRECT_URI
from tests.oauth.support import hidden_fields, pkce_pair
from tests.oauth.test_authorization_rules import shown_error
from tests.signals.support import ERAS, attempt, running

RULES = """
requires_recent_auth(_user: User, "call", Tool{"deskhttp/search_customers"}, 120);
"""
QUERY = {"query": "a"}


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    yield from running(tmp_path_factory, "step-up", RULES)


class Skewed:
    """The authorization server's clock set back: what it issues now looks signed in earlier."""

    def __init__(self, bastion, seconds: float) -> None:
        self.server, self.seconds = bastion.app.state.oauth, seconds

    def __enter__(self):
        self.server.clock = lambda: time.time() - self.seconds

    def __exit__(self, *exc):
        self.server.clock = time.time


def claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@pytest.mark.parametrize("mode", ERAS)
def test_an_old_sign_in_is_challenged_and_the_sdk_signs_in_again_then_the_call_goes_through(
    bastion, mode
):
    clock = Skewed(bastion, 200)  # signed in 200 s ago; the policy accepts 120

    async def script(client, seen):
        await attempt(
            client, seen, "calls", "send_email", {"to": "a@b.c", "subject": "s", "body": "b"}
        )
        clock.__exit__()  # from now on the person signs in at the real time
        await attempt(client, seen, "calls", "search_customers", QUERY)

    logins = len(bastion.logins)
    with clock:
        seen = bastion.sdk("sam", "deskhttp", mode, script)
    first, second = seen["calls"]
    assert first[0] == "ok"  # no recent sign-in needed for this tool
    assert second[0] == "ok", second  # challenged, signed in again, then went through
    assert len(seen["redirects"]) == 2  # the first sign-in, then the step-up
    assert bastion.logins[logins:] == ["sam", "sam"]  # the password was typed twice
    assert time.time() - claims(seen["tokens"].access_token)["auth_time"] < 60
    bastion.flush()
    challenged = [
        r
        for _, r in bastion.records.after(0, 10_000)
        if r.reason == "insufficient_user_authentication"
        and r.target.endswith('search_customers"}')
    ]
    assert challenged and challenged[-1].result == "step_up"
    assert challenged[-1].obligations["max_auth_age"] == 120


def test_the_challenge_is_rfc_9470s_with_max_age(bastion):
    with Skewed(bastion, 200):
        token = bastion.token("sam", "deskhttp")
    response = bastion.http.post(
        bastion.mcp_url("deskhttp"),
        json=modern_request(1, "tools/call", {"name": "search_customers", "arguments": QUERY}),
        headers=modern_headers(token, "tools/call", "search_customers"),
    )
    assert response.status_code == 401, response.text
    header = response.headers["www-authenticate"]
    assert header.startswith("Bearer ")
    assert 'error="insufficient_user_authentication"' in header
    assert 'max_age="120"' in header
    assert "resource_metadata=" in header
    assert response.json()["max_age"] == 120


def test_a_recent_sign_in_is_not_challenged(bastion):
    token = bastion.token("sam", "deskhttp")
    response = bastion.http.post(
        bastion.mcp_url("deskhttp"),
        json=modern_request(1, "tools/call", {"name": "search_customers", "arguments": QUERY}),
        headers=modern_headers(token, "tools/call", "search_customers"),
    )
    assert response.status_code == 200 and "result" in response.text, response.text


# -- the authorization server: prompt=login, max_age, auth_time ----------------------------------


class Browser:
    """One person's browser (its cookies kept) and one registered client."""

    def __init__(self, bastion) -> None:
        self.bastion = bastion
        self.http = clients.client(follow_redirects=False, timeout=10)
        self.client_id = bastion.http.post(
            f"{bastion.url}/register",
            json={
                "client_name": "step-up test client",
                "redirect_uris": [REDIRECT_URI],
                "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code", "refresh_token"],
            },
        ).json()["client_id"]

    def authorize(self, **extra) -> tuple[httpx.Response, str]:
        verifier, challenge = pkce_pair()
        params = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": REDIRECT_URI,
            "state": "s",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "resource": self.bastion.mcp_url("deskhttp"),
            "scope": "customers:read",
            **extra,
        }
        return self.http.get(f"{self.bastion.url}/authorize?{urlencode(params)}"), verifier

    def sign_in(self, **extra) -> dict:
        """Authorize, typing the password if asked; the token response."""
        page, verifier = self.authorize(**extra)
        if not page.is_redirect:
            assert asks_password(page), page.text
            page = self.http.post(
                f"{self.bastion.url}/authorize/login",
                data={
                    **hidden_fields(page.text),
                    "username": "sam",
                    "password": self.bastion.password,
                },
            )
            if not page.is_redirect:
                page = self.http.post(
                    f"{self.bastion.url}/authorize/consent",
                    data={**hidden_fields(page.text), "decision": "allow"},
                )
        return self.exchange(page, verifier)

    def exchange(self, redirect: httpx.Response, verifier: str) -> dict:
        code = parse_qs(urlsplit(redirect.headers["location"]).query)["code"][0]
        tokens = self.bastion.http.post(
            f"{self.bastion.url}/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT_URI,
                "code_verifier": verifier,
                "client_id": self.client_id,
            },
        )
        assert tokens.status_code == 200, tokens.text
        return tokens.json()


def asks_password(page: httpx.Response) -> bool:
    return not page.is_redirect and ('name="password"' in page.text or "name=password" in page.text)


def test_a_signed_in_browser_is_asked_for_the_password_again_with_prompt_login(bastion):
    browser = Browser(bastion)
    browser.sign_in()
    assert not asks_password(browser.authorize()[0])  # signed in: straight back with a code
    assert asks_password(browser.authorize(prompt="login")[0])


def test_max_age_asks_for_the_password_when_the_sign_in_is_older(bastion):
    browser = Browser(bastion)
    with Skewed(bastion, 600):
        first = browser.sign_in()
    assert not asks_password(browser.authorize(max_age="3600")[0])
    assert asks_password(browser.authorize(max_age="300")[0])
    again = browser.sign_in(max_age="300")
    assert claims(again["access_token"])["auth_time"] > claims(first["access_token"])["auth_time"]


@pytest.mark.parametrize("max_age", ["-1", "soon", "1e3", "99999999999", "٣"])
def test_a_malformed_max_age_is_refused(bastion, max_age):
    browser = Browser(bastion)
    page, _ = browser.authorize(max_age=max_age)
    # A client that registered itself: the error is shown on bastion's page, not redirected.
    error = shown_error(page)
    assert error["error"] == "invalid_request" and "max_age" in error["error_description"]


def test_max_age_is_taken_up_to_ten_years_and_refused_past_them(bastion):
    browser = Browser(bastion)
    browser.sign_in()
    taken, _ = browser.authorize(max_age=str(MAX_AGE_LIMIT))
    # Taken: no password asked, no error; the consent page, as every time for a public client at
    # a loopback redirect (docs/oauth.md, "Remembered consent"), and allowing gives the code.
    assert taken.status_code == 200 and "/authorize/consent" in taken.text, taken.text
    assert not asks_password(taken)
    allowed = browser.http.post(
        f"{bastion.url}/authorize/consent", data={**hidden_fields(taken.text), "decision": "allow"}
    )
    assert allowed.is_redirect and "code" in parse_qs(urlsplit(allowed.headers["location"]).query)
    error = shown_error(browser.authorize(max_age=str(MAX_AGE_LIMIT + 1))[0])
    assert error["error"] == "invalid_request"
    assert f"from 0 to {MAX_AGE_LIMIT}" in error["error_description"]


def test_auth_time_is_the_sign_in_and_a_refresh_keeps_it(bastion):
    browser = Browser(bastion)
    with Skewed(bastion, 100):
        tokens = browser.sign_in()
    signed_in = claims(tokens["access_token"])["auth_time"]
    assert time.time() - 130 < signed_in < time.time() - 70
    refreshed = bastion.http.post(
        f"{bastion.url}/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": browser.client_id,
        },
    )
    assert refreshed.status_code == 200, refreshed.text
    assert claims(refreshed.json()["access_token"])["auth_time"] == signed_in
