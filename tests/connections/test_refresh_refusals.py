"""What a refused refresh does to a user's connection, against a real token endpoint.

Only ``invalid_grant`` (RFC 6749 §5.2: the refresh token is invalid, expired or revoked) says the
user's grant is gone: the connection is deleted and the next call sends the user to connect
again. Every other refusal is about bastion's client or the server's state (its client secret
changed, a rate limit, a request it does not take): the connection is kept, the call fails with
a clear error, and once the server is fixed the same connection refreshes again. Deleting on
those made one misconfiguration or a 429 cost every user their connection.
"""

from __future__ import annotations

import logging

import anyio
import pytest
from cryptography.fernet import Fernet

from bastion.connections.sealing import Sealer
from bastion.connections.service import Connections, ConnectionUnavailable
from bastion.connections.settings import UpstreamOAuth
from bastion.connections.store import ConnectionStore, StoredConnection
from bastion.db import Database
from bastion.names import SHOWN_CHARS
from tests.connections.fakes import AuthorizationServer, loopback_base
from tests.connections.hostile_text import HOSTILE, assert_escaped_and_cut
from tests.oauth.support import free_socket, serve

NOW = 1000.0


@pytest.fixture
def server():
    """An authorization server whose token endpoint answers its ``refusal`` (status, body), or
    fresh tokens when it has none."""
    sock = free_socket()
    # As the server this module was written against: an access token alone, no new refresh
    # token (RFC 6749 §6 allows it), and no revocation endpoint for bastion to call on a drop.
    refusing = AuthorizationServer(
        "refusing",
        loopback_base(sock),
        registration=False,
        revocation=False,
        issues_refresh_tokens=False,
    )
    with serve(refusing.app(), sock):
        yield refusing


@pytest.fixture
def service(database_url, server):
    base = server.base
    db = Database(database_url)
    oauth = UpstreamOAuth(issuer=base, client_id="bastion", client_secret="s3cret")
    connections = Connections(
        ConnectionStore(db),
        Sealer([Fernet.generate_key()]),
        {"tracker": (f"{base}/mcp", oauth)},
        "https://b",
        lambda: NOW,
    )
    sealed = connections.sealer.seal(
        "alice", "tracker", {"access_token": "old", "refresh_token": "refresh-1"}
    )
    connections.store.put(StoredConnection("alice", "tracker", sealed, "", NOW, 0.0, 0.0))
    yield connections
    db.close()


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (401, {"error": "invalid_client"}),  # bastion's client secret changed there
        (400, {"error": "unauthorized_client"}),
        (400, {"error": "invalid_request", "error_description": "try later"}),
        (400, {"error": "invalid_scope"}),
        (429, {"error": "rate_limited"}),
        (403, {"error": "access_denied"}),
    ],
)
def test_a_refusal_that_is_not_invalid_grant_keeps_the_connection(service, server, status, body):
    server.refusal = (status, body)
    with pytest.raises(ConnectionUnavailable, match=f"tracker.*{body['error']}") as refused:
        anyio.run(service.access_token, "alice", "tracker")
    assert "refresh-1" not in str(refused.value) and "s3cret" not in str(refused.value)
    assert service.store.get("alice", "tracker") is not None
    server.refusal = None  # the server is fixed: the same connection refreshes
    assert anyio.run(service.access_token, "alice", "tracker") == "access-of-refusing-1"


def test_an_answer_that_names_a_member_twice_is_refused_and_keeps_the_connection(service, server):
    """A token endpoint's answer with ``access_token`` twice: which token a parser keeps is
    its own choice (I-JSON, RFC 7493 §2.3). Refused, naming the member, as an answer that is
    not JSON is; the connection is kept as it was, and refreshes once the server is fixed."""
    server.answer_text = (
        b'{"access_token": "access-one", "token_type": "Bearer", "expires_in": 3600,'
        b' "access_token": "access-two"}'
    )
    before = service.store.get("alice", "tracker")
    with pytest.raises(ConnectionUnavailable, match="'access_token' twice"):
        anyio.run(service.access_token, "alice", "tracker")
    assert service.store.get("alice", "tracker") == before
    server.answer_text = None
    assert anyio.run(service.access_token, "alice", "tracker") == "access-of-refusing-1"


def test_invalid_grant_deletes_the_connection_and_the_user_connects_again(service, server):
    server.refusal = (400, {"error": "invalid_grant"})
    assert anyio.run(service.access_token, "alice", "tracker") is None
    assert service.store.get("alice", "tracker") is None
    server.refusal = None
    assert anyio.run(service.access_token, "alice", "tracker") is None  # no refresh, no loop


def test_a_refusals_error_and_description_are_logged_and_told_escaped_and_cut(
    service, server, caplog
):
    """The server writes its ``error`` and ``error_description``: the log line and the call's
    error hold them escaped and cut (`bastion.names.readable`)."""
    server.refusal = (400, {"error": "invalid_grant", "error_description": HOSTILE})
    with caplog.at_level(logging.INFO, logger="bastion.connections"):
        assert anyio.run(service.access_token, "alice", "tracker") is None
    [line] = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert_escaped_and_cut(line)
    assert len(line) < 2 * SHOWN_CHARS + 200

    sealed = service.sealer.seal("alice", "tracker", {"refresh_token": "refresh-1"})
    service.store.put(StoredConnection("alice", "tracker", sealed, "", NOW, 0.0, 0.0))
    server.refusal = (
        400,
        {"error": "slow_down\n\x1b[2J" + "y" * 500, "error_description": HOSTILE},
    )
    with pytest.raises(ConnectionUnavailable) as refused:
        anyio.run(service.access_token, "alice", "tracker")
    said = str(refused.value)
    assert_escaped_and_cut(said)
    assert "slow_down\\u000a\\u001b[2Jy" in said and "y" * 200 not in said
