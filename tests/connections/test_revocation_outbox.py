"""A user's tokens are revoked at the authorization server that issued them even when it is away
at the moment their connection ends, or the process revoking them stops.

The tokens to revoke go into an outbox (``upstream_revocations``, sealed as the connection held
them) in the transaction that deletes the connection; the revocation is tried at once, as
before, and what did not succeed is tried again by any process's sweep with backoff
(`Connections.sweep_revocations`), until the server has answered, refused for good, or the
upstream's ``revocation_retry_seconds`` ran out; each attempt is recorded
(``connection.upstream_revocation``, with ``attempts``). Replicas are two `Connections` over one
database and one key, against a real authorization server served by uvicorn, on SQLite and on
PostgreSQL.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pytest
from cryptography.fernet import Fernet

from bastion.audit.log import AuditLog
from bastion.connections.sealing import Sealer
from bastion.connections.service import Connections
from bastion.connections.settings import UpstreamOAuth
from bastion.connections.store import ConnectionStore, StoredConnection
from bastion.db import Database
from tests.connections.fakes import AuthorizationServer, ResourceMetadata, loopback_base
from tests.oauth.support import Servers, free_socket
from tests.outage_rounds import logged, through_a_cut
from tests.relays import Relay
from tests.waits import PATIENCE

AWAY = (503, {})


@pytest.fixture
def lab(database_url):
    """The authorization server, the clock, and a function making a replica (`Connections`)
    over one database and key (or the ``keys`` given), with the upstream's ``oauth`` table as
    given; ``replica.key`` is the key."""
    sockets = [free_socket() for _ in range(2)]
    server_base, upstream = (loopback_base(s) for s in sockets)
    # It serves the metadata of issuers under its base too (a former server, ``<base>/former``).
    server = AuthorizationServer("as", server_base, client_id="bastion-at-as", under_paths=True)
    resource = ResourceMetadata(upstream, [server_base])
    db = Database(database_url)
    store = ConnectionStore(db)
    key = Fernet.generate_key()
    now = [1000.0]

    def replica(keys: list[bytes] | None = None, **oauth) -> Connections:
        return Connections(
            store,
            Sealer(keys or [key]),
            {"tracker": (f"{upstream}/mcp", UpstreamOAuth(**oauth))},
            "https://bastion.example",
            lambda: now[0],
        )

    replica.key = key
    with Servers() as servers:
        servers.serve(server.app(), sockets[0])
        servers.serve(resource.app(), sockets[1])
        try:
            yield server, now, replica
        finally:
            server.revoking.set()
    db.close()


def _connected(connections: Connections, subject: str = "alice") -> dict:
    """``subject`` connected; the tokens they hold."""
    link = anyio.run(lambda: connections.start(subject, "tracker", browser="b"))
    with httpx.Client(timeout=10) as browser:
        query = parse_qs(urlsplit(browser.get(link).headers["location"]).query)
    state, code = query["state"][0], query["code"][0]
    anyio.run(lambda: connections.finish(subject, "tracker", state, code, browser="b"))
    row = connections.store.get(subject, "tracker")
    return connections.sealer.open(subject, "tracker", row.sealed)


def _attempts(connections: Connections) -> list[tuple]:
    """(outcome, attempts, retry_at) of each ``connection.upstream_revocation``, in order."""
    events = AuditLog(connections.store.db).events("connection.upstream_revocation")
    return [
        (e.detail["outcome"], e.detail["attempts"], e.detail.get("retry_at"))
        for e in sorted(events, key=lambda e: (e.detail["attempts"], e.at))
    ]


def _revoked(server: AuthorizationServer) -> list[tuple[str, str]]:
    return [(form["token"], form["token_type_hint"]) for form in server.revocations]


def test_a_revocation_whose_server_is_away_is_retried_and_done_once_it_is_back(lab):
    server, now, replica = lab
    one = replica()
    tokens = _connected(one)
    server.revocation_refusal = AWAY

    assert anyio.run(lambda: one.revoke("alice", "tracker", actor="user:alice"))

    assert one.store.get("alice", "tracker") is None  # gone from bastion at once, as before
    [pending] = one.store.revocations("alice")
    assert (
        one.sealer.open("alice", "tracker", pending.sealed)["refresh_token"]
        == tokens["refresh_token"]
    )  # sealed as the connection was, never in the clear
    stored = repr(one.store.db.execute("SELECT * FROM upstream_revocations"))
    assert tokens["refresh_token"] not in stored and tokens["access_token"] not in stored
    [(outcome, attempts, retry_at)] = _attempts(one)
    assert outcome.startswith("failed: ") and "503" in outcome
    assert (attempts, retry_at) == (1, now[0] + 60)

    # Not due yet: nobody asks the server again.
    asked = len(server.revocations)
    assert anyio.run(one.sweep_revocations) == 0
    assert len(server.revocations) == asked
    # Due, still away: tried, and put off twice as long.
    now[0] += 61
    assert anyio.run(one.sweep_revocations) == 1
    assert _attempts(one)[-1][1:] == (2, now[0] + 120)
    # Back: another replica's sweep revokes both tokens, and the outbox is empty.
    server.revocation_refusal = None
    now[0] += 121
    before = len(server.revocations)
    assert anyio.run(replica().sweep_revocations) == 1

    assert _revoked(server)[before:] == [
        (tokens["refresh_token"], "refresh_token"),
        (tokens["access_token"], "access_token"),
    ]
    assert _attempts(one)[-1] == ("revoked", 3, None)
    assert one.store.revocations() == []
    events = AuditLog(one.store.db).events("connection.upstream_revocation")
    assert {e.detail["actor"] for e in events} == {"user:alice"}
    assert anyio.run(replica().sweep_revocations) == 0  # done: never sent again


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_revocation_under_way_when_its_process_stops_is_completed_by_another(lab, how):
    """The process revoking is killed (its attempt never ends) or stopped (`close`) while the
    server has not answered: the revocation stays in the outbox. A killed process holds it
    until its lease ends; a stopped one lets it go at once. Another process (or the next start)
    then revokes the tokens."""
    server, now, replica = lab
    one = replica()
    tokens = _connected(one)
    server.revoking.clear()  # the server takes the revocation, and answers only when released

    async def revoking_then_stopped() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: one.revoke("alice", "tracker", actor="user:alice"))
            with anyio.fail_after(PATIENCE):
                while not server.revocations:
                    await anyio.sleep(0.01)
            group.cancel_scope.cancel()  # the process goes away mid-way

    anyio.run(revoking_then_stopped)
    assert one.store.get("alice", "tracker") is None
    assert len(one.store.revocations("alice")) == 1
    two = replica()
    if how == "stopped":
        anyio.run(one.close)
    else:
        assert anyio.run(two.sweep_revocations) == 0  # still held by the killed process
        now[0] += 3 * 10 + 60  # its lease: three times timeout_seconds, and a margin
    server.revoking.set()
    before = len(server.revocations)

    assert anyio.run(two.sweep_revocations) == 1

    assert _revoked(server)[before:] == [
        (tokens["refresh_token"], "refresh_token"),
        (tokens["access_token"], "access_token"),
    ]
    assert _attempts(two) == [("revoked", 2, None)]
    assert two.store.revocations() == []


def test_a_dropped_connections_revocation_left_by_a_killed_process_is_completed(lab):
    """A connection bastion drops (its refresh finds it made at a server the upstream no longer
    names) is revoked at that server in a task after the call's answer: the process ending
    before that task does leaves the revocation in the outbox, and the next process revokes it
    there, with the client bastion registered there."""
    server, now, replica = lab
    one = replica()
    former = f"{server.base}/former"
    registration = one.sealer.seal("", f"tracker {former}", {"client_id": "bastion-at-former"})
    one.store.add_client("tracker", former, registration)
    tokens = {"access_token": "a-former", "refresh_token": "r-former", "issuer": former}
    sealed = one.sealer.seal("alice", "tracker", tokens)
    one.store.put(StoredConnection("alice", "tracker", sealed, "", now[0] - 1, now[0], now[0]))
    server.revoking.clear()

    assert anyio.run(one.access_token, "alice", "tracker") is None  # the process ends here
    [pending] = one.store.revocations("alice")
    assert pending.actor == "bastion"
    server.revoking.set()
    now[0] += 3 * 10 + 60
    before = len(server.revocations)

    assert anyio.run(replica().sweep_revocations) == 1

    revoked = [(f["token"], f["client_id"]) for f in server.revocations[before:]]
    assert revoked == [("r-former", "bastion-at-former"), ("a-former", "bastion-at-former")]
    [(outcome, attempts, retry_at)] = _attempts(one)
    assert (outcome, retry_at) == ("revoked", None)
    assert one.store.revocations() == []


def test_a_refusal_of_the_server_is_final(lab):
    """RFC 7009 §2.2.1: the server refused (here ``unsupported_token_type``): asking again would
    get the same answer, so the revocation is recorded failed and leaves the outbox."""
    server, now, replica = lab
    one = replica()
    _connected(one)
    server.revocation_refusal = (400, {"error": "unsupported_token_type"})

    assert anyio.run(lambda: one.revoke("alice", "tracker", actor="test"))

    [(outcome, attempts, retry_at)] = _attempts(one)
    assert outcome.startswith("failed: unsupported_token_type")
    assert (attempts, retry_at) == (1, None)
    assert one.store.revocations() == []


def test_retries_end_after_revocation_retry_seconds(lab):
    server, now, replica = lab
    one = replica(revocation_retry_seconds=150)
    _connected(one)
    server.revocation_refusal = AWAY
    assert anyio.run(lambda: one.revoke("alice", "tracker", actor="test"))
    now[0] += 61

    assert anyio.run(one.sweep_revocations) == 1  # the next one would be due past the bound

    outcomes = _attempts(one)
    assert [a[1:] for a in outcomes] == [(1, 1060.0), (2, None)]
    assert outcomes[-1][0].startswith("failed: ")
    assert one.store.revocations() == []


def test_revocations_of_an_upstream_no_longer_configured_are_given_up_in_time(lab):
    """A replica tries only the revocations of upstreams it has (an upstream removed from the
    configuration leaves bastion no client to revoke with); their time runs out all the same,
    recorded."""
    server, now, replica = lab
    one = replica(revocation_retry_seconds=500)
    _connected(one)
    server.revocation_refusal = AWAY
    assert anyio.run(lambda: one.revoke("alice", "tracker", actor="test"))
    elsewhere = Connections(
        one.store,
        one.sealer,
        {"other": ("http://127.0.0.1:9/mcp", UpstreamOAuth())},
        "https://bastion.example",
        lambda: now[0],
    )
    now[0] += 100
    assert anyio.run(elsewhere.sweep_revocations) == 0
    assert len(one.store.revocations()) == 1
    now[0] += 400

    assert anyio.run(elsewhere.sweep_revocations) == 0

    assert one.store.revocations() == []
    outcome = _attempts(one)[-1]
    assert outcome == ("failed: not revoked within revocation_retry_seconds", 1, None)


def test_rekey_seals_revocations_still_to_make_again(lab):
    server, now, replica = lab
    one = replica()
    tokens = _connected(one)
    server.revocation_refusal = AWAY
    assert anyio.run(lambda: one.revoke("alice", "tracker", actor="test"))
    new = Fernet.generate_key()

    replica(keys=[new, replica.key]).rekey()

    [pending] = one.store.revocations()
    opened = Sealer([new]).open("alice", "tracker", pending.sealed)
    assert opened["refresh_token"] == tokens["refresh_token"]


def test_a_database_from_before_the_outbox_is_upgraded(database_url):
    """The outbox is the connections' third migration: a database at the second takes it at
    the next start, its connections kept."""
    from bastion.connections.store import _MIGRATIONS

    db = Database(database_url)
    try:
        db.migrate("upstream_connections", _MIGRATIONS[:2])
        db.execute(
            "INSERT INTO upstream_connections (subject, upstream, sealed, scope, expires_at,"
            " created_at, refreshed_at) VALUES ('alice', 'tracker', 'sealed', '', 1, 1, 1)"
        )
        store = ConnectionStore(db)
        assert store.get("alice", "tracker") is not None
        assert store.revocations() == []
    finally:
        db.close()


def test_a_database_outage_is_logged_once_by_the_sweep_not_at_every_round(postgres_url, caplog):
    """Every process sweeps the revocations' outbox (every 30 s); while the database is away each
    sweep fails, and that is said once (a warning at every sweep, before), then once that the
    outbox is swept again. The outage is the test's own: a relay to PostgreSQL it cuts."""
    caplog.set_level(logging.DEBUG, logger="bastion.connections")
    with Relay(("127.0.0.1", 5432)) as relay:
        db = Database(postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}"))
        connections = Connections(
            ConnectionStore(db),
            Sealer([Fernet.generate_key()]),
            {"tracker": ("http://127.0.0.1:9/mcp", UpstreamOAuth())},
            "https://bastion.example",
        )

        said = logged(caplog, "bastion.connections", "outbox")
        try:
            through_a_cut(relay, lambda: connections.sweep_revocations_forever(every=0.01), said)
        finally:
            db.close()
    loud = said(logging.WARNING)
    assert len(loud) == 2 and "could not" in loud[0] and loud[1].endswith(" again"), loud
