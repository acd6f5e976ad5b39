"""`make run-oidc`: the quickstart (`bastion serve` in a process of its own) with
examples/quickstart/identity.toml added, people logging in through the test OpenID provider
(oidc-provider with Node, as `python -m tests.identity.oidc_provider` runs it) in Debian's
chromium. sam logs in at the provider, his agent's token calls the desk as sam, and his
provider group is a team membership."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from bastion.facts.model import Entity
from bastion.facts.store import FactStore
from tests.browser import browser_fixture, tab_fixture  # noqa: F401 (fixtures)
from tests.gateway.streams import messages, modern_headers, modern_request
from tests.gateway.support import serve_quickstart, stop
from tests.oauth.support import free_socket, pkce_pair

from .oidc_provider import QUICKSTART_PEOPLE, oidc_provider
from .oidc_support import REDIRECT_URI, log_in_at_the_provider

IDENTITY = Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "identity.toml"
SECRET = "quickstart-oidc-secret"


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    directory = tmp_path_factory.mktemp("quickstart-oidc")
    people = directory / "people.json"
    # sam is also in a group the quickstart's facts know nothing of.
    sam = {**QUICKSTART_PEOPLE["sam"], "groups": ["support", "night-shift"]}
    people.write_text(json.dumps({**QUICKSTART_PEOPLE, "sam": sam}))
    provider_sock = free_socket()
    port = provider_sock.getsockname()[1]
    provider_sock.close()  # Node binds it
    identity = IDENTITY.read_text().replace("127.0.0.1:9400", f"127.0.0.1:{port}")
    bastion_sock = free_socket()
    bastion_port = bastion_sock.getsockname()[1]
    bastion_sock.close()
    with oidc_provider(
        port,
        client_id="bastion",
        client_secret=SECRET,
        redirect_uris=[f"http://127.0.0.1:{bastion_port}/login/test-idp/callback"],
        users_file=people,
    ):
        server, url = serve_quickstart(
            directory,
            env={"QUICKSTART_OIDC_SECRET": SECRET},
            replace={"[approvals]": f"{identity}\n[approvals]"},
            port=bastion_port,
        )
        try:
            yield url, directory
        finally:
            stop(server)


def test_sam_logs_in_at_the_provider_and_his_agent_searches_the_desk_as_sam(quickstart, tab):
    url, directory = quickstart
    resource = f"{url}/mcp/desk"
    with httpx.Client(timeout=20) as http:
        client = http.post(
            f"{url}/register",
            json={
                "client_name": "quickstart agent",
                "redirect_uris": [REDIRECT_URI],
                "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code"],
            },
        ).json()
        verifier, challenge = pkce_pair()
        params = {
            "response_type": "code",
            "client_id": client["client_id"],
            "redirect_uri": REDIRECT_URI,
            "state": "s",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "resource": resource,
            "scope": "customers:read",
        }
        query = log_in_at_the_provider(
            tab,
            f"{url}/authorize?{urlencode(params)}",
            "the test provider",
            "sam",
            "quickstart-password",
            "sam",
        )
        tokens = http.post(
            f"{url}/token",
            data={
                "grant_type": "authorization_code",
                "code": query["code"][0],
                "redirect_uri": REDIRECT_URI,
                "code_verifier": verifier,
                "client_id": client["client_id"],
            },
        ).json()
        call = {"name": "search_customers", "arguments": {"query": "a"}}
        response = http.post(
            resource,
            json=modern_request(1, "tools/call", call),
            headers=modern_headers(tokens["access_token"], "tools/call", "search_customers"),
        )
    assert response.status_code == 200, response.text
    assert "result" in messages(response)[-1], messages(response)[-1]
    store = FactStore.open(str(directory / "bastion.db"))
    try:
        membership = store.get(("has_role", Entity("User", "sam"), "member", None))
    finally:
        store.close()
    teams = {f.fact[3]: f.expires_at for f in membership}
    assert set(teams) == {Entity("Team", "support"), Entity("Team", "night-shift")}
    assert teams[Entity("Team", "support")] is None  # desk.facts' own, left as it is
    assert teams[Entity("Team", "night-shift")] is not None  # the provider's, expiring
