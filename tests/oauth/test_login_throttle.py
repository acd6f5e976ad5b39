"""The login form is throttled: per username and per address with a doubling backoff (refused
before any password is hashed), a pending request ends after a few failures, and password
hashes are limited per process ("busy" rather than a queue)."""

from __future__ import annotations

import secrets
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

import httpx
import pytest

from bastion.db import Database
from bastion.oauth import sign_in
from bastion.oauth.settings import LoginSettings
from bastion.oauth.store import OAuthStore
from bastion.oauth.throttle import LoginThrottle
from tests.waits import PATIENCE, eventually

from .support import PASSWORD, Bastion, Clock, hidden_fields, pkce_pair, running_bastion


@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """The usernames whose password was checked (hashed), in order."""
    checked: list[str] = []
    real = sign_in.check_password

    def counting(store, username, password):
        checked.append(username)
        return real(store, username, password)

    monkeypatch.setattr(sign_in, "check_password", counting)
    return checked


class LoginForm:
    """A browser at the login page of one pending authorization request."""

    def __init__(self, bastion: Bastion) -> None:
        self.bastion = bastion
        self.browser = httpx.Client(timeout=10)
        client = bastion.register()
        _, challenge = pkce_pair()
        params = bastion.authorize_params(client, challenge)
        page = self.browser.get(f"{bastion.url}/authorize?{urlencode(params)}")
        assert page.status_code == 200
        self.fields = hidden_fields(page.text)

    def sign_in(self, username: str = "alice", password: str = "wrong password") -> httpx.Response:
        return self.browser.post(
            f"{self.bastion.url}/authorize/login",
            data={**self.fields, "username": username, "password": password},
        )


def limits(**login) -> dict:
    return {"login": {"max_failures_per_request": 100, **login}}


def test_guesses_past_the_user_limit_wait_unhashed_and_the_wait_doubles(
    sqlite_url, tmp_path, hashes
):
    with running_bastion(sqlite_url, tmp_path, **limits(max_failures_per_user=3)) as bastion:
        form = LoginForm(bastion)
        for _ in range(3):
            assert form.sign_in().status_code == 401
        assert hashes == ["alice"] * 3
        # Even the right password waits: nothing is hashed, no session is made.
        refused = form.sign_in(password=PASSWORD)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "30"
        assert "Too many failed sign-ins for this username" in refused.text
        assert "Try again in 30 seconds" in refused.text
        assert "bastion_session" not in form.browser.cookies
        assert hashes == ["alice"] * 3
        assert [e.kind for e in bastion.server.audit.events("login.failed")] == ["login.failed"] * 3

        bastion.clock.advance(31)
        assert form.sign_in().status_code == 401  # the fourth failure: now 60 s
        waited = form.sign_in(password=PASSWORD)
        assert waited.status_code == 429 and waited.headers["retry-after"] == "60"
        bastion.clock.advance(61)
        assert form.sign_in(password=PASSWORD).status_code == 200  # the consent page
        assert hashes == ["alice"] * 5
        # Signing in cleared the user's counter.
        assert bastion.server.login_throttle.wait("alice", "192.0.2.1") is None


def test_guesses_of_many_usernames_from_one_address_wait(sqlite_url, tmp_path, hashes):
    settings = limits(max_failures_per_user=100, max_failures_per_address=5)
    with running_bastion(sqlite_url, tmp_path, **settings) as bastion:
        form = LoginForm(bastion)
        for n in range(5):
            assert form.sign_in(username=f"user{n}").status_code == 401
        refused = form.sign_in(username="alice", password=PASSWORD)
        assert refused.status_code == 429 and "from your network" in refused.text
        assert len(hashes) == 5
        # The counter is the address's, not the username's: alice from elsewhere is not held.
        assert bastion.server.login_throttle.wait("alice", "192.0.2.1") is None


def test_a_pending_request_ends_after_its_failures(bastion: Bastion, hashes):
    assert bastion.server.settings.login.max_failures_per_request == 3
    form = LoginForm(bastion)
    assert form.sign_in().status_code == 401
    assert form.sign_in().status_code == 401
    ended = form.sign_in()
    assert ended.status_code == 403 and "start again" in ended.text
    assert bastion.rows()["oauth_pending_authorizations"] == []
    # The right password no longer helps: the request is gone.
    again = form.sign_in(password=PASSWORD)
    assert again.status_code == 400 and "unknown or expired" in again.text
    assert "bastion_session" not in form.browser.cookies
    assert len(hashes) == 3


def test_password_checks_beyond_the_limit_are_answered_busy(sqlite_url, tmp_path, monkeypatch):
    hashing, release = threading.Event(), threading.Event()
    real = sign_in.check_password

    def slow(store, username, password):
        hashing.set()
        release.wait(PATIENCE)
        return real(store, username, password)

    monkeypatch.setattr(sign_in, "check_password", slow)
    settings = limits(max_concurrent_password_checks=1)
    with running_bastion(sqlite_url, tmp_path, **settings) as bastion:
        first, second = LoginForm(bastion), LoginForm(bastion)
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(first.sign_in)
            assert hashing.wait(PATIENCE)
            busy = second.sign_in(password=PASSWORD)
            release.set()
            assert held.result().status_code == 401
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert "busy" in busy.text
        # The refused attempt used none of its request's attempts, and the slot is free again.
        assert second.sign_in(password=PASSWORD).status_code == 200


def test_failure_counters_are_shared_by_every_process_on_the_database(sqlite_url):
    clock = Clock()
    settings = LoginSettings(max_failures_per_user=2)
    one = LoginThrottle(OAuthStore(Database(sqlite_url)), settings, clock, lambda: b"k" * 32)
    other = LoginThrottle(OAuthStore(Database(sqlite_url)), settings, clock, lambda: b"k" * 32)
    one.failed("alice", "192.0.2.1")
    other.failed("alice", "192.0.2.2")
    assert one.wait("alice", "192.0.2.3").counter == "user"
    # A counter restarts once its last failure is a window old.
    clock.advance(settings.failure_window_seconds + 1)
    assert other.wait("alice", "192.0.2.3") is None
    other.failed("alice", "192.0.2.1")
    assert other.wait("alice", "192.0.2.3") is None


@pytest.mark.parametrize("database", ["sqlite_url", "postgres_url"])
def test_guesses_sent_at_once_cannot_pass_the_limit_together(
    database, request, tmp_path, monkeypatch
):
    # Each attempt is counted before its password is hashed, so attempts in parallel (each on
    # its own pending request, each with a free password-check slot) see those before them.
    started: list[str] = []
    release = threading.Event()
    real = sign_in.check_password

    def slow(store, username, password):
        started.append(username)
        release.wait(PATIENCE)
        return real(store, username, password)

    monkeypatch.setattr(sign_in, "check_password", slow)
    url = request.getfixturevalue(database)
    with running_bastion(url, tmp_path, **limits(max_failures_per_user=1)) as bastion:
        first, second = LoginForm(bastion), LoginForm(bastion)
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(first.sign_in)
            assert eventually(lambda: started, every=0.01), "the first password check never began"
            racing = pool.submit(second.sign_in)
            # Either it is refused at once, or its password check begins beside the first.
            eventually(lambda: racing.done() or len(started) >= 2, every=0.01)
            release.set()
            assert held.result().status_code == 401
            assert racing.result().status_code == 429
        assert started == ["alice"]


def test_an_ipv6_network_is_one_address_for_the_counters(sqlite_url):
    # A host is given a whole /64: counted per address, each guess could come from another.
    settings = LoginSettings(max_failures_per_user=100, max_failures_per_address=3)
    throttle = LoginThrottle(OAuthStore(Database(sqlite_url)), settings, Clock(), lambda: b"k" * 32)
    for n in range(3):
        throttle.failed(f"user{n}", f"2001:db8:1:2::{n + 1:x}")
    held = throttle.wait("alice", "2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert held is not None and held.counter == "address"
    assert throttle.wait("alice", "2001:db8:1:3::1") is None  # the next /64 is someone else
    # An IPv4 address is its own; written as IPv4-mapped IPv6 it is the same address.
    for n in range(3):
        throttle.failed(f"user{n}", "192.0.2.7")
    assert throttle.wait("alice", "::ffff:192.0.2.7").counter == "address"
    assert throttle.wait("alice", "192.0.2.8") is None


def test_a_password_typed_as_the_username_is_not_kept_in_the_database(sqlite_url, tmp_path):
    """People type their password into the username field. Such a name is no user, so no audit
    event names it, and its failures are still counted per username: under a keyed digest of the
    name, never the text, which would otherwise sit in the database for the failure window."""
    typed = f"Tr0ub4dor&3-{secrets.token_hex(8)}"
    with running_bastion(sqlite_url, tmp_path, **limits(max_failures_per_user=2)) as bastion:
        form = LoginForm(bastion)
        assert form.sign_in(username=typed).status_code == 401
        assert form.sign_in(username=typed).status_code == 401
        assert form.sign_in(username=typed).status_code == 429  # counted all the same
        assert form.sign_in().status_code == 401  # another name, its own counter
    database = sqlite3.connect(sqlite_url)
    try:
        stored = "\n".join(database.iterdump())
    finally:
        database.close()
    assert "oauth_login_failures" in stored
    assert typed not in stored
