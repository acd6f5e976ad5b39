"""Signing in again through a company provider when a client asks for a recent sign-in: OpenID
Connect Core 1.0 §3.1.2.1 (``max_age``, ``prompt=login``) and §3.1.3.7 step 13 (``auth_time``).
The provider is the certified oidc-provider (`oidc_provider.mjs`), where the person keeps a
session of their own; their browser is an httpx client that fills in its pages.

Without this, the step-up a policy asks for (``requires_recent_auth``: the gateway's 401 with
``max_age``, the client's new authorization request) was met by the provider's session alone:
bastion sent neither ``max_age`` nor ``prompt`` on, the provider signed the person in without a
password, and bastion wrote *now* as the access token's ``auth_time``."""

from __future__ import annotations

import json
import re
import time
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest

from tests.oauth.support import free_socket

from .oidc_provider import oidc_provider
from .oidc_support import Person, bastion_with_providers

SECRET = "a-client-secret-for-bastion-0123456789"
PASSWORD = "ada-at-the-provider"


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    directory = tmp_path_factory.mktemp("oidc-reauthentication")
    people = directory / "people.json"
    people.write_text(json.dumps({"ada": {"password": PASSWORD, "email": "ada@acme.test"}}))
    bastion_sock, provider_sock = free_socket(), free_socket()
    bastion_url = f"http://127.0.0.1:{bastion_sock.getsockname()[1]}"
    port = provider_sock.getsockname()[1]
    provider_sock.close()  # Node binds it
    with oidc_provider(
        port,
        client_id="bastion",
        client_secret=SECRET,
        redirect_uris=[f"{bastion_url}/login/corp/callback"],
        users_file=people,
    ) as issuer:
        identity = {
            "providers": [
                {"id": "corp", "issuer": issuer, "client_id": "bastion", "client_secret": SECRET}
            ]
        }
        with bastion_with_providers(
            str(directory / "bastion.db"), str(directory / "keys"), bastion_sock, identity
        ) as b:
            yield b


@pytest.fixture(scope="module")
def client(bastion):
    return bastion.register()


@pytest.fixture(scope="module")
def person(bastion):
    p = Person(bastion)
    yield p
    p.close()


def at_the_provider(person: Person, started: httpx.Response) -> tuple[httpx.Response, bool]:
    """From bastion's redirect to the provider, through its pages (the password typed when its
    login page is shown, its consent given) and back: bastion's answer to the callback, and
    whether the provider asked for the password."""
    asked = False
    response = started
    for _ in range(12):
        assert response.status_code in (302, 303), response.text
        location = urljoin(str(response.url), response.headers["location"])
        if location.startswith(f"{person.bastion.url}/"):
            return person.http.get(location), asked
        response = person.http.get(location)
        if response.status_code == 200:  # one of the provider's interaction pages
            action = re.search(r'<form autocomplete="off" action="([^"]+)"', response.text)
            assert action, response.text
            if 'name="prompt" value="login"' in response.text:
                asked = True
                form = {"prompt": "login", "login": "ada", "password": PASSWORD}
            else:
                form = {"prompt": "consent"}
            response = person.http.post(urljoin(str(response.url), action[1]), data=form)
    raise AssertionError("the provider never sent the browser back to bastion")


def code_of(bastion, person: Person, answer: httpx.Response) -> str:
    """The code the MCP client receives, through bastion's consent page when it is shown."""
    if answer.status_code == 200:
        return person.consent(answer)["code"]
    assert answer.status_code in (302, 303), answer.text
    return parse_qs(urlsplit(answer.headers["location"]).query)["code"][0]


def signed_in_through_corp(bastion, person: Person, client: dict, **asked) -> tuple[dict, bool]:
    """The claims of the access token the MCP client gets, and whether the provider asked for
    the password."""
    page = person.open_authorization(client, **asked)
    answer, typed = at_the_provider(person, person.choose(page, "corp"))
    tokens = person.redeem(code_of(bastion, person, answer))
    return bastion.server.verifier.verify(tokens["access_token"], bastion.resource).claims, typed


@pytest.mark.parametrize("asked", [{"max_age": "0"}, {"prompt": "login"}], ids=["max_age", "login"])
def test_a_recent_sign_in_asked_for_is_made_at_the_provider_not_taken_from_its_session(
    bastion, person, client, asked
):
    first, typed = signed_in_through_corp(bastion, person, client)
    assert first["sub"] == "corp:ada"
    time.sleep(1.1)  # auth_time is in whole seconds
    before = int(time.time())
    again, typed = signed_in_through_corp(bastion, person, client, **asked)
    assert typed, "the provider signed the person in from its session: no password asked"
    assert again["auth_time"] >= before
