"""A replica killed outright (SIGKILL: nothing removed, nothing said) frees the places its users
followed once their lease lapses: two real `bastion serve` replicas on one PostgreSQL and one
Redis, where a user may follow one resource on a server (``max_subscriptions_per_user``) and
a follow's lease is a few seconds (``subscription_lease_seconds``). The rest of the shared count
(across replicas, unsubscribe, races, Redis away): tests/gateway/test_shared_subscriptions.py."""

from __future__ import annotations

import os
import signal
import time

import httpx
import redis

from tests.conftest import REDIS_URL
from tests.gateway.streams import events, modern_headers, modern_request
from tests.gateway.support import PASSWORD, access_token
from tests.waits import PATIENCE, eventually

from .balancer import deployment

LEASE = 5
GATEWAY = f"max_subscriptions_per_user = 1\nsubscription_lease_seconds = {LEASE}\n"


def listen(http: httpx.Client, base: str, token: str):
    body = modern_request("watch", "subscriptions/listen", {"notifications": {
        "resourceSubscriptions": ["lab://open"]}})  # fmt: skip
    headers = modern_headers(token, "subscriptions/listen")
    return http.stream("POST", f"{base}/mcp/labhttp", json=body, headers=headers)


def granted(http: httpx.Client, base: str, token: str) -> bool:
    """Whether a listen stream for lab://open opens on ``base`` (closed again at once), or is
    refused as one follow too many."""
    with listen(http, base, token) as response:
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            ack = next(events(response))
            return ack["params"]["notifications"].get("resourceSubscriptions") == ["lab://open"]
        response.read()
        error = response.json()["error"]
        assert response.status_code == 400 and error["code"] == -32602, response.text
        assert "gateway.max_subscriptions_per_user" in error["message"]
        return False


def lease_end(prefix: str) -> float:
    """When (epoch seconds, Redis's clock: this machine's) the last lease of a follow counted
    under ``prefix`` ends: the latest score of its sets (bastion.gateway.follows)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        scores = [
            score
            for key in client.scan_iter(f"{prefix}:follows:*")
            for _, score in client.zrange(key, 0, -1, withscores=True)
        ]
    finally:
        client.close()
    assert scores, f"no follow counted in Redis under {prefix}"
    return max(scores) / 1000


def test_a_replica_killed_outright_frees_its_places_once_their_lease_lapses(tmp_path, postgres_url):
    with (
        deployment(tmp_path, postgres_url, gateway=GATEWAY) as lb,
        httpx.Client(timeout=20) as http,
    ):
        token = access_token(
            http, lb.url, lb.mcp_url("labhttp"), "avery", PASSWORD, "customers:read"
        )
        doomed, survivor = lb.replicas["a"], lb.replicas["b"]
        with listen(http, doomed, token) as stream:
            frames = events(stream)  # held: the stream stays open while it is read
            ack = next(frames)
            assert ack["params"]["notifications"]["resourceSubscriptions"] == ["lab://open"]
            # Held past its first lease: renewed by its replica, the place stays taken.
            time.sleep(LEASE * 1.5)
            assert not granted(http, survivor, token)
            # Its lease ends then at the earliest (a renewal before the kill moves it later).
            lapses = lease_end(lb.redis_prefix)
            os.kill(lb.pids["a"], signal.SIGKILL)
        # Nobody removes the dead replica's entry: it is still counted until its lease lapses...
        # A check that ended before then must find the place taken; one a busy machine
        # answered only after it may find it free.
        taken = not granted(http, survivor, token)
        assert taken or time.time() >= lapses, "freed before the dead replica's lease lapsed"
        # ... and lapses with its lease: the place is free again.
        freed = eventually(lambda: granted(http, survivor, token), LEASE + PATIENCE, every=0.5)
        assert freed, "the killed replica's follow was never freed"
