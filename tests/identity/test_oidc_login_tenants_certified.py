"""Signing in through a multi-tenant provider as Entra ID's ``/organizations/v2.0`` is one, with
the certified oidc-provider run by Node (`oidc_provider.mjs` with TENANTS: one oidc-provider per
tenant, each its own issuer, behind the alias whose discovery document's issuer is the template
``<base>/{tenantid}/v2.0``; oidc-provider alone signs every token with its one issuer, so the
alias is a path router in front of them) and a person in Debian's chromium (Playwright). The
ways such a login must be refused are tried in test_oidc_login_tenants.py."""

from __future__ import annotations

import html
import json
from urllib.parse import urlencode

import pytest

from tests.browser import browser_fixture, tab_fixture  # noqa: F401 (fixtures)
from tests.oauth.support import free_socket, pkce_pair

from .oidc_provider import oidc_provider
from .oidc_support import (
    REDIRECT_URI,
    bastion_with_providers,
    log_in_at_the_provider,
    sign_in_at_the_provider,
)

PASSWORD = "ada-at-her-company"
SECRET = "a-client-secret-for-bastion-0123456789"
TENANT_A = "72f988bf-86f1-41af-91ab-2d7cd011db47"
TENANT_B = "f8cdef31-a31e-4b4a-93e4-5f571e91255a"
UNLISTED = "9188040d-6c67-4c5b-b112-36a304b66dad"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The multi-tenant provider (three tenants), and bastion taking two of them."""
    directory = tmp_path_factory.mktemp("oidc-tenants")
    people = directory / "people.json"
    people.write_text(json.dumps({"ada": {"password": PASSWORD, "email": "ada@corp.test"}}))
    home = directory / "tenant"
    bastion_sock, provider_sock = free_socket(), free_socket()
    bastion_url = f"http://127.0.0.1:{bastion_sock.getsockname()[1]}"
    port = provider_sock.getsockname()[1]
    provider_sock.close()  # Node binds it
    with oidc_provider(
        port,
        client_id="bastion",
        client_secret=SECRET,
        redirect_uris=[f"{bastion_url}/login/entra/callback"],
        users_file=people,
        tenants=[TENANT_A, TENANT_B, UNLISTED],
        tenant_file=home,
    ) as issuer:
        assert issuer.endswith("/organizations/v2.0")
        identity = {
            "providers": [
                {
                    "id": "entra",
                    "name": "Entra ID",
                    "issuer": issuer,
                    "client_id": "bastion",
                    "client_secret": SECRET,
                    "tenants": [TENANT_A, TENANT_B],
                }
            ]
        }
        with bastion_with_providers(
            str(directory / "bastion.db"), str(directory / "keys"), bastion_sock, identity
        ) as bastion:
            yield {"bastion": bastion, "home": home}


def authorize_url(bastion) -> str:
    client = bastion.register(redirect_uris=[REDIRECT_URI])
    _, challenge = pkce_pair()
    params = bastion.authorize_params(client, challenge, resource=bastion.resource)
    return f"{bastion.url}/authorize?{urlencode(params)}"


def test_the_same_sub_in_two_tenants_signs_in_as_two_users(world, tab):
    bastion = world["bastion"]
    for tenant in (TENANT_A, TENANT_B):
        world["home"].write_text(tenant)
        tab.page.context.clear_cookies()
        user = f"entra:{tenant}:ada"
        query = log_in_at_the_provider(
            tab, authorize_url(bastion), "Entra ID", "ada", PASSWORD, user
        )
        assert "code" in query
        event = bastion.server.audit.events("login.succeeded", limit=1)[0]
        assert (event.subject, event.detail["tenant"]) == (user, tenant)
    users = {u[0] for u in bastion.server.store.users()}
    assert {f"entra:{TENANT_A}:ada", f"entra:{TENANT_B}:ada"} <= users


def test_a_person_of_a_tenant_not_listed_signs_in_nowhere(world, tab):
    bastion = world["bastion"]
    world["home"].write_text(UNLISTED)
    before = {u[0] for u in bastion.server.store.users()}
    sign_in_at_the_provider(tab, authorize_url(bastion), "Entra ID", "ada", PASSWORD)
    text = html.unescape(tab.page.inner_text("body"))
    # oidc-provider sends RFC 9207's iss: the tenant's issuer, refused before the code is used.
    assert f"/{UNLISTED}/v2.0, the issuer of none of the tenants taken" in text, text
    assert {u[0] for u in bastion.server.store.users()} == before
    event = bastion.server.audit.events("login.refused", limit=1)[0]
    assert event.detail["reason"] == "mix_up"
