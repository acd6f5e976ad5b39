"""Waiting in tests for what another thread or process does."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any


def eventually(condition: Callable[[], object], within: float = 20.0, every: float = 0.005) -> bool:
    """Ask ``condition`` every ``every`` seconds until it holds; False if it never did within
    ``within`` seconds (a deadline, not a timing: the caller asserts)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


@contextlib.contextmanager
def reads_held(replica: Any, within: float = 30.0) -> Iterator[threading.Event]:
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
