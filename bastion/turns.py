"""Long work on a thread beside the event loop's, in turns, so that the loop gets Python's GIL.

A thread that holds the GIL (building and encoding records, numbering a million facts) keeps
the event loop's thread waiting for it until the interpreter forces a switch, every 5 ms, and
a single C call (a set or an array of a million items) holds it for as long as it runs: a
request that arrives meanwhile waits that long. Work done in turns checks the time between
steps, and after about `TURN` seconds pauses (`PAUSE`), long enough for a thread woken by the
release to take the GIL. The loop then waits about one turn, or one step if a step takes
longer: steps must be small (`CHUNK` items of a C call; one element of a JSON array,
`loads_in_turns`). The garbage collector's passes hold the GIL too: `collector_paused` keeps
them from starting over and over while such work makes its objects.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any, TypeVar

T = TypeVar("T")

TURN = 0.0003
# Asked of `time.sleep`, which sleeps longer by the kernel's timer slack (50 µs by default on
# Linux): about 95 µs here, in which a thread waiting for the GIL wakes and takes it. Asked for
# 0.1 ms, it slept 180 µs, and a large change of the fact log took 3.7–5.4 s to put in force
# instead of 3.1 (docs/benchmarks.md). `time.sleep(0)` would lean on the slack alone: a thread
# with none set (`PR_SET_TIMERSLACK`) then handed the GIL over after 14 to 39 of 40 pauses (29 to
# 36 with this one; 38 of 40 with either at the default slack).
PAUSE = 0.00002
# Items a step hands to one C call (a set, an array, a join) between two checks of the time.
CHUNK = 1024
# Bytes of text a step splits into lines (`Turns.lines`).
PIECE = 65536


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

    def each(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, a tick after each."""
        for item in items:
            yield item
            self.tick()

    def empty(self, items: list | dict | set) -> None:
        """Let go of what ``items`` holds a `CHUNK` at a time, a tick after each: freed whole, a
        million objects hold the GIL for tens of milliseconds in one call."""
        if isinstance(items, list):
            while items:
                del items[-CHUNK:]
                self.tick()
            return
        take = items.popitem if isinstance(items, dict) else items.pop
        while items:
            for _ in range(min(CHUNK, len(items))):
                take()
            self.tick()

    def lines(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """The lines of the text the ``chunks`` make one after the other, as
        ``b"".join(chunks).splitlines()`` gives them, without that join (21 MB, on the event
        loop, were 20 ms and more): each chunk is split a piece of about `PIECE` bytes at a
        time, each piece cut just after a newline (so a ``\\r\\n`` stays whole), and what
        follows a chunk's last newline is carried to the next; a tick after each line."""
        held: list[bytes] = []  # the text since the last newline
        for chunk in chunks:
            first = chunk.find(b"\n")
            if first < 0:
                held.append(chunk)
                continue
            start = 0
            if held:  # the line that began in an earlier chunk ends here
                held.append(chunk[: first + 1])
                yield from self._pieces(b"".join(held))
                start = first + 1
            last = chunk.rfind(b"\n") + 1
            yield from self._pieces(chunk, start, last)
            held = [chunk[last:]] if last < len(chunk) else []
        if held:
            yield from self._pieces(b"".join(held))

    def _pieces(self, data: bytes, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """The lines of ``data[start:stop]``, a piece at a time (`lines`)."""
        at, stop = start, len(data) if stop is None else stop
        while at < stop:
            cut = data.find(b"\n", at + PIECE, stop)
            end = stop if cut < 0 else cut + 1
            for line in data[at:end].splitlines():
                yield line
                self.tick()
            at = end

    def slices(self, items: Sequence[T]) -> Iterator[tuple[int, Sequence[T]]]:
        """``items`` in slices of at most `CHUNK`, each with its start; a tick after each."""
        for start in range(0, len(items), CHUNK):
            yield start, items[start : start + CHUNK]
            self.tick()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused for a piece of work that makes many objects
    none of which can be cyclic garbage (a replica's first load, a fact snapshot's encoding):
    otherwise it starts pass after pass over them, each holding the GIL for as long as
    it runs (0.3 s and more at 200,000 facts). Around CPU work only, never around a wait: the
    collector is the whole process's."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# `full_passes_held`: how many pieces of work hold them, and the thresholds to put back.
_held = 0
_held_lock = threading.Lock()
_thresholds = gc.get_threshold()


@contextlib.contextmanager
def full_passes_held() -> Iterator[None]:
    """Python's cyclic garbage collector kept from its full passes (those that walk every object
    the process holds) for a piece of work that makes many long-lived objects beside an event
    loop, while its young passes go on: each of those walks only what was made since the one
    before, so the work's objects reach the oldest generation a few thousand at a time. With the
    collector paused instead (`collector_paused`), its first pass after the work walks all of
    them at once (about 0.15 s at 300,000 facts). Pieces of work on several threads may hold them
    at once; the thresholds are put back when the last ends."""
    global _held, _thresholds
    with _held_lock:
        if _held == 0:
            _thresholds = gc.get_threshold()
            gc.set_threshold(_thresholds[0], _thresholds[1], 2**31 - 1)
        _held += 1
    try:
        yield
    finally:
        with _held_lock:
            _held -= 1
            if _held == 0:
                gc.set_threshold(*_thresholds)


def in_turns(make: Callable[[Any], T], items: Iterable[Any]) -> list[T]:
    """``[make(item) for item in items]``, in turns (a tick after each item)."""
    return [make(item) for item in Turns().each(items)]


_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")
_BLANKS = (" ", "\t", "\n", "\r")


def loads_in_turns(text: str, turns: Turns) -> Any:
    """``json.loads(text)``, in turns: in an object, each array's elements are decoded one at a
    time, with a tick after each (a 20 MB change of the fact log is otherwise one C call of most
    of a second). Anything else, and each element, is decoded as ``json.loads`` decodes it;
    malformed text raises `ValueError` as it does."""

    def space(at: int) -> int:
        return _SPACE.match(text, at).end()  # type: ignore[union-attr]  # always matches

    def expect(at: int, marks: str) -> str:
        mark = text[at : at + 1]
        if mark and mark in marks:
            return mark
        raise json.JSONDecodeError(f"Expecting one of {marks!r}", text, at)

    scan = _DECODER.raw_decode
    element = _DECODER.scan_once  # `raw_decode` without its Python frame, for each element
    at = space(0)
    if not text.startswith("{", at):
        return json.loads(text)
    out: dict[str, Any] = {}
    at = space(at + 1)
    if text.startswith("}", at):
        at += 1
    else:
        while True:
            if not text.startswith('"', at):
                raise json.JSONDecodeError("Expecting property name", text, at)
            key, at = scan(text, at)
            at = space(at)
            expect(at, ":")
            at = space(at + 1)
            if text.startswith("[", at):
                value: Any = []
                at = space(at + 1)
                if text.startswith("]", at):
                    at += 1
                else:
                    append, tick = value.append, turns.tick
                    while True:
                        try:
                            item, at = element(text, at)
                        except StopIteration as e:  # as `raw_decode` says it
                            raise json.JSONDecodeError("Expecting value", text, e.value) from None
                        append(item)
                        tick()
                        # bastion writes no space between elements: looked for only if there.
                        if text.startswith(",", at) and not text.startswith(_BLANKS, at + 1):
                            at += 1
                            continue
                        at = space(at)
                        if expect(at, ",]") == "]":
                            at += 1
                            break
                        at = space(at + 1)
            else:
                value, at = scan(text, at)
            out[key] = value
            at = space(at)
            if expect(at, ",}") == "}":
                at += 1
                break
            at = space(at + 1)
    if space(at) != len(text):
        raise json.JSONDecodeError("Extra data", text, at)
    return out
