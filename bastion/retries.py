"""A step that keeps failing: the waits between attempts (exponential, capped, with jitter), and
what the log says of it (once when it begins to fail, once when it works again).

A loop that tries an expensive step again (a replica's reload of every fact, a fact snapshot, a
listener's registration) waits `Backoff.after_failure` seconds after each failure and calls
`Backoff.succeeded` when it works; the first wait is the loop's ordinary one, so a step that
fails once (a database blip) is tried again as soon as before. A loop that runs for as long as
the process does (a background round, a stream opened again) tells its `Outage` of each failure
and success: a database away for an hour is one warning and one "again", not one a round.
"""

from __future__ import annotations

import logging
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


class Outage:
    """What ``log`` says of a step run again and again: its first failure (at ``level``, or
    WARNING), the failures after it at DEBUG while they are of the same ``kind``, and once that
    the step works again. A failure of another kind (`kind_of`: another error) is said again."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        # The kind of the failures under way; None while the step works.
        self.failure: str | None = None

    @property
    def failing(self) -> bool:
        return self.failure is not None

    def failed(
        self,
        message: str,
        *args: object,
        kind: str = "",
        level: int = logging.WARNING,
        exc_info: bool = False,
        stacklevel: int = 1,
    ) -> bool:
        """Note a failure and log ``message % args``: at ``level`` if it begins an outage or is
        of another ``kind`` than the one before, else at DEBUG. True if it was said at
        ``level``. The record names the caller's line (``stacklevel`` 1), or its caller's (2:
        a helper saying the failures of several rounds, `bastion.db.round_failed`)."""
        first = self.failure != kind
        self.failure = kind
        # Attributed to the caller's line, not this one.
        self.log.log(
            level if first else logging.DEBUG,
            message,
            *args,
            exc_info=exc_info,
            stacklevel=stacklevel + 1,
        )
        return first

    def ended(self, message: str, *args: object) -> bool:
        """Note that the step worked; if it was failing, log ``message % args`` (a warning, as
        its failure was). True if it was failing."""
        if self.failure is None:
            return False
        self.failure = None
        self.log.warning(message, *args, stacklevel=2)
        return True


def kind_of(error: BaseException) -> str:
    """An error's class and the first line of its message: two failures of one kind are the
    same failure again (`Outage`)."""
    line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__qualname__}: {line}"
