"""A user's grant goes back only to the authorization server that issued it.

Without ``oauth.issuer`` the upstream's own protected-resource metadata (RFC 9728) names its
authorization server, read again when its lifetime ends: another replica, or the same one
later, may read another name there (the upstream moved, or a hostile or compromised upstream names a
server of its own). A code, a PKCE verifier, a refresh token or a token to revoke is sent only
to the server that issued it (or that the flow was started with): a grant of one server posted
to another's token endpoint is that server's to redeem at the first one (bastion's client there
is public, dynamic registration), the mix-up of RFC 9700 §4.4 across time instead of across
upstreams. Each scenario runs on two `Connections` over one database and one key, as two
replicas are, against real authorization servers served by uvicorn. A connection dropped because
its server changed is revoked there after the call that dropped it has its answer: the tests
wait for that revocation in the call's event loop, where it goes on (`answered_then`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pytest
from cryptography.fernet import Fernet

from bastion.audit.log import AuditLog
from bastion.connections.sealing import Sealer
from bastion.connections.service import Connections, ConnectionUnavailable, FlowRefused
from bastion.connections.settings import UpstreamOAuth
from bastion.connections.store import ConnectionStore, StoredConnection
from bastion.db import Database
from tests.connections.fakes import AuthorizationServer, ResourceMetadata, loopback_base
from tests.oauth.support import Servers, free_socket
from tests.waits import PATIENCE, eventually_async


@pytest.fixture
def moved(database_url):
    """``first`` and ``second`` authorization servers, an upstream whose protected-resource
    metadata names ``named[0]``, the clock, a function making a replica (`Connections`) over
    one database and key, a ``third`` server the upstream never names, and the upstream's
    metadata (``resource.reads``: how many times it was read)."""
    sockets = [free_socket() for _ in range(4)]
    first_base, second_base, upstream, third_base = (loopback_base(s) for s in sockets)
    # Each authorizes at once and registers bastion's client as bastion-at-<its name>.
    first, second, third = (
        AuthorizationServer(name, base, client_id=f"bastion-at-{name}")
        for name, base in (("first", first_base), ("second", second_base), ("third", third_base))
    )
    named: list[str] = [""]
    resource = ResourceMetadata(upstream, named)
    db = Database(database_url)
    store = ConnectionStore(db)
    key = Fernet.generate_key()
    now = [1000.0]

    def replica() -> Connections:
        return Connections(
            store,
            Sealer([key]),
            {"tracker": (f"{upstream}/mcp", UpstreamOAuth())},
            "https://bastion.example",
            lambda: now[0],
        )

    with Servers() as servers:
        apps = (first.app(), second.app(), resource.app(), third.app())
        for app, sock in zip(apps, sockets, strict=True):
            servers.serve(app, sock)
        named[0] = first.base
        try:
            yield first, second, named, now, replica, third, resource
        finally:
            first.revoking.set()  # a revocation a test held is answered, and the server stops
    db.close()


def _authorized(link: str) -> tuple[str, str]:
    """The state and code the authorization server sends the browser back with."""
    with httpx.Client(timeout=10) as browser:
        location = browser.get(link).headers["location"]
    query = parse_qs(urlsplit(location).query)
    return query["state"][0], query["code"][0]


def answered_then(call: Callable[[], Awaitable[Any]], done: Callable[[], object]) -> Any:
    """What ``call`` answers, once ``done()`` holds too: asked in the call's event loop, where a
    dropped connection's revocation goes on after the answer (within a deadline, not a time)."""

    async def answered() -> Any:
        answer = await call()
        assert await eventually_async(done, every=0.01), "what the call set going never ended"
        return answer

    return anyio.run(answered)


def revocations_recorded(connections: Connections, count: int = 1) -> Callable[[], bool]:
    """Whether ``count`` revocations have been recorded (``connection.upstream_revocation``, the
    last thing a revocation does: its server's answers are in)."""
    log = AuditLog(connections.store.db)
    return lambda: len(log.events("connection.upstream_revocation")) >= count


def _connected(connections: Connections) -> None:
    state, code = _authorized(anyio.run(lambda: connections.start("alice", "tracker", browser="b")))
    anyio.run(lambda: connections.finish("alice", "tracker", state, code, browser="b"))


def test_a_code_goes_only_to_the_server_its_flow_was_started_with(moved):
    first, second, named, _, replica, *_ = moved
    one = replica()
    link = anyio.run(lambda: one.start("alice", "tracker", browser="b"))
    named[0] = second.base  # the upstream now names another server; replica two reads that
    state, code = _authorized(link)

    with pytest.raises(FlowRefused, match="started with .* authorization server") as refused:
        anyio.run(lambda: replica().finish("alice", "tracker", state, code, browser="b"))

    assert refused.value.status == 400
    assert second.posted == []  # neither the code nor the PKCE verifier reached it
    assert first.posted == []
    assert one.listed("alice") == []


def test_a_refresh_token_goes_only_to_the_server_that_issued_it(moved):
    first, second, named, now, replica, *_ = moved
    one = replica()
    _connected(one)
    [issued] = [f for f in first.posted if f["grant_type"] == "authorization_code"]
    named[0] = second.base
    two = replica()
    now[0] += 7200  # the access token has expired: the next call refreshes it

    assert anyio.run(two.access_token, "alice", "tracker") is None  # connect again

    assert second.posted == []  # the refresh token issued by the first server stayed here
    granted = [f["grant_type"] for f in first.posted if "grant_type" in f]
    assert granted == ["authorization_code"]  # never refreshed; revoked (below)
    assert issued["code"].startswith("code-of-first-")
    # Connecting again, at the server the upstream names now, replaces the connection.
    _connected(two)
    assert anyio.run(two.access_token, "alice", "tracker").startswith("access-of-second-")


def _stored_tokens(connections: Connections, subject: str) -> dict:
    return connections.sealer.open(
        subject, "tracker", connections.store.get(subject, "tracker").sealed
    )


def _revocations(server: AuthorizationServer) -> list[tuple[str, str, str]]:
    """(token, its hint, the client that asked) of every revocation the server was sent."""
    return [(f["token"], f["token_type_hint"], f["client_id"]) for f in server.revocations]


def test_a_token_is_revoked_only_at_the_server_that_issued_it(moved):
    """Revoked by the user after the upstream moved: at the server that issued the tokens (its
    own metadata, bastion's client there), never at the one the upstream names now."""
    first, second, named, _, replica, *_ = moved
    _connected(replica())
    named[0] = second.base
    two = replica()
    held = _stored_tokens(two, "alice")

    assert anyio.run(lambda: two.revoke("alice", "tracker", actor="test"))

    assert second.posted == []
    assert _revocations(first) == [
        (held["refresh_token"], "refresh_token", "bastion-at-first"),
        (held["access_token"], "access_token", "bastion-at-first"),
    ]
    assert two.store.get("alice", "tracker") is None  # gone from bastion either way
    [event] = AuditLog(two.store.db).events("connection.upstream_revocation")
    assert event.detail["outcome"] == "revoked"


@pytest.mark.parametrize("why", ["expired", "refused"])
def test_a_connection_whose_server_changed_is_dropped_and_recorded(moved, why):
    """Its refresh token can go nowhere now: the connection is deleted (not kept to fail each
    refresh again), the user is asked to connect anew, and the drop is audited; whether the
    refresh was due to the token's expiry or to the upstream's 401."""
    first, second, named, now, replica, *_ = moved
    one = replica()
    _connected(one)
    token = anyio.run(one.access_token, "alice", "tracker")
    named[0] = second.base
    two = replica()
    if why == "expired":
        now[0] += 7200
        assert anyio.run(two.access_token, "alice", "tracker") is None
    else:
        assert anyio.run(two.access_token_refused, "alice", "tracker", token) is None

    assert two.store.get("alice", "tracker") is None
    assert anyio.run(one.access_token, "alice", "tracker") is None  # on every replica
    assert second.posted == []
    [event] = AuditLog(two.store.db).events("connection.dropped")
    assert (event.subject, event.detail["upstream"]) == ("alice", "tracker")
    assert f"issued by {first.base}" in event.detail["reason"]
    assert second.base in event.detail["reason"]


def test_a_replica_that_read_the_former_server_keeps_a_connection_made_at_the_new_one(moved):
    """A rolling restart: replica one still holds the first server's metadata when it meets a
    connection made at the second. It reads the upstream's metadata again, once, finds the
    connection's server named there, and refreshes it there; after that it uses what it read."""
    first, second, named, now, replica, _, resource = moved
    one = replica()
    _connected(one)  # one reads the first server
    named[0] = second.base
    _connected(replica())  # alice connects again, at the second server, on a restarted replica
    before = resource.reads
    now[0] += 7200

    token = anyio.run(one.access_token, "alice", "tracker")

    assert token is not None and token.startswith("access-of-second-")
    assert resource.reads == before + 1
    assert AuditLog(one.store.db).events("connection.dropped") == []
    assert [f.get("grant_type") for f in second.posted] == ["authorization_code", "refresh_token"]
    assert [f.get("grant_type") for f in first.posted] == ["authorization_code"]
    now[0] += 7200  # the next refresh: replica one now knows the second server
    assert anyio.run(one.access_token, "alice", "tracker").startswith("access-of-second-")
    # Read once more because its lifetime (an hour) ended, not for the connection.
    assert resource.reads == before + 2


def test_a_connection_naming_a_server_the_upstream_never_named_is_dropped_after_one_reread(moved):
    """A row whose server the upstream's metadata still does not name once read again is
    dropped as before; a second such row within the interval does not make the metadata read
    again (rows cannot make every call fetch). bastion holds no client at that server, so its
    tokens are sent nowhere, and the revocation record says why."""
    first, second, named, now, replica, third, resource = moved
    one = replica()
    anyio.run(one.clients["tracker"].metadata)  # one reads the first server
    for subject in ("bob", "carol"):
        tokens = {"access_token": f"a-{subject}", "refresh_token": f"r-{subject}"}
        sealed = one.sealer.seal(subject, "tracker", {**tokens, "issuer": third.base})
        one.store.put(StoredConnection(subject, "tracker", sealed, "", now[0] - 1, 0.0, 0.0))
    before = resource.reads

    recorded = revocations_recorded(one)
    assert answered_then(partial(one.access_token, "bob", "tracker"), recorded) is None
    assert resource.reads == before + 1
    recorded = revocations_recorded(one, 2)
    assert answered_then(partial(one.access_token, "carol", "tracker"), recorded) is None
    assert resource.reads == before + 1  # within the interval: not read again

    assert one.listed() == []
    dropped = AuditLog(one.store.db).events("connection.dropped")
    assert sorted(e.subject for e in dropped) == ["bob", "carol"]
    assert all(f"issued by {third.base}" in e.detail["reason"] for e in dropped)
    assert (first.posted, second.posted, third.posted) == ([], [], [])
    outcomes = AuditLog(one.store.db).events("connection.upstream_revocation")
    assert sorted(e.subject for e in outcomes) == ["bob", "carol"]
    for event in outcomes:
        assert event.detail["outcome"].startswith("failed: bastion holds no client")
        assert third.base in event.detail["outcome"]


@pytest.mark.parametrize("why", ["expired", "refused"])
def test_a_dropped_connection_is_revoked_at_the_server_that_issued_it(moved, why):
    """The upstream moved for good: the connection made at the first server is dropped, and its
    tokens are revoked at the first server's revocation endpoint with bastion's client there;
    the second server never sees them. The call still answers "connect again"."""
    first, second, named, now, replica, *_ = moved
    one = replica()
    _connected(one)
    held = _stored_tokens(one, "alice")
    named[0] = second.base
    two = replica()
    if why == "expired":
        now[0] += 7200
        call = partial(two.access_token, "alice", "tracker")
    else:
        call = partial(two.access_token_refused, "alice", "tracker", held["access_token"])

    assert answered_then(call, revocations_recorded(two)) is None

    assert two.store.get("alice", "tracker") is None
    assert second.posted == []
    assert _revocations(first) == [
        (held["refresh_token"], "refresh_token", "bastion-at-first"),
        (held["access_token"], "access_token", "bastion-at-first"),
    ]
    [event] = AuditLog(two.store.db).events("connection.upstream_revocation")
    assert (event.subject, event.detail["upstream"]) == ("alice", "tracker")
    assert event.detail["outcome"] == "revoked"


def test_a_connection_is_kept_when_the_upstreams_metadata_cannot_be_read_again(moved):
    """Whether the upstream moved cannot be told: the call fails and the connection is neither
    refreshed anywhere nor dropped; until the interval has passed the read is not tried again."""
    first, second, named, now, replica, _, resource = moved
    one = replica()
    anyio.run(one.clients["tracker"].metadata)  # one reads the first server
    named[0] = second.base
    _connected(replica())  # made at the second server
    named[0] = "ftp://nowhere"  # the upstream's metadata now names nothing usable
    before = resource.reads
    now[0] += 7200

    for _ in range(2):
        with pytest.raises(ConnectionUnavailable, match="no usable authorization server"):
            anyio.run(one.access_token, "alice", "tracker")
    assert resource.reads == before + 1

    assert one.store.get("alice", "tracker") is not None
    assert AuditLog(one.store.db).events("connection.dropped") == []
    assert [f.get("grant_type") for f in second.posted] == ["authorization_code"]
    assert first.posted == []


def test_the_call_that_drops_a_connection_is_answered_before_its_former_server_revokes(moved):
    """The server that issued the tokens answers its revocations only once released (slow, or
    away for a while): the call that found the upstream moved is told to connect again at once,
    the connection dropped, and does not wait for it. The tokens are revoked there after the
    answer, when the server answers, and recorded so."""
    first, second, named, now, replica, *_ = moved
    _connected(replica())
    named[0] = second.base
    two = replica()
    now[0] += 7200
    first.revoking.clear()

    async def call() -> str | None:
        token = await two.access_token("alice", "tracker")
        dropped = two.store.get("alice", "tracker") is None
        first.happened.append(("answered", token, dropped))
        first.revoking.set()
        return token

    assert answered_then(call, revocations_recorded(two)) is None
    assert first.happened == [
        ("answered", None, True),
        ("revoked", "refresh_token"),
        ("revoked", "access_token"),
    ]
    [event] = AuditLog(two.store.db).events("connection.upstream_revocation")
    assert event.detail["outcome"] == "revoked"


def test_a_revocation_under_way_at_shutdown_is_waited_for(moved):
    """Stopping (`Connections.close`, after the gateway) while a dropped connection's revocation
    waits for its former server: the stop waits for it, and it is revoked and recorded."""
    first, second, named, now, replica, *_ = moved
    _connected(replica())
    named[0] = second.base
    two = replica()
    now[0] += 7200
    first.revoking.clear()

    async def dropped_then_stopped() -> None:
        assert await two.access_token("alice", "tracker") is None

        async def released_once_asked() -> None:
            while not _revocations(first):
                await anyio.sleep(0.01)
            first.revoking.set()

        with anyio.fail_after(PATIENCE):  # a deadline, not a timing
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(released_once_asked)
                await two.close()

    anyio.run(dropped_then_stopped)
    [event] = AuditLog(two.store.db).events("connection.upstream_revocation")
    assert event.detail["outcome"] == "revoked"
