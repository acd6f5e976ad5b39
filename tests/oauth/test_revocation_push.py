"""Revocations pushed to every process on PostgreSQL (NOTIFY in the revoking transaction, one
LISTEN connection per process): a remembered token is checked in memory, yet a token revoked by
another replica is refused once the notice arrives, one revoked through this process at once, and
while the listener is down every call reads the database, so nothing revoked meanwhile is missed.

"Another replica" is an `OAuthStore` on a `Database` of its own, as a second bastion process
would have. Database reads of the process under test are counted on its own `Database`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from joserfc import jwt as jose_jwt

from bastion.db import Database
from bastion.oauth import InvalidToken, verifier
from bastion.oauth.store import OAuthStore
from bastion.oauth.users import create_user
from bastion.oauth.verifier import VerifiedTokens
from tests.delayed_relay import DelayedRelay
from tests.waits import PATIENCE, eventually

from .support import PASSWORD, Bastion, running_bastion
from .test_access_tokens import claims_of, stolen_key


class Reads:
    """Counts the statements a `Database` runs."""

    def __init__(self, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        execute = db.execute

        def counted(*args, **kwargs):
            self.count += 1
            return execute(*args, **kwargs)

        monkeypatch.setattr(db, "execute", counted)


class Replicas:
    """Process A (an authorization server and the gateway's `VerifiedTokens`) and the store of
    another replica B, on one PostgreSQL database."""

    def __init__(self, a: Bastion, tokens: VerifiedTokens, b: OAuthStore) -> None:
        self.a, self.tokens, self.b = a, tokens, b
        self.client = a.register()

    def issue(self) -> tuple[str, str, str]:
        """A fresh grant's access token, remembered by A: (token, jti, grant_id)."""
        token = self.a.tokens_for(self.client)["access_token"]
        verified = self.remember(token)
        return token, verified.jti, verified.grant_id

    def remember(self, token: str):
        """``token`` verified by A, and remembered. A `verify` that overlaps the handling of any
        revocation's notice does not remember its token, and other tests' notices (other
        schemas, other runs on the same PostgreSQL database) reach A's listener too: verified
        again until it is remembered."""
        verified = []

        def remembered_once_verified() -> bool:
            verified.append(self.tokens.verify(token, self.a.resource))
            return self.remembered(token) is not None

        assert eventually(remembered_once_verified), "the token was never remembered"
        return verified[-1]

    def remembered(self, token: str):
        return self.tokens.remembered(token, self.a.resource)


def listener_state(tokens: VerifiedTokens) -> str:
    """What a listener that never came up was doing, for the failure's message."""
    listener = tokens.listener
    assert listener is not None
    return (
        f"connected: {listener._connected}, last answer"
        f" {time.monotonic() - listener._answered_at:.1f} s ago, parked: {listener._waiting},"
        f" behind: {listener.behind()}, thread alive: {listener._thread.is_alive()}"
    )


@pytest.fixture
def replicas(postgres_url, tmp_path) -> Iterator[Replicas]:
    with running_bastion(postgres_url, tmp_path) as a:
        tokens = VerifiedTokens(a.server.verifier, postgres_url)
        b = OAuthStore(Database(postgres_url))
        try:
            assert eventually(lambda: tokens.local), (
                f"the revocation listener never came up ({listener_state(tokens)})"
            )
            yield Replicas(a, tokens, b)
        finally:
            tokens.close()
            b.db.close()


@pytest.fixture
def listener_gate(monkeypatch) -> threading.Event:
    """While cleared, the revocation listener cannot (re)connect: a network outage for it alone."""
    gate = threading.Event()
    gate.set()
    connect = psycopg.connect

    def gated(*args, **kwargs):
        if kwargs.get("application_name") == "bastion-revocations" and not gate.is_set():
            raise psycopg.OperationalError("connection refused (held down by the test)")
        return connect(*args, **kwargs)

    monkeypatch.setattr(psycopg, "connect", gated)
    return gate


REVOCATIONS_BY_ANOTHER_REPLICA = {
    "access token": lambda b, jti, grant_id: b.revoke_access_token(jti, time.time()),
    "grant": lambda b, jti, grant_id: b.revoke_grant(grant_id, time.time(), "test", actor="test"),
    "user disabled": lambda b, jti, grant_id: b.disable_user("alice", time.time(), actor="test"),
    "client revoked": lambda b, jti, grant_id: b.revoke_client(
        b.grant(grant_id).client_id, time.time(), actor="test"
    ),
}


@pytest.mark.parametrize("revocation", REVOCATIONS_BY_ANOTHER_REPLICA)
def test_a_revocation_by_another_replica_is_refused_once_notified_without_a_read_per_call(
    replicas, monkeypatch, revocation
):
    token, jti, grant_id = replicas.issue()
    sibling, _, _ = replicas.issue()  # another grant of the same user and client
    reads = Reads(replicas.tokens.db, monkeypatch)
    for _ in range(50):
        assert replicas.remembered(token).jti == jti
    assert reads.count == 0, "a remembered token was checked with a database read"

    REVOCATIONS_BY_ANOTHER_REPLICA[revocation](replicas.b, jti, grant_id)

    assert eventually(lambda: replicas.remembered(token) is None), "the notice never arrived"
    assert reads.count == 0, "refused by a database read, not by the notice"
    with pytest.raises(InvalidToken, match="revoked"):
        replicas.tokens.verify(token, replicas.a.resource)
    if revocation in ("access token", "grant"):
        assert replicas.remembered(sibling) is not None  # other grants are not forgotten
    else:
        assert eventually(lambda: replicas.remembered(sibling) is None)


@pytest.mark.parametrize("revocation", REVOCATIONS_BY_ANOTHER_REPLICA)
def test_a_revocation_by_another_replica_is_refused_on_the_first_use_after_it_returns(
    postgres_url, tmp_path, revocation
):
    """The revoking call returns only once every process's token cache has heard of it, however
    late its notice: here, once A's cache is up, everything PostgreSQL sends it arrives half a
    second late (a loaded machine's tens of milliseconds, made long and certain), and A's
    listener asks its connection rarely, so only the notice can tell it. Before, the call
    returned at its commit, and the next use in A was answered from memory: the revoked token
    was accepted."""
    with running_bastion(postgres_url, tmp_path) as a, DelayedRelay() as relay:
        tokens = VerifiedTokens(a.server.verifier, relay.url(postgres_url))
        assert tokens.listener is not None
        tokens.listener.heartbeat, tokens.listener.stale_after = 30.0, 60.0
        b = OAuthStore(Database(postgres_url))
        try:
            assert eventually(lambda: tokens.local), (
                f"the listener never came up ({listener_state(tokens)})"
            )
            replicas = Replicas(a, tokens, b)
            token, jti, grant_id = replicas.issue()
            assert replicas.remembered(token) is not None
            relay.delay = 0.5  # from here on: A's start (its schema checks) is not what is tested

            REVOCATIONS_BY_ANOTHER_REPLICA[revocation](b, jti, grant_id)

            assert replicas.remembered(token) is None
        finally:
            tokens.close()
            b.db.close()


USER_CHANGES_BY_ANOTHER_REPLICA = {
    "disabled": lambda b, user, now: b.disable_user(user, now, actor="test"),
    "all grants revoked": lambda b, user, now: b.revoke_user_grants(
        user, now, "test: signal", actor="test"
    ),
}


@pytest.mark.parametrize(
    ("change", "user"), [("disabled", "lee"), ("all grants revoked", "not-a-user-of-bastion")]
)
def test_a_users_standing_changed_by_another_replica_is_known_once_notified_without_a_read_per_call(
    replicas, monkeypatch, change, user
):
    """The standing a trusted issuer's token is checked against (its user holds no grant, so no
    grant's notice would tell): read once, then in memory until a user is disabled, or all of
    a user's grants revoked (any name: also one bastion does not hold), anywhere."""
    create_user(replicas.a.server.store, "lee", PASSWORD, time.time(), actor="test")
    reads = Reads(replicas.tokens.db, monkeypatch)
    issued_before = time.time()
    assert replicas.tokens.user_standing(user).refusal(user, issued_before) is None
    assert replicas.tokens.user_standing("sam").refusal("sam", issued_before) is None

    def from_memory() -> bool:
        read = reads.count
        answer = replicas.tokens.user_standing(user, on_loop=True)
        assert reads.count == read, "a remembered user's standing was read per call"
        if answer == "off_loop":
            # The listener was behind, or forgot every standing, at a notice of another test's
            # (other schemas', other runs' on the database): asked off the loop, as the gateway
            # then does, and again on it.
            assert replicas.tokens.user_standing(user).refusal(user, 0) is None
            return False
        assert answer.refusal(user, 0) is None
        return True

    for _ in range(50):
        assert eventually(from_memory), (
            "a remembered user's standing was never answered on the loop"
        )

    USER_CHANGES_BY_ANOTHER_REPLICA[change](replicas.b, user, time.time())

    assert eventually(
        lambda: replicas.tokens.user_standing(user).refusal(user, issued_before) is not None
    ), "never notified"
    assert replicas.tokens.user_standing("sam").refusal("sam", issued_before) is None


class HeldNotices:
    """The handling, by one `VerifiedTokens`, of the revocation notices of chosen grants waits
    until `release` is set, as a listener thread waiting for the GIL while calls are decided
    would; `arrived` is set when one reaches it. Those only: the channel is the database's, so
    the notices of other tests (other schemas, other runs on the same PostgreSQL) reach the
    listener too. Held, one of them stopped the listener at any moment, and set `arrived`
    before this test's revocation had even been committed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.arrived, self.release = threading.Event(), threading.Event()
        self.tokens: VerifiedTokens | None = None
        self.grants: set[str] = set()
        notified = VerifiedTokens._notified

        def held(tokens: VerifiedTokens, payload: str) -> None:
            if tokens is self.tokens and payload in self.grants:
                self.arrived.set()
                self.release.wait(PATIENCE)
            notified(tokens, payload)

        monkeypatch.setattr(VerifiedTokens, "_notified", held)

    def hold(self, tokens: VerifiedTokens, *grant_ids: str) -> None:
        self.tokens = tokens
        self.grants.update(grant_ids)


@pytest.fixture
def held_notices(monkeypatch) -> Iterator[HeldNotices]:
    held = HeldNotices(monkeypatch)
    yield held
    held.release.set()


def test_a_revocation_whose_notice_has_arrived_but_is_not_handled_yet_is_refused(
    held_notices, replicas, monkeypatch
):
    token, jti, grant_id = replicas.issue()
    waited, waited_jti, waited_grant_id = replicas.issue()
    held_notices.hold(replicas.tokens, grant_id, waited_grant_id)
    reads = Reads(replicas.tokens.db, monkeypatch)

    def from_memory() -> bool:
        # While the listener is current (parked, nothing on its socket), a remembered token is
        # answered without a read. Its heartbeat (every 0.5 s) unparks it for a moment, and a
        # use then waits up to CATCH_UP and may read instead: on a loaded machine that moment
        # can last longer, so the use is judged only when the listener was current around it.
        reads.count = 0
        current = replicas.tokens.local
        found = replicas.remembered(token)
        return current and replicas.tokens.local and found is not None and reads.count == 0

    assert eventually(from_memory)

    reads.count = 0
    # The revoking call waits for every listener to confirm it, this one too, held below: it
    # runs aside, and what is asked meanwhile is what a call made while it waits would find.
    revoking = threading.Thread(target=replicas.b.revoke_access_token, args=(jti, time.time()))
    revoking.start()
    assert held_notices.arrived.wait(PATIENCE)
    # The notice is here, its handling is not done: on the event loop nothing is answered (nor
    # waited for, nor read); from a worker thread the token's state is read, not trusted.
    assert not replicas.tokens.local
    assert replicas.tokens.remembered(token, replicas.a.resource, on_loop=True) == "off_loop"
    assert reads.count == 0
    assert replicas.remembered(token) is None
    assert reads.count == 1
    held_notices.release.set()
    revoking.join(PATIENCE)
    held_notices.release.clear()

    # Handled while a call waits for it: the notice refuses, without a read. The wait is bounded
    # (CATCH_UP, then the use reads, as above); a loaded machine can outlast the bound's tenth of
    # a second while the notice is handled, so here it is long enough that only a read the
    # product chose to make, not a slow moment, counts.
    monkeypatch.setattr(verifier, "CATCH_UP", 30.0)
    # So too its staleness: the listener, held, asks its connection nothing meanwhile.
    monkeypatch.setattr(replicas.tokens.listener, "stale_after", PATIENCE)
    held_notices.arrived.clear()
    revoking = threading.Thread(
        target=replicas.b.revoke_access_token, args=(waited_jti, time.time())
    )
    revoking.start()
    assert held_notices.arrived.wait(PATIENCE)
    threading.Timer(0.02, held_notices.release.set).start()
    before = reads.count
    assert eventually(lambda: replicas.remembered(waited) is None)
    assert reads.count == before
    revoking.join(PATIENCE)


def revoke_at_the_endpoint(replicas: Replicas, issued: dict) -> None:
    response = replicas.a.http.post(
        f"{replicas.a.url}/revoke",
        data={"token": issued["access_token"], "client_id": replicas.client["client_id"]},
    )
    assert response.status_code == 200, response.text


def reuse_the_refresh_token(replicas: Replicas, issued: dict) -> None:
    refresh = {"grant_type": "refresh_token", "client_id": replicas.client["client_id"]}
    assert replicas.a.token(**refresh, refresh_token=issued["refresh_token"]).status_code == 200
    reused = replicas.a.token(**refresh, refresh_token=issued["refresh_token"])
    assert reused.json()["error"] == "invalid_grant"


@pytest.mark.parametrize("revoke", [revoke_at_the_endpoint, reuse_the_refresh_token])
def test_a_revocation_through_this_process_is_refused_on_the_very_next_call(
    held_notices, replicas, monkeypatch, revoke
):
    issued = replicas.a.tokens_for(replicas.client)
    token = issued["access_token"]
    held_notices.hold(replicas.tokens, replicas.remember(token).grant_id)

    revoke(replicas, issued)

    reads = Reads(replicas.tokens.db, monkeypatch)
    assert replicas.remembered(token) is None
    assert reads.count == 0, "refused by a database read, not forgotten at the revocation"
    held_notices.release.set()


def test_while_the_listener_is_down_every_call_reads_and_nothing_revoked_meanwhile_is_missed(
    listener_gate, replicas, monkeypatch
):
    checked, checked_jti, _ = replicas.issue()
    unseen, unseen_jti, _ = replicas.issue()
    kept, _, _ = replicas.issue()
    reads = Reads(replicas.tokens.db, monkeypatch)

    listener_gate.clear()
    with psycopg.connect(replicas.a.server.db.url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (replicas.tokens.listener.backend_pid,))
    assert eventually(lambda: not replicas.tokens.local), "the dropped listener was trusted"

    # Down: a remembered token costs one read per call, so a revocation is seen at once.
    assert replicas.remembered(checked) is not None
    assert replicas.remembered(checked) is not None
    assert reads.count == 2
    replicas.b.revoke_access_token(checked_jti, time.time())
    assert replicas.remembered(checked) is None
    # A revocation no call looks at while the listener is down...
    replicas.b.revoke_access_token(unseen_jti, time.time())

    listener_gate.set()
    assert eventually(lambda: replicas.tokens.local), "the listener never came back"
    # ...is refused once it is back, though its notice was sent to nobody.
    assert replicas.remembered(unseen) is None
    with pytest.raises(InvalidToken, match="revoked"):
        replicas.tokens.verify(unseen, replicas.a.resource)
    # A token nobody revoked is still accepted, and again checked in memory.
    assert (replicas.remembered(kept) or replicas.remember(kept)).subject == "alice"
    before = reads.count
    assert replicas.remembered(kept) is not None
    assert reads.count == before


def test_a_remembered_token_lasts_until_its_stored_expiry_and_a_forged_one_is_never_remembered(
    replicas,
):
    token, jti, _ = replicas.issue()
    # Signed with the server's key (from the key directory, as a thief has it) under the live
    # jti, with an expiry ten years on: refused, so never remembered until that expiry.
    header, claims = claims_of(token)
    ten_years = {"exp": claims["exp"] + 10 * 365 * 86400}
    forged = jose_jwt.encode(header, {**claims, **ten_years}, stolen_key(replicas.a, token))
    with pytest.raises(InvalidToken, match="not issued by this server"):
        replicas.tokens.verify(forged, replicas.a.resource)
    assert replicas.remembered(forged) is None
    stored = replicas.b.access_token_state(jti).expires_at
    assert replicas.remembered(token).expires_at == stored


def test_a_key_retired_by_another_replica_refuses_its_remembered_tokens_once_notified(
    replicas, monkeypatch
):
    token, _, _ = replicas.issue()
    old_kid = claims_of(token)[0]["kid"]
    replicas.a.server.keys.rotate(actor="test")
    fresh, _, _ = replicas.issue()  # signed by the new key
    reads = Reads(replicas.tokens.db, monkeypatch)

    replicas.b.retire_signing_key(old_kid, time.time(), actor="test")

    assert eventually(lambda: replicas.remembered(token) is None), "the notice never arrived"
    assert reads.count == 0, "refused by a database read, not by the notice"
    with pytest.raises(InvalidToken, match="revoked|is not a key"):
        replicas.tokens.verify(token, replicas.a.resource)
    assert replicas.remembered(fresh) is not None


def test_a_verification_overlapping_a_revocation_is_not_remembered(replicas):
    token, _, grant_id = replicas.issue()
    replicas.tokens.verify(token, None)  # the same token remembered a second time
    verifier = replicas.a.server.verifier
    verify = verifier.verify

    def revoked_meanwhile(*args, **kwargs):
        verified = verify(*args, **kwargs)  # the state is read: not revoked yet
        replicas.b.revoke_grant(grant_id, time.time(), "test", actor="test")
        assert eventually(lambda: replicas.tokens.remembered(token, None) is None)
        return verified

    verifier.verify = revoked_meanwhile
    try:
        replicas.tokens.verify(token, replicas.a.resource)  # valid when it was checked...
    finally:
        verifier.verify = verify
    assert replicas.remembered(token) is None  # ...but not remembered as valid


def test_a_revocation_rolled_back_is_not_announced(database_url, tmp_path):
    with running_bastion(database_url, tmp_path) as a:
        store = a.server.store
        grant_id = a.server.verifier.verify(
            a.tokens_for(a.register())["access_token"], a.resource
        ).grant_id
        announced: list[str] = []
        store.on_revoked(announced.append)
        with pytest.raises(RuntimeError), store.db.transaction():
            store.revoke_client(store.grant(grant_id).client_id, time.time(), actor="test")
            raise RuntimeError("the revoking transaction fails")
        assert announced == [] and store.grant(grant_id).revoked_at is None
        store.revoke_client(store.grant(grant_id).client_id, time.time(), actor="test")
        assert announced == [grant_id]


def test_a_closed_verified_tokens_is_no_longer_told_of_revocations(database_url, tmp_path):
    with running_bastion(database_url, tmp_path) as a:
        store = a.server.store
        tokens = VerifiedTokens(a.server.verifier, database_url)
        tokens.close()
        forgotten = tokens._forgotten  # moves each time a revocation reaches it
        grant_id = a.server.verifier.verify(
            a.tokens_for(a.register())["access_token"], a.resource
        ).grant_id
        store.revoke_client(store.grant(grant_id).client_id, time.time(), actor="test")
        assert tokens._forgotten == forgotten


def test_on_sqlite_a_token_whose_state_may_have_changed_is_read_off_the_event_loop(
    sqlite_url, tmp_path, monkeypatch
):
    """On SQLite, after any other commit (the decision records' flush does one every 0.2 s) a
    remembered token's state is read again; the event loop is told to ask from a worker thread
    instead of reading there (a statement that may wait on SQLite's lock)."""
    with running_bastion(sqlite_url, tmp_path) as a:
        tokens = VerifiedTokens(a.server.verifier, sqlite_url)
        other = OAuthStore(Database(sqlite_url))
        try:
            client = a.register()
            token = a.tokens_for(client)["access_token"]
            jti = tokens.verify(token, a.resource).jti
            reads = Reads(tokens.db, monkeypatch)
            assert tokens.remembered(token, a.resource, on_loop=True).jti == jti
            assert reads.count == 0
            other.revoke_access_token(jti, time.time())  # another connection commits
            assert tokens.remembered(token, a.resource, on_loop=True) == "off_loop"
            assert reads.count == 0
            assert tokens.remembered(token, a.resource) is None  # from a worker thread: read
            assert reads.count == 1
        finally:
            tokens.close()
            other.db.close()


def test_a_token_recorded_while_another_replica_retires_its_key_is_revoked_with_the_others(
    replicas, postgres_url
):
    """Replica A signs with the key it read; B retires that key (after a rotation) while A's
    issuing transaction is still open. The retirement waits for it and revokes that token too:
    no token of a retired key outlives the retirement, whichever commits first."""
    from bastion.oauth.keys import KeyRing

    token, jti, grant_id = replicas.issue()
    old_kid = claims_of(token)[0]["kid"]
    settings = replicas.a.server.settings
    b_keys = KeyRing(replicas.b, settings.key_dir, settings.access_token_seconds, time.time)
    b_keys.rotate(actor="test")
    a = replicas.a.server.store
    late = f"{jti}-late"
    retired = threading.Thread(target=b_keys.retire, args=(old_kid,), kwargs={"actor": "test"})
    with psycopg.connect(postgres_url, autocommit=True) as watcher:

        def retirement_waits() -> bool:
            return bool(
                watcher.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE 'DELETE FROM oauth_signing_keys%'"
                ).fetchall()
            )

        with a.db.transaction():
            assert a.save_access_token(late, grant_id, time.time() + 300, token + "x", old_kid)
            retired.start()
            assert eventually(lambda: not retired.is_alive() or retirement_waits())
        retired.join(PATIENCE)
    assert not retired.is_alive()
    assert a.access_token_state(late).revoked
    # Once retired, the key records no token at all.
    assert not a.save_access_token(f"{jti}-later", grant_id, time.time() + 300, token, old_kid)
    assert a.access_token_state(f"{jti}-later") is None
