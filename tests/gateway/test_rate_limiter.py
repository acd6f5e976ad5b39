"""The in-process rate limiter: a sliding window per principal and target, which forgets the
windows whose calls have all left them, so that calls to ever new targets cannot grow its memory
without bound, and never forgets a window that still holds a call."""

from __future__ import annotations

import asyncio
import inspect

from bastion.decide.contract import RateLimit
from bastion.facts.model import Entity
from bastion.gateway.ratelimit import SWEEP_AT, RateLimiter, RedisRateLimiter
from tests.clock import ManualClock

SAM = Entity("User", "sam")


def admit(limiter: RateLimiter, limit: RateLimit, target: str) -> float | None:
    # admit awaits nothing in process: one step of its coroutine runs it to its end.
    try:
        limiter.admit([limit], "read", Entity("Doc", target)).send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the in-process limiter waited")


def test_calls_to_ever_new_targets_do_not_grow_the_counters_without_bound():
    clock = ManualClock()
    limiter = RateLimiter(clock)
    limit = RateLimit(SAM, 5, 1)
    for n in range(5 * SWEEP_AT):
        assert admit(limiter, limit, f"doc-{n}") is None
        clock.now += 0.001  # 1,000 calls a second: about a thousand windows hold a call
    assert len(limiter._calls) <= 2 * SWEEP_AT + 1


def test_a_window_that_still_holds_a_call_is_never_forgotten():
    clock = ManualClock()
    limiter = RateLimiter(clock)
    slow = RateLimit(SAM, 1, 3600)
    assert admit(limiter, slow, "report") is None
    for n in range(3 * SWEEP_AT):  # sweeps come and go; the hour's call stays counted
        admit(limiter, RateLimit(SAM, 5, 1), f"doc-{n}")
        clock.now += 0.01
    assert admit(limiter, slow, "report") is not None
    clock.now += 3600
    assert admit(limiter, slow, "report") is None


def test_the_in_process_limiter_answers_every_method_the_redis_one_does():
    """The gateway calls either limiter alike (`admit`, `give_back`, `close` at shutdown, whose
    errors it suppresses: a method lost would go unseen there)."""
    public = {n for n, f in inspect.getmembers(RedisRateLimiter, inspect.isfunction)}
    public = {n for n in public if not n.startswith("_")} - {"key"}
    assert public <= {n for n in dir(RateLimiter) if callable(getattr(RateLimiter, n))}
    limiter = RateLimiter(ManualClock())
    limit = RateLimit(SAM, 1, 60)
    assert admit(limiter, limit, "doc") is None
    assert asyncio.run(limiter.give_back([limit], "read", Entity("Doc", "doc"), "")) is True
    assert admit(limiter, limit, "doc") is None  # given back: the window had room again
    asyncio.run(limiter.close())
