"""Large JSON (an upstream's message, a result held for review): read, masked and written on a
worker thread, in turns (`bastion.turns`) that let the event loop have the GIL, so that one large
message does not stop every other request.

JSON text of at least `OFF_LOOP_BYTES` is read on a worker thread (the caller compares its
length: a smaller one, nearly every message, pays that comparison and nothing else); one that is
an object comes back as a `LargeMessage`. The gateway notes it (`Exchange.forward`), masks and
writes its answer on a worker thread too; the approval store seals a held result that is one,
and opens a large sealed one, in turns (`bastion.approvals.store.Sealed`). A thread alone would
not do: json's C reader and writer keep the GIL from start to end, so the loop would wait as
long as before. Here the reader calls Python after each object (`object_hook`), and the writer
is json's own `iterencode`, Python between the values: each of those steps is a tick of
`bastion.turns.Turns`, which pauses every 0.3 ms for the loop to take the GIL. The text written
is the same, byte for byte, as `bastion.gateway.jsonrpc.encode` writes (json promises it of
`iterencode`), and what is read is the same value, or the same error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json import JSONEncoder
from typing import Any

from bastion.turns import Turns, full_passes_held

# 1 MiB of JSON text. json's C code reads and writes some tens to some hundreds of MB a second,
# by shape (one long text is quickest, many small objects slowest): below 1 MiB that is a few
# milliseconds on the loop, of the order of the 5 ms a thread may hold the GIL anyway before
# another takes it; past it the pause grows with the size, to hundreds of milliseconds at the
# 64 MiB an upstream may send. Below it, too, the thread hop and the stepwise writer (several
# times the C writer's work on many small values) would cost more than they spare.
OFF_LOOP_BYTES = 1 << 20


class LargeMessage(dict):
    """JSON read off the loop (`OFF_LOOP_BYTES` of text or more: an upstream's message, a held
    result): a dict in every way, whose class says that what is made of it is masked and
    written off the loop."""

    __slots__ = ()


def object_hook(turns: Turns) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The object hook of the large reader: gives each object back as it is, after a tick of
    ``turns``."""
    tick = turns.tick

    def handed_on(value: dict[str, Any]) -> dict[str, Any]:
        tick()
        return value

    return handed_on


# Compact, as `bastion.gateway.jsonrpc.encode` writes; each `iterencode` keeps its own markers,
# so any number of threads may write at once.
_STEPWISE = JSONEncoder(separators=(",", ":"))


def written(value: Any) -> bytes:
    """``encode(value)``, on a worker thread, in turns. (What it makes is text, which
    the garbage collector does not follow: its passes are left alone.)"""
    pieces = Turns().chunks(_STEPWISE.iterencode(value))
    return b"".join(["".join(piece).encode() for piece in pieces])


def read(data: bytes) -> Any:
    """``json.loads(data)``, on a worker thread, in turns (a tick after each object; the
    collector's full passes held meanwhile); an object comes back as a `LargeMessage`."""
    with full_passes_held():
        value = json.loads(data, object_hook=object_hook(Turns()))
    return LargeMessage(value) if value.__class__ is dict else value


# As `json.dumps` writes (its default separators).
_STEPWISE_SPACED = JSONEncoder()


def loads(text: str) -> Any:
    """``json.loads(text)`` of a large text (the JSON of a text block being masked), on a worker
    thread, in turns: the same value, or the same error."""
    with full_passes_held():
        return json.loads(text, object_hook=object_hook(Turns()))


def dumps(value: Any) -> str:
    """``json.dumps(value)``, on a worker thread, in turns."""
    return "".join(["".join(part) for part in Turns().chunks(_STEPWISE_SPACED.iterencode(value))])
