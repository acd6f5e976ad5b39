"""Where a function runs: on an event loop, or in a worker thread; how long a loop stops."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from tests.waits import PATIENCE


def noting_where(func: Callable[..., Any], seen: list[str]) -> Callable[..., Any]:
    """``func``, noting in ``seen`` where each call of it ran: "event loop" or "worker
    thread"."""

    def noted(*args: Any, **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
            seen.append("event loop")
        except RuntimeError:
            seen.append("worker thread")
        return func(*args, **kwargs)

    return noted


@contextlib.contextmanager
def longest_pause(
    loop: asyncio.AbstractEventLoop, longest: list[float] | None = None
) -> Iterator[list[float]]:
    """The longest time ``loop`` (running in another thread) went without running a ticker
    task that asks to run every millisecond, while the block runs: added, in seconds, to the
    list it yields (``longest``, or a new one) once the block ends. A loop that something holds
    (a C call that keeps the GIL, on its thread or another) runs the ticker late by that long."""
    longest = [] if longest is None else longest
    started, stop = threading.Event(), threading.Event()

    async def ticker() -> float:
        most, last = 0.0, time.perf_counter()
        started.set()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            most, last = max(most, now - last), now
        return most

    running = asyncio.run_coroutine_threadsafe(ticker(), loop)
    assert started.wait(PATIENCE), "the loop did not run the ticker"
    try:
        yield longest
    finally:
        stop.set()
        longest.append(running.result())
