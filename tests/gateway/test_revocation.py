"""Tokens are remembered between calls, yet a revocation committed anywhere (this server, another
process on the same database) refuses the token on its very next call."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time

import pytest

from bastion.oauth.verifier import VerifiedTokens
from tests.waits import PATIENCE

ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}
HEADERS = {
    "content-type": "application/json",
    "accept": "application/json",  # JSON however long it takes (httpx's */* takes events)
    "mcp-protocol-version": "2026-07-28",
    "mcp-method": "tools/call",
    "mcp-name": "search_customers",
}
CALL = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/call",
    "params": {"name": "search_customers", "arguments": {"query": "a"}, "_meta": ENVELOPE},
}

# Run in a process of its own: revoke a token (``jti``) or its whole grant on the database.
REVOKE = """
import sys, time
from bastion.db import Database
from bastion.oauth.store import OAuthStore
database, what, jti = sys.argv[1:]
store = OAuthStore(Database(database))
if what == "token":
    store.revoke_access_token(jti, time.time())
else:
    grant_id = store.access_token_state(jti).grant_id
    store.revoke_grant(grant_id, time.time(), "revoked by another process", actor="test")
"""


def call(bastion, token):
    return bastion.http.post(
        bastion.mcp_url("deskhttp"),
        json=CALL,
        headers={**HEADERS, "authorization": f"Bearer {token}"},
    )


def jti(token: str) -> str:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]


@pytest.mark.parametrize("what", ["token", "grant"])
def test_a_revocation_by_another_process_refuses_the_next_call(bastion, what):
    token = bastion.token("sam", "deskhttp")
    for _ in range(3):  # verified once, then remembered
        assert "error" not in call(bastion, token).json()
    subprocess.run(
        [sys.executable, "-c", REVOKE, bastion.app.state.config.database, what, jti(token)],
        check=True,
        timeout=60,
    )
    response = call(bastion, token)
    assert response.status_code == 401
    assert "revoked" in response.headers["www-authenticate"]


def test_a_revocation_by_this_server_refuses_the_next_call(bastion):
    token = bastion.token("sam", "deskhttp")
    assert "error" not in call(bastion, token).json()
    revoked = bastion.http.post(
        f"{bastion.url}/revoke", data={"token": token, "client_id": client_id(token)}
    )
    assert revoked.status_code == 200, revoked.text
    assert call(bastion, token).status_code == 401


def client_id(token: str) -> str:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["client_id"]


def test_a_remembered_token_is_refused_once_it_expires(bastion):
    oauth = bastion.app.state.oauth
    token = bastion.token("sam", "deskhttp")
    tokens = VerifiedTokens(oauth.verifier, bastion.app.state.config.database)
    try:
        resource = bastion.mcp_url("deskhttp")
        verified = tokens.verify(token, resource)
        assert tokens.remembered(token, resource) == verified
        saved = oauth.verifier.clock
        oauth.verifier.clock = lambda: time.time() + 3 * 3600
        try:
            assert tokens.remembered(token, resource) is None
        finally:
            oauth.verifier.clock = saved
        assert tokens.remembered(token, bastion.mcp_url("desk")) is None  # another audience
    finally:
        tokens.close()


def test_the_event_loop_does_not_wait_for_a_worker_using_the_token_states_connection(bastion):
    """On SQLite a remembered token asked for on the event loop reads ``data_version`` on the
    connection worker threads read token states on: while one of them holds it, the loop is
    told to ask from a worker (``"off_loop"``) instead of waiting for that statement."""
    oauth = bastion.app.state.oauth
    token = bastion.token("sam", "deskhttp")
    tokens = VerifiedTokens(oauth.verifier, bastion.app.state.config.database)
    resource = bastion.mcp_url("deskhttp")
    held, done = threading.Event(), threading.Event()
    waited: list[bool] = []

    def worker_statement() -> None:
        with tokens.db._lock:
            held.set()
            # A deadline, not a figure: let go of at once unless the answer below waited.
            waited.append(not done.wait(PATIENCE))

    worker = threading.Thread(target=worker_statement)
    try:
        verified = tokens.verify(token, resource)
        worker.start()
        assert held.wait(PATIENCE)
        answer = tokens.remembered(token, resource, on_loop=True)
        done.set()
        worker.join()
        assert (answer, waited) == ("off_loop", [False])
        assert tokens.remembered(token, resource) == verified  # from a worker: read, valid
    finally:
        done.set()
        tokens.close()


def test_calls_reuse_one_keep_alive_connection_to_the_upstream(bastion):
    token = bastion.token("sam", "deskhttp")
    before = len(bastion.recorder.requests)
    for _ in range(4):
        assert "error" not in call(bastion, token).json()
    clients = {r["client"] for r in bastion.recorder.requests[before:]}
    assert len(clients) == 1, clients
