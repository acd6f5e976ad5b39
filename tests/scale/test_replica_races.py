"""Two bastion apps (replicas) on one real PostgreSQL: what one of them is told is enforced by the
other on the very next request that reaches it, not once it gets round to it."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from bastion.facts.model import Entity
from tests.conftest import postgres_schema
from tests.gateway.support import start
from tests.oauth.test_access_tokens import claims_of
from tests.signals.test_kill_switch import authorization_code, client_id, confidential_client
from tests.waits import eventually

ROUNDS = 2
# A change this large takes a replica a while to put in force; what comes after it waits.
IMPORT = 100_000


@pytest.fixture
def two_replicas(tmp_path, postgres_url):
    """Two replicas of the test's own, for a test that changes what every other would see."""
    with start(tmp_path, replicas=1, database=postgres_url) as bastion:
        yield bastion


@pytest.fixture(scope="module")
def shared_replicas(tmp_path_factory):
    """Two replicas shared by the tests of this file that each use their own clients, codes and
    grants, and leave the signing keys, settings and policy as they were."""
    with (
        postgres_schema() as database,
        start(tmp_path_factory.mktemp("replicas"), replicas=1, database=database) as bastion,
    ):
        yield bastion


def test_an_agent_suspended_through_one_replica_gets_no_token_and_is_inactive_on_the_other(
    shared_replicas,
):
    bastion = shared_replicas
    key, _ = bastion.app.state.keys.create("kill switch", ["suspensions"], created_by="test")
    admin = {"authorization": f"Bearer {key}"}
    agent = confidential_client(bastion, "nightly agent")
    resource_server = confidential_client(
        bastion, "resource server", introspection_resources=("*",)
    )
    other = bastion.replicas[0]
    form = {"grant_type": "client_credentials", "resource": bastion.mcp_url("deskhttp")}
    issued = bastion.http.post(f"{bastion.url}/token", data=form, auth=agent)
    assert issued.status_code == 200, issued.text
    token = issued.json()["access_token"]

    def introspect() -> dict:
        answer = bastion.http.post(
            f"{other}/introspect", data={"token": token}, auth=resource_server
        )
        assert answer.status_code in (200, 503), answer.text
        return answer.json()

    def suspension(method: str) -> None:
        path = "/v1/suspensions" + ("" if method == "POST" else f"/agent/{agent[0]}")
        body = {"kind": "agent", "id": agent[0]} if method == "POST" else None
        answer = bastion.http.request(method, f"{bastion.url}{path}", json=body, headers=admin)
        assert answer.status_code in (200, 201), answer.text

    seen = []
    for round in range(ROUNDS):
        # The other replica is busy with a large change when the suspension reaches it.
        team = Entity("Team", f"import-{round}")
        bastion.store.apply(
            [("has_role", Entity("User", f"u{i}"), "member", team) for i in range(IMPORT)],
            actor="test",
        )
        suspension("POST")
        # Straight to the other replica: its answers must already know.
        inactive = introspect()
        minted = bastion.http.post(f"{other}/token", data=form, auth=agent)
        seen.append((inactive.get("active"), minted.status_code))
        suspension("DELETE")
        # A deadline for hearing of the resume (which waits behind the import), not a timing: on
        # a machine loaded by other work the import alone took over 10 s.
        heard = eventually(lambda: introspect().get("active") is True, every=0.02)
        assert heard, "the other replica never heard of the resume"
    # Inactive (or 503 while it catches up) and no token: never active, never a token.
    assert [(active, status) for active, status in seen if active or status == 200] == []


def test_a_replica_past_its_staleness_bound_issues_no_token_and_introspects_nothing(tmp_path):
    """Its view of the kill switch may lack a suspension made through another replica: 503
    ``temporarily_unavailable`` (retry), not a token or an ``active`` that may be wrong."""
    with start(tmp_path) as bastion:
        oauth = bastion.app.state.oauth
        agent = confidential_client(bastion, "nightly agent")
        resource_server = confidential_client(
            bastion, "resource server", introspection_resources=("*",)
        )
        form = {"grant_type": "client_credentials", "resource": bastion.mcp_url("deskhttp")}
        token = bastion.http.post(f"{bastion.url}/token", data=form, auth=agent).json()

        def answers() -> list:
            minted = bastion.http.post(f"{bastion.url}/token", data=form, auth=agent)
            shown = bastion.http.post(
                f"{bastion.url}/introspect",
                data={"token": token["access_token"]},
                auth=resource_server,
            )
            return [(r.status_code, r.json().get("error")) for r in (minted, shown)]

        current = oauth.facts_stale
        oauth.facts_stale = lambda: True  # as `Replica.stale` says past max_staleness_seconds
        try:
            stale = answers()
        finally:
            oauth.facts_stale = current
        assert stale == [(503, "temporarily_unavailable")] * 2
        assert answers() == [(200, None)] * 2


def test_an_approval_whose_spend_waits_past_lock_timeout_is_refused_as_unavailable_not_used(
    tmp_path, postgres_url
):
    """Another replica's transaction holds the approval's row (PostgreSQL answering slowly):
    the call cannot spend it within ``lock_timeout``, so it is refused as a store that cannot
    be written (try again), not as an approval already used; the approval stays whole."""
    import psycopg

    from tests.approvals.test_gateway_holds import EMAIL, RULES, approvals, raw_call

    impatient = postgres_url + "%20-clock_timeout%3D300"  # ms: after the search_path option
    with start(
        tmp_path, approvals={"wait_seconds": 0}, policy_extra=RULES, database=impatient
    ) as bastion:
        token = bastion.token("sam", "deskhttp")
        email = {**EMAIL, "subject": "slow database"}
        held = raw_call(bastion, token, email)["error"]["data"]
        approvals(bastion).answer(held["approval_id"], "avery", "approve", channel="api")
        with psycopg.connect(postgres_url) as other_replica:  # a transaction, left open
            other_replica.execute(
                "SELECT id FROM approval_requests WHERE id = %s FOR UPDATE",
                (held["approval_id"],),
            )
            refused = raw_call(bastion, token, email)["error"]["data"]
            other_replica.rollback()
        assert refused["reason"] == "approval_unavailable"
        assert approvals(bastion).get(held["approval_id"]).status == "approved"
        assert "result" in raw_call(bastion, token, email)
        assert approvals(bastion).get(held["approval_id"]).status == "used"


def test_a_signing_key_retired_by_another_process_signs_no_token_on_either_replica(
    two_replicas, postgres_url
):
    """`bastion signing-keys rotate`, then `retire` of the old key (it may be stolen), run as
    their own process: every token either replica issues after that is signed with the new key,
    published by both (jwks.json) and active on both. Each replica had signed with the old key
    just before, and keeps the key that signs in memory."""
    from bastion.db import Database
    from bastion.oauth.keys import KeyRing
    from bastion.oauth.store import OAuthStore

    bastion = two_replicas
    agent = confidential_client(bastion, "nightly agent")
    resource_server = confidential_client(
        bastion, "resource server", introspection_resources=("*",)
    )
    urls = [bastion.url, bastion.replicas[0]]
    form = {"grant_type": "client_credentials", "resource": bastion.mcp_url("deskhttp")}

    def issued(url: str) -> str:
        answer = bastion.http.post(f"{url}/token", data=form, auth=agent)
        assert answer.status_code == 200, answer.text
        return answer.json()["access_token"]

    def kid(token: str) -> str:
        return claims_of(token)[0]["kid"]

    (old,) = {kid(issued(url)) for url in urls}
    settings = bastion.app.state.oauth.settings
    db = Database(postgres_url)
    try:
        command = KeyRing(
            OAuthStore(db), settings.key_dir, settings.access_token_seconds, time.time
        )
        new = command.rotate(actor="test")
        command.retire(old, actor="test")
    finally:
        db.close()
    for url in urls:
        token = issued(url)
        for elsewhere in urls:
            published = bastion.http.get(f"{elsewhere}/jwks.json").json()["keys"]
            assert [k["kid"] for k in published] == [new]
            assert kid(token) == new, f"{url} signed with the retired key"
            shown = bastion.http.post(
                f"{elsewhere}/introspect", data={"token": token}, auth=resource_server
            )
            assert shown.json()["active"] is True, shown.text


def _both_at_once(urls: list[str], form: dict) -> list[httpx.Response]:
    """The same token request sent to each replica at the same moment."""
    with ThreadPoolExecutor(len(urls)) as pool, httpx.Client(timeout=20) as http:
        return list(pool.map(lambda url: http.post(f"{url}/token", data=form), urls))


def test_a_code_or_refresh_token_sent_to_both_replicas_at_once_is_redeemed_once_then_revoked(
    shared_replicas,
):
    """RFC 9700 §4.14.2 across replicas: of two uses at once one wins, the other is a replay,
    and the replay revokes the grant, the winner's new tokens with it."""
    bastion = shared_replicas
    urls = [bastion.url, bastion.replicas[0]]
    for _ in range(3):
        code = authorization_code(bastion, "sam")
        redeemed = _both_at_once(urls, code)
        assert sorted(r.status_code for r in redeemed) == [200, 400], [r.text for r in redeemed]
        won = next(r.json() for r in redeemed if r.status_code == 200)
        refresh = {
            "grant_type": "refresh_token",
            "refresh_token": won["refresh_token"],
            "client_id": client_id(won["access_token"]),
        }
        assert bastion.http.post(f"{urls[1]}/token", data=refresh).status_code == 400

        tokens = bastion.http.post(f"{urls[0]}/token", data=authorization_code(bastion, "sam"))
        refresh["refresh_token"] = tokens.json()["refresh_token"]
        refresh["client_id"] = client_id(tokens.json()["access_token"])
        rotated = _both_at_once(urls, refresh)
        assert sorted(r.status_code for r in rotated) == [200, 400], [r.text for r in rotated]
        won = next(r.json() for r in rotated if r.status_code == 200)
        again = {**refresh, "refresh_token": won["refresh_token"]}
        assert bastion.http.post(f"{urls[0]}/token", data=again).status_code == 400
