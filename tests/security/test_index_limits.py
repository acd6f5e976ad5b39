"""Values an index cannot take. PostgreSQL indexes no entry over 2,704 bytes, so a value someone
sends that reached an indexed column unbounded was a 500 there (SQLite took it): a fact with an
id of 3,000 characters, a client ID metadata document's URL of as many at /authorize, an
X-Forwarded-For header of as many at a sign-in or an open registration. Each is bounded where it
comes in, on SQLite as on PostgreSQL: a fact up to its bound is stored and one past it is a 422
that names the bound; a longer URL is refused as a client ID; a longer address is counted by its
digest. (The user and agent of a trusted issuer's token: tests/identity/test_trusted_issuers.py;
an upstream's authorization server: tests/connections/test_store_and_settings.py.)"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from bastion.db import Database
from bastion.facts.model import Entity
from bastion.facts.store import MAX_FACT_KEY, FactStore, fact_key
from bastion.oauth.client_metadata_document import MAX_CLIENT_ID_URL
from bastion.oauth.store import OAuthStore
from bastion.oauth.users import create_user
from tests.oauth.support import hidden_fields
from tests.security.conftest import OAUTH
from tests.server.conftest import ADMIN_KEY

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
PASSWORD = "correct horse battery staple"
CONFIG = (
    """
[server]
proxy_headers = true
forwarded_allow_ips = "*"
"""
    + OAUTH
)


def random_text(n: int) -> str:
    """Text PostgreSQL cannot compress into a smaller index entry."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(n))


@pytest.fixture
def bastion(database_url, tmp_path, served):
    server = served(database_url, CONFIG % (tmp_path / "keys"))
    db = Database(database_url)
    create_user(OAuthStore(db), "sam", PASSWORD, time.time(), actor="test")
    db.close()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield server, http, database_url
    assert "Traceback" not in server.log.read_text(), server.log.read_text()[-3000:]


def fact_of_key_length(length: int) -> dict:
    """A has_role fact whose key (`fact_key`) is ``length`` characters."""
    bare = fact_key(("has_role", Entity("User", ""), "reader", Entity("Repo", "anvil")))
    user = random_text(length - len(bare))
    fact = ("has_role", Entity("User", user), "reader", Entity("Repo", "anvil"))
    assert len(fact_key(fact)) == length
    return {"predicate": "has_role", "args": [{"type": "User", "id": user}, "reader", {"type": "Repo", "id": "anvil"}]}  # fmt: skip


def test_a_fact_up_to_the_bound_is_stored_and_a_longer_one_is_refused(bastion):
    server, http, database = bastion
    stored = http.post(
        "/v1/facts", json={"facts": [fact_of_key_length(MAX_FACT_KEY)]}, headers=ADMIN
    )
    assert stored.status_code == 200, stored.text
    store = FactStore.open(database)
    try:
        head = store.head()
        over = fact_of_key_length(MAX_FACT_KEY + 1)
        refused = http.post("/v1/facts", json={"facts": [over]}, headers=ADMIN)
        assert refused.status_code == 422, refused.text
        assert f"at most {MAX_FACT_KEY}" in refused.json()["detail"]
        # The Oso Cloud API refuses it alike.
        args = [{"type": "User", "id": over["args"][0]["id"]}, {"type": "String", "id": "reader"}, {"type": "Repo", "id": "anvil"}]  # fmt: skip
        refused = http.post("/api/batch", json=[{"inserts": [{"predicate": "has_role", "args": args}]}], headers=ADMIN)  # fmt: skip
        assert refused.status_code == 422, refused.text
        assert f"at most {MAX_FACT_KEY}" in refused.json()["message"]
        assert store.head() == head  # nothing written, nothing logged
    finally:
        store.close()


def test_a_client_id_url_longer_than_the_bound_is_refused_as_a_client_id(bastion):
    server, http, _ = bastion
    client_id = "https://client.example/" + random_text(MAX_CLIENT_ID_URL)
    answer = http.get("/authorize", params={"client_id": client_id, "response_type": "code"})
    assert answer.status_code == 400, answer.text
    assert f"longer than {MAX_CLIENT_ID_URL} characters" in answer.text


def test_a_forwarded_address_of_any_length_is_counted_by_its_digest(bastion):
    server, http, database = bastion
    address = random_text(3000)
    forwarded = {"x-forwarded-for": address}
    page = http.get("/sign-in", headers=forwarded)
    wrong = {**hidden_fields(page.text), "username": "sam", "password": "wrong"}
    answer = http.post("/sign-in", data=wrong, headers=forwarded)
    assert answer.status_code == 401, answer.text
    db = Database(database)
    try:
        counters = [row[0] for row in db.execute("SELECT counter FROM oauth_login_failures")]
    finally:
        db.close()
    assert any(re.fullmatch(r"address:sha256:[0-9a-f]{64}", c) for c in counters), counters
    # An open registration from it is counted the same way, and made.
    client = {"client_name": "x", "redirect_uris": ["http://127.0.0.1:9/cb"], "token_endpoint_auth_method": "none"}  # fmt: skip
    assert http.post("/register", json=client, headers=forwarded).status_code == 201
