"""bastion's authorization server with `[identity]` providers, served over real HTTP for the
provider-login tests, and a person's browser (cookies kept) driven with httpx."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from starlette.applications import Starlette

from bastion.db import Database
from bastion.identity.oidc_login import compose
from bastion.oauth import AuthorizationServer
from tests import clients
from tests.oauth.support import Bastion, Clock, hidden_fields, make_settings, pkce_pair, serve

OTHER_RESOURCE = "http://127.0.0.1:9/other-mcp"
REDIRECT_URI = "http://127.0.0.1:9/callback"  # an MCP client's; the browser never goes there


@contextmanager
def bastion_with_providers(
    database_url: str,
    key_dir: str,
    sock,
    identity: dict[str, Any],
    resource: str = "http://127.0.0.1:9/mcp",
    env: dict[str, str] | None = None,
) -> Iterator[Bastion]:
    """An authorization server on ``sock`` whose [identity] table is ``identity``."""
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    clock = Clock()
    db = Database(database_url)
    server = AuthorizationServer(
        make_settings(url, resource, OTHER_RESOURCE, key_dir), db, clock=clock
    )
    compose(server, identity, env or {})
    app = Starlette(routes=server.routes())
    try:
        with serve(app, sock) as base, httpx.Client(timeout=20) as http:
            assert base == url
            yield Bastion(server, url, resource, OTHER_RESOURCE, clock, http)
    finally:
        db.close()


def buttons(html: str) -> list[tuple[str, str]]:
    """(form action, button text) of each provider button on a login page."""
    return re.findall(
        r"<form method=post action='([^']*/login/[^']*)'>.*?<button type=submit>([^<]*)</button>",
        html,
    )


class Person:
    """A browser (its own cookie jar) going through bastion's login with a provider."""

    def __init__(self, bastion: Bastion) -> None:
        self.bastion = bastion
        self.http = clients.client(follow_redirects=False, timeout=20)
        self.verifier = ""
        self.client: dict = {}

    def close(self) -> None:
        self.http.close()

    def open_authorization(self, client: dict, **overrides) -> httpx.Response:
        """The MCP client sends the person to bastion's authorization endpoint."""
        self.client = client
        self.verifier, challenge = pkce_pair()
        params = self.bastion.authorize_params(client, challenge, **overrides)
        page = self.http.get(f"{self.bastion.url}/authorize?{urlencode(params)}")
        assert page.status_code == 200, page.text
        return page

    def choose(self, page: httpx.Response, provider: str) -> httpx.Response:
        """Click "Sign in with <provider>" on a login page."""
        return self.http.post(f"{self.bastion.url}/login/{provider}", data=hidden_fields(page.text))

    def sent_to_provider(self, client: dict, provider: str, **overrides) -> dict[str, str]:
        """Start a login at ``provider``; the query bastion sends the browser to it with."""
        response = self.choose(self.open_authorization(client, **overrides), provider)
        assert response.status_code == 303, response.text
        return {k: v[0] for k, v in parse_qs(urlsplit(response.headers["location"]).query).items()}

    def back_from_provider(self, provider: str, **params: str) -> httpx.Response:
        """The provider sends the browser back to bastion with ``params``."""
        return self.http.get(f"{self.bastion.url}/login/{provider}/callback?{urlencode(params)}")

    def consent(self, page: httpx.Response) -> dict[str, str]:
        """Allow on the consent page; the query the MCP client's redirect URI receives."""
        assert "Allow access?" in page.text, page.text
        done = self.http.post(
            f"{self.bastion.url}/authorize/consent",
            data={**hidden_fields(page.text), "decision": "allow"},
        )
        assert done.status_code == 303, done.text
        return {k: v[0] for k, v in parse_qs(urlsplit(done.headers["location"]).query).items()}

    def redeem(self, code: str) -> dict:
        response = self.bastion.token(
            grant_type="authorization_code",
            code=code,
            redirect_uri=self.client["redirect_uris"][0],
            code_verifier=self.verifier,
            client_id=self.client["client_id"],
        )
        assert response.status_code == 200, response.text
        return response.json()


def sign_in_at_the_provider(
    tab, authorize_url: str, provider: str, login: str, password: str
) -> list[str]:
    """The person in chromium: bastion's login page, the provider's sign-in and consent, then
    back at bastion's callback (its page loaded, whatever it says). Returns the list the URLs
    the MCP client's redirect URI receives are appended to."""
    page = tab.page
    arrived: list[str] = []

    def client_callback(route) -> None:
        arrived.append(route.request.url)
        route.fulfill(status=200, content_type="text/html", body="<title>Client</title>back")

    page.route(f"{REDIRECT_URI}*", client_callback)
    page.goto(authorize_url)
    assert page.get_by_label("Password").count() == 0  # local passwords are off
    page.get_by_role("button", name=f"Sign in with {provider}").click()
    page.wait_for_selector("input[name=login]")  # at the provider now
    page.fill("input[name=login]", login)
    page.fill("input[name=password]", password)
    page.get_by_role("button", name="Sign-in").click()
    with page.expect_response(lambda r: "/login/" in r.url and "/callback?" in r.url):
        page.get_by_role("button", name="Continue").click()  # the provider's own consent
    page.wait_for_load_state()
    return arrived


def log_in_at_the_provider(
    tab, authorize_url: str, provider: str, login: str, password: str, user_id: str
) -> dict[str, list[str]]:
    """`sign_in_at_the_provider`, then bastion's consent. Returns the query the MCP client's
    redirect URI receives."""
    page = tab.page
    arrived = sign_in_at_the_provider(tab, authorize_url, provider, login, password)
    try:
        page.wait_for_selector("text=Allow access?")  # back at bastion, signed in
    except PlaywrightTimeout:
        raise AssertionError(page.inner_text("body")) from None
    assert page.get_by_text(f"Signed in as {user_id}.").count() == 1
    page.get_by_role("button", name="Allow").click()
    page.wait_for_url(f"{REDIRECT_URI}*")
    assert len(arrived) == 1
    return parse_qs(urlsplit(arrived[0]).query)
