"""The waits between attempts at a step that keeps failing: exponential, capped, with jitter.

A loop that tries an expensive step again (a replica's reload of every fact, a fact snapshot, a
listener's registration) waits `Backoff.after_failure` seconds after each failure and calls
`Backoff.succeeded` when it works; the first wait is the loop's ordinary one, so a step that
fails once (a database blip) is tried again as soon as before.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Backoff:
    """``first`` seconds after the first failure in a row, doubled after each next one up to
    ``longest``; each wait drawn between half of that and the whole (jitter: replicas that fail
    together, at a database's return say, do not all try again at the same moment)."""

    first: float
    longest: float
    # Failures in a row since the last success.
    failures: int = 0

    def after_failure(self) -> float:
        """Note a failure; the seconds to wait before the next attempt."""
        self.failures += 1
        # The exponent is bounded so that a step failing for days never overflows a float.
        ceiling = min(self.longest, self.first * 2 ** min(self.failures - 1, 64))
        ceiling = max(ceiling, self.first)
        return random.uniform(ceiling / 2, ceiling)

    def succeeded(self) -> None:
        """The step worked: the next failure waits ``first`` again."""
        self.failures = 0
