"""Login CSRF through cookies chosen by someone else: a value planted in a victim's browser (from
a sibling subdomain, or injected into plain HTTP) that bastion would adopt as the browser's, a
session cookie planted the same way, and a sign-in (or any page's) form sent from another site.
Each is tried with real requests and refused."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from starlette.routing import Route

from bastion.oauth.users import create_user
from tests.gateway.support import PASSWORD as GATEWAY_PASSWORD
from tests.gateway.support import start

from .support import PASSWORD, Bastion, hidden_fields, pkce_pair, running_bastion
from .test_ciba import ciba_client, only_pending_url, requested, signed_in

CHOSEN = "chosen-by-someone-else"
FOREIGN = {"Origin": "https://evil.example"}
REFUSED = "sent from another site"


@pytest.mark.parametrize("form", ["/sign-in", "/authorize/login"])
def test_no_sign_in_form_adopts_or_binds_to_a_browser_cookie_bastion_did_not_make(
    bastion: Bastion, form: str
):
    """The sign-in page and an authorization request's login each make a browser value of their
    own, and a form sent with a planted one is refused."""
    planted = {"Cookie": f"bastion_browser={CHOSEN}"}
    if form == "/sign-in":
        page = httpx.get(f"{bastion.url}/sign-in", params={"next": "/approvals"}, headers=planted)
    else:
        _, challenge = pkce_pair()
        query = urlencode(bastion.authorize_params(bastion.register(), challenge))
        page = httpx.get(f"{bastion.url}/authorize?{query}", headers=planted)
    assert page.status_code == 200
    assert page.cookies.get("bastion_browser") not in (None, CHOSEN)
    answer = httpx.post(
        f"{bastion.url}{form}",
        data={**hidden_fields(page.text), "username": "alice", "password": PASSWORD},
        headers=planted,
    )
    assert answer.status_code == 403, answer.text
    assert "bastion_session" not in answer.cookies


def test_on_an_https_issuer_the_cookies_are_host_only_and_secure(sqlite_url, tmp_path):
    """``__Host-``: a browser takes the cookie only from this host, over https, for path / and
    with no Domain, so neither a sibling subdomain nor plain HTTP can set one."""
    with running_bastion(sqlite_url, tmp_path, https=True) as bastion:
        with httpx.Client(verify=bastion.trust) as browser:
            page = browser.get(f"{bastion.url}/sign-in", params={"next": "/approvals"})
            (made,) = page.headers.get_list("set-cookie")
            assert made.startswith("__Host-bastion_browser=")
            signed_in = browser.post(
                f"{bastion.url}/sign-in",
                data={**hidden_fields(page.text), "username": "alice", "password": PASSWORD},
            )
        assert signed_in.status_code == 303, signed_in.text
        (session,) = signed_in.headers.get_list("set-cookie")
        assert session.startswith("__Host-bastion_session=")
        for cookie in (made, session):
            attributes = [a.strip().lower() for a in cookie.split(";")[1:]]
            assert "secure" in attributes and "path=/" in attributes and "httponly" in attributes
            assert not any(a.startswith("domain") for a in attributes)


def test_on_an_https_issuer_a_session_cookie_planted_without_the_prefix_signs_nobody_in(
    sqlite_url, tmp_path
):
    with running_bastion(sqlite_url, tmp_path, https=True) as bastion:
        session = bastion.server.store.create_session("alice", bastion.clock(), 3600)
        signed_in = "/approvals"

        def sign_in_page(cookie: str) -> httpx.Response:
            return httpx.get(
                f"{bastion.url}/sign-in",
                params={"next": signed_in},
                headers={"Cookie": f"{cookie}={session}"},
                verify=bastion.trust,
            )

        planted = sign_in_page("bastion_session")
        assert planted.status_code == 200 and "name=password" in planted.text
        own = sign_in_page("__Host-bastion_session")
        assert own.status_code == 303 and own.headers["location"] == signed_in


def test_a_sign_in_form_sent_from_another_site_is_refused(bastion: Bastion):
    """Another site's page auto-submits bastion's sign-in form with the attacker's password:
    refused before anything is checked, whatever the form holds; sent from bastion's own page,
    the same form signs in."""
    with httpx.Client(timeout=10) as browser:
        page = browser.get(f"{bastion.url}/sign-in", params={"next": "/approvals"})
        form = {**hidden_fields(page.text), "username": "alice", "password": PASSWORD}
        for origin in (
            "https://evil.example",
            "null",
            bastion.url.replace("127.0.0.1", "localhost"),
        ):
            refused = browser.post(f"{bastion.url}/sign-in", data=form, headers={"Origin": origin})
            assert refused.status_code == 403 and REFUSED in refused.text, origin
            assert "bastion_session" not in refused.cookies
        own = browser.post(f"{bastion.url}/sign-in", data=form, headers={"Origin": bastion.url})
        assert own.status_code == 303 and "bastion_session" in own.cookies


def test_login_and_consent_forms_sent_from_another_site_are_refused(bastion: Bastion):
    client = bastion.register()
    _, challenge = pkce_pair()
    url = f"{bastion.url}/authorize?{urlencode(bastion.authorize_params(client, challenge))}"
    with httpx.Client(timeout=10) as browser:
        page = browser.get(url)
        form = {**hidden_fields(page.text), "username": "alice", "password": PASSWORD}
        refused = browser.post(f"{bastion.url}/authorize/login", data=form, headers=FOREIGN)
        assert refused.status_code == 403 and REFUSED in refused.text
        page = browser.post(
            f"{bastion.url}/authorize/login", data=form, headers={"Origin": bastion.url}
        )
        assert page.status_code == 200 and "decision" in page.text, page.text
        allow = {**hidden_fields(page.text), "decision": "allow"}
        refused = browser.post(f"{bastion.url}/authorize/consent", data=allow, headers=FOREIGN)
        assert refused.status_code == 403 and REFUSED in refused.text
        assert "location" not in refused.headers
        # The refused form changed nothing: sent from bastion's page (no Origin: an older
        # browser), it is still answered.
        done = browser.post(f"{bastion.url}/authorize/consent", data=allow)
        assert done.status_code == 303
        assert "code" in parse_qs(urlsplit(done.headers["location"]).query)


def test_a_ciba_answer_sent_from_another_site_is_refused(bastion: Bastion):
    requested(bastion, ciba_client(bastion))
    browser = signed_in(bastion, "alice")
    url = only_pending_url(bastion)
    page = browser.get(url)
    refused = browser.post(
        url, data={**hidden_fields(page.text), "decision": "approve"}, headers=FOREIGN
    )
    assert refused.status_code == 403 and REFUSED in refused.text
    assert len(bastion.server.ciba.pending_for("alice")) == 1


def still_signed_in(bastion: Bastion, session: str) -> bool:
    """Whether ``session`` is a live session: the sign-in page goes straight on with it."""
    page = httpx.get(
        f"{bastion.url}/sign-in",
        params={"next": "/approvals"},
        headers={"Cookie": f"bastion_session={session}"},
    )
    return page.status_code == 303


def test_sign_out_ends_the_session_so_its_cookie_signs_nobody_in(bastion: Bastion):
    browser = signed_in(bastion, "alice")
    session = browser.cookies["bastion_session"]
    page = browser.get(f"{bastion.url}/sign-out")
    assert page.status_code == 200 and "Signed in as <strong>alice</strong>" in page.text
    done = browser.post(f"{bastion.url}/sign-out", data=hidden_fields(page.text))
    assert done.status_code == 200 and "You are signed out" in done.text, done.text
    (cleared,) = done.headers.get_list("set-cookie")
    assert cleared.startswith('bastion_session="";') and "Max-Age=0" in cleared
    # The cookie's value is worth nothing now, wherever it was copied to.
    assert not still_signed_in(bastion, session)
    assert bastion.db.execute("SELECT COUNT(*) FROM oauth_sessions")[0][0] == 0
    assert [e.subject for e in bastion.server.audit.events("logout.succeeded")] == ["alice"]


def test_a_sign_out_without_its_form_token_or_from_another_site_signs_nobody_out(
    bastion: Bastion,
):
    """Signing a person out against their will (to then sign them in as someone else, or just
    to annoy) takes a form from bastion's own page: a POST without the token bound to the
    session, with a token of another session, from another site, or a GET, ends nothing."""
    browser = signed_in(bastion, "alice")
    session = browser.cookies["bastion_session"]
    form = hidden_fields(browser.get(f"{bastion.url}/sign-out").text)
    other = signed_in(bastion, "alice")
    others_form = hidden_fields(other.get(f"{bastion.url}/sign-out").text)
    for data in ({}, {"csrf_token": "1.forged"}, others_form):
        refused = browser.post(f"{bastion.url}/sign-out", data=data)
        assert refused.status_code == 403 and "nothing was done" in refused.text, data
        assert "set-cookie" not in refused.headers
    refused = browser.post(f"{bastion.url}/sign-out", data=form, headers=FOREIGN)
    assert refused.status_code == 403 and REFUSED in refused.text
    assert browser.get(f"{bastion.url}/sign-out").status_code == 200
    assert still_signed_in(bastion, session)


# The machine-facing POST routes, which other sites' scripts may call (CORS) and which carry no
# browser cookie: not pages, so no Origin check of the pages' applies.
API_PATHS = ("/token", "/register", "/revoke", "/introspect", "/bc-authorize", "/ssf/events")
API_PREFIXES = ("/v1/", "/api/", "/access/")


def test_every_page_form_of_a_whole_server_refuses_another_sites_post_and_no_api_does(tmp_path):
    """Every POST route of a server with a gateway, approvals, alerts and per-user connections:
    a page's form refuses a POST from another site before it looks at anything; an API does not
    (its own checks answer). A page route added without the check fails here."""
    personal = {"name": "personal", "url": "http://127.0.0.1:9/mcp", "auth": "per_user"}
    with start(tmp_path, more_upstreams=(personal,)) as running:
        posts = sorted(
            {
                re.sub(r"\{[^}]*\}", "x", route.path)
                for route in running.app.routes
                if isinstance(route, Route) and "POST" in (route.methods or ())
            }
        )
        pages = [p for p in posts if p not in API_PATHS and not p.startswith(API_PREFIXES)]
        for wanted in ("/sign-in", "/sign-out", "/authorize/consent", "/approvals/x", "/alerts/x"):
            assert wanted in pages, pages
        assert "/connections/x/connect" in pages and "/connections/x/revoke" in pages, pages
        # A browser that sends no Origin (an older one, or one an extension strips it from)
        # still says where the form came from in Referer; another site's page, a sibling
        # subdomain's, or a page with an opaque origin is refused the same.
        referers = [
            {"Referer": "https://evil.example/page"},
            {"Referer": f"{running.url.replace('127.0.0.1', 'localhost')}/approvals"},
            {"Referer": "about:blank"},
        ]
        for path in posts:
            for headers in (FOREIGN, *referers):
                answer = running.http.post(f"{running.url}{path}", data={"a": "b"}, headers=headers)
                if path in pages:
                    assert answer.status_code == 403 and REFUSED in answer.text, (path, headers)
                else:
                    assert REFUSED not in answer.text, path
        # No API takes a person's session cookie for credentials: a signed-in browser that
        # another site's page makes send a body no preflight stops (text/plain) to any of them,
        # on any method, is unauthenticated there (401), so the Origin rule is not needed.
        with httpx.Client(base_url=running.url, timeout=20) as browser:
            page = browser.get("/sign-in", params={"next": "/approvals"})
            form = {**hidden_fields(page.text), "username": "sam", "password": GATEWAY_PASSWORD}
            assert browser.post("/sign-in", data=form).status_code == 303
            for route in running.app.routes:
                if not (isinstance(route, Route) and route.path.startswith(API_PREFIXES)):
                    continue
                path = re.sub(r"\{[^}]*\}", "x", route.path)
                for method in sorted((route.methods or set()) - {"HEAD"}):
                    if path == "/v1/openapi.json":
                        continue  # public: it describes the API
                    answer = browser.request(
                        method, path, content=b"{}", headers={"Content-Type": "text/plain"}
                    )
                    assert answer.status_code == 401, (method, path, answer.status_code)


def test_signing_in_ends_the_session_the_browser_held_before(bastion: Bastion):
    """A sign-in replaces the browser's session, and the session it held before is ended with
    it, not left live on the server: the sign-in page, an authorization request's login
    (``prompt=login``) and a sign-in as another person on a shared browser alike. A session
    value copied out of the browser (or planted in it) is worth nothing after the next sign-in."""
    create_user(bastion.server.store, "bob", PASSWORD, bastion.clock(), actor="test")
    before = signed_in(bastion, "alice").cookies["bastion_session"]
    # The sign-in page's form, posted by a browser that still holds a session (the form was
    # opened before, in another tab; another person at the same browser).
    with httpx.Client(timeout=10, follow_redirects=False) as shared:
        page = shared.get(f"{bastion.url}/sign-in", params={"next": "/approvals"})
        form = {**hidden_fields(page.text), "username": "bob", "password": PASSWORD}
        shared.cookies.set("bastion_session", before)
        done = shared.post(f"{bastion.url}/sign-in", data=form)
        assert done.status_code == 303, done.text
        after = done.cookies["bastion_session"]
    assert after != before
    assert not still_signed_in(bastion, before)
    assert still_signed_in(bastion, after)
    # An authorization request's login with prompt=login, in a browser signed in already.
    _, challenge = pkce_pair()
    params = {**bastion.authorize_params(bastion.register(), challenge), "prompt": "login"}
    with httpx.Client(timeout=10, follow_redirects=False) as again:
        again.cookies.set("bastion_session", after)
        page = again.get(f"{bastion.url}/authorize?{urlencode(params)}")
        assert page.status_code == 200 and "name=password" in page.text, page.text
        done = again.post(
            f"{bastion.url}/authorize/login",
            data={**hidden_fields(page.text), "username": "alice", "password": PASSWORD},
        )
        assert done.status_code in (200, 303), done.text
        newest = done.cookies["bastion_session"]
    assert not still_signed_in(bastion, after)
    assert still_signed_in(bastion, newest)
