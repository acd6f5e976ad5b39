"""A user disabled (or whose grants a signal revokes) while a grant for them is being made never
keeps a live grant: each path that makes a grant (consent, CIBA, ID-JAG) reads the user's state
inside the transaction that writes the grant, and the disable or revocation is ordered with it.

Each race is forced, not hoped for: the store method a path calls to check the user before it
writes is wrapped so that, right after that check, the disable or revocation commits on another
thread through another connection to the same database (as another replica would), on SQLite
and on PostgreSQL. The refresh grant and token exchange also refuse a disabled user's grant that
is somehow still live."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from types import SimpleNamespace
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import psycopg
import pytest

from bastion.agents.identity import owner_fact
from bastion.cli import main
from bastion.db import Database
from bastion.oauth.jwt_bearer import JWT_BEARER_GRANT_TYPE
from bastion.oauth.store import Grant, GrantRefused, OAuthStore
from tests.identity.test_id_jag import EnterpriseIdp
from tests.signals.test_ssf import jti_of
from tests.waits import PATIENCE, eventually

from .support import (
    PASSWORD,
    Bastion,
    free_socket,
    hidden_fields,
    pkce_pair,
    running_bastion,
    serve,
)
from .test_ciba import (
    answer,
    assert_oauth_error,
    ciba_client,
    only_pending_url,
    requested,
    signed_in,
    wait_and_poll,
)

IAT = {"Authorization": "Bearer initial-access-token-for-tests"}


@contextmanager
def elsewhere_right_after(
    monkeypatch,
    bastion: Bastion,
    method: str,
    act: Callable[[OAuthStore], object],
    *,
    inside_transaction: bool = False,
):
    """Right after the first call of the server's ``store.<method>`` returns, ``act`` runs on
    another thread with its own connection (another replica, as far as this one can tell) and
    commits before the server goes on; yields an event set once it has run.

    ``inside_transaction``: the method is called in the server's write transaction, so ``act``
    may have to wait for it: the server goes on once ``act`` has committed or waits on a lock
    (PostgreSQL), and ``act`` is waited for when the block ends."""
    store = bastion.server.store
    real = getattr(store, method)
    acted = threading.Event()
    failures: list[BaseException] = []
    role = f"other-replica-{uuid.uuid4().hex[:8]}"
    threads: list[threading.Thread] = []

    def other_replica() -> None:
        db = Database(bastion.db.url, role=role)
        try:
            act(OAuthStore(db))
        except BaseException as e:  # noqa: BLE001 (reported by the test's thread)
            failures.append(e)
        finally:
            db.close()

    def waits_on_a_lock() -> bool:
        with psycopg.connect(bastion.db.url, autocommit=True) as conn:
            return bool(
                conn.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = %s"
                    " AND wait_event_type = 'Lock'",
                    (role,),
                ).fetchall()
            )

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        if not threads:
            thread = threading.Thread(target=other_replica)
            threads.append(thread)
            thread.start()
            if inside_transaction:
                assert eventually(lambda: not thread.is_alive() or waits_on_a_lock())
            else:
                thread.join(PATIENCE)
                assert not thread.is_alive(), f"{method}: the other replica never committed"
            acted.set()
        return result

    monkeypatch.setattr(store, method, wrapped)
    yield acted
    monkeypatch.setattr(store, method, real)
    for thread in threads:
        thread.join(PATIENCE)
        assert not thread.is_alive(), f"{method}: the other replica never committed"
    if failures:
        raise failures[0]


def disable_alice(store: OAuthStore) -> None:
    assert store.disable_user("alice", time.time(), actor="test")


def revoke_alices_grants(store: OAuthStore) -> None:
    store.revoke_user_grants("alice", time.time(), "ssf test: session-revoked", actor="test")


def live_grants(bastion: Bastion, username: str = "alice") -> list:
    return bastion.db.execute(
        "SELECT grant_id FROM oauth_grants WHERE username = ? AND revoked_at IS NULL", (username,)
    )


def at_consent_page(bastion: Bastion, client: dict) -> tuple[httpx.Client, str]:
    """A browser signed in as alice (through the login form) on the consent page of a fresh
    authorization request of ``client``; and that page."""
    browser = httpx.Client(follow_redirects=False, timeout=10)
    _, challenge = pkce_pair()
    params = bastion.authorize_params(client, challenge)
    page = browser.get(f"{bastion.url}/authorize?{urlencode(params)}")
    assert page.status_code == 200, page.text
    page = browser.post(
        f"{bastion.url}/authorize/login",
        data={**hidden_fields(page.text), "username": "alice", "password": PASSWORD},
    )
    assert page.status_code == 200 and "decision" in page.text, page.text
    return browser, page.text


def consent(bastion: Bastion, browser: httpx.Client, page: str) -> httpx.Response:
    return browser.post(
        f"{bastion.url}/authorize/consent", data={**hidden_fields(page), "decision": "allow"}
    )


def no_token_from(bastion: Bastion, client: dict, response: httpx.Response) -> None:
    """The answer to a consent carries no code that could still be redeemed."""
    location = response.headers.get("location", "")
    code = parse_qs(urlsplit(location).query).get("code")
    if code:
        redeemed = bastion.token(
            grant_type="authorization_code",
            code=code[0],
            redirect_uri=client["redirect_uris"][0],
            code_verifier="x" * 43,
            client_id=client["client_id"],
        )
        assert redeemed.status_code == 400, redeemed.text


@pytest.mark.parametrize("act", [disable_alice, revoke_alices_grants], ids=["disable", "revoke"])
def test_a_user_disabled_or_revoked_as_they_consent_keeps_no_grant(
    database_url, tmp_path, monkeypatch, act
):
    with running_bastion(database_url, tmp_path) as bastion:
        client = bastion.register()
        browser, page = at_consent_page(bastion, client)
        with elsewhere_right_after(monkeypatch, bastion, "session_login", act) as acted:
            response = consent(bastion, browser, page)
        assert acted.is_set()
        assert live_grants(bastion) == []
        assert response.status_code == 403, response.text
        no_token_from(bastion, client, response)


@pytest.mark.parametrize("act", [disable_alice, revoke_alices_grants], ids=["disable", "revoke"])
def test_a_user_disabled_or_revoked_while_their_grant_is_written_does_not_keep_it(
    postgres_url, tmp_path, monkeypatch, act
):
    """The other order: the disable or revocation starts once the grant is written but not yet
    committed. It waits for that commit (the user's lock), then finds the grant. (On SQLite the
    write transaction holds the database's one write lock: nothing to force there.)"""
    with running_bastion(postgres_url, tmp_path) as bastion:
        client = bastion.register()
        browser, page = at_consent_page(bastion, client)
        with elsewhere_right_after(
            monkeypatch, bastion, "save_code", act, inside_transaction=True
        ) as acted:
            response = consent(bastion, browser, page)
        assert acted.is_set()
        assert live_grants(bastion) == []
        no_token_from(bastion, client, response)


@pytest.mark.parametrize("act", [disable_alice, revoke_alices_grants], ids=["disable", "revoke"])
def test_a_ciba_approval_redeemed_as_its_user_is_disabled_or_revoked_issues_nothing(
    database_url, tmp_path, monkeypatch, act
):
    with running_bastion(database_url, tmp_path) as bastion:
        client = ciba_client(bastion)
        ack = requested(bastion, client)
        answer(signed_in(bastion, "alice"), only_pending_url(bastion), "approve")
        with elsewhere_right_after(monkeypatch, bastion, "user_password_hash", act) as acted:
            response = wait_and_poll(bastion, client, ack["auth_req_id"])
        assert acted.is_set()
        assert live_grants(bastion) == []
        assert_oauth_error(response, "access_denied")
        assert_oauth_error(wait_and_poll(bastion, client, ack["auth_req_id"]), "access_denied")


@pytest.fixture(scope="module")
def idp():
    provider = EnterpriseIdp()
    with serve(provider.app, free_socket()) as url:
        provider.url = url
        yield provider


@pytest.mark.parametrize("act", [disable_alice, revoke_alices_grants], ids=["disable", "revoke"])
def test_an_id_jag_redeemed_as_its_user_is_disabled_or_revoked_issues_nothing(
    database_url, tmp_path, monkeypatch, idp, act
):
    id_jag = {"issuers": [{"issuer": idp.issuer("acme")}]}
    with running_bastion(database_url, tmp_path, id_jag=id_jag) as bastion:
        registered = bastion.http.post(
            f"{bastion.url}/register",
            json={
                "client_name": "enterprise agent",
                "grant_types": [JWT_BEARER_GRANT_TYPE],
                "token_endpoint_auth_method": "client_secret_basic",
                "scope": "tools:read",
            },
            headers=IAT,
        )
        assert registered.status_code == 201, registered.text
        agent = registered.json()
        # The provider's helper names a gateway's resource by default; this one is bastion's.
        audience = SimpleNamespace(url=bastion.url, mcp_url=lambda _server: bastion.resource)
        assertion = idp.id_jag(audience, agent["client_id"], sub="alice", scope="tools:read")
        with elsewhere_right_after(monkeypatch, bastion, "user_state", act) as acted:
            response = bastion.http.post(
                f"{bastion.url}/token",
                data={"grant_type": JWT_BEARER_GRANT_TYPE, "assertion": assertion},
                auth=(agent["client_id"], agent["client_secret"]),
            )
        assert acted.is_set()
        assert live_grants(bastion) == []
        assert_oauth_error(response, "invalid_grant")


def test_a_refresh_for_a_disabled_user_whose_grant_lives_on_is_refused_and_revokes_it(
    bastion: Bastion,
):
    client = bastion.register()
    tokens = bastion.tokens_for(client)
    # As a disable that missed this grant would leave it: the user disabled, the grant live.
    bastion.db.execute(
        "UPDATE oauth_users SET disabled_at = ? WHERE username = 'alice'", (bastion.clock(),)
    )
    refreshed = bastion.token(
        grant_type="refresh_token",
        refresh_token=tokens["refresh_token"],
        client_id=client["client_id"],
    )
    assert_oauth_error(refreshed, "invalid_grant")
    assert live_grants(bastion) == []


def test_a_code_of_a_disabled_user_whose_grant_lives_on_is_refused_and_revokes_it(
    bastion: Bastion,
):
    client = bastion.register()
    code, verifier = bastion.code_for(client)
    bastion.db.execute(
        "UPDATE oauth_users SET disabled_at = ? WHERE username = 'alice'", (bastion.clock(),)
    )
    redeemed = bastion.token(
        grant_type="authorization_code",
        code=code,
        redirect_uri=client["redirect_uris"][0],
        code_verifier=verifier,
        client_id=client["client_id"],
    )
    assert_oauth_error(redeemed, "invalid_grant")
    assert live_grants(bastion) == []


def test_a_sign_in_from_before_a_disable_makes_no_grant_once_the_user_is_back(database_url):
    """A disable is also a revocation of all the user's grants: if the user is enabled again,
    what rested on a sign-in, approval or assertion from before it stays refused."""
    db = Database(database_url)
    try:
        store = OAuthStore(db)
        store.create_user("alice", "x", time.time(), actor="test")
        signed_in_at = time.time()
        disabled_at = signed_in_at + 1
        assert store.disable_user("alice", disabled_at, actor="test")
        db.execute("UPDATE oauth_users SET disabled_at = NULL WHERE username = 'alice'")
        stale = Grant("g1", "c", "alice", "https://r", "s", disabled_at, disabled_at + 60, None)
        with pytest.raises(GrantRefused, match="revoked after the sign-in"):
            store.create_grant(stale, authorized_at=signed_in_at)
        assert store.user_standing("alice").refusal("alice", signed_in_at) is not None
        fresh = Grant("g2", "c", "alice", "https://r", "s", disabled_at, disabled_at + 60, None)
        store.create_grant(fresh, authorized_at=disabled_at + 1)
    finally:
        db.close()


def test_a_user_enabled_again_is_refused_everything_issued_before_the_disable(
    database_url, tmp_path
):
    """`bastion users enable` lets the person sign in again; the refresh token an agent held
    and a CIBA approval given before the disable stay refused."""
    with running_bastion(database_url, tmp_path) as bastion:
        client = bastion.register()
        tokens = bastion.tokens_for(client)
        agent = ciba_client(bastion)
        ack = requested(bastion, agent)
        answer(signed_in(bastion, "alice"), only_pending_url(bastion), "approve")
        assert bastion.server.store.disable_user("alice", bastion.clock(), actor="test")
        bastion.clock.advance(1)

        assert main(["users", "enable", "alice", "--database", bastion.db.url]) == 0

        refreshed = bastion.token(
            grant_type="refresh_token",
            refresh_token=tokens["refresh_token"],
            client_id=client["client_id"],
        )
        assert_oauth_error(refreshed, "invalid_grant")
        assert_oauth_error(wait_and_poll(bastion, agent, ack["auth_req_id"]), "access_denied")
        assert live_grants(bastion) == []
        # A fresh sign-in (and consent: the disable forgot the old one) works.
        assert bastion.tokens_for(client)["access_token"]
        assert len(live_grants(bastion)) == 1


def test_an_agent_whose_owner_is_disabled_as_it_gets_a_token_keeps_no_grant(
    postgres_url, tmp_path, monkeypatch
):
    """An agent acting as itself (client credentials) asks for a token as its owner is disabled
    through another replica, right after the token endpoint read the owner's state: the disable
    either waits for the grant and revokes it, or the token endpoint finds the owner disabled
    and saves nothing. No grant of an agent whose owner is disabled is left live. (On SQLite the
    token endpoint's transaction holds the one write lock: nothing to force there.)"""
    with running_bastion(postgres_url, tmp_path) as bastion:
        agent = bastion.register_as_admin(
            client_name="alice's build agent",
            token_endpoint_auth_method="client_secret_basic",
            grant_types=["client_credentials"],
            redirect_uris=[],
            scope="tools:read",
        )
        bastion.server.facts.apply([owner_fact(agent["client_id"], "alice")], (), actor="test")
        form = {"grant_type": "client_credentials", "resource": bastion.resource}
        credentials = (agent["client_id"], agent["client_secret"])
        with elsewhere_right_after(
            monkeypatch, bastion, "owner_disabled", disable_alice, inside_transaction=True
        ) as acted:
            answer = bastion.http.post(f"{bastion.url}/token", data=form, auth=credentials)
        assert acted.is_set()
        live = bastion.db.execute(
            "SELECT grant_id FROM oauth_grants WHERE client_id = ? AND revoked_at IS NULL",
            (agent["client_id"],),
        )
        assert live == [], "a grant of an agent whose owner is disabled is live"
        if answer.status_code == 200:
            token = answer.json()["access_token"]
            state = bastion.server.store.access_token_state(jti_of(token))
            assert state is not None and state.revoked
        else:
            assert answer.json()["error"] == "invalid_grant", answer.text
