"""OpenID CIBA Core 1.0 in poll mode, over real HTTP: a confidential client asks at
/bc-authorize, the person answers on /bc-approve/<id> signed in with a real login session (made
by the /authorize login flow, as a browser does), and the client polls /token with httpx.

The test clock is moved forward by the interval between polls: nothing sleeps."""

from __future__ import annotations

import base64
import json
import threading
from urllib.parse import urlencode, urlsplit

import httpx
import pytest

from bastion.db import Database
from bastion.facts.model import Entity
from bastion.oauth import registration, store
from bastion.oauth.ciba import CIBA_GRANT_TYPE
from bastion.oauth.sign_in_context import SignInContext
from bastion.oauth.store import digest
from bastion.oauth.users import create_user
from tests import clients
from tests.waits import eventually

from .support import (
    PASSWORD,
    Bastion,
    hidden_fields,
    log_in_and_consent,
    pkce_pair,
    running_bastion,
)
from .test_commands import run, write_config
from .test_introspection_audit import claims

IAT = {"Authorization": "Bearer initial-access-token-for-tests"}
INTERVAL = 5


def assert_oauth_error(response: httpx.Response, error: str, status: int = 400) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error, body
    assert body["error_description"]
    assert response.headers["cache-control"] == "no-store"


def basic(client: dict) -> dict[str, str]:
    raw = f"{client['client_id']}:{client['client_secret']}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def ciba_client(bastion: Bastion, **metadata) -> dict:
    """A confidential client registered (with an initial access token) for the CIBA grant."""
    body = {
        "client_name": "Night agent",
        "token_endpoint_auth_method": "client_secret_basic",
        "grant_types": [CIBA_GRANT_TYPE],
        "redirect_uris": [],
        "scope": "tools:read tools:call",
        **metadata,
    }
    response = bastion.http.post(f"{bastion.url}/register", json=body, headers=IAT)
    assert response.status_code == 201, response.text
    return response.json()


def bc_authorize(bastion: Bastion, client: dict | None, **params) -> httpx.Response:
    form = {
        "login_hint": "alice",
        "scope": "tools:read",
        "resource": bastion.resource,
        "binding_message": "Refund order 4711",
        **params,
    }
    form = {k: v for k, v in form.items() if v is not None}
    headers = basic(client) if client is not None else {}
    return bastion.http.post(f"{bastion.url}/bc-authorize", data=form, headers=headers)


def requested(bastion: Bastion, client: dict, **params) -> dict:
    response = bc_authorize(bastion, client, **params)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    return response.json()


def poll(bastion: Bastion, client: dict, auth_req_id: str, **extra) -> httpx.Response:
    return bastion.http.post(
        f"{bastion.url}/token",
        data={"grant_type": CIBA_GRANT_TYPE, "auth_req_id": auth_req_id, **extra},
        headers=basic(client),
    )


def wait_and_poll(bastion: Bastion, client: dict, auth_req_id: str) -> httpx.Response:
    """Poll as a well-behaved client does: after the interval has passed."""
    bastion.clock.advance(INTERVAL)
    return poll(bastion, client, auth_req_id)


def signed_in(bastion: Bastion, username: str) -> httpx.Client:
    """A browser with a real login session of ``username``: it signed in through the
    /authorize login flow of a public client, as a person would."""
    browser = clients.client(follow_redirects=False, timeout=10)
    public = bastion.register()
    _, challenge = pkce_pair()
    url = f"{bastion.url}/authorize?{urlencode(bastion.authorize_params(public, challenge))}"
    response = log_in_and_consent(bastion.url, url, username, PASSWORD, browser)
    assert response.status_code in (302, 303), response.text
    assert browser.cookies.get("bastion_session")
    return browser


def only_pending_url(bastion: Bastion, username: str = "alice") -> str:
    (shown,) = bastion.server.ciba.pending_for(username)
    return shown["url"]


def answer(browser: httpx.Client, url: str, decision: str) -> httpx.Response:
    page = browser.get(url)
    assert page.status_code == 200, page.text
    return browser.post(url, data={**hidden_fields(page.text), "decision": decision})


def introspecting_client(bastion: Bastion) -> dict:
    """A resource server an admin allowed to introspect (as `bastion clients create
    --introspection` makes one)."""
    values = registration.validate_client_metadata(
        {
            "client_name": "Resource server",
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["client_credentials"],
        },
        bastion.server.settings,
    )
    made = registration.new_client(
        values, source="admin", now=bastion.clock(), introspection_resources=("*",)
    )
    bastion.server.store.save_client(made.client)
    return made.response()


def events(bastion: Bastion, kind: str) -> list:
    return bastion.server.audit.events(kind)


# The flow


@pytest.fixture
def any_database(database_url, tmp_path):
    with running_bastion(database_url, tmp_path) as running:
        yield running


def test_approved_request_is_pending_then_gives_a_token_that_works(any_database: Bastion):
    bastion = any_database
    client = ciba_client(bastion)
    ack = requested(bastion, client, scope="openid tools:call")
    assert set(ack) == {"auth_req_id", "expires_in", "interval"}
    assert ack["expires_in"] == 300 and ack["interval"] == INTERVAL
    assert_oauth_error(wait_and_poll(bastion, client, ack["auth_req_id"]), "authorization_pending")
    assert_oauth_error(wait_and_poll(bastion, client, ack["auth_req_id"]), "authorization_pending")

    browser = signed_in(bastion, "alice")
    page = browser.get(only_pending_url(bastion))
    assert page.status_code == 200
    for shown in ("Night agent", "Refund order 4711", "tools:call", bastion.resource, "alice"):
        assert shown in page.text
    assert ack["auth_req_id"] not in page.text
    done = browser.post(
        only_pending_url(bastion), data={**hidden_fields(page.text), "decision": "approve"}
    )
    assert done.status_code == 200 and "Approved" in done.text
    # Approving is consenting: the first person to do so owns the agent (docs/delegation.md).
    agent = Entity("Agent", client["client_id"])
    owners = [f.fact[3] for f in bastion.server.facts.get(("has_relation", agent, "owner", None))]
    assert owners == [Entity("User", "alice")]

    response = wait_and_poll(bastion, client, ack["auth_req_id"])
    assert response.status_code == 200, response.text
    tokens = response.json()
    assert tokens["token_type"] == "Bearer" and tokens["scope"] == "tools:call"
    assert "refresh_token" not in tokens  # the client has no refresh_token grant
    assert "id_token" not in tokens
    verified = bastion.server.verifier.verify(tokens["access_token"], resource=bastion.resource)
    assert verified.subject == "alice" and verified.client_id == client["client_id"]
    resource_server = introspecting_client(bastion)
    introspected = bastion.http.post(
        f"{bastion.url}/introspect",
        data={"token": tokens["access_token"]},
        headers=basic(resource_server),
    ).json()
    assert introspected["active"] is True
    assert introspected["sub"] == "alice" and introspected["scope"] == "tools:call"
    assert introspected["aud"] == bastion.resource


def test_input_no_user_or_page_could_have_is_refused_on_either_database(any_database: Bastion):
    bastion = any_database
    client = ciba_client(bastion)
    for hint in ("ali\x00ce", " alice", "a" * 129):
        assert_oauth_error(bc_authorize(bastion, client, login_hint=hint), "unknown_user_id")
    browser = signed_in(bastion, "alice")
    for request_id in ("%00", "x" * 65, "%C3%A9t%C3%A9"):
        assert browser.get(f"{bastion.url}/bc-approve/{request_id}").status_code == 404
    assert_oauth_error(poll(bastion, client, "\x00"), "invalid_grant")


def test_the_page_shows_nothing_the_client_could_not_check(bastion: Bastion):
    requested(bastion, ciba_client(bastion), binding_message="<script>x</script> & co")
    page = signed_in(bastion, "alice").get(only_pending_url(bastion))
    assert "<script>x" not in page.text and "&lt;script&gt;x&lt;/script&gt; &amp; co" in page.text
    assert "Unverified application" in page.text  # it registered itself: no one vouches


def test_denied_request_answers_access_denied(bastion: Bastion):
    client = ciba_client(bastion)
    ack = requested(bastion, client)
    done = answer(signed_in(bastion, "alice"), only_pending_url(bastion), "deny")
    assert done.status_code == 200 and "Denied" in done.text
    assert_oauth_error(wait_and_poll(bastion, client, ack["auth_req_id"]), "access_denied")
    assert bastion.server.ciba.pending_for("alice") == []
    assert not bastion.db.execute(
        "SELECT * FROM oauth_grants WHERE client_id = ?", (client["client_id"],)
    )


def test_request_not_answered_in_time_answers_expired_token(bastion: Bastion):
    client = ciba_client(bastion)
    ack = requested(bastion, client)
    url = only_pending_url(bastion)
    bastion.clock.advance(ack["expires_in"])
    assert_oauth_error(poll(bastion, client, ack["auth_req_id"]), "expired_token")
    browser = signed_in(bastion, "alice")
    assert browser.get(url).status_code == 410
    assert bastion.server.ciba.pending_for("alice") == []


def test_an_approval_after_expiry_is_refused(bastion: Bastion):
    client = ciba_client(bastion)
    ack = requested(bastion, client)
    browser = signed_in(bastion, "alice")
    url = only_pending_url(bastion)
    form = hidden_fields(browser.get(url).text)
    bastion.clock.advance(ack["expires_in"])
    late = browser.post(url, data={**form, "decision": "approve"})
    assert late.status_code == 410
    assert_oauth_error(poll(bastion, client, ack["auth_req_id"]), "expired_token")


def test_requested_expiry_sets_how_long_the_request_waits_within_the_limit(bastion: Bastion):
    client = ciba_client(bastion)
    assert requested(bastion, client, requested_expiry="60")["expires_in"] == 60
    assert requested(bastion, client, requested_expiry="99999")["expires_in"] == 1800
    assert requested(bastion, client, requested_expiry="9" * 5000)["expires_in"] == 1800
    short = requested(bastion, client, requested_expiry="60")
    bastion.clock.advance(60)
    assert_oauth_error(poll(bastion, client, short["auth_req_id"]), "expired_token")


def test_polling_faster_than_the_interval_answers_slow_down_and_raises_it(bastion: Bastion):
    client = ciba_client(bastion)
    ack = requested(bastion, client)
    too_soon = poll(bastion, client, ack["auth_req_id"])
    assert_oauth_error(too_soon, "slow_down")
    assert "10 seconds" in too_soon.json()["error_description"]
    # The old interval is no longer enough; the new one is.
    bastion.clock.advance(INTERVAL)
    assert_oauth_error(poll(bastion, client, ack["auth_req_id"]), "slow_down")
    bastion.clock.advance(INTERVAL + 2 * 5)
    assert_oauth_error(poll(bastion, client, ack["auth_req_id"]), "authorization_pending")


def test_waiting_polls_write_no_refusal_rows(bastion: Bastion):
    client = ciba_client(bastion)
    ack = requested(bastion, client)
    poll(bastion, client, ack["auth_req_id"])
    wait_and_poll(bastion, client, ack["auth_req_id"])
    assert events(bastion, "token.refused") == []
    (row,) = events(bastion, "ciba.requested")
    assert row.subject == "alice" and row.client_id == client["client_id"]
    assert row.detail["binding_message"] == "Refund order 4711"


# Who may redeem, who may answer


def test_another_client_cannot_redeem_the_auth_req_id(bastion: Bastion):
    client, thief = ciba_client(bastion), ciba_client(bastion, client_name="Thief")
    ack = requested(bastion, client)
    answer(signed_in(bastion, "alice"), only_pending_url(bastion), "approve")
    bastion.clock.advance(INTERVAL)
    assert_oauth_error(poll(bastion, thief, ack["auth_req_id"]), "invalid_grant")
    # The rightful client is not slowed down by the thief's attempt, and gets its token.
    assert poll(bastion, client, ack["auth_req_id"]).status_code == 200


def test_unauthenticated_clients_are_refused_and_nothing_is_kept(bastion: Bastion):
    client = ciba_client(bastion)
    before = bastion.rows()
    assert_oauth_error(
        bc_authorize(bastion, None, client_id=client["client_id"]), "invalid_client", 401
    )
    wrong = {**client, "client_secret": "not-the-secret"}
    assert_oauth_error(bc_authorize(bastion, wrong), "invalid_client", 401)
    assert bastion.rows() == before
    assert not bastion.db.execute("SELECT * FROM oauth_backchannel_requests")
    ack = requested(bastion, client)
    bastion.clock.advance(INTERVAL)
    response = bastion.http.post(
        f"{bastion.url}/token",
        data={"grant_type": CIBA_GRANT_TYPE, "auth_req_id": ack["auth_req_id"]},
    )
    assert_oauth_error(response, "invalid_client", 401)


def test_a_client_without_the_ciba_grant_is_refused(bastion: Bastion):
    other = bastion.http.post(
        f"{bastion.url}/register",
        json={
            "client_name": "Plain",
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["client_credentials"],
            "scope": "tools:read",
        },
        headers=IAT,
    ).json()
    assert_oauth_error(bc_authorize(bastion, other), "unauthorized_client")
    client = ciba_client(bastion)
    ack = requested(bastion, client)
    bastion.clock.advance(INTERVAL)
    assert_oauth_error(poll(bastion, other, ack["auth_req_id"]), "unauthorized_client")


def test_another_signed_in_user_cannot_see_or_answer_the_request(bastion: Bastion):
    create_user(bastion.server.store, "bob", PASSWORD, bastion.clock(), actor="test")
    client = ciba_client(bastion)
    ack = requested(bastion, client)
    url = only_pending_url(bastion)
    alice_form = hidden_fields(signed_in(bastion, "alice").get(url).text)
    bob = signed_in(bastion, "bob")
    page = bob.get(url)
    assert page.status_code == 403 and "Refund order" not in page.text
    # Not even with a form alice's browser was given.
    assert bob.post(url, data={**alice_form, "decision": "approve"}).status_code == 403
    assert bastion.server.ciba.pending_for("bob") == []
    assert_oauth_error(wait_and_poll(bastion, client, ack["auth_req_id"]), "authorization_pending")
    refused = events(bastion, "ciba.answer_refused")
    assert len(refused) == 2  # the look and the answer
    assert {(r.subject, r.detail["reason"]) for r in refused} == {("bob", "another_user")}


def test_an_answer_without_its_csrf_token_is_refused(bastion: Bastion):
    client = ciba_client(bastion)
    ack = requested(bastion, client)
    url = only_pending_url(bastion)
    browser = signed_in(bastion, "alice")
    assert browser.post(url, data={"decision": "approve"}).status_code == 403
    # A token of another sign-in of the same person (an attacker's own session) is no good.
    other_session_form = hidden_fields(signed_in(bastion, "alice").get(url).text)
    assert browser.post(url, data={**other_session_form, "decision": "approve"}).status_code == 403
    # Nor the token of another request.
    requested(bastion, client, binding_message="Second")
    second = next(
        p["url"]
        for p in bastion.server.ciba.pending_for("alice")
        if p["binding_message"] == "Second"
    )
    second_form = hidden_fields(browser.get(second).text)
    assert browser.post(url, data={**second_form, "decision": "approve"}).status_code == 403
    assert_oauth_error(wait_and_poll(bastion, client, ack["auth_req_id"]), "authorization_pending")


def test_the_page_asks_to_sign_in_and_forbids_framing_and_caching(bastion: Bastion):
    requested(bastion, ciba_client(bastion))
    url = only_pending_url(bastion)
    anonymous = httpx.Client(timeout=10)
    page = anonymous.get(url)
    assert page.status_code == 200 and "Refund order" not in page.text
    link = urlsplit(url).path
    assert f"/sign-in?{urlencode({'next': link})}" in page.text.replace("&amp;", "&")
    assert anonymous.post(url, data={"decision": "approve"}).status_code == 403
    for response in (page, signed_in(bastion, "alice").get(url)):
        assert response.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert response.headers["cache-control"] == "no-store"


def test_a_request_is_answered_once(bastion: Bastion):
    client = ciba_client(bastion)
    ack = requested(bastion, client)
    browser = signed_in(bastion, "alice")
    url = only_pending_url(bastion)
    form = hidden_fields(browser.get(url).text)
    assert browser.post(url, data={**form, "decision": "deny"}).status_code == 200
    assert browser.post(url, data={**form, "decision": "approve"}).status_code == 409
    assert_oauth_error(wait_and_poll(bastion, client, ack["auth_req_id"]), "access_denied")


def test_a_poll_naming_another_resource_than_the_one_approved_is_refused(bastion: Bastion):
    client = ciba_client(bastion)
    ack = requested(bastion, client)
    answer(signed_in(bastion, "alice"), only_pending_url(bastion), "approve")
    bastion.clock.advance(INTERVAL)
    response = poll(bastion, client, ack["auth_req_id"], resource=bastion.other_resource)
    assert_oauth_error(response, "invalid_target")
    assert "differs from" in response.json()["error_description"]
    assert not bastion.db.execute(
        "SELECT * FROM oauth_grants WHERE client_id = ?", (client["client_id"],)
    )
    # Refused, the request is left unspent: polled for its own resource, it gives the token.
    bastion.clock.advance(INTERVAL)
    response = poll(bastion, client, ack["auth_req_id"], resource=bastion.resource)
    assert response.status_code == 200, response.text
    bastion.server.verifier.verify(response.json()["access_token"], resource=bastion.resource)


# When and how the person who approved signed in


def authenticated_at(bastion: Bastion, browser: httpx.Client) -> int:
    """When the browser's login session signed in (OpenID Connect ``auth_time``), as stored."""
    (row,) = bastion.db.execute(
        "SELECT authenticated_at FROM oauth_sessions WHERE session_digest = ?",
        (digest(browser.cookies["bastion_session"]),),
    )
    return int(row[0])


def test_the_token_says_when_and_how_the_person_who_approved_signed_in(any_database: Bastion):
    bastion = any_database
    client = ciba_client(bastion, grant_types=[CIBA_GRANT_TYPE, "refresh_token"])
    browser = signed_in(bastion, "alice")
    # The approval comes long after the sign-in, from the same session: the sign-in is what
    # the token says, as a consent's token does (a policy's requires_recent_auth reads it).
    bastion.clock.advance(3600)
    ack = requested(bastion, client)
    answer(browser, only_pending_url(bastion), "approve")
    tokens = wait_and_poll(bastion, client, ack["auth_req_id"]).json()
    said = {"auth_time": authenticated_at(bastion, browser), "amr": ["pwd"]}
    carried = claims(tokens["access_token"])
    assert {k: carried.get(k) for k in ("auth_time", "amr", "acr")} == {**said, "acr": None}
    refreshed = bastion.http.post(
        f"{bastion.url}/token",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
        headers=basic(client),
    )
    assert refreshed.status_code == 200, refreshed.text
    assert {k: claims(refreshed.json()["access_token"]).get(k) for k in said} == said
    asker = introspecting_client(bastion)
    answered = bastion.http.post(
        f"{bastion.url}/introspect", data={"token": tokens["access_token"]}, headers=basic(asker)
    ).json()
    assert {k: answered.get(k) for k in said} == said


def test_an_identity_providers_acr_and_amr_reach_the_token_through_the_approval(bastion: Bastion):
    """A session made by a sign-in at the company's provider keeps its ``acr`` and ``amr``
    (`bastion.identity.oidc_login` makes it as here); approving from it, the token says so."""
    session = bastion.server.store.create_session(
        "alice", bastion.clock(), 3600, SignInContext("phr", ("hwk", "mfa"))
    )
    browser = clients.client(follow_redirects=False, timeout=10)
    browser.cookies.set("bastion_session", session)
    client = ciba_client(bastion)
    ack = requested(bastion, client)
    answer(browser, only_pending_url(bastion), "approve")
    carried = claims(wait_and_poll(bastion, client, ack["auth_req_id"]).json()["access_token"])
    assert (carried["acr"], carried["amr"]) == ("phr", ["hwk", "mfa"])
    assert carried["auth_time"] == authenticated_at(bastion, browser)


def test_an_approval_counts_no_more_than_a_consent_from_the_same_session(bastion: Bastion):
    """Every grant of alice revoked as of a time after her sign-in and before her answer: a
    revocation that read its clock before she approved and committed after (or ran on a replica
    a second behind). It ended her session; the approval she gave from it is refused, as a
    consent from it is: both rest on the sign-in, not on the click."""
    client = ciba_client(bastion)
    browser = signed_in(bastion, "alice")
    since = bastion.clock()
    ack = requested(bastion, client)
    bastion.clock.advance(60)
    answer(browser, only_pending_url(bastion), "approve")
    bastion.server.store.revoke_user_grants("alice", since + 30, "test", actor="test")
    response = wait_and_poll(bastion, client, ack["auth_req_id"])
    assert_oauth_error(response, "access_denied")
    assert "revoked after the sign-in" in response.json()["error_description"]
    assert not bastion.db.execute(
        "SELECT * FROM oauth_grants WHERE client_id = ?", (client["client_id"],)
    )


def test_a_request_approved_before_the_upgrade_rests_on_no_known_sign_in(database_url, tmp_path):
    """Rows answered by the release before kept no sign-in: such an approval is redeemed with
    a token that says nothing of it while no revocation of all the person's grants was ever
    recorded, and refused once one was, as a legacy session is."""
    added = next(i for i, m in enumerate(store._MIGRATIONS) if "backchannel_requests ADD" in m)
    db = Database(database_url)
    db.migrate("oauth", store._MIGRATIONS[:added])  # the schema of the release before
    db.execute(
        "INSERT INTO oauth_clients (client_id, secret_digest, client_name, redirect_uris,"
        " grant_types, token_endpoint_auth_method, scope, source, may_introspect, metadata,"
        " created_at) VALUES ('night-agent', ?, 'Night agent', '[]', ?,"
        " 'client_secret_basic', 'tools:read', 'admin', 0, '{}', 0)",
        (digest("night-agent-secret"), json.dumps([CIBA_GRANT_TYPE])),
    )
    with running_bastion(database_url, tmp_path) as bastion:
        now = bastion.clock()
        for auth_req_id in ("answered-before-1", "answered-before-2"):
            bastion.db.execute(
                "INSERT INTO oauth_backchannel_requests (auth_req_digest, last_polled_at,"
                " request_id, client_id, username, resource, scope, binding_message,"
                " created_at, expires_at, interval_seconds, status, answered_at, grant_id)"
                " VALUES (?, ?, ?, 'night-agent', 'alice', ?, 'tools:read', NULL, ?, ?, 5,"
                " 'approved', ?, NULL)",
                (digest(auth_req_id), now - 60, auth_req_id, bastion.resource, now - 60,
                 now + 600, now - 30),
            )  # fmt: skip
        client = {"client_id": "night-agent", "client_secret": "night-agent-secret"}
        tokens = poll(bastion, client, "answered-before-1")
        assert tokens.status_code == 200, tokens.text
        assert not {"auth_time", "acr", "amr"} & claims(tokens.json()["access_token"]).keys()
        bastion.server.store.revoke_user_grants("alice", now - 300, "test", actor="test")
        assert_oauth_error(poll(bastion, client, "answered-before-2"), "access_denied")
    db.close()


# Single use


def test_a_replayed_auth_req_id_is_refused_after_its_token(bastion: Bastion):
    client = ciba_client(bastion)
    ack = requested(bastion, client)
    answer(signed_in(bastion, "alice"), only_pending_url(bastion), "approve")
    assert wait_and_poll(bastion, client, ack["auth_req_id"]).status_code == 200
    assert_oauth_error(wait_and_poll(bastion, client, ack["auth_req_id"]), "invalid_grant")
    assert (
        len(
            bastion.db.execute(
                "SELECT * FROM oauth_grants WHERE client_id = ?", (client["client_id"],)
            )
        )
        == 1
    )


def test_two_polls_at_once_get_one_token(bastion: Bastion):
    client = ciba_client(bastion)
    ack = requested(bastion, client)
    answer(signed_in(bastion, "alice"), only_pending_url(bastion), "approve")
    bastion.clock.advance(INTERVAL)
    answers: list[httpx.Response] = []

    def one() -> None:
        with httpx.Client(timeout=10) as http:
            answers.append(
                http.post(
                    f"{bastion.url}/token",
                    data={"grant_type": CIBA_GRANT_TYPE, "auth_req_id": ack["auth_req_id"]},
                    headers=basic(client),
                )
            )

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.status_code for r in answers).count(200) == 1
    assert all(
        r.json()["error"] in ("invalid_grant", "slow_down") for r in answers if r.status_code != 200
    )


def test_polls_at_once_on_two_replicas_get_one_token(postgres_url, tmp_path):
    """Two replicas (two servers, each with its own connections, one PostgreSQL) polled for
    one approved request at the same moment: one token between them, one grant."""
    from starlette.applications import Starlette

    from bastion.oauth import AuthorizationServer

    from .support import free_socket, serve

    with running_bastion(postgres_url, tmp_path) as bastion:
        db = Database(postgres_url)
        replica = AuthorizationServer(bastion.server.settings, db, clock=bastion.clock)
        sock = free_socket()
        with serve(Starlette(routes=replica.routes()), sock) as other:
            client = ciba_client(bastion)
            ack = requested(bastion, client)
            answer(signed_in(bastion, "alice"), only_pending_url(bastion), "approve")
            bastion.clock.advance(INTERVAL)
            start = threading.Barrier(8)
            answers: list[httpx.Response] = []

            def one(url: str) -> None:
                with httpx.Client(timeout=10) as http:
                    start.wait()
                    answers.append(
                        http.post(
                            f"{url}/token",
                            data={"grant_type": CIBA_GRANT_TYPE, "auth_req_id": ack["auth_req_id"]},
                            headers=basic(client),
                        )
                    )

            threads = [threading.Thread(target=one, args=(u,)) for u in [bastion.url, other] * 4]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            issued = [r for r in answers if r.status_code == 200]
            assert len(answers) == 8 and len(issued) == 1, [r.text for r in answers]
            assert {r.json()["error"] for r in answers if r.status_code != 200} <= {
                "invalid_grant",
                "slow_down",
            }
            grants = db.execute(
                "SELECT grant_id FROM oauth_grants WHERE client_id = ?", (client["client_id"],)
            )
            assert len(grants) == 1
            token = issued[0].json()["access_token"]
            for server in (bastion.server, replica):
                assert server.verifier.verify(token, bastion.resource).subject == "alice"
        db.close()


def test_refresh_token_only_with_that_grant_and_it_ends_with_what_was_approved(bastion: Bastion):
    client = ciba_client(bastion, grant_types=[CIBA_GRANT_TYPE, "refresh_token"])
    ack = requested(bastion, client)
    answer(signed_in(bastion, "alice"), only_pending_url(bastion), "approve")
    tokens = wait_and_poll(bastion, client, ack["auth_req_id"]).json()
    refreshed = bastion.http.post(
        f"{bastion.url}/token",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
        headers=basic(client),
    )
    assert refreshed.status_code == 200, refreshed.text
    bastion.clock.advance(3600)  # [oauth.ciba] grant_seconds
    late = bastion.http.post(
        f"{bastion.url}/token",
        data={"grant_type": "refresh_token", "refresh_token": refreshed.json()["refresh_token"]},
        headers=basic(client),
    )
    assert_oauth_error(late, "invalid_grant")


def test_no_token_for_a_person_disabled_after_approving(bastion: Bastion):
    client = ciba_client(bastion)
    ack = requested(bastion, client)
    answer(signed_in(bastion, "alice"), only_pending_url(bastion), "approve")
    bastion.server.store.disable_user("alice", bastion.clock(), actor="test")
    assert_oauth_error(wait_and_poll(bastion, client, ack["auth_req_id"]), "access_denied")


def test_audit_records_request_answer_and_token(bastion: Bastion):
    client = ciba_client(bastion)
    ack = requested(bastion, client)
    answer(signed_in(bastion, "alice"), only_pending_url(bastion), "approve")
    wait_and_poll(bastion, client, ack["auth_req_id"])
    (asked,) = events(bastion, "ciba.requested")
    (approved,) = events(bastion, "ciba.approved")
    issued = [
        e for e in events(bastion, "token.issued") if e.detail.get("grant_type") == CIBA_GRANT_TYPE
    ]
    assert approved.subject == "alice" and approved.detail["channel"] == "web"
    assert (
        approved.detail["request_id"]
        == asked.detail["request_id"]
        == issued[0].detail["request_id"]
    )
    assert issued[0].client_id == client["client_id"]
    requested(bastion, client)
    answer(signed_in(bastion, "alice"), only_pending_url(bastion), "deny")
    (denied,) = events(bastion, "ciba.denied")
    assert denied.subject == "alice"


# Bad requests: the error of CIBA §13 (or RFC 8707), and nothing kept


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"login_hint": "nobody"}, "unknown_user_id"),
        ({"login_hint": None}, "invalid_request"),
        ({"login_hint_token": "x"}, "invalid_request"),
        ({"id_token_hint": "x"}, "invalid_request"),
        ({"user_code": "1234"}, "invalid_request"),
        ({"client_notification_token": "x"}, "invalid_request"),
        ({"request": "eyJ..."}, "invalid_request"),
        ({"binding_message": "x" * 101}, "invalid_binding_message"),
        ({"binding_message": "line\nbreak"}, "invalid_binding_message"),
        ({"binding_message": "\u202eevil"}, "invalid_binding_message"),
        ({"binding_message": " "}, "invalid_binding_message"),
        ({"scope": None}, "invalid_scope"),
        ({"scope": "openid"}, "invalid_scope"),
        ({"scope": "admin"}, "invalid_scope"),
        ({"resource": None}, "invalid_target"),
        ({"resource": "https://elsewhere.example/mcp"}, "invalid_target"),
        ({"requested_expiry": "0"}, "invalid_request"),
        ({"requested_expiry": "-5"}, "invalid_request"),
        ({"requested_expiry": "ten"}, "invalid_request"),
        ({"requested_expiry": "\u0661\u0662"}, "invalid_request"),
    ],
)
def test_bad_requests_are_refused_and_change_nothing(bastion: Bastion, params, error):
    client = ciba_client(bastion)
    before = bastion.rows()
    assert_oauth_error(bc_authorize(bastion, client, **params), error)
    assert bastion.rows() == before
    assert not bastion.db.execute("SELECT * FROM oauth_backchannel_requests")


def test_a_disabled_user_is_an_unknown_user(bastion: Bastion):
    create_user(bastion.server.store, "carol", PASSWORD, bastion.clock(), actor="test")
    bastion.server.store.disable_user("carol", bastion.clock(), actor="test")
    assert_oauth_error(
        bc_authorize(bastion, ciba_client(bastion), login_hint="carol"), "unknown_user_id"
    )


def test_scope_is_limited_to_what_the_client_registered(bastion: Bastion):
    client = ciba_client(bastion, scope="tools:read")
    assert_oauth_error(bc_authorize(bastion, client, scope="tools:call"), "invalid_scope")


def test_a_client_may_have_only_so_many_requests_waiting(sqlite_url, tmp_path):
    with running_bastion(sqlite_url, tmp_path, ciba={"max_pending_per_client": 2}) as bastion:
        client = ciba_client(bastion)
        requested(bastion, client)
        requested(bastion, client)
        assert_oauth_error(bc_authorize(bastion, client), "access_denied", 403)
        answer(
            signed_in(bastion, "alice"), bastion.server.ciba.pending_for("alice")[0]["url"], "deny"
        )
        requested(bastion, client)


def test_unknown_auth_req_id_and_missing_one_are_refused(bastion: Bastion):
    client = ciba_client(bastion)
    assert_oauth_error(poll(bastion, client, "no-such-id"), "invalid_grant")
    response = bastion.http.post(
        f"{bastion.url}/token", data={"grant_type": CIBA_GRANT_TYPE}, headers=basic(client)
    )
    assert_oauth_error(response, "invalid_request")


def test_pending_for_lists_what_waits_for_the_person(bastion: Bastion):
    create_user(bastion.server.store, "bob", PASSWORD, bastion.clock(), actor="test")
    client = ciba_client(bastion)
    requested(bastion, client)
    requested(
        bastion, client, login_hint="bob", binding_message=None, scope="tools:read tools:call"
    )
    (mine,) = bastion.server.ciba.pending_for("alice")
    assert mine["client_name"] == "Night agent" and mine["binding_message"] == "Refund order 4711"
    assert mine["scope"] == "tools:read" and mine["url"] == f"{bastion.url}/bc-approve/{mine['id']}"
    (bobs,) = bastion.server.ciba.pending_for("bob")
    assert bobs["binding_message"] is None and bobs["scope"] == "tools:read tools:call"


# Discovery and registration


def test_metadata_advertises_ciba_poll_mode(bastion: Bastion):
    metadata = bastion.http.get(f"{bastion.url}/.well-known/oauth-authorization-server").json()
    assert metadata["backchannel_authentication_endpoint"] == f"{bastion.url}/bc-authorize"
    assert metadata["backchannel_token_delivery_modes_supported"] == ["poll"]
    assert metadata["backchannel_user_code_parameter_supported"] is False
    assert CIBA_GRANT_TYPE in metadata["grant_types_supported"]


def test_registration_takes_ciba_for_confidential_clients_in_poll_mode_only(bastion: Bastion):
    client = ciba_client(bastion, backchannel_token_delivery_mode="poll")
    assert client["backchannel_token_delivery_mode"] == "poll"
    for metadata, status in (
        ({"token_endpoint_auth_method": "none"}, 400),
        ({"backchannel_token_delivery_mode": "ping"}, 400),
        ({"backchannel_token_delivery_mode": "push"}, 400),
    ):
        body = {
            "client_name": "Night agent",
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": [CIBA_GRANT_TYPE],
            **metadata,
        }
        response = bastion.http.post(f"{bastion.url}/register", json=body, headers=IAT)
        assert response.status_code == status, response.text
        assert response.json()["error"] == "invalid_client_metadata"
    # Open registration (no initial access token) is for public clients only.
    open_one = bastion.http.post(
        f"{bastion.url}/register",
        json={
            "client_name": "Night agent",
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": [CIBA_GRANT_TYPE],
        },
    )
    assert open_one.status_code == 401


def test_cli_creates_a_ciba_client(capsys, monkeypatch, sqlite_url, tmp_path):
    config = write_config(tmp_path, sqlite_url)
    code, out, err = run(
        capsys,
        monkeypatch,
        "clients",
        "create",
        "--name",
        "Night agent",
        "--confidential",
        "--grant-type",
        CIBA_GRANT_TYPE,
        "--grant-type",
        "refresh_token",
        "--config",
        config,
    )
    assert code == 0, err
    created = json.loads(out)
    assert created["grant_types"] == [CIBA_GRANT_TYPE, "refresh_token"]
    assert created["backchannel_token_delivery_mode"] == "poll"
    code, _, err = run(
        capsys,
        monkeypatch,
        "clients",
        "create",
        "--name",
        "Public",
        "--grant-type",
        CIBA_GRANT_TYPE,
        "--config",
        config,
    )
    assert code == 2 and "confidential" in err


def test_ciba_settings_are_checked(tmp_path):
    from bastion.oauth.settings import SettingsError

    from .support import make_settings

    def settings(**ciba):
        return make_settings(
            "https://auth.example.com",
            "https://mcp.example.com/mcp",
            "https://o.example/mcp",
            str(tmp_path),
            ciba=ciba,
        )

    assert settings().ciba.interval_seconds == 5
    assert settings(interval_seconds=10).ciba.interval_seconds == 10
    with pytest.raises(SettingsError, match="oauth.ciba: unknown keys"):
        settings(poll_seconds=3)
    with pytest.raises(SettingsError, match="oauth.ciba.interval_seconds"):
        settings(interval_seconds=0)
    with pytest.raises(SettingsError, match="may not exceed"):
        settings(request_seconds=600, max_request_seconds=300)
    with pytest.raises(SettingsError, match="outlive what the person approved"):
        settings(grant_seconds=60)


def test_a_public_client_cannot_ask(bastion: Bastion):
    public = bastion.register()
    response = bastion.http.post(
        f"{bastion.url}/bc-authorize",
        data={
            "client_id": public["client_id"],
            "login_hint": "alice",
            "scope": "tools:read",
            "resource": bastion.resource,
        },
    )
    assert_oauth_error(response, "unauthorized_client")
    assert not bastion.db.execute("SELECT * FROM oauth_backchannel_requests")


def test_housekeeping_forgets_spent_requests_once_a_replay_no_longer_matters(bastion: Bastion):
    client = ciba_client(bastion)
    ack = requested(bastion, client)
    answer(signed_in(bastion, "alice"), only_pending_url(bastion), "approve")
    assert wait_and_poll(bastion, client, ack["auth_req_id"]).status_code == 200
    bastion.clock.advance(ack["expires_in"] + bastion.server.settings.leeway_seconds + 3600)
    bastion.server.housekeeping()
    assert not bastion.db.execute("SELECT * FROM oauth_backchannel_requests")
    assert_oauth_error(poll(bastion, client, ack["auth_req_id"]), "invalid_grant")


def test_with_the_database_out_of_reach_nothing_is_issued_and_no_request_is_lost(outage, tmp_path):
    """PostgreSQL taken away from this bastion: polls and the page answer 503 (the app's own
    handler), never a token; once it is back, the approved request gives its token."""
    from starlette.applications import Starlette

    from bastion.db import Database, DatabaseUnavailable
    from bastion.oauth import AuthorizationServer
    from bastion.server.app import database_unavailable

    from .support import Clock, free_socket, make_settings, serve

    role = outage.role()
    sock = free_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    resource, other = "http://127.0.0.1:9/mcp", "http://127.0.0.1:9/other-mcp"
    clock = Clock()
    db = Database(outage.url(role))
    server = AuthorizationServer(
        make_settings(url, resource, other, str(tmp_path / "keys")), db, clock=clock
    )
    create_user(server.store, "alice", PASSWORD, clock(), actor="test")
    app = Starlette(
        routes=server.routes(), exception_handlers={DatabaseUnavailable: database_unavailable}
    )
    with serve(app, sock), httpx.Client(timeout=10) as http:
        bastion = Bastion(server, url, resource, other, clock, http)
        client = ciba_client(bastion)
        ack = requested(bastion, client)
        page_url = only_pending_url(bastion)
        browser = signed_in(bastion, "alice")
        form = hidden_fields(browser.get(page_url).text)

        outage.block(role)
        assert_oauth_error(
            wait_and_poll(bastion, client, ack["auth_req_id"]), "temporarily_unavailable", 503
        )
        assert browser.post(page_url, data={**form, "decision": "approve"}).status_code == 503
        assert_oauth_error(bc_authorize(bastion, client), "temporarily_unavailable", 503)

        outage.unblock(role)
        answers: list[httpx.Response] = []

        def answered() -> bool:  # once the database connection is made again
            answers.append(browser.post(page_url, data={**form, "decision": "approve"}))
            return answers[-1].status_code != 503

        eventually(answered, every=0.1)
        assert answers[-1].status_code == 200, answers[-1].text
        response = wait_and_poll(bastion, client, ack["auth_req_id"])
        assert response.status_code == 200, response.text
    db.close()


def test_a_revoked_client_can_no_longer_be_approved_or_poll(bastion: Bastion):
    client = ciba_client(bastion)
    ack = requested(bastion, client)
    url = only_pending_url(bastion)
    browser = signed_in(bastion, "alice")
    form = hidden_fields(browser.get(url).text)
    assert bastion.server.store.revoke_client(client["client_id"], bastion.clock(), actor="test")
    assert bastion.server.ciba.pending_for("alice") == []
    assert browser.get(url).status_code == 410
    assert browser.post(url, data={**form, "decision": "approve"}).status_code == 410
    assert_oauth_error(wait_and_poll(bastion, client, ack["auth_req_id"]), "invalid_client", 401)
    assert not events(bastion, "ciba.approved")


def test_a_suspended_person_can_neither_see_nor_answer_a_request(bastion: Bastion):
    from bastion.facts.store import StoredFact
    from bastion.signals.suspensions import PREDICATE, Suspensions

    bastion.server.suspensions = view = Suspensions(bastion.clock)
    alice = Entity("User", "alice")
    client = ciba_client(bastion)
    ack = requested(bastion, client)
    url = only_pending_url(bastion)
    browser = signed_in(bastion, "alice")
    form = hidden_fields(browser.get(url).text)
    view.apply([StoredFact((PREDICATE, alice))], ())
    page = browser.get(url)
    answered = browser.post(url, data={**form, "decision": "approve"})
    for refused in (page, answered):
        assert refused.status_code == 403, refused.text
        assert "suspended" in refused.text and "Refund order" not in refused.text
    assert_oauth_error(wait_and_poll(bastion, client, ack["auth_req_id"]), "authorization_pending")
    # Resumed, the same session answers.
    view.apply([], [(PREDICATE, alice)])
    assert answer(browser, url, "approve").status_code == 200
    assert wait_and_poll(bastion, client, ack["auth_req_id"]).status_code == 200
