"""Waiting in tests for what another thread or process does."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(condition: Callable[[], object], within: float = 20.0, every: float = 0.005) -> bool:
    """Ask ``condition`` every ``every`` seconds until it holds; False if it never did within
    ``within`` seconds (a deadline, not a timing: the caller asserts)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True
