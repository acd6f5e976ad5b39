"""``gateway.max_subscriptions_per_user`` across replicas: with ``gateway.redis_url`` the
resources a user follows (``resources/subscribe`` in every session, ``subscriptions/listen``
streams) are counted in Redis by every bastion process that uses it, as leased entries checked
and added in one script. Two apps on one database and one Redis (what two replicas behind a load
balancer are) let a user follow no more than one would; unsubscribing on one makes room on the
other; two racing for the last place cannot both take it; a Redis that cannot be reached refuses
a follow, and an unsubscribe still ends its subscription. A replica killed outright:
tests/scale/test_shared_subscriptions.py."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import uuid
from dataclasses import dataclass

import httpx
import pytest
import redis

from bastion.gateway.follows import FollowLeases
from tests.conftest import REDIS_URL, drop_redis_keys, require_service
from tests.ports import free_port
from tests.private_redis import PrivateRedis
from tests.relays import Relay
from tests.waits import PATIENCE, eventually

from .streams import events, legacy_session, messages, modern_headers, modern_request
from .support import start

SAM_READS = "lab://open"  # both users may read it; lab://secret only avery (an admin)


@dataclass
class Replica:
    """One app, as `legacy_session` and the helpers below address it."""

    url: str
    http: httpx.Client

    def mcp_url(self, server: str) -> str:
        return f"{self.url}/mcp/{server}"


def post(at: Replica, headers: dict, method: str, params: dict) -> httpx.Response:
    body = {"jsonrpc": "2.0", "id": 7, "method": method, "params": params}
    return at.http.post(at.mcp_url("lab"), json=body, headers=headers)


def subscribed(response: httpx.Response) -> bool:
    assert response.status_code in (200, 400), response.text
    # As JSON, or (an answer that takes longer: a loaded machine) as an event stream.
    return messages(response)[-1].get("result") == {}


def refused_as_too_many(response: httpx.Response) -> bool:
    error = messages(response)[-1].get("error", {})
    # A JSON answer's status says the refusal; an event stream has begun with 200 already.
    streamed = response.headers["content-type"].startswith("text/event-stream")
    return (
        response.status_code == (200 if streamed else 400)
        and error.get("code") == -32602
        and "gateway.max_subscriptions_per_user" in error.get("message", "")
    )


def listen(at: Replica, token: str, uris: list[str]):
    body = modern_request("watch", "subscriptions/listen", {"notifications": {
        "resourceSubscriptions": uris}})  # fmt: skip
    headers = modern_headers(token, "subscriptions/listen")
    return at.http.stream("POST", at.mcp_url("lab"), json=body, headers=headers)


def follows_in_redis(prefix: str, server: str, user: str) -> int:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        key = FollowLeases(REDIS_URL, prefix).key(server, user)
        return client.zcard(key)
    finally:
        client.close()


@pytest.fixture
def two_replicas(tmp_path):
    """Two apps sharing one database and one Redis (a prefix of this test's own), where a user
    may follow two resources on a server."""
    require_service("Redis", "127.0.0.1", 6379)
    prefix = f"bastion-test-{uuid.uuid4().hex[:12]}"
    settings = {"redis_url": REDIS_URL, "redis_prefix": prefix, "max_subscriptions_per_user": 2}
    try:
        with start(tmp_path, gateway=settings, replicas=1) as bastion:
            yield bastion, prefix
    finally:
        drop_redis_keys(prefix)


def test_a_user_follows_no_more_across_two_replicas_than_on_one(two_replicas):
    bastion, prefix = two_replicas
    first = Replica(bastion.url, bastion.http)
    second = Replica(bastion.replicas[0], bastion.http)
    token = bastion.token("avery", "lab")
    on_first = legacy_session(first, token, "lab")
    assert subscribed(post(first, on_first, "resources/subscribe", {"uri": "lab://open"}))
    assert subscribed(post(first, on_first, "resources/subscribe", {"uri": "lab://secret"}))
    # The third place, on the other replica: refused, for a session and for a listen stream.
    on_second = legacy_session(second, token, "lab")
    refused = post(second, on_second, "resources/subscribe", {"uri": "lab://open"})
    assert refused_as_too_many(refused), refused.text
    assert "2 are followed" in refused.json()["error"]["message"]
    assert follows_in_redis(prefix, "lab", "avery") == 2
    with listen(second, token, ["lab://open"]) as response:
        response.read()
        assert refused_as_too_many(response), response.text
    # Another user's count is their own.
    sam = legacy_session(second, bastion.token("sam", "lab"), "lab")
    assert subscribed(post(second, sam, "resources/subscribe", {"uri": SAM_READS}))
    # Unsubscribing on the first replica makes room on the second, at once.
    gone = post(first, on_first, "resources/unsubscribe", {"uri": "lab://secret"})
    assert gone.status_code == 200, gone.text
    assert follows_in_redis(prefix, "lab", "avery") == 1
    assert subscribed(post(second, on_second, "resources/subscribe", {"uri": "lab://open"}))
    # A session ended (DELETE) gives its places back too.
    ended = second.http.delete(second.mcp_url("lab"), headers=on_second)
    assert ended.status_code in (200, 202, 204), ended.text
    assert eventually(lambda: follows_in_redis(prefix, "lab", "avery") == 1, every=0.02), (
        "the ended session's follow stayed in Redis"
    )
    with listen(second, token, ["lab://secret"]) as response:
        frames = events(response)
        ack = next(frames)
        assert ack["params"]["notifications"]["resourceSubscriptions"] == ["lab://secret"]
        # The stream's resource counts while it is open, on the other replica too.
        refused = post(first, on_first, "resources/subscribe", {"uri": "lab://secret"})
        assert refused_as_too_many(refused), refused.text


def test_two_replicas_racing_for_the_last_place_cannot_both_take_it(two_replicas):
    bastion, prefix = two_replicas
    replicas = [Replica(bastion.url, bastion.http), Replica(bastion.replicas[0], bastion.http)]
    token = bastion.token("avery", "lab")
    first = legacy_session(replicas[0], token, "lab")
    assert subscribed(post(replicas[0], first, "resources/subscribe", {"uri": "lab://open"}))
    # One place is left; four sessions, two on each replica, ask for it at the same moment.
    racers = [(at, legacy_session(at, token, "lab")) for at in replicas for _ in range(2)]
    ready = threading.Barrier(len(racers))
    outcomes: list[httpx.Response] = []

    def race(at: Replica, headers: dict) -> None:
        with httpx.Client(timeout=20) as http:
            ready.wait()
            body = {"jsonrpc": "2.0", "id": 7, "method": "resources/subscribe",
                    "params": {"uri": "lab://open"}}  # fmt: skip
            outcomes.append(http.post(at.mcp_url("lab"), json=body, headers=headers))

    threads = [threading.Thread(target=race, args=racer) for racer in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    won = [o for o in outcomes if subscribed(o)]
    assert len(won) == 1, [o.text for o in outcomes]
    assert all(refused_as_too_many(o) for o in outcomes if o not in won)
    assert follows_in_redis(prefix, "lab", "avery") == 2


def test_a_follow_redis_cannot_count_is_refused_and_an_unsubscribe_still_ends_it(tmp_path, caplog):
    folder = tmp_path / "redis"
    folder.mkdir()
    own = PrivateRedis(folder)  # this test's own, which it stops (never the shared one)
    # The harness's timeout (a bound against a hang) is not what refuses the follow: a stopped
    # Redis refuses connections at once.
    settings = {"redis_url": own.url}
    with own, start(tmp_path, gateway=settings) as bastion:
        at = Replica(bastion.url, bastion.http)
        token = bastion.token("avery", "lab")
        headers = legacy_session(at, token, "lab")
        assert subscribed(post(at, headers, "resources/subscribe", {"uri": "lab://open"}))
        own.stop()
        refused = post(at, headers, "resources/subscribe", {"uri": "lab://secret"})
        error = refused.json()["error"]
        assert error["code"] == -32006, refused.text
        assert "gateway.redis_url" in error["message"]
        assert error["data"]["reason"] == "subscriptions_unavailable"
        assert "decision_id" in error["data"]  # the read it was decided as, recorded
        with listen(at, token, ["lab://open"]) as response:
            response.read()
            assert response.json()["error"]["code"] == -32006, response.text
        # An unsubscribe ends the subscription here though Redis cannot be told.
        gone = post(at, headers, "resources/unsubscribe", {"uri": "lab://open"})
        assert gone.json() == {"jsonrpc": "2.0", "id": 7, "result": {}}, gone.text
        session = bastion.app.state.gateway.sessions.get(headers["mcp-session-id"])
        assert session.subscriptions == set()
    assert any("subscriptions cannot be counted" in r.getMessage() for r in caplog.records)


def test_a_closed_port_refuses_every_follow(tmp_path):
    # Nothing listens there: the first follow already cannot be counted.
    settings = {"redis_url": f"redis://127.0.0.1:{free_port()}/0", "redis_timeout_seconds": 0.5}
    with start(tmp_path, gateway=settings) as bastion:
        at = Replica(bastion.url, bastion.http)
        headers = legacy_session(at, bastion.token("sam", "lab"), "lab")
        refused = post(at, headers, "resources/subscribe", {"uri": SAM_READS})
        assert refused.json()["error"]["code"] == -32006, refused.text
        assert bastion.app.state.gateway.sessions.subscriptions_of("lab", "sam") == 0
        # A listen stream is refused too, once its connect was decided: no decision names the
        # refusal, so it is audited as a refused request is (an mcp.refused row), not lost.
        token = bastion.token("sam", "lab")
        with listen(at, token, [SAM_READS]) as response:
            response.read()
            assert response.json()["error"]["code"] == -32006, response.text
        payload = token.split(".")[1]
        agent = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))[
            "client_id"
        ]
        rows = [
            (e.detail["method"], e.detail["reason"], e.detail["code"])
            for e in bastion.app.state.oauth.audit.events("mcp.refused")
            if e.client_id == agent
        ]
        assert rows == [("subscriptions/listen", "subscriptions_unavailable", -32006)]


def test_entries_redis_lost_are_counted_again_by_the_process_that_holds_them():
    require_service("Redis", "127.0.0.1", 6379)
    prefix = f"bastion-test-{uuid.uuid4().hex[:12]}"
    held = {("lab", "avery", "session-1", "lab://open"), ("lab", "avery", "session-1", "lab://b")}

    async def scenario() -> tuple[int, int, int | None]:
        follows = FollowLeases(REDIS_URL, prefix, PATIENCE, lease_seconds=30)
        try:
            assert await follows.take("lab", "avery", "session-1", ["lab://open"], 5) is None
            # A follow this process holds that Redis never had (lost), and one it dropped.
            restored = await follows.renew(lambda: held)
            counted = follows_in_redis(prefix, "lab", "avery")
            held.discard(("lab", "avery", "session-1", "lab://b"))
            await follows.drop("lab", "avery", "session-1", ["lab://b"])
            # Renewing no longer brings back what ended.
            await follows.renew(lambda: held)
            refused = await follows.take("lab", "avery", "other", ["x", "y", "z", "w", "v"], 5)
            return restored, counted, refused
        finally:
            await follows.close()

    try:
        restored, counted, refused = asyncio.run(scenario())
        assert (restored, counted) == (1, 2)
        assert follows_in_redis(prefix, "lab", "avery") == 1
        assert refused == 1  # 1 + 5 > 5: nothing added
    finally:
        drop_redis_keys(prefix)


def test_a_redis_outage_is_logged_once_by_the_renewals_and_once_again(caplog):
    """Every renewal while Redis cannot be reached fails (the gateway renews every third of the
    lease); it is said once, not at each renewal, and once that renewals work again. The outage
    is the test's own: a relay to Redis it cuts."""
    require_service("Redis", "127.0.0.1", 6379)
    caplog.set_level(logging.DEBUG, logger="bastion.gateway.follows")
    prefix = f"bastion-test-{uuid.uuid4().hex[:12]}"
    held = {("lab", "avery", "session-1", "lab://open")}

    def said(level: int = logging.DEBUG) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "bastion.gateway.follows" and r.levelno >= level
        ]

    async def scenario() -> None:
        with Relay(("127.0.0.1", 6379)) as relay:
            follows = FollowLeases(f"redis://127.0.0.1:{relay.port}/0", prefix, PATIENCE, 30)
            try:
                assert await follows.take("lab", "avery", "session-1", ["lab://open"], 5) is None
                relay.cut()
                for _ in range(5):
                    assert await follows.renew(lambda: held) == 0
                assert len(said(logging.WARNING)) == 1, said()
                relay.restore()
                assert await follows.renew(lambda: held) == 0
            finally:
                await follows.close()

    try:
        asyncio.run(scenario())
        lines = said(logging.WARNING)
        assert len(lines) == 2 and "cannot be renewed" in lines[0], lines
        assert "renewed in Redis again" in lines[1], lines
    finally:
        drop_redis_keys(prefix)
