"""The ``rate_limit`` obligation: at most ``max`` calls per ``seconds``, per principal and target.

Counters live in this process (a sliding window of call times per key). Replicas behind a load
balancer each count on their own; sharing counters through Redis is not built yet.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

from bastion.decide.contract import RateLimit
from bastion.facts.model import Entity


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._calls: dict[tuple, deque[float]] = {}

    def admit(self, limits: Sequence[RateLimit], action: str, resource: Entity) -> float | None:
        """Count one call against every limit; return None if admitted, else seconds to wait.

        A refused call is not counted.
        """
        if not limits:
            return None
        now = self.clock()
        windows = []
        wait = 0.0
        for limit in limits:
            key = (limit.principal, action, resource, limit.max, limit.seconds)
            window = self._calls.setdefault(key, deque())
            while window and window[0] <= now - limit.seconds:
                window.popleft()
            if len(window) >= limit.max:
                wait = max(wait, window[0] + limit.seconds - now) if window else limit.seconds
            windows.append(window)
        if wait > 0 or any(limit.max <= 0 for limit in limits):
            return max(wait, 0.001)
        for window in windows:
            window.append(now)
        return None
