"""When the person signed in is kept by the OAuth store, on a real SQLite file and a real
PostgreSQL: with the login session, and with each grant (the migration adds both columns)."""

from __future__ import annotations

from bastion.db import Database
from bastion.oauth.sign_in_context import PASSWORD, UNKNOWN, SignInContext
from bastion.oauth.store import Grant, OAuthStore, SessionLogin
from bastion.oauth.users import create_user


def test_the_sign_in_time_is_kept_with_the_session_and_the_grant(database_url):
    store = OAuthStore(Database(database_url))
    try:
        create_user(store, "sam", "a long enough password", 1000.0, actor="test")
        session = store.create_session("sam", 1000.0, 3600)
        assert store.session_login(session, 1001.0) == SessionLogin("sam", 1000.0, UNKNOWN)
        assert store.session_login(session, 5000.0) is None  # the session has expired
        assert store.session_login("not-a-session", 1001.0) is None
        grant = Grant("g1", "c1", "sam", "https://r.example/mcp", "s", 1000.0, 9000.0, None, 990.0)
        store.create_grant(grant)
        assert store.grant("g1").auth_time == 990.0
        store.create_grant(Grant("g2", "c1", None, "https://r.example/mcp", "s", 1.0, 2.0, None))
        assert store.grant("g2").auth_time is None  # a client acting as itself
    finally:
        store.db.close()


def test_how_the_person_signed_in_is_kept_with_the_session_and_the_grant(database_url):
    store = OAuthStore(Database(database_url))
    mfa = SignInContext("urn:acme:phr", ("pwd", "mfa", "hwk"))
    try:
        create_user(store, "sam", "a long enough password", 1000.0, actor="test")
        session = store.create_session("sam", 1000.0, 3600, mfa)
        assert store.session_login(session, 1001.0) == SessionLogin("sam", 1000.0, mfa)
        typed = store.create_session("sam", 1000.0, 3600, PASSWORD)
        assert store.session_login(typed, 1001.0).sign_in == SignInContext(None, ("pwd",))
        store.create_grant(
            Grant("g1", "c1", "sam", "https://r.example/mcp", "s", 1.0, 9.0, None, 1.0, sign_in=mfa)
        )
        assert store.grant("g1").sign_in == mfa
        store.create_grant(Grant("g2", "c1", None, "https://r.example/mcp", "s", 1.0, 2.0, None))
        assert store.grant("g2").sign_in == UNKNOWN  # a client acting as itself
    finally:
        store.db.close()
