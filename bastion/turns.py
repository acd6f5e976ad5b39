"""Long work on a thread beside the event loop's, in turns, so that the loop gets Python's GIL.

A thread that holds the GIL (building and encoding records, numbering a million facts) keeps
the event loop's thread waiting for it until the interpreter forces a switch, every 5 ms, and
a single C call (a set or an array of a million items) holds it for as long as it runs: a
request that arrives meanwhile waits that long. Work done in turns checks the time between
steps, and after about `TURN` seconds pauses `PAUSE` seconds, long enough for a thread woken by
the release to take the GIL. The loop then waits about one turn, or one step if a step takes
longer: steps must be small (`CHUNK` items of a C call).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any, TypeVar

T = TypeVar("T")

TURN = 0.0003
PAUSE = 0.0001
# Items a step hands to one C call (a set, an array, a join) between two checks of the time.
CHUNK = 1024


class Turns:
    """The clock of one piece of work: `tick` after each step."""

    __slots__ = ("_ends",)

    def __init__(self) -> None:
        self._ends = time.perf_counter() + TURN

    def tick(self) -> None:
        """Pause if this turn's time is up."""
        if time.perf_counter() >= self._ends:
            time.sleep(PAUSE)
            self._ends = time.perf_counter() + TURN

    def chunks(self, items: Iterable[T]) -> Iterator[list[T]]:
        """``items`` as lists of at most `CHUNK`, a tick after each."""
        it = iter(items)
        while chunk := list(islice(it, CHUNK)):
            yield chunk
            self.tick()

    def slices(self, items: Sequence[T]) -> Iterator[tuple[int, Sequence[T]]]:
        """``items`` in slices of at most `CHUNK`, each with its start; a tick after each."""
        for start in range(0, len(items), CHUNK):
            yield start, items[start : start + CHUNK]
            self.tick()


def in_turns(make: Callable[[Any], T], items: Iterable[Any]) -> list[T]:
    """``[make(item) for item in items]``, in turns (a tick after each item)."""
    made = []
    turns = Turns()
    for item in items:
        made.append(make(item))
        turns.tick()
    return made
