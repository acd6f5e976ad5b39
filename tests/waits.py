"""Waiting in tests for what another thread or process does."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio

# How long a test waits for what another thread or process is to do before calling it stuck: a
# bound against a hang, never what a passing run waits (a wait ends once the thing is done).
# Several test runs share the machine's two cores: `bastion serve` takes 0.7 s to be ready alone
# and 13 s at a load of 14, so a bound of a few seconds asserted a time (and failed under load).
PATIENCE = 120.0

T = TypeVar("T")


def eventually(
    condition: Callable[[], object], within: float = PATIENCE, every: float = 0.005
) -> bool:
    """Ask ``condition`` every ``every`` seconds until it holds; False if it never did within
    ``within`` seconds (a deadline, not a timing: the caller asserts)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


async def eventually_async(
    condition: Callable[[], object], within: float = PATIENCE, every: float = 0.005
) -> bool:
    """`eventually` in an event loop (the loop runs on while it sleeps): ``condition`` must be
    quick and not block, as it is asked in the loop itself."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        await anyio.sleep(every)
    return True


def before_expiry(arrange: Callable[[float], T], lead: float) -> tuple[T, float]:
    """What ``arrange(at)`` made to expire at ``at``, ``lead`` seconds ahead, and checked before
    then, with that ``at``, still ahead once it was done. On a machine too busy for that, made
    again ``lead`` twice as long (an assertion of ``arrange`` that failed past ``at`` is not
    taken: it was not asked before the expiry): a test of what happens at an expiry, not of
    how fast a busy machine arranges it."""
    deadline = time.monotonic() + PATIENCE
    while True:
        at = time.time() + lead
        try:
            made = arrange(at)
        except AssertionError:
            if time.time() < at or time.monotonic() > deadline:
                raise
        else:
            if time.time() < at:
                return made, at
        lead *= 2


def time_enough(attempt: Callable[[float], T | None], seconds: float) -> tuple[T, float]:
    """What ``attempt(seconds)`` made of a bound of ``seconds`` (a timeout that must run out)
    within which other steps must succeed first, and that bound. ``attempt`` gives None when
    they had not (on a machine too busy for them in that time): it is made again with the bound
    twice as long, until they have. A test of what happens at the bound, not of how much a busy
    machine does before it; fails once PATIENCE has passed."""
    deadline = time.monotonic() + PATIENCE
    while (made := attempt(seconds)) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"what must succeed within the bound did not, up to {seconds:g} s")
        seconds *= 2
    return made, seconds


def past(at: float, clock: Callable[[], float] = time.time) -> None:
    """Sleep until ``clock`` (``time.time``, or ``time.monotonic`` for a bound another process
    measures with it) is past ``at``: an expiry, or a bound, crossed."""
    while (left := at - clock()) >= 0:
        time.sleep(left + 0.001)


def until_ready(
    process: subprocess.Popen, ready: Callable[[], bool], log: Path, within: float = PATIENCE
) -> None:
    """Until `bastion serve`'s ``process`` is ``ready()`` (asked every 50 ms). Fails, with its
    ``log``, if it ends first, or is still not ready after ``within`` seconds (stuck)."""
    deadline = time.monotonic() + within
    while process.poll() is None:
        if ready():
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"bastion serve did not become ready in {within:.0f} s:\n{log.read_text()}"
            )
        time.sleep(0.05)
    raise AssertionError(f"bastion serve exited:\n{log.read_text()}")


@contextlib.contextmanager
def reads_held(replica: Any, within: float = PATIENCE) -> Iterator[threading.Event]:
    """A replica's reads of the change log held back, as on a loaded machine, until the event
    this gives is set (or for ``within`` seconds each); set, and the reads put back, at the end."""
    held, read = threading.Event(), replica.store.changes_since

    def slow_read(*args: Any, **kwargs: Any) -> Any:
        held.wait(within)
        return read(*args, **kwargs)

    replica.store.changes_since = slow_read
    try:
        yield held
    finally:
        held.set()
        replica.store.changes_since = read


def run_settled(func: Callable[..., Any], *args: Any) -> Any:
    """``anyio.run(func, *args)``, then until the tasks it left running in that loop (a read
    in the background: `bastion.oauth.jwks.CoalescedFetches.in_background`) have ended, so the
    next run sees what they found (a loop that ends cancels them)."""

    async def run() -> Any:
        try:
            return await func(*args)
        finally:
            others = asyncio.all_tasks() - {asyncio.current_task()}
            if others:
                await asyncio.wait(others)

    return anyio.run(run)
