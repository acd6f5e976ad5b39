"""What the login and consent pages say: a client's name is vouched for only when an
administrator registered it; the resource appears by its configured name and each scope by its
configured description. (Seen in a real browser in test_browser.py.)"""

from __future__ import annotations

import re
import time
from html import unescape
from urllib.parse import urlencode

import httpx

from bastion.oauth import registration

from .support import PASSWORD, Bastion, hidden_fields, pkce_pair, running_bastion


def text(html: str) -> str:
    return " ".join(unescape(re.sub(r"<[^>]+>", "", html)).split())


def pages_for(bastion: Bastion, client: dict, **overrides) -> tuple[str, str]:
    """(login page, consent page) of one authorization request, as HTML."""
    _, challenge = pkce_pair()
    browser = httpx.Client(timeout=10)
    params = bastion.authorize_params(client, challenge, **overrides)
    login = browser.get(f"{bastion.url}/authorize?{urlencode(params)}")
    consent = browser.post(
        f"{bastion.url}/authorize/login",
        data={**hidden_fields(login.text), "username": "alice", "password": PASSWORD},
    )
    assert consent.status_code == 200, consent.text
    return login.text, consent.text


def admin_client(bastion: Bastion, name: str) -> dict:
    values = registration.validate_client_metadata(
        {"client_name": name, "redirect_uris": ["http://127.0.0.1:9/callback"]},
        bastion.server.settings,
    )
    registered = registration.new_client(values, source="admin", now=time.time())
    bastion.server.store.save_client(registered.client)
    return registered.response()


def test_a_self_registered_client_is_shown_as_unverified(bastion: Bastion):
    client = bastion.register(client_name="Claude Desktop (example)")
    login, consent = pages_for(bastion, client)
    for page in (text(login), text(consent)):
        assert "Unverified application." in page
        assert "anyone can register any name" in page
        assert "“Claude Desktop (example)” may not be what it says it is" in page
        assert "registered by your administrator" not in page
        assert "It asks to act for you, and will send you back to 127.0.0.1:9." in page
    assert "class=unverified role=note" in consent


def test_an_administrators_client_is_shown_as_registered_by_the_administrator(bastion: Bastion):
    client = admin_client(bastion, "Finance agent")
    login, consent = pages_for(bastion, client)
    for page in (text(login), text(consent)):
        assert "Finance agent registered by your administrator" in page
        assert "Unverified" not in page


def test_the_resource_is_named_and_each_scope_described(bastion: Bastion):
    client = bastion.register()
    _, consent = pages_for(bastion, client, scope="tools:read tools:call")
    page = text(consent)
    assert f"It wants access to Test tools ({bastion.resource}) to:" in page
    items = re.findall(r"<li>(.*?)</li>", consent)
    assert [text(item) for item in items] == [
        "See the test tools and their results tools:read",
        "tools:call",  # no description configured: its name
    ]
    # A resource with no configured name is shown by its URI.
    _, other = pages_for(bastion, client, resource=bastion.other_resource)
    assert f"It wants access to {bastion.other_resource} to:" in text(other)


def test_names_and_descriptions_from_the_configuration_are_escaped(sqlite_url, tmp_path):
    marked = {
        "uri": "http://127.0.0.1:9/mcp",
        "scopes": ["tools:read"],
        "name": "<b>Tools</b>",
        "scope_descriptions": {"tools:read": "<script>alert(1)</script>"},
    }
    with running_bastion(sqlite_url, tmp_path, resources=[marked]) as bastion:
        _, consent = pages_for(bastion, bastion.register(client_name="<i>x</i>"))
        assert "<script>" not in consent and "<b>" not in consent and "<i>" not in consent
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in consent
        assert "&lt;b&gt;Tools&lt;/b&gt;" in consent
