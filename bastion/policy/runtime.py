"""What compiled policy code calls at evaluation time: the query state and its helpers.

`Query` carries the request's context and, for recursive rules, the answer tables that make
recursion terminate on cyclic data (a fixpoint per strongly connected group of rules).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


class _Missing:
    """A context field the request did not provide. Every literal that touches it is false."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class _Table:
    __slots__ = ("answers", "complete", "running", "iteration", "scc")

    def __init__(self, scc: int) -> None:
        self.answers: set = set()
        self.complete = False
        self.running = False
        self.iteration = -1
        self.scc = scc


def context_value(context: dict | None, path: tuple[str, ...]) -> Any:
    """What ``context.<path>`` means to a policy: MISSING when absent or null; ``time`` is
    the current time unless the context gives one."""
    value: Any = context
    if path and path[0] == "time" and (value is None or "time" not in value):
        value = {"time": datetime.now(UTC)}
    for name in path:
        if not isinstance(value, dict):
            return MISSING
        value = value.get(name, MISSING)
        if value is MISSING:
            return MISSING
    return MISSING if value is None else value


class Query:
    """The state of one top-level evaluation."""

    __slots__ = ("context", "index", "tables", "active", "dirty", "changed", "iteration")

    def __init__(self, context: dict | None, index: Any) -> None:
        self.context = context
        self.index = index
        self.tables: dict | None = None

    def lookup(self, path: tuple[str, ...]) -> Any:
        return context_value(self.context, path)

    def tabled(self, scc: int, fn: Any, key: tuple, args: tuple, is_bool: bool) -> Any:
        """Evaluate a recursive predicate call with tabling, to a fixpoint, cycles included."""
        if self.tables is None:
            self.tables, self.active, self.dirty, self.changed, self.iteration = {}, {}, {}, {}, {}
        entry = self.tables.get(key)
        if entry is not None and (
            entry.complete or entry.running or entry.iteration == self.iteration.get(scc, 0)
        ):
            if not entry.complete:
                self.dirty[scc] = True
            return bool(entry.answers) if is_bool else tuple(entry.answers)
        if entry is None:
            entry = self.tables[key] = _Table(scc)
        leader = not self.active.get(scc)
        self.active[scc] = self.active.get(scc, 0) + 1
        outer_dirty = self.dirty.get(scc, False)
        try:
            while True:
                if leader:
                    self.changed[scc] = False
                self.dirty[scc] = False
                entry.running, entry.iteration = True, self.iteration.get(scc, 0)
                answers = entry.answers
                try:
                    if is_bool:
                        if fn(self, *args) and not answers:
                            answers.add(())
                            self.changed[scc] = True
                    else:
                        for answer in fn(self, *args):
                            if answer not in answers:
                                answers.add(answer)
                                self.changed[scc] = True
                finally:
                    entry.running = False
                dirty = self.dirty[scc]
                if not dirty or (is_bool and answers):
                    entry.complete = True  # read nothing unfinished (or proved): final
                    self.dirty[scc] = outer_dirty
                    break
                if not leader:
                    self.dirty[scc] = True  # unfinished: the leader of this group iterates
                    break
                if not self.changed[scc]:
                    for other in self.tables.values():
                        if other.scc == scc:
                            other.complete = True
                    self.dirty[scc] = outer_dirty
                    break
                self.iteration[scc] = self.iteration.get(scc, 0) + 1
        finally:
            self.active[scc] -= 1
        return bool(entry.answers) if is_bool else tuple(entry.answers)


def compare(op: str, left: Any, right: Any) -> bool:
    """Ordering comparisons between values of one kind (numbers, or strings); else false."""
    if left is MISSING or right is MISSING:
        return False
    if isinstance(left, bool) or isinstance(right, bool):
        return False
    if (
        isinstance(left, (int, float))
        and isinstance(right, (int, float))
        or type(left) is type(right) is str
    ):
        if op == "<":
            return left < right
        if op == "<=":
            return left <= right
        if op == ">":
            return left > right
        return left >= right
    return False


def contains(container: Any, item: Any) -> bool:
    if item is MISSING or not isinstance(container, (list, tuple, set, frozenset)):
        return False
    return item in container


def members(container: Any) -> Any:
    return container if isinstance(container, (list, tuple, set, frozenset)) else ()
