"""Login CSRF through cookies chosen by someone else: a value planted in a victim's browser (from
a sibling subdomain, or injected into plain HTTP) that bastion would adopt as the browser's, a
session cookie planted the same way, and a sign-in (or any page's) form sent from another site.
Each is tried with real requests and refused."""

from __future__ import annotations

from urllib.parse import urlencode

import httpx

from .support import PASSWORD, Bastion, hidden_fields, pkce_pair

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
