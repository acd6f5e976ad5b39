"""A background round (a sweep, a prune, a purge) run through an outage the test makes itself:
a `tests.relays.Relay` to PostgreSQL it cuts, then restores. What the round says meanwhile is
read from pytest's ``caplog``: once when the outage begins, once when the round works again,
never a warning at every round."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from tests.relays import Relay
from tests.waits import PATIENCE

# Rounds that fail (said at DEBUG or louder) before the outage ends: enough that a warning at
# each would show.
FAILED_ROUNDS = 6


def logged(caplog, logger: str, about: str) -> Callable[..., list[str]]:
    """What ``logger`` said of ``about`` so far, at ``level`` or louder (DEBUG by default)."""

    def said(level: int = logging.DEBUG) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == logger and r.levelno >= level and about in r.getMessage()
        ]

    return said


def through_a_cut(
    relay: Relay,
    rounds: Callable[[], Awaitable[None]],
    said: Callable[..., list[str]],
    meanwhile: Callable[[], None] = lambda: None,
) -> None:
    """Run ``rounds`` (a background loop) while ``relay`` is cut for `FAILED_ROUNDS` failed
    rounds, which must have said one warning, then restored until a second one (that it works
    again). ``meanwhile`` runs once the relay is cut (what the rounds are to write later)."""

    async def scenario() -> None:
        task = asyncio.ensure_future(rounds())
        try:
            relay.cut()
            meanwhile()
            async with asyncio.timeout(PATIENCE):
                while len(said()) < FAILED_ROUNDS:
                    await asyncio.sleep(0.01)
            assert len(said(logging.WARNING)) == 1, said()
            relay.restore()
            async with asyncio.timeout(PATIENCE):
                while len(said(logging.WARNING)) < 2:
                    await asyncio.sleep(0.01)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
