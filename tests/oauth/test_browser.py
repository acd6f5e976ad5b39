"""The login and consent pages in a real browser: Debian's chromium, driven by Playwright
(`tests.browser`: never a downloaded browser, never a request off this machine).

A real bastion runs on a loopback port, and a tiny loopback HTTP server plays the client's site
(its redirect URI, and a page of another origin that tries to frame bastion's pages).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from playwright.sync_api import Page

from bastion.oauth import registration
from tests.browser import ClientSite, Tab, browser_fixture, tab_fixture  # noqa: F401 (fixtures)

from .support import PASSWORD, Bastion, pkce_pair

CLIENT_NAME = "Browser Test Agent"


@pytest.fixture
def site() -> Iterator[ClientSite]:
    site = ClientSite()
    yield site
    site.close()


@pytest.fixture
def client(bastion: Bastion, site: ClientSite) -> dict:
    return bastion.register(client_name=CLIENT_NAME, redirect_uris=[site.callback])


def open_authorization(tab: Tab, bastion: Bastion, client: dict, **overrides) -> tuple[str, str]:
    """Open the client's /authorize URL (PKCE S256, a resource); return (verifier, state)."""
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(12)
    params = bastion.authorize_params(client, challenge, state=state, **overrides)
    response = tab.page.goto(f"{bastion.url}/authorize?{urlencode(params)}")
    assert response is not None and response.status == 200
    return verifier, state


def sign_in(tab: Tab, password: str = PASSWORD) -> int:
    """Type the username and password and press the button, as a person does; return the
    status of the page it leads to."""
    page = tab.page
    assert page.title() == "Sign in to bastion"
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill(password)
    with page.expect_navigation() as navigation:
        page.get_by_role("button", name="Sign in").click()
    return navigation.value.status


def answer(tab: Tab, decision: str) -> int:
    page = tab.page
    with page.expect_navigation() as navigation:
        page.get_by_role("button", name=decision).click()
    return navigation.value.status


def text_of(page: Page) -> str:
    return " ".join(page.locator("body").inner_text().split())


def issued_nothing(bastion: Bastion) -> bool:
    rows = bastion.rows()
    return not any(
        rows[t]
        for t in ("oauth_grants", "oauth_codes", "oauth_access_tokens", "oauth_refresh_tokens")
    )


def test_sign_in_and_allow_lands_on_the_client_with_a_code_for_a_working_token(
    bastion: Bastion, client: dict, site: ClientSite, tab: Tab, tmp_path
):
    page = tab.page
    verifier, state = open_authorization(tab, bastion, client)
    assert page.get_by_role("heading", name="Sign in to bastion").is_visible()
    login_text = text_of(page)
    assert CLIENT_NAME in login_text and site.host in login_text
    assert page.get_by_label("Username").is_visible() and page.get_by_label("Password").is_visible()
    page.screenshot(path=tmp_path / "login.png", full_page=True)

    assert sign_in(tab) == 200
    assert page.get_by_role("heading", name="Allow access?").is_visible()
    consent_text = text_of(page)
    assert "Signed in as alice" in consent_text
    # It registered itself: the page says its name is unverified, and where it sends you back.
    warning = page.get_by_role("note")
    assert warning.is_visible()
    assert "Unverified application" in warning.inner_text()
    assert f"“{CLIENT_NAME}” may not be what it says it is" in warning.inner_text()
    assert f"It asks to act for you, and will send you back to {site.host}." in consent_text
    # The resource by its configured name, each scope by its description (or its name).
    assert f"It wants access to Test tools ({bastion.resource}) to:" in consent_text
    assert page.get_by_role("listitem").all_inner_texts() == [
        "See the test tools and their results tools:read"
    ]
    # The raw client id is a technical detail, out of the way until asked for.
    assert client["client_id"] not in consent_text
    page.get_by_text("Technical details").click()
    assert client["client_id"] in text_of(page)
    page.screenshot(path=tmp_path / "consent.png", full_page=True)
    session = {c["name"]: c for c in page.context.cookies()}["bastion_session"]
    assert session["httpOnly"] and session["sameSite"] == "Lax"

    assert answer(tab, "Allow") == 200
    landed = urlsplit(page.url)
    assert f"{landed.scheme}://{landed.netloc}{landed.path}" == site.callback
    query = parse_qs(landed.query)
    assert set(query) == {"code", "state", "iss"}
    assert query["state"] == [state] and query["iss"] == [bastion.url]
    assert page.get_by_role("heading", name="Back at the client").is_visible()
    assert site.arrivals == [query]
    assert site.referers == [None]  # bastion's pages tell no other site their addresses

    response = bastion.token(
        grant_type="authorization_code",
        code=query["code"][0],
        redirect_uri=site.callback,
        code_verifier=verifier,
        client_id=client["client_id"],
    )
    assert response.status_code == 200, response.text
    tokens = response.json()
    assert tokens["token_type"] == "Bearer" and tokens["scope"] == "tools:read"
    verified = bastion.server.verifier.verify(tokens["access_token"], bastion.resource)
    assert verified.subject == "alice"
    assert verified.client_id == client["client_id"]
    assert verified.scopes == {"tools:read"}
    assert verified.audience == (bastion.resource,)
    assert verified.claims["iss"] == bastion.url
    assert tab.console_errors == [] and tab.failed_requests == []


def test_another_site_cannot_submit_the_sign_in_form_even_with_its_token_and_cookie(
    bastion: Bastion, site: ClientSite, tab: Tab
):
    """Login CSRF from another site of the same host (cookies ignore ports, so it is as a
    sibling subdomain would be): it has the browser's cookie and a token bound to it (as if it
    had planted both), and its page submits the sign-in form with its own password at once.
    The browser says where the form came from (``Origin``), and bastion refuses it."""
    page = tab.page
    page.goto(f"{bastion.url}/sign-in?next=/approvals")
    token = page.locator("input[name=csrf_token]").get_attribute("value")
    fields = {"next": "/approvals", "csrf_token": token, "username": "alice", "password": PASSWORD}
    hostile = f"{site.url}/post?{urlencode({'action': f'{bastion.url}/sign-in', **fields})}"
    with page.expect_response(
        lambda r: r.url == f"{bastion.url}/sign-in" and r.request.method == "POST"
    ) as posted:
        page.goto(hostile)
    assert posted.value.status == 403
    assert posted.value.request.headers.get("origin") == site.url
    assert "sent from another site" in text_of(page)
    assert "bastion_session" not in {c["name"] for c in page.context.cookies()}


def test_an_administrators_client_is_shown_as_verified_and_a_self_registered_one_is_not(
    bastion: Bastion, client: dict, site: ClientSite, tab: Tab, tmp_path
):
    values = registration.validate_client_metadata(
        {"client_name": "Finance agent", "redirect_uris": [site.callback]}, bastion.server.settings
    )
    admin = registration.new_client(values, source="admin", now=bastion.clock())
    bastion.server.store.save_client(admin.client)
    page = tab.page
    open_authorization(tab, bastion, admin.response())
    sign_in(tab)
    assert page.get_by_role("heading", name="Allow access?").is_visible()
    assert page.get_by_role("note").count() == 0
    assert "Finance agent registered by your administrator" in text_of(page)
    page.screenshot(path=tmp_path / "consent-verified.png", full_page=True)

    # The self-registered client, by contrast, carries the warning on both pages.
    open_authorization(tab, bastion, client, prompt="consent")
    assert page.get_by_role("heading", name="Allow access?").is_visible()
    assert page.get_by_role("note").is_visible()
    assert "registered by your administrator" not in text_of(page)
    page.screenshot(path=tmp_path / "consent-unverified.png", full_page=True)


def test_a_wrong_password_shows_an_error_and_issues_nothing(
    bastion: Bastion, client: dict, site: ClientSite, tab: Tab, tmp_path
):
    page = tab.page
    open_authorization(tab, bastion, client)
    assert sign_in(tab, password="not the password") == 401
    assert page.get_by_role("alert").inner_text() == "Wrong username or password."
    assert page.get_by_role("heading", name="Sign in to bastion").is_visible()
    assert page.get_by_label("Password").input_value() == ""
    assert page.get_by_label("Username").input_value() == "alice"  # no need to type it again
    page.screenshot(path=tmp_path / "login-error.png", full_page=True)
    assert "bastion_session" not in {c["name"] for c in page.context.cookies()}
    assert bastion.rows()["oauth_sessions"] == [] and issued_nothing(bastion)
    assert site.arrivals == []

    # The page shown again is a working form: the right password goes on to consent.
    assert sign_in(tab) == 200
    assert page.get_by_role("heading", name="Allow access?").is_visible()


def test_deny_lands_on_the_client_with_access_denied(
    bastion: Bastion, client: dict, site: ClientSite, tab: Tab
):
    page = tab.page
    _, state = open_authorization(tab, bastion, client)
    sign_in(tab)
    assert answer(tab, "Deny") == 200
    landed = urlsplit(page.url)
    assert f"{landed.scheme}://{landed.netloc}{landed.path}" == site.callback
    query = parse_qs(landed.query)
    assert query["error"] == ["access_denied"] and "code" not in query
    assert query["state"] == [state] and query["iss"] == [bastion.url]
    assert site.arrivals == [query]
    assert issued_nothing(bastion) and bastion.rows()["oauth_consents"] == []


def test_the_pages_refuse_to_be_framed_by_another_origin(
    bastion: Bastion, client: dict, site: ClientSite, tab: Tab, tmp_path
):
    page = tab.page
    _, challenge = pkce_pair()

    def authorize_url(**overrides) -> str:
        params = bastion.authorize_params(client, challenge, **overrides)
        return f"{bastion.url}/authorize?{urlencode(params)}"

    def framed(url: str):
        """Open the other origin's page that frames ``url`` next to a page that may be framed."""
        tab.failed_requests.clear()
        tab.console_errors.clear()
        page.goto(f"{site.url}/frame?{urlencode({'target': url, 'control': f'{site.url}/plain'})}")
        frames = {f.name: f for f in page.frames}
        control = frames["control"]
        assert control.get_by_role("heading", name="A page that may be framed").is_visible()
        return frames["target"]

    # Signed out, the URL shows the login page; the browser refuses to show it in a frame.
    login = authorize_url()
    target = framed(login)
    assert (login, "net::ERR_BLOCKED_BY_RESPONSE") in tab.failed_requests
    assert target.url.startswith("chrome-error://")
    assert "Sign in to bastion" not in target.content()
    assert target.locator("input[name=password]").count() == 0
    assert any("frame-ancestors 'none'" in e for e in tab.console_errors)

    # Signed in, the same request with prompt=consent is the consent page: framed, it stays empty.
    open_authorization(tab, bastion, client)
    sign_in(tab)
    consent = authorize_url(prompt="consent")
    page.goto(consent)
    assert page.get_by_role("heading", name="Allow access?").is_visible()
    target = framed(consent)
    assert (consent, "net::ERR_BLOCKED_BY_RESPONSE") in tab.failed_requests
    assert target.url.startswith("chrome-error://")
    assert "Allow access?" not in target.content()
    assert target.locator("input[name=csrf_token], button[name=decision]").count() == 0
    assert any("frame-ancestors 'none'" in e for e in tab.console_errors)
    page.screenshot(path=tmp_path / "framed.png", full_page=True)
    assert issued_nothing(bastion) and site.arrivals == []


def test_consent_without_its_csrf_token_is_refused_in_the_browser(
    bastion: Bastion, client: dict, site: ClientSite, tab: Tab, tmp_path
):
    page = tab.page
    open_authorization(tab, bastion, client)
    sign_in(tab)
    assert page.locator("input[name=csrf_token]").count() == 1
    page.evaluate("document.querySelector('input[name=csrf_token]').remove()")
    assert page.locator("input[name=csrf_token]").count() == 0

    assert answer(tab, "Allow") == 403
    assert page.get_by_role("heading", name="Authorization failed").is_visible()
    assert "missing its CSRF token" in page.get_by_role("alert").inner_text()
    page.screenshot(path=tmp_path / "error.png", full_page=True)
    assert urlsplit(page.url).netloc == urlsplit(bastion.url).netloc
    assert site.arrivals == []
    assert issued_nothing(bastion) and bastion.rows()["oauth_consents"] == []


def test_a_person_who_signs_out_is_asked_to_sign_in_again(
    bastion: Bastion, client: dict, tab: Tab, tmp_path
):
    page = tab.page
    page.goto(f"{bastion.url}/sign-in?next=/sign-out")
    assert sign_in(tab) == 200
    assert page.get_by_role("heading", name="Sign out of bastion?").is_visible()
    assert "Signed in as alice" in text_of(page)
    page.screenshot(path=tmp_path / "signed-in.png", full_page=True)

    assert answer(tab, "Sign out") == 200
    assert page.get_by_role("heading", name="Signed out").is_visible()
    assert "bastion_session" not in {c["name"] for c in page.context.cookies(bastion.url)}
    with page.expect_navigation():
        page.get_by_role("link", name="Sign in again").click()
    assert page.title() == "Sign in to bastion"
    # An application's authorization request asks for the password again, too.
    open_authorization(tab, bastion, client)
    assert page.title() == "Sign in to bastion" and page.get_by_label("Password").is_visible()
    assert tab.console_errors == [] and tab.failed_requests == []


def test_the_name_typed_back_into_the_login_page_is_escaped():
    from bastion.oauth.pages import ClientShown, login_page

    client = ClientShown(name="app", client_id="c1", source="dynamic", redirect_host="127.0.0.1")
    html = login_page(
        action="/authorize/login", request_id="r", csrf_token="c", client=client,
        error="Wrong username or password.", username="x'><script>alert(1)</script>",
    ).body.decode()  # fmt: skip
    assert "<script>alert(1)</script>" not in html
    assert "value='x&#x27;&gt;&lt;script&gt;alert(1)&lt;/script&gt;'" in html
