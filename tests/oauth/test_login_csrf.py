"""Login CSRF through cookies chosen by someone else: a value planted in a victim's browser (from
a sibling subdomain, or injected into plain HTTP) that bastion would adopt as the browser's, a
session cookie planted the same way, and a sign-in (or any page's) form sent from another site.
Each is tried with real requests and refused."""

from __future__ import annotations

from urllib.parse import urlencode

import httpx

from .support import PASSWORD, Bastion, hidden_fields, pkce_pair, running_bastion

CHOSEN = "chosen-by-someone-else"


def test_the_sign_in_page_never_adopts_a_browser_cookie_bastion_did_not_make(bastion: Bastion):
    planted = {"Cookie": f"bastion_browser={CHOSEN}"}
    page = httpx.get(f"{bastion.url}/sign-in", params={"next": "/approvals"}, headers=planted)
    assert page.status_code == 200
    assert page.cookies.get("bastion_browser") not in (None, CHOSEN)
    answer = httpx.post(
        f"{bastion.url}/sign-in",
        data={**hidden_fields(page.text), "username": "alice", "password": PASSWORD},
        headers=planted,
    )
    assert answer.status_code == 403, answer.text
    assert "bastion_session" not in answer.cookies


def test_an_authorization_request_never_binds_to_a_browser_cookie_bastion_did_not_make(
    bastion: Bastion,
):
    client = bastion.register()
    _, challenge = pkce_pair()
    planted = {"Cookie": f"bastion_browser={CHOSEN}"}
    url = f"{bastion.url}/authorize?{urlencode(bastion.authorize_params(client, challenge))}"
    page = httpx.get(url, headers=planted)
    assert page.status_code == 200
    assert page.cookies.get("bastion_browser") not in (None, CHOSEN)
    answer = httpx.post(
        f"{bastion.url}/authorize/login",
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
