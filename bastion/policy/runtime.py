"""What compiled policy code calls at evaluation time: the query state and its helpers.

`Query` carries the request's context, the evaluation budget (`PolicyLimits`) and, for recursive
rules, the answer tables that make recursion terminate on cyclic data (a fixpoint per strongly
connected group of rules).

The budget is spent where work can pile up, never per line of a rule: a step per value a rule
iterates over (counted once, when the facts, entities, list items or recursive answers are
fetched), per call of a recursive rule, and per call of a rule that itself makes many calls.
Non-recursive rules that look facts up one key at a time spend nothing, so ``authorize`` pays
nothing for it on the usual policies. Work that grows with the size of a value is paid by size:
a list searched by ``in`` spends a step per item, and a list built, iterated over, or read from
the context as a policy value a step per value it holds (nested lists and objects counted in
full), so a long list in the request cannot multiply the work of each step.

The budget is handed out in chunks of `STEP_CHUNK` steps, so that time is bounded too
(``evaluation_max_milliseconds``) at no cost to the usual question: code spends from ``steps``
and calls `exhausted` when it goes below 0, which hands out the next chunk, reading the clock,
or refuses. The first chunk is not timed (a question that fits in it is never slowed by a clock).
"""

from __future__ import annotations

from datetime import UTC, datetime
from time import monotonic
from typing import Any, NoReturn

from bastion.policy.builtins.constants import constant_value
from bastion.policy.errors import EvaluationLimit, Undecided
from bastion.policy.limits import DEFAULT_LIMITS, PolicyLimits


class _Missing:
    """A context field the request did not provide. Every literal that touches it is false."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

# Steps handed out at a time (`exhausted`). Small enough that its time is small beside the time
# bound (10,000 compiled steps take from about 1 to a few tens of milliseconds, depending on the
# policy), large enough that reading the clock at each costs nothing measurable.
STEP_CHUNK = 10_000


def first_chunk(budget: int, chunk: int = STEP_CHUNK) -> int:
    """The steps an evaluation starts with (``Query.steps`` and ``Query.granted``): the first
    chunk of its ``budget``."""
    return min(budget, chunk)


class _Table:
    __slots__ = ("answers", "complete", "running", "iteration", "scc")

    def __init__(self, scc: int) -> None:
        self.answers: set = set()
        self.complete = False
        self.running = False
        self.iteration = -1
        self.scc = scc


class FrozenObject(dict):
    """An object (JSON) from the context, as a policy value: compared by content (`same`), and
    hashable like every other value, so that it can be looked up and remembered. Never
    changed."""

    __slots__ = ()

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __eq__(self, other: object) -> bool:
        return same(self, other)

    def __ne__(self, other: object) -> bool:
        return not same(self, other)


class PolicyList(tuple):
    """A list as a policy value: one from the context, one written in a rule, one built while
    evaluating. Equal (`same`) to a list of the same values, and never to an entity, which is
    a tuple of two strings too: a request's ``["User", "alice"]`` is not ``User{"alice"}``.
    Hashed apart from a tuple of the same values, so it finds no fact (facts hold no lists:
    their entities would otherwise be found by a list of their type and id)."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return same(self, other)

    def __ne__(self, other: object) -> bool:
        return not same(self, other)

    def __hash__(self) -> int:
        return hash((PolicyList, tuple.__hash__(self)))


# Values that hold other values: comparing, hashing or searching one costs its size.
_NESTED = (list, tuple, PolicyList, dict, set, frozenset, FrozenObject)
_NESTED_TYPES = frozenset(_NESTED)
# The kind of value each class is, where Python equates values of different kinds (True == 1,
# a tuple with an entity): a class not here is a kind of its own (str, Entity).
_KINDS: dict[type, type] = {
    bool: bool,
    int: float,
    float: float,
    PolicyList: list,
    tuple: list,
    list: list,
    FrozenObject: dict,
    dict: dict,
}


def same(left: Any, right: Any) -> bool:
    """Whether two policy values are equal: of one kind and equal. A boolean is not the number
    1 or 0 (Python's ``True == 1``), a list is not an entity (both tuples); numbers compare by
    value (``1 = 1.0``); lists and objects compare item by item, each item so."""
    cls = left.__class__
    if cls is str:  # the usual case: a string equals only a string
        return right.__class__ is str and left == right
    kind = _KINDS.get(cls, cls)
    if kind is not _KINDS.get(right.__class__, right.__class__):
        return False
    if kind is list:
        return len(left) == len(right) and all(map(same, left, right))
    if kind is dict:
        return left.keys() == right.keys() and all(same(v, right[k]) for k, v in left.items())
    return left == right


def frozen(value: Any) -> Any:
    """A context value as the policy sees it: a list is a `PolicyList` (equal to the same list
    written in the policy), an object a `FrozenObject`, nested ones too."""
    if value.__class__ is list or value.__class__ is tuple:
        if _NESTED_TYPES.isdisjoint(map(type, value)):
            return PolicyList(value)  # a list of plain values (the usual case), at C speed
        return PolicyList(frozen(item) for item in value)
    if isinstance(value, dict):
        return FrozenObject((key, frozen(item)) for key, item in value.items())
    return value


def context_value(context: dict | None, path: tuple[str, ...]) -> Any:
    """What ``context.<path>`` means to a policy: MISSING when absent or null; ``time`` is
    the current time unless the context gives one."""
    value: Any = context
    if path and path[0][0] == "@":  # a built-in constant (``@current_unix_time``)
        value = constant_value(path[0], context)
        return MISSING if value is None else value
    if path and path[0] == "time" and (value is None or "time" not in value):
        value = {"time": datetime.now(UTC)}
    for name in path:
        if not isinstance(value, dict):
            return MISSING
        value = value.get(name, MISSING)
        if value is MISSING:
            return MISSING
    return MISSING if value is None else value


class ReadContext(dict):
    """A request's context that notes what is read of it, for a memory of answers
    (`bastion.decide.contract.Remembered`): ``paths``, each path a policy read
    (``context.arguments.field`` is ``("arguments", "field")``, however much else
    ``context.arguments`` holds), and ``fields``, each top-level field that other code read with
    ``get``, ``[]`` or ``in`` (read whole). Anything that reads the context whole (its keys, its
    items, a copy) marks it ``whole``. The policy reads ``source``, the context as given; the
    rest reads a copy of it."""

    __slots__ = ("source", "paths", "fields", "whole")

    def __init__(self, context: dict) -> None:
        super().__init__(context)
        self.source = context
        self.paths: set[tuple[str, ...]] = set()
        self.fields: set[Any] = set()
        self.whole = False

    def noted(self, path: tuple[str, ...]) -> dict:
        """Note that a policy read ``context.<path>``; the context it reads it from."""
        self.paths.add(path)
        return self.source

    def get(self, key: Any, default: Any = None) -> Any:
        self.fields.add(key)
        return dict.get(self, key, default)

    def __getitem__(self, key: Any) -> Any:
        self.fields.add(key)
        return dict.__getitem__(self, key)

    def __contains__(self, key: Any) -> bool:
        self.fields.add(key)
        return dict.__contains__(self, key)

    def _all(self) -> None:
        self.whole = True

    def keys(self):  # type: ignore[override]
        self._all()
        return dict.keys(self)

    def values(self):  # type: ignore[override]
        self._all()
        return dict.values(self)

    def items(self):  # type: ignore[override]
        self._all()
        return dict.items(self)

    def __iter__(self):  # type: ignore[override]
        self._all()
        return dict.__iter__(self)

    def copy(self):  # type: ignore[override]
        self._all()
        return dict(self)


class Query:
    """The state of one top-level evaluation; `start` (or `Authorizer._begin`, which does the
    same inline on the hot path) resets it before each.

    ``steps`` is what is left of the chunk of the budget handed out last, ``granted`` the steps
    handed out so far (both reset by every evaluation, with one store: ``q.steps = q.granted =
    first_chunk(...)``), and ``began`` when the second chunk was handed out: the evaluation's
    clock, read at each chunk after (`exhausted`)."""

    __slots__ = (
        "context",
        "index",
        "tables",
        "active",
        "dirty",
        "changed",
        "iteration",
        "limits",
        "steps",
        "granted",
        "began",
        "depth",
        "step_limit",
        "chunk",
        "first",
        "frozen",
    )

    def __init__(
        self, context: dict | None, index: Any, limits: PolicyLimits = DEFAULT_LIMITS
    ) -> None:
        self.index = index
        self.limits = limits
        self.depth = 0  # recursive calls in progress; back to 0 when an evaluation ends
        self.began = 0.0
        self.meter("evaluation_max_steps")
        self.start(context)

    def meter(self, limit: str, chunk: int = STEP_CHUNK) -> None:
        """Spend the budget of the setting ``limit`` (``evaluation_max_steps``, or an
        explanation's ``explanation_max_steps``), named when it runs out, ``chunk`` steps at a
        time (fewer where steps are dearer, so that the first, untimed, takes little time)."""
        self.step_limit = limit
        self.chunk = chunk
        self.first = first_chunk(getattr(self.limits, limit), chunk)
        self.steps = self.granted = self.first

    def start(self, context: dict | None) -> None:
        """Begin an evaluation: this context, no tables, the first chunk of the budget."""
        self.context = context
        self.frozen: dict | None = None
        self.tables: dict | None = None
        self.steps = self.granted = self.first

    def read(self, path: tuple[str, ...]) -> Any:
        """``context.<path>`` as the request gave it (for a list only searched with ``in``)."""
        context = self.context
        if context.__class__ is ReadContext:
            context = context.noted(path)
        return context_value(context, path)

    def lookup(self, path: tuple[str, ...]) -> Any:
        """``context.<path>`` as a policy value (a list or object `frozen`)."""
        context = self.context
        if context.__class__ is ReadContext:
            context = context.noted(path)
        value = context_value(context, path)
        cls = value.__class__
        if cls is list or cls is dict:
            return self._frozen(path, value)
        return value

    def _frozen(self, path: tuple[str, ...], value: Any) -> Any:
        """A list or object of the context as a policy value (`frozen`): made once per
        evaluation, for a step per value it holds."""
        made = self.frozen
        if made is None:
            made = self.frozen = {}
        else:
            found = made.get(path)
            if found is not None:
                return found
        if value.__class__ is list and _NESTED_TYPES.isdisjoint(map(type, value)):
            found, size = PolicyList(value), len(value) + 1  # plain values: the usual case
        else:
            found, size = frozen(value), size_of(value)
        self.steps -= size
        if self.steps < 0:
            exhausted(self)
        made[path] = found
        return found

    def tabled(self, scc: int, fn: Any, key: tuple, args: tuple, is_bool: bool) -> Any:
        """Evaluate a recursive predicate call with tabling, to a fixpoint, cycles included."""
        self.steps -= 1
        if self.steps < 0:
            exhausted(self)
        if self.tables is None:
            self.tables, self.active, self.dirty, self.changed, self.iteration = {}, {}, {}, {}, {}
        entry = self.tables.get(key)
        if entry is not None and (
            entry.complete or entry.running or entry.iteration == self.iteration.get(scc, 0)
        ):
            if not entry.complete:
                self.dirty[scc] = True
            return self._answers(entry, is_bool)
        if self.depth >= self.limits.evaluation_max_depth:
            too_deep(self)
        if entry is None:
            entry = self.tables[key] = _Table(scc)
        leader = not self.active.get(scc)
        self.active[scc] = self.active.get(scc, 0) + 1
        outer_dirty = self.dirty.get(scc, False)
        self.depth += 1
        try:
            while True:
                self.steps -= 1  # one more round of the fixpoint
                if self.steps < 0:
                    exhausted(self)
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
        except Undecided:
            # Strict code that cannot be decided stops the whole group: its half-made answers
            # are forgotten, so that a later call works them out again rather than reads them.
            tables = self.tables
            for done in [k for k, other in tables.items() if other.scc == scc]:
                del tables[done]
            raise
        finally:
            self.active[scc] -= 1
            self.depth -= 1
        return self._answers(entry, is_bool)

    def _answers(self, entry: _Table, is_bool: bool) -> Any:
        if is_bool:
            return bool(entry.answers)
        self.steps -= len(entry.answers)  # the caller iterates over every one
        if self.steps < 0:
            exhausted(self)
        return tuple(entry.answers)


# Each way an evaluation stops forgets its answer tables: a table left half filled would read as
# complete to a later question of the same session (and 'not' of it would hold wrongly).


def exhausted(q: Query) -> None:
    """Called where ``q.steps`` went below 0: hands out the next chunk of the budget and returns
    (the evaluation goes on), or refuses (`EvaluationLimit`) once the whole budget is spent or
    the time bound has passed. The clock starts at the second chunk and is read at each after; an
    evaluation that spends no more than its first chunk never comes here."""
    limits = q.limits
    budget = getattr(limits, q.step_limit)
    granted = q.granted
    spent = granted - q.steps
    if spent > budget:
        q.tables = None
        raise EvaluationLimit(q.step_limit, budget, f"more than {budget} steps")
    now = monotonic()
    if granted == q.first:  # the first chunk is spent: the clock starts
        q.began = now
    elif now - q.began > limits.evaluation_max_milliseconds / 1000:
        bound = limits.evaluation_max_milliseconds
        q.tables = None
        raise EvaluationLimit(
            "evaluation_max_milliseconds",
            bound,
            f"more than {bound} ms of evaluation after its first {q.first} steps",
        )
    more = min(q.chunk, budget - spent)
    q.steps = more
    q.granted = spent + more


def too_deep(q: Query) -> NoReturn:
    limit = q.limits.evaluation_max_depth
    q.tables = None
    raise EvaluationLimit(
        "evaluation_max_depth", limit, f"recursive rules nested more than {limit} calls deep"
    )


def stack_exhausted(q: Query) -> NoReturn:
    """For a RecursionError met while evaluating: rules called one another deeper than the
    interpreter's stack allows, before the depth budget was reached."""
    limit = q.limits.evaluation_max_depth
    q.tables = None
    raise EvaluationLimit(
        "evaluation_max_depth",
        limit,
        "rules call one another deeper than the interpreter's stack allows (lower the limit)",
    ) from None


def size_of(value: Any) -> int:
    """How many values ``value`` holds: 1 for a scalar; a list or object counts itself and its
    items, nested ones too, with repeats (``[x, x]`` holds x twice)."""
    cls = value.__class__
    if cls is PolicyList or cls is list or cls is tuple:
        if _NESTED_TYPES.isdisjoint(map(type, value)):
            return len(value) + 1  # a list of plain values (the usual case), at C speed
    elif cls not in _NESTED_TYPES:
        return 1
    size, stack = 1, [value]
    while stack:
        items = stack.pop()
        if isinstance(items, dict):
            items = items.values()
        size += len(items)
        if not _NESTED_TYPES.isdisjoint(map(type, items)):  # a flat list is measured by len
            stack.extend(item for item in items if item.__class__ in _NESTED)
    return size


def built(q: Query, items: tuple) -> PolicyList:
    """A list the policy builds during evaluation, refused once larger than the budget allows
    (counted with repeats, as hashing and comparing it would go: ``[x, x]`` holds x twice).
    Building it spends a step per value it holds."""
    limit = q.limits.evaluation_max_term_size
    size, stack = 1, list(items)
    while stack:
        item = stack.pop()
        size += 1
        if size > limit:
            q.tables = None
            raise EvaluationLimit(
                "evaluation_max_term_size", limit, f"a list of more than {limit} values was built"
            )
        if item.__class__ in _NESTED:
            stack.extend(item.values() if isinstance(item, dict) else item)
    q.steps -= size
    if q.steps < 0:
        exhausted(q)
    return PolicyList(items)


def counted_members(q: Query, container: Any) -> Any:
    """`members`, with each value they hold a step of the budget (a list of lists counted in
    full: each item is compared or searched whole later)."""
    items = members(container)
    q.steps -= size_of(items) - 1
    if q.steps < 0:
        exhausted(q)
    return items


def undecided() -> NoReturn:
    raise Undecided


def proved_or_undecided(strict: Any, q: Query, *args: Any) -> bool:
    """Whether strict code (the body of a ``not`` in ordinary code, or a ``deny`` rule) holds,
    or may hold: one that cannot be decided (`Undecided`) is taken as holding, so the ``not``
    fails and the ``deny`` refuses. The answer tables of the rules it left unfinished are
    forgotten (`Query.tabled`)."""
    try:
        return strict(q, *args)
    except Undecided:
        return True


def orderable(left: Any, right: Any) -> bool:
    """Whether ``<`` and the like can order the two: two numbers (not booleans, not NaN, which
    is in no order with anything), or two strings."""
    lcls, rcls = left.__class__, right.__class__
    if lcls is float and left != left or rcls is float and right != right:
        return False  # NaN
    return (
        (lcls is int or lcls is float) and (rcls is int or rcls is float) or (lcls is rcls is str)
    )


def compare_strict(op: str, left: Any, right: Any) -> bool:
    """`compare` in strict code (where holding refuses: a ``deny`` rule, the body of a ``not``
    in ordinary code, and the rules they call): two values that cannot be ordered may be in
    order, so the comparison holds. A missing value is still false (the rule does not apply)."""
    if left is MISSING or right is MISSING:
        return False
    lcls, rcls = left.__class__, right.__class__
    if not (
        (lcls is int or lcls is float) and (rcls is int or rcls is float) or lcls is rcls is str
    ):
        return True  # not `orderable` (written out: this is a deny rule's hot path)
    if lcls is float and left != left or rcls is float and right != right:
        return True  # NaN, in no order with anything: it cannot be decided either
    if op == "<":
        return left < right
    if op == "<=":
        return left <= right
    if op == ">":
        return left > right
    return left >= right


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


def contains(q: Query, container: Any, item: Any) -> bool:
    """``item in container``, each item compared by `same`; searching a list spends a step per
    item, and, for an ``item`` that is a list or an object, a step per value it holds for each
    item compared with it (the comparison walks it: a search of 100 lists of 1,500 values for
    another such list is 150,000 values compared, not 100); a set is searched by hash, for
    nothing, unless a boolean may have been taken for a number there: then a step per item."""
    cls = container.__class__
    if cls is PolicyList or cls is list or cls is tuple:
        if item is MISSING:
            return False
        q.steps -= len(container) * _compared(item)
        if q.steps < 0:
            exhausted(q)
    elif item is MISSING or not isinstance(container, (list, tuple, set, frozenset)):
        return False
    elif isinstance(container, (list, tuple)):  # a subclass
        q.steps -= len(container) * _compared(item)
        if q.steps < 0:
            exhausted(q)
    if item not in container:  # at C speed: what `same` finds, == finds too
        return False
    kind = item.__class__
    if kind is str:  # a string equals only a string
        return True
    if (kind is int or kind is float) and item != 1 and item != 0:
        return True  # a boolean equals only 1 and 0: this was found as a number
    if isinstance(container, (set, frozenset)):
        q.steps -= len(container)
        if q.steps < 0:
            exhausted(q)
    if kind is bool:
        return any(member is item for member in container)
    if kind is int or kind is float:
        return any(member == item and member.__class__ is not bool for member in container)
    return any(same(item, member) for member in container)


def _compared(item: Any) -> int:
    """The steps of comparing ``item`` with one value: 1, or the values a list or an object
    holds (`size_of`), which a comparison with its like walks."""
    return 1 if item.__class__ not in _NESTED_TYPES else size_of(item)


def members(container: Any) -> Any:
    return container if isinstance(container, (list, tuple, set, frozenset)) else ()


def spent(q: Query, many: Any) -> Any:
    """Several facts found under one key, read inline by compiled code: a step each, as their
    predicate's function would spend."""
    q.steps -= len(many)
    if q.steps < 0:
        exhausted(q)
    return many
