"""Where a function runs: on an event loop, or in a worker thread."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


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
