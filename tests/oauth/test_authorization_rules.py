"""Each rule of the authorization and token endpoints, tried and refused."""

from __future__ import annotations

import html
import re
from dataclasses import replace
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from bastion.db import Database
from bastion.oauth import InvalidToken, pkce, registration, store
from bastion.oauth.users import create_user

from .support import PASSWORD, Bastion, hidden_fields, pkce_pair, running_bastion


def redirect_query(response: httpx.Response) -> dict[str, str]:
    assert response.status_code in (302, 303), response.text
    return {k: v[0] for k, v in parse_qs(urlsplit(response.headers["location"]).query).items()}


def shown_error(response: httpx.Response) -> dict[str, str]:
    """The error of an authorization request shown on bastion's page, not redirected: the query
    of the page's one link back to the client (which the person may follow, or not)."""
    assert response.status_code == 400, response.text
    assert "location" not in response.headers
    (href,) = re.findall(r"<a href='([^']*)'", response.text)
    return {k: v[0] for k, v in parse_qs(urlsplit(html.unescape(href)).query).items()}


def authorize(bastion: Bastion, params: dict) -> httpx.Response:
    return bastion.http.get(f"{bastion.url}/authorize?{urlencode(params)}")


def exchange(
    bastion: Bastion, client: dict, code: str, verifier: str, **overrides
) -> httpx.Response:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": client["redirect_uris"][0],
        "code_verifier": verifier,
        "client_id": client["client_id"],
        **overrides,
    }
    return bastion.token(**{k: v for k, v in form.items() if v is not None})


def assert_oauth_error(response: httpx.Response, error: str, status: int = 400) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error
    assert body["error_description"]


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"code_challenge": None, "code_challenge_method": None}, "invalid_request"),
        ({"code_challenge_method": None}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        # An S256 challenge is 43 base64url characters (RFC 7636 §4.2), nothing else.
        ({"code_challenge": "a" * 42}, "invalid_request"),
        ({"code_challenge": "a" * 44}, "invalid_request"),
        ({"code_challenge": "a" * 42 + "="}, "invalid_request"),
        # A regex's "$" matches before a final line break: the challenge is matched whole.
        ({"code_challenge": "a" * 43 + "\n"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"resource": None}, "invalid_target"),
        ({"resource": "http://127.0.0.1:9/not-configured"}, "invalid_target"),
        ({"scope": "tools:read admin"}, "invalid_scope"),
    ],
    ids=[
        "no-pkce",
        "pkce-without-method",
        "plain-pkce",
        "challenge-of-42",
        "challenge-of-44",
        "challenge-not-base64url",
        "challenge-with-a-line-break",
        "implicit",
        "no-resource",
        "unknown-resource",
        "unknown-scope",
    ],
)
def test_authorization_request_errors_go_back_to_a_client_the_deployment_vouches_for(
    bastion: Bastion, overrides, error
):
    client = bastion.register_as_admin()
    _, challenge = pkce_pair()
    before = bastion.rows()
    query = redirect_query(
        authorize(bastion, bastion.authorize_params(client, challenge, **overrides))
    )
    assert query["error"] == error
    assert query["error_description"]
    assert query["state"] == "xyz-state"
    assert query["iss"] == bastion.url
    assert "code" not in query
    assert bastion.rows() == before


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"code_challenge": None, "code_challenge_method": None}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"resource": None}, "invalid_target"),
        ({"scope": "tools:read admin"}, "invalid_scope"),
    ],
    ids=["no-pkce", "implicit", "no-resource", "unknown-scope"],
)
def test_errors_before_the_person_acts_are_shown_not_redirected_for_a_self_registered_client(
    bastion: Bastion, overrides, error
):
    """RFC 9700 §4.11.2: anyone may register a client with any redirect URI, so bastion does not
    send a browser there on its own; the page names the host and links there."""
    client = bastion.register()
    _, challenge = pkce_pair()
    before = bastion.rows()
    response = authorize(bastion, bastion.authorize_params(client, challenge, **overrides))
    query = shown_error(response)
    assert query["error"] == error and error in response.text
    assert query["error_description"]
    assert query["state"] == "xyz-state" and query["iss"] == bastion.url
    assert "127.0.0.1:9" in response.text
    assert bastion.rows() == before


def test_bastion_is_no_open_redirect_to_a_client_anyone_registered(bastion: Bastion):
    phish = bastion.register(redirect_uris=["https://phish.example/login"])
    response = authorize(bastion, {"client_id": phish["client_id"], "response_type": "x"})
    assert shown_error(response)["error"] == "unsupported_response_type"
    assert "phish.example" in response.text


def test_an_admin_registered_clients_scope_bounds_what_it_may_ask_for(bastion: Bastion):
    """An administrator's client asks for no more than the scope it was registered with (a
    self-registered client's registered scope bounds nothing: it could have registered any)."""
    client = bastion.register_as_admin(scope="tools:read")
    _, challenge = pkce_pair()
    within = authorize(bastion, bastion.authorize_params(client, challenge, scope="tools:read"))
    assert within.status_code == 200 and "name=password" in within.text  # the sign-in page
    wider = bastion.authorize_params(client, challenge, scope="tools:read tools:call")
    assert redirect_query(authorize(bastion, wider))["error"] == "invalid_scope"


def test_a_client_not_registered_for_authorization_code_gets_no_code(bastion: Bastion):
    _, challenge = pkce_pair()
    exchange_only = {"grant_types": ["urn:ietf:params:oauth:grant-type:token-exchange"]}
    admins = bastion.register_as_admin(**exchange_only)
    query = redirect_query(authorize(bastion, bastion.authorize_params(admins, challenge)))
    assert query["error"] == "unauthorized_client" and "code" not in query
    own = bastion.register(**exchange_only)
    query = shown_error(authorize(bastion, bastion.authorize_params(own, challenge)))
    assert query["error"] == "unauthorized_client" and "code" not in query


def test_a_scope_the_other_resource_lacks_is_refused(bastion: Bastion):
    client = bastion.register()
    _, challenge = pkce_pair()
    params = bastion.authorize_params(
        client, challenge, resource=bastion.other_resource, scope="tools:call"
    )
    assert shown_error(authorize(bastion, params))["error"] == "invalid_scope"


def test_redirect_uri_differing_by_one_character_is_refused_without_redirecting(bastion: Bastion):
    client = bastion.register()
    _, challenge = pkce_pair()
    before = bastion.rows()
    for wrong in (
        "http://127.0.0.1:9/callbacK",
        "http://127.0.0.1:9/callback/",
        "http://127.0.0.2:9/callback",
        "https://127.0.0.1:9/callback",
    ):
        response = authorize(
            bastion, bastion.authorize_params(client, challenge, redirect_uri=wrong)
        )
        assert response.status_code == 400
        assert "location" not in response.headers
        assert "redirect_uri" in response.text
    assert bastion.rows() == before


def test_unknown_client_gets_an_error_page_not_a_redirect(bastion: Bastion):
    _, challenge = pkce_pair()
    params = bastion.authorize_params(
        {"client_id": "nobody", "redirect_uris": ["https://evil.example/cb"]}, challenge
    )
    response = authorize(bastion, params)
    assert response.status_code == 400 and "location" not in response.headers
    assert "invalid_client" in response.text


def test_repeated_parameters_are_refused(bastion: Bastion):
    client = bastion.register()
    _, challenge = pkce_pair()
    params = list(bastion.authorize_params(client, challenge).items()) + [("scope", "tools:call")]
    response = bastion.http.get(f"{bastion.url}/authorize?{urlencode(params)}")
    assert shown_error(response)["error"] == "invalid_request"


def test_two_resource_parameters_are_refused(bastion: Bastion):
    # A code is for one resource (RFC 8707 would allow several): the same one twice, or two.
    client = bastion.register()
    _, challenge = pkce_pair()
    before = bastion.rows()
    for second in (bastion.resource, bastion.other_resource):
        params = list(bastion.authorize_params(client, challenge).items())
        response = authorize(bastion, params + [("resource", second)])
        assert shown_error(response)["error"] in ("invalid_request", "invalid_target")
    assert bastion.rows() == before


def test_the_redirect_carries_code_state_and_issuer(bastion: Bastion):
    client = bastion.register()
    verifier, challenge = pkce_pair()
    params = bastion.authorize_params(client, challenge)
    query = redirect_query(
        bastion.log_in_and_consent(f"{bastion.url}/authorize?{urlencode(params)}")
    )
    assert query["state"] == "xyz-state"
    assert query["iss"] == bastion.url
    assert exchange(bastion, client, query["code"], verifier).status_code == 200


def test_wrong_code_verifier_is_refused_and_the_code_stays_unused(bastion: Bastion):
    client = bastion.register()
    code, verifier = bastion.code_for(client)
    before = bastion.rows()
    other_verifier, _ = pkce_pair()
    assert_oauth_error(exchange(bastion, client, code, other_verifier), "invalid_grant")
    assert_oauth_error(exchange(bastion, client, code, "short"), "invalid_grant")
    assert_oauth_error(exchange(bastion, client, code, None), "invalid_request")
    assert bastion.rows() == before
    assert exchange(bastion, client, code, verifier).status_code == 200


def test_a_code_verifier_of_43_to_128_unreserved_characters_only_is_accepted(bastion: Bastion):
    """RFC 7636 §4.1, checked on its own: each code's challenge is the verifier's own S256
    digest, so only the verifier's form can refuse it."""
    client = bastion.register()
    # A line break at the end makes 129 characters of 128 allowed ones, or adds one not
    # allowed: refused, though the challenge is the S256 of exactly that verifier.
    for verifier in ("a" * 42, "a" * 129, "a" * 42 + "!", "a" * 128 + "\n", "a" * 43 + "\n"):
        code, _ = bastion.code_for(client, code_challenge=pkce.s256(verifier))
        assert_oauth_error(exchange(bastion, client, code, verifier), "invalid_grant")
    for verifier in ("a" * 43, "~._-" * 32):
        code, _ = bastion.code_for(client, code_challenge=pkce.s256(verifier))
        assert exchange(bastion, client, code, verifier).status_code == 200, verifier


def test_redirect_uri_at_the_token_endpoint_must_match(bastion: Bastion):
    client = bastion.register(
        redirect_uris=["http://127.0.0.1:9/callback", "http://127.0.0.1:9/callback2"]
    )
    code, verifier = bastion.code_for(client)
    before = bastion.rows()
    response = exchange(
        bastion, client, code, verifier, redirect_uri="http://127.0.0.1:9/callback2"
    )
    assert_oauth_error(response, "invalid_grant")
    assert bastion.rows() == before


def test_code_replay_fails_and_revokes_what_the_first_use_issued(bastion: Bastion):
    client = bastion.register()
    code, verifier = bastion.code_for(client)
    first = exchange(bastion, client, code, verifier).json()
    bastion.server.verifier.verify(first["access_token"], bastion.resource)

    replay = exchange(bastion, client, code, verifier)
    assert_oauth_error(replay, "invalid_grant")
    with pytest.raises(InvalidToken, match="revoked"):
        bastion.server.verifier.verify(first["access_token"], bastion.resource)
    refresh = bastion.token(
        grant_type="refresh_token",
        refresh_token=first["refresh_token"],
        client_id=client["client_id"],
    )
    assert_oauth_error(refresh, "invalid_grant")
    assert "grant.revoked" in [e.kind for e in bastion.server.audit.events()]


def test_a_code_is_bound_to_its_client(bastion: Bastion):
    client = bastion.register()
    thief = bastion.register()
    code, verifier = bastion.code_for(client)
    response = exchange(bastion, thief, code, verifier, redirect_uri=client["redirect_uris"][0])
    assert_oauth_error(response, "invalid_grant")
    assert exchange(bastion, client, code, verifier).status_code == 200


def test_expired_code_is_refused(bastion: Bastion):
    client = bastion.register()
    code, verifier = bastion.code_for(client)
    bastion.clock.advance(bastion.server.settings.code_seconds + 1)
    assert_oauth_error(exchange(bastion, client, code, verifier), "invalid_grant")


def test_a_code_whose_grant_was_revoked_is_refused(bastion: Bastion):
    # Revoked before the client redeemed it (the user, an administrator, a signal).
    client = bastion.register()
    code, verifier = bastion.code_for(client)
    grant_id = bastion.server.store.code(code)[0]
    bastion.server.store.revoke_grant(grant_id, bastion.clock(), "test", actor="test")
    before = bastion.rows()
    response = exchange(bastion, client, code, verifier)
    assert_oauth_error(response, "invalid_grant")
    assert "revoked" in response.json()["error_description"]
    assert bastion.rows() == before


def test_refresh_rotates_the_refresh_token(bastion: Bastion):
    client = bastion.register()
    first = bastion.tokens_for(client)
    second = bastion.token(
        grant_type="refresh_token",
        refresh_token=first["refresh_token"],
        client_id=client["client_id"],
    ).json()
    assert second["refresh_token"] != first["refresh_token"]
    verified = bastion.server.verifier.verify(second["access_token"], bastion.resource)
    assert verified.scopes == {"tools:read"}


def test_refresh_token_reuse_revokes_the_whole_grant(bastion: Bastion):
    client = bastion.register()
    first = bastion.tokens_for(client)
    refresh = {"grant_type": "refresh_token", "client_id": client["client_id"]}
    second = bastion.token(**refresh, refresh_token=first["refresh_token"]).json()

    reuse = bastion.token(**refresh, refresh_token=first["refresh_token"])
    assert_oauth_error(reuse, "invalid_grant")
    # Everything of the grant is dead: the newest refresh token and every access token.
    assert_oauth_error(
        bastion.token(**refresh, refresh_token=second["refresh_token"]), "invalid_grant"
    )
    for token in (first["access_token"], second["access_token"]):
        with pytest.raises(InvalidToken, match="revoked"):
            bastion.server.verifier.verify(token, bastion.resource)


def test_refresh_cannot_widen_scope_or_change_resource(bastion: Bastion):
    client = bastion.register()
    tokens = bastion.tokens_for(client)
    before = bastion.rows()
    refresh = {
        "grant_type": "refresh_token",
        "client_id": client["client_id"],
        "refresh_token": tokens["refresh_token"],
    }
    assert_oauth_error(bastion.token(**refresh, scope="tools:read tools:call"), "invalid_scope")
    assert_oauth_error(bastion.token(**refresh, resource=bastion.other_resource), "invalid_target")
    assert bastion.rows() == before


def test_another_client_cannot_use_a_refresh_token(bastion: Bastion):
    client = bastion.register()
    thief = bastion.register()
    tokens = bastion.tokens_for(client)
    response = bastion.token(
        grant_type="refresh_token",
        refresh_token=tokens["refresh_token"],
        client_id=thief["client_id"],
    )
    assert_oauth_error(response, "invalid_grant")


def test_token_request_for_another_resource_than_authorized_is_refused(bastion: Bastion):
    client = bastion.register()
    code, verifier = bastion.code_for(client)
    response = exchange(bastion, client, code, verifier, resource=bastion.other_resource)
    assert_oauth_error(response, "invalid_target")


def test_consent_post_without_csrf_token_is_refused(bastion: Bastion):
    client = bastion.register()
    _, challenge = pkce_pair()
    browser = httpx.Client()
    page = browser.get(
        f"{bastion.url}/authorize?{urlencode(bastion.authorize_params(client, challenge))}"
    )
    fields = hidden_fields(page.text)
    page = browser.post(
        f"{bastion.url}/authorize/login",
        data={**fields, "username": "alice", "password": "correct horse battery staple"},
    )
    assert "decision" in page.text
    fields = hidden_fields(page.text)
    before = bastion.rows()
    # A token beyond ASCII is refused as any wrong one (it was a 500: compare_digest on text).
    guesses = ({**fields, "csrf_token": "guess"}, {**fields, "csrf_token": "gu\u00e9ss"})
    for forged in ({"request_id": fields["request_id"]}, *guesses):
        response = browser.post(
            f"{bastion.url}/authorize/consent", data={**forged, "decision": "allow"}
        )
        assert response.status_code == 403
        assert "location" not in response.headers
    assert bastion.rows() == before
    # The same form from another browser (no binding cookie) is refused too.
    other = httpx.Client(cookies={"bastion_session": browser.cookies["bastion_session"]})
    response = other.post(f"{bastion.url}/authorize/consent", data={**fields, "decision": "allow"})
    assert response.status_code == 403
    assert bastion.rows() == before


def test_login_without_csrf_token_is_refused(bastion: Bastion):
    client = bastion.register()
    _, challenge = pkce_pair()
    browser = httpx.Client()
    page = browser.get(
        f"{bastion.url}/authorize?{urlencode(bastion.authorize_params(client, challenge))}"
    )
    fields = hidden_fields(page.text)
    before = bastion.rows()
    response = browser.post(
        f"{bastion.url}/authorize/login",
        data={
            "request_id": fields["request_id"],
            "username": "alice",
            "password": "correct horse battery staple",
        },
    )
    assert response.status_code == 403
    assert bastion.rows() == before


def test_wrong_password_is_refused_and_audited(bastion: Bastion):
    client = bastion.register()
    _, challenge = pkce_pair()
    browser = httpx.Client()
    page = browser.get(
        f"{bastion.url}/authorize?{urlencode(bastion.authorize_params(client, challenge))}"
    )
    response = browser.post(
        f"{bastion.url}/authorize/login",
        data={**hidden_fields(page.text), "username": "alice", "password": "wrong password"},
    )
    assert response.status_code == 401
    assert "bastion_session" not in browser.cookies
    assert "login.failed" in [e.kind for e in bastion.server.audit.events()]


def test_denied_consent_returns_access_denied(bastion: Bastion):
    client = bastion.register()
    _, challenge = pkce_pair()
    browser = httpx.Client()
    page = browser.get(
        f"{bastion.url}/authorize?{urlencode(bastion.authorize_params(client, challenge))}"
    )
    page = browser.post(
        f"{bastion.url}/authorize/login",
        data={
            **hidden_fields(page.text),
            "username": "alice",
            "password": "correct horse battery staple",
        },
    )
    response = browser.post(
        f"{bastion.url}/authorize/consent", data={**hidden_fields(page.text), "decision": "deny"}
    )
    query = redirect_query(response)
    assert query["error"] == "access_denied" and query["state"] == "xyz-state"


def test_consent_is_remembered_per_user_client_redirect_uri_and_scopes(bastion: Bastion):
    # A public client whose redirect is a claimed https one (RFC 8252 §8.6); a loopback one is
    # asked every time (test_a_program_on_the_device_gets_no_code_...).
    client = bastion.register(
        redirect_uris=["https://agent.example/callback", "https://agent.example/elsewhere"]
    )
    browser = httpx.Client()
    _, challenge = pkce_pair()
    first = bastion.log_in_and_consent(
        f"{bastion.url}/authorize?{urlencode(bastion.authorize_params(client, challenge))}", browser
    )
    assert "code" in redirect_query(first)
    # Same scopes again: straight back with a code, no page.
    again = browser.get(
        f"{bastion.url}/authorize?{urlencode(bastion.authorize_params(client, challenge))}"
    )
    assert "code" in redirect_query(again)
    # More scopes: the person is asked again.
    wider = bastion.authorize_params(client, challenge, scope="tools:read tools:call")
    page = browser.get(f"{bastion.url}/authorize?{urlencode(wider)}")
    assert page.status_code == 200 and "tools:call" in page.text
    # Another of the client's redirect URIs: asked again, and shown where it sends them.
    elsewhere = bastion.authorize_params(
        client, challenge, redirect_uri="https://agent.example/elsewhere"
    )
    page = browser.get(f"{bastion.url}/authorize?{urlencode(elsewhere)}")
    assert page.status_code == 200 and "/authorize/consent" in page.text
    # Another client: asked again.
    other = bastion.register(
        client_name="Other agent", redirect_uris=["https://agent.example/callback"]
    )
    page = browser.get(
        f"{bastion.url}/authorize?{urlencode(bastion.authorize_params(other, challenge))}"
    )
    assert page.status_code == 200 and "Other agent" in page.text
    # Another user, same client and request: asked, once signed in.
    create_user(bastion.server.store, "bob", PASSWORD, bastion.clock(), actor="test")
    bobs = httpx.Client()
    login = bobs.get(
        f"{bastion.url}/authorize?{urlencode(bastion.authorize_params(client, challenge))}"
    )
    page = bobs.post(
        f"{bastion.url}/authorize/login",
        data={**hidden_fields(login.text), "username": "bob", "password": PASSWORD},
    )
    assert page.status_code == 200 and "Signed in as <strong>bob</strong>" in page.text
    assert "/authorize/consent" in page.text


def consented(bastion: Bastion, client: dict, redirect_uri: str) -> httpx.Client:
    """alice's browser after she signed in and allowed ``client`` at ``redirect_uri``."""
    browser = httpx.Client(timeout=10)
    _, challenge = pkce_pair()
    params = bastion.authorize_params(client, challenge, redirect_uri=redirect_uri)
    first = bastion.log_in_and_consent(f"{bastion.url}/authorize?{urlencode(params)}", browser)
    assert "code" in redirect_query(first)
    return browser


def asks_consent(page: httpx.Response) -> bool:
    return page.status_code == 200 and "/authorize/consent" in page.text


@pytest.mark.parametrize(
    ("registered", "consented_at", "attacked_at"),
    [
        # Another port: RFC 8252 §7.3 lets a loopback client come back on any.
        ("http://127.0.0.1:9/callback", ":9", ":4444"),
        # The very URI consented at, taken while the client is not listening on it.
        ("http://127.0.0.1:9/callback", ":9", ":9"),
        ("http://127.0.0.1:9/callback", ":51234", ":51234"),
        ("http://[::1]:9/callback", ":9", ":4444"),
        ("http://localhost:8765/callback", ":8765", ":8765"),
    ],
)
def test_a_program_on_the_device_gets_no_code_from_a_public_loopback_clients_consent(
    bastion: Bastion, registered: str, consented_at: str, attacked_at: str
):
    """RFC 8252 §8.6: any program on the device can listen on a loopback port and open the
    person's browser on an authorization request of its own, with the client's id and its own
    PKCE challenge. A public client's identity cannot be assured there, so the person is asked
    again, and the page names where the code would go."""
    client = bastion.register(redirect_uris=[registered])
    port = urlsplit(registered).port
    consented_at = registered.replace(f":{port}/", f"{consented_at}/")
    attacked_at = registered.replace(f":{port}/", f"{attacked_at}/")
    browser = consented(bastion, client, consented_at)
    codes = bastion.rows()["oauth_codes"]
    _, challenge = pkce_pair()  # the other program's own
    params = bastion.authorize_params(client, challenge, redirect_uri=attacked_at, state="theirs")
    page = browser.get(f"{bastion.url}/authorize?{urlencode(params)}")
    assert asks_consent(page), page.headers.get("location")
    assert urlsplit(attacked_at).netloc in page.text
    assert bastion.rows()["oauth_codes"] == codes


def test_a_remembered_consent_answers_only_at_the_redirect_uri_it_was_given_at(bastion: Bastion):
    """A public client with a claimed https redirect (RFC 8252 §8.6) is remembered, but only for
    the redirect URI the person saw on the page: another one of the client's asks again."""
    client = bastion.register(
        redirect_uris=["https://agent.example/callback", "https://agent.example/elsewhere"]
    )
    browser = consented(bastion, client, "https://agent.example/callback")
    _, challenge = pkce_pair()
    elsewhere = bastion.authorize_params(
        client, challenge, redirect_uri="https://agent.example/elsewhere"
    )
    page = browser.get(f"{bastion.url}/authorize?{urlencode(elsewhere)}")
    assert asks_consent(page), page.headers.get("location")
    same = bastion.authorize_params(
        client, challenge, redirect_uri="https://agent.example/callback"
    )
    assert "code" in redirect_query(browser.get(f"{bastion.url}/authorize?{urlencode(same)}"))


def test_a_confidential_clients_consent_holds_at_its_redirect_uri_where_a_code_needs_its_secret(
    bastion: Bastion,
):
    """A confidential client proves who it is at the token endpoint: a code taken at its
    loopback redirect by another program is refused without the client's secret, so its consent
    is remembered, for the exact redirect URI (port included) the person saw."""
    client = bastion.register_as_admin(token_endpoint_auth_method="client_secret_basic")
    browser = consented(bastion, client, "http://127.0.0.1:9/callback")
    verifier, challenge = pkce_pair()
    same = bastion.authorize_params(client, challenge)
    code = redirect_query(browser.get(f"{bastion.url}/authorize?{urlencode(same)}"))["code"]
    # Whoever listened on the port holds the code and the verifier, not the secret.
    before = bastion.rows()
    assert_oauth_error(exchange(bastion, client, code, verifier), "invalid_client", 401)
    assert bastion.rows() == before
    other_port = bastion.authorize_params(
        client, challenge, redirect_uri="http://127.0.0.1:4444/callback"
    )
    page = browser.get(f"{bastion.url}/authorize?{urlencode(other_port)}")
    assert asks_consent(page), page.headers.get("location")


def test_a_consent_remembered_before_the_upgrade_asks_again(database_url, tmp_path):
    """A consent remembered before consents named their redirect URI could answer at any: after
    the upgrade it answers at none (fail closed), and the person is asked once more."""
    before = next(i for i, m in enumerate(store._MIGRATIONS) if "DROP TABLE oauth_consents" in m)
    db = Database(database_url)
    db.migrate("oauth", store._MIGRATIONS[:before])  # consents named no redirect URI then
    resource = "http://127.0.0.1:9/mcp"
    db.execute(
        "INSERT INTO oauth_consents (username, client_id, resource, scope, granted_at)"
        " VALUES ('alice', 'web-agent', ?, 'tools:read', 0)",
        (resource,),
    )
    db.close()
    with running_bastion(database_url, tmp_path) as bastion:
        values = registration.validate_client_metadata(
            {"client_name": "Web agent", "redirect_uris": ["https://agent.example/callback"]},
            bastion.server.settings,
        )
        made = registration.new_client(values, source="dynamic", now=bastion.clock())
        bastion.server.store.save_client(replace(made.client, client_id="web-agent"))
        client = {"client_id": "web-agent", "redirect_uris": ["https://agent.example/callback"]}
        _, challenge = pkce_pair()
        browser = httpx.Client(timeout=10)
        login = browser.get(
            f"{bastion.url}/authorize?{urlencode(bastion.authorize_params(client, challenge))}"
        )
        page = browser.post(
            f"{bastion.url}/authorize/login",
            data={**hidden_fields(login.text), "username": "alice", "password": PASSWORD},
        )
        assert asks_consent(page), page.headers.get("location")


def test_pages_forbid_framing(bastion: Bastion):
    client = bastion.register()
    _, challenge = pkce_pair()
    login = bastion.http.get(
        f"{bastion.url}/authorize?{urlencode(bastion.authorize_params(client, challenge))}"
    )
    error = bastion.http.get(f"{bastion.url}/authorize?client_id=nobody")
    for page in (login, error):
        assert page.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-store"


def test_consent_page_names_the_client_and_its_redirect_host_escaped(bastion: Bastion):
    client = bastion.register(client_name="<script>alert(1)</script>")
    _, challenge = pkce_pair()
    browser = httpx.Client()
    page = browser.get(
        f"{bastion.url}/authorize?{urlencode(bastion.authorize_params(client, challenge))}"
    )
    page = browser.post(
        f"{bastion.url}/authorize/login",
        data={
            **hidden_fields(page.text),
            "username": "alice",
            "password": "correct horse battery staple",
        },
    )
    assert "<script>" not in page.text
    assert "&lt;script&gt;" in page.text
    assert "127.0.0.1:9" in page.text


def test_housekeeping_forgets_expired_codes_tokens_and_sessions_but_keeps_grants(bastion: Bastion):
    client = bastion.register()
    bastion.tokens_for(client)
    bastion.clock.advance(bastion.server.settings.refresh_token_seconds + 7200)
    bastion.server.housekeeping()
    rows = bastion.rows()
    for table in ("oauth_codes", "oauth_refresh_tokens", "oauth_access_tokens", "oauth_sessions"):
        assert rows[table] == [], table
    assert len(rows["oauth_grants"]) == 1


def test_a_resource_spelled_with_a_letter_that_is_not_ascii_is_another_resource(
    sqlite_url, tmp_path
):
    """Case is ignored in ASCII alone (RFC 3986 §6.2.2.1; a URI holds no other character): a
    host spelt with the Kelvin sign (U+212A), which str.lower makes a "k", or with İ, names
    no configured resource, at the authorization endpoint, the token endpoint or a refresh.
    Another party that signed for that spelling (an ID-JAG's resource) did not sign for this one."""
    canonical = "http://mcp.bank.localhost:9/mcp"
    spellings = ("http://mcp.ban\u212a.localhost:9/mcp", "HTTP://MCP.BAN\u212a.LOCALHOST:9/mcp")
    with running_bastion(sqlite_url, tmp_path, resource=canonical) as bastion:
        client = bastion.register()
        _, challenge = pkce_pair()
        for spelt in spellings:
            params = bastion.authorize_params(client, challenge, resource=spelt)
            assert shown_error(authorize(bastion, params))["error"] == "invalid_target", spelt
        code, verifier = bastion.code_for(client, resource=canonical)
        before = bastion.rows()
        assert_oauth_error(
            exchange(bastion, client, code, verifier, resource=spellings[0]), "invalid_target"
        )
        assert bastion.rows() == before
        response = exchange(
            bastion, client, code, verifier, resource="HTTP://MCP.BANK.localhost:9/mcp"
        )
        assert response.status_code == 200, response.text
        refresh = {
            "grant_type": "refresh_token",
            "client_id": client["client_id"],
            "refresh_token": response.json()["refresh_token"],
        }
        for spelt in spellings:
            assert_oauth_error(bastion.token(**refresh, resource=spelt), "invalid_target")


def test_a_resource_spelled_with_an_uppercase_scheme_or_host_is_the_same_resource(
    sqlite_url, tmp_path
):
    """MCP authorization (2025-11-25 and 2026-07-28), "Canonical Server URI": "While the
    canonical form uses lowercase scheme and host components, implementations SHOULD accept
    uppercase scheme and host components". The grant and its tokens are for the configured URI;
    the path stays case-sensitive (another path is another resource)."""
    canonical = "http://mcp.localhost:9/mcp"
    with running_bastion(sqlite_url, tmp_path, resource=canonical) as bastion:
        client = bastion.register()
        code, verifier = bastion.code_for(client, resource="HTTP://MCP.LOCALHOST:9/mcp")
        response = exchange(bastion, client, code, verifier, resource="Http://Mcp.Localhost:9/mcp")
        assert response.status_code == 200, response.text
        tokens = response.json()
        verified = bastion.server.verifier.verify(tokens["access_token"], canonical)
        assert verified.audience == (canonical,)
        refresh = {
            "grant_type": "refresh_token",
            "client_id": client["client_id"],
            "refresh_token": tokens["refresh_token"],
        }
        before = bastion.rows()
        assert_oauth_error(
            bastion.token(**refresh, resource="http://mcp.localhost:9/MCP"), "invalid_target"
        )
        assert bastion.rows() == before
        response = bastion.token(**refresh, resource="HTTP://mcp.localhost:9/mcp")
        assert response.status_code == 200, response.text
        _, challenge = pkce_pair()
        params = bastion.authorize_params(client, challenge, resource="http://mcp.localhost:9/MCP")
        assert shown_error(authorize(bastion, params))["error"] == "invalid_target"
