"""Every store on Redis says an outage once, not once per call (`bastion.redis_client.RedisAway`):
rate limits, behaviour counters, subscriptions and session labels are asked at each call, so a
Redis away while a gateway is under load logged an error for every call (and, for the behaviour
counters, two). Now an error when the outage begins (or its error changes), the failed calls
after it at DEBUG, and a warning once Redis answers again. Each call still fails closed as
before. The outage is the test's own: a relay to the shared Redis that it cuts."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

import pytest

from bastion.decide.contract import RateLimit
from bastion.delegation.labels import LabelKey, LabelsUnavailable, RedisLabels
from bastion.facts.model import Entity
from bastion.gateway.follows import FollowLeases, FollowsUnavailable
from bastion.gateway.ratelimit import LimitsUnavailable, RedisRateLimiter
from bastion.signals.behavior import RedisBehavior, scope_keys
from tests.conftest import drop_redis_keys, require_service
from tests.redis_outage import RedisRelay
from tests.waits import PATIENCE

# Calls that fail while Redis is away: enough that a line at each would show.
FAILED_CALLS = 5
TOOL = Entity("Tool", "desk/search")
LIMIT = (RateLimit(Entity("User", "sam"), 1000, 60),)
KEY = LabelKey("sam", "planner", "t-1")


def rate_limits(url: str, prefix: str) -> tuple[Callable[[], Awaitable[bool]], object]:
    limiter = RedisRateLimiter(url, prefix, PATIENCE)

    async def call() -> bool:
        try:
            await limiter.admit(LIMIT, "call", TOOL, uuid.uuid4().hex)
        except LimitsUnavailable:
            return False
        return True

    return call, limiter


def behaviour(url: str, prefix: str) -> tuple[Callable[[], Awaitable[bool]], object]:
    counters = RedisBehavior(url, prefix, timeout=PATIENCE)

    async def call() -> bool:
        view = counters.view("sam", "agent-1", repr(TOOL))
        await counters.prepare(view)
        return view._source is not None  # read, or unavailable (a rule reading it refuses)

    return call, counters


def subscriptions(url: str, prefix: str) -> tuple[Callable[[], Awaitable[bool]], object]:
    follows = FollowLeases(url, prefix, PATIENCE)

    async def call() -> bool:
        try:
            await follows.take("lab", "sam", "session-1", ["lab://open"], 5)
        except FollowsUnavailable:
            return False
        return True

    return call, follows


def labels(url: str, prefix: str) -> tuple[Callable[[], Awaitable[bool]], object]:
    store = RedisLabels(url, prefix, timeout=PATIENCE)

    async def call() -> bool:
        try:
            await store.record([KEY], ["pii"])
            await store.labels(KEY)
        except LabelsUnavailable:
            return False
        return True

    return call, store


@pytest.mark.parametrize(
    "store, logger",
    [
        (rate_limits, "bastion.gateway.ratelimit"),
        (behaviour, "bastion.signals.behavior"),
        (subscriptions, "bastion.gateway.follows"),
        (labels, "bastion.delegation.labels"),
    ],
)
def test_a_redis_outage_is_logged_once_by_each_store_and_once_again(store, logger, caplog):
    require_service("Redis", "127.0.0.1", 6379)
    caplog.set_level(logging.DEBUG, logger=logger)
    prefix = f"bastion-test-{uuid.uuid4().hex[:12]}"

    def said(level: int = logging.DEBUG) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == logger and r.levelno >= level and "Redis at" in r.getMessage()
        ]

    async def scenario() -> None:
        with RedisRelay() as relay:
            call, made = store(relay.url, prefix)
            try:
                assert await call()
                relay.cut()
                for _ in range(FAILED_CALLS):
                    assert not await call()  # refused (fail closed), every time
                assert len(said()) >= FAILED_CALLS, said()
                assert len(said(logging.WARNING)) == 1, said()
                relay.restore()
                assert await call()
            finally:
                await made.close()

    try:
        asyncio.run(scenario())
        lines = said(logging.WARNING)
        assert len(lines) == 2 and lines[1].endswith("answers again"), lines
    finally:
        drop_redis_keys(prefix)


def test_one_outage_is_one_error_whatever_the_connection_errors_say(caplog):
    """A Redis stopped fails the connection open at that moment as "Connection closed by
    server", and the next ones as "Error 111 connecting ...": one outage, said once. A timeout
    after them is another failure, said again."""
    from redis import exceptions

    from bastion.redis_client import RedisAway

    caplog.set_level(logging.DEBUG, logger="bastion.test")
    away = RedisAway(logging.getLogger("bastion.test"), "redis://:secret@127.0.0.1:1/0", "tests")
    away.failed("not counted", exceptions.ConnectionError("Connection closed by server."))
    away.failed("not counted", exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:1."))
    away.failed("not counted", exceptions.TimeoutError("Timeout reading from 127.0.0.1:1"))
    away.answered()
    loud = [(r.levelno, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert [level for level, _ in loud] == [logging.ERROR, logging.ERROR, logging.WARNING], loud
    assert "Connection closed" in loud[0][1] and "Timeout" in loud[1][1], loud
    assert loud[2][1] == "tests: Redis at redis://:***@127.0.0.1:1/0 answers again", loud
    assert all("secret" not in message for _, message in loud), loud


def test_behaviour_counts_dropped_behind_a_slow_redis_are_said_once_then_counted(caplog):
    """Behaviour writes beyond `RedisBehavior.MAX_PENDING` are dropped: the gateway under load
    behind a Redis that does not answer logged an error at every call. Now an error at the
    first dropped, and once writes are taken again a warning with how many were dropped."""
    require_service("Redis", "127.0.0.1", 6379)
    caplog.set_level(logging.DEBUG, logger="bastion.signals.behavior")
    prefix = f"bastion-test-{uuid.uuid4().hex[:12]}"
    keys = scope_keys("sam", "agent-1", "target")

    def said(level: int) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "bastion.signals.behavior" and r.levelno >= level
        ]

    async def scenario() -> None:
        counters = RedisBehavior("redis://127.0.0.1:6379/0", prefix, timeout=PATIENCE)
        counters.MAX_PENDING = 3
        try:
            # No await between them: the first three writes wait, the next five find no room.
            for _ in range(8):
                counters.observe(keys, False, False, "target", "")
            assert len(counters._pending) == 3
            assert said(logging.WARNING) == [
                "behaviour counts dropped: 3 writes already wait for Redis (said again once"
                " they are taken)"
            ]
            await asyncio.wait(set(counters._pending))
            counters.observe(keys, False, False, "target", "")
            assert said(logging.WARNING)[1:] == [
                "behaviour counts are written again; 5 dropped while writes waited for Redis"
            ]
            await asyncio.wait(set(counters._pending))
            view = counters.view("sam", "agent-1", "target")
            await counters.prepare(view)
            assert view["user"]["calls"]["minute"]["count"] == 4  # the three, then the one
        finally:
            await counters.close()

    try:
        asyncio.run(scenario())
    finally:
        drop_redis_keys(prefix)
