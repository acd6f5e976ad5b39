"""The OpenID CIBA approval page in a real browser (Debian's chromium, driven by Playwright, as in
test_browser.py): a person signs in, reads the request and approves it while the client polls
over real HTTP; the page cannot be framed, a form posted by another page is refused, and on a
phone's screen the whole binding message is in view."""

# The browser fixtures come from tests/browser.py; tests name them as parameters.
# ruff: noqa: F811

from __future__ import annotations

from html import escape
from urllib.parse import urlencode

from bastion.oauth.ciba import CIBA_GRANT_TYPE
from tests.browser import ClientSite, Tab, browser_fixture, tab_fixture  # noqa: F401 (fixtures)

from .support import Bastion
from .test_browser import (  # noqa: F401 - pytest fixtures
    client,
    open_authorization,
    sign_in,
    site,
    text_of,
)
from .test_ciba import assert_oauth_error, ciba_client, only_pending_url, requested, wait_and_poll


def sign_in_at_authorize(tab: Tab, bastion: Bastion, client: dict) -> None:
    """Sign in as alice through the login page of an ordinary authorization request: that
    gives the browser bastion's login session."""
    open_authorization(tab, bastion, client)
    assert sign_in(tab) == 200
    assert any(c["name"] == "bastion_session" for c in tab.page.context.cookies())


def test_a_person_approves_in_the_browser_and_the_polling_client_gets_its_token(
    bastion: Bastion, client: dict, tab: Tab, tmp_path
):
    agent = ciba_client(bastion)
    ack = requested(bastion, agent, scope="tools:read tools:call")
    assert_oauth_error(wait_and_poll(bastion, agent, ack["auth_req_id"]), "authorization_pending")
    url = only_pending_url(bastion)
    page = tab.page

    # Signed out, the page only says to sign in.
    page.goto(url)
    assert page.get_by_role("heading", name="Sign in to answer").is_visible()
    assert "Refund order" not in text_of(page)

    sign_in_at_authorize(tab, bastion, client)
    page.goto(url)
    assert page.get_by_role("heading", name="Approve access?").is_visible()
    shown = text_of(page)
    assert "Signed in as alice" in shown and "Night agent" in shown
    assert "Refund order 4711" in shown
    assert f"It wants access to Test tools ({bastion.resource}) to:" in shown
    assert page.get_by_role("listitem").all_inner_texts() == [
        "See the test tools and their results tools:read",
        "tools:call",
    ]
    page.screenshot(path=tmp_path / "ciba-request.png", full_page=True)
    with page.expect_navigation() as navigation:
        page.get_by_role("button", name="Approve").click()
    assert navigation.value.status == 200
    assert page.get_by_role("heading", name="Approved").is_visible()

    response = wait_and_poll(bastion, agent, ack["auth_req_id"])
    assert response.status_code == 200, response.text
    verified = bastion.server.verifier.verify(response.json()["access_token"], bastion.resource)
    assert verified.subject == "alice" and verified.scopes == {"tools:read", "tools:call"}
    assert tab.console_errors == [] and tab.failed_requests == []


def test_the_approval_page_refuses_to_be_framed_by_another_origin(
    bastion: Bastion, client: dict, site: ClientSite, tab: Tab
):
    agent = ciba_client(bastion)
    ack = requested(bastion, agent)
    url = only_pending_url(bastion)
    sign_in_at_authorize(tab, bastion, client)
    page = tab.page
    tab.failed_requests.clear()
    tab.console_errors.clear()
    page.goto(f"{site.url}/frame?{urlencode({'target': url, 'control': f'{site.url}/plain'})}")
    frames = {f.name: f for f in page.frames}
    assert frames["control"].get_by_role("heading", name="A page that may be framed").is_visible()
    target = frames["target"]
    assert (url, "net::ERR_BLOCKED_BY_RESPONSE") in tab.failed_requests
    assert target.locator("button[name=decision]").count() == 0
    assert any("frame-ancestors 'none'" in e for e in tab.console_errors)
    assert_oauth_error(wait_and_poll(bastion, agent, ack["auth_req_id"]), "authorization_pending")


def test_a_form_posted_by_another_page_is_refused(
    bastion: Bastion, client: dict, site: ClientSite, tab: Tab
):
    """The client's site and bastion are both on 127.0.0.1: the same site, so the browser sends
    the Lax session cookie with the other page's POST. Its ``Origin`` (another site's) refuses
    it before anything else; its guessed CSRF token would too
    (test_ciba.py::test_an_answer_without_its_csrf_token_is_refused)."""
    agent = ciba_client(bastion)
    ack = requested(bastion, agent)
    url = only_pending_url(bastion)
    sign_in_at_authorize(tab, bastion, client)
    page = tab.page
    attack = (
        "<!doctype html><title>Win a prize</title>"
        f"<form id=f method=post action='{escape(url, quote=True)}'>"
        "<input type=hidden name=decision value=approve>"
        "<input type=hidden name=csrf_token value=guessed></form>"
        "<script>document.getElementById('f').submit()</script>"
    )
    page.route(
        f"{site.url}/prize",
        lambda route: route.fulfill(status=200, content_type="text/html", body=attack),
    )
    with page.expect_navigation(url=url) as navigation:
        page.goto(f"{site.url}/prize")
    assert navigation.value.status == 403
    assert page.get_by_role("heading", name="Form refused").is_visible()
    assert_oauth_error(wait_and_poll(bastion, agent, ack["auth_req_id"]), "authorization_pending")
    assert CIBA_GRANT_TYPE in agent["grant_types"]


def test_a_long_binding_message_and_name_are_read_whole_on_a_phone(
    bastion: Bastion, client: dict, tab: Tab
):
    """The person compares the binding message with what the agent shows, often on a phone: a
    message or a client name of one long word wraps inside the page, none of it off to the side
    where the person would have to scroll to read it."""
    message = "Refund-order-4711-" + "x" * 60 + "-and-close-account"
    agent = ciba_client(bastion, client_name="Night" + "-agent" * 30)
    requested(bastion, agent, binding_message=message)
    sign_in_at_authorize(tab, bastion, client)
    page = tab.page
    page.set_viewport_size({"width": 360, "height": 740})
    page.goto(only_pending_url(bastion))
    assert page.get_by_role("heading", name="Approve access?").is_visible()
    assert page.locator("blockquote.binding").inner_text() == message
    width = page.evaluate("window.innerWidth")
    for shown in (page.locator("blockquote.binding strong"), page.locator(".unverified p")):
        box = shown.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, box
    assert page.evaluate("document.documentElement.scrollWidth") <= width
