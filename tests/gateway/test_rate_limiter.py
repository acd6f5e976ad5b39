"""The in-process rate limiter: a sliding window per principal and target, which forgets the
windows whose calls have all left them, so that calls to ever new targets cannot grow its memory
without bound, and never forgets a window that still holds a call."""

from __future__ import annotations

from bastion.decide.contract import RateLimit
from bastion.facts.model import Entity
from bastion.gateway.ratelimit import SWEEP_AT, RateLimiter
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
