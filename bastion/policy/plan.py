"""Join order: which literal of a clause body to evaluate next, given the variables bound so far.

Filters run as soon as their variables are bound; calls run with as many bound arguments as
possible (each bound argument narrows an index lookup); enumerating every entity of a type is
the last resort. The compiler and the explainer both follow this order.
"""

from __future__ import annotations

import heapq

from bastion.policy.ast import Arith, EntityOf, ListTerm, Var
from bastion.policy.builtins import BUILTINS
from bastion.policy.errors import Location
from bastion.policy.program import (
    CmpLit,
    Literal,
    NotLit,
    TypeLit,
    literal_vars,
    term_vars,
)


class PlanError(Exception):
    def __init__(self, location: Location, message: str) -> None:
        self.location = location
        super().__init__(message)


def _bound(term, bound: set[str]) -> bool:
    return all(v in bound for v in term_vars(term))


def _cost(lit: Literal, bound: set[str]) -> float | None:
    """Lower is sooner; ``None`` means the literal cannot run yet."""
    if isinstance(lit, TypeLit):
        if _bound(lit.term, bound):
            return 0
        # An unbound variable alone enumerates the entities of the types it names; anything
        # else (arithmetic, a list) can only be computed once its variables are bound.
        return 100 if isinstance(lit.term, Var) else None
    if isinstance(lit, CmpLit):
        left, right = _bound(lit.left, bound), _bound(lit.right, bound)
        if left and right:
            return 0
        if lit.op in ("=", "==") and (left or right):
            unbound = lit.left if right else lit.right
            return 0.5 if isinstance(unbound, Var) else None
        if lit.op == "in" and right and isinstance(lit.left, Var):
            return 3
        return None
    # a call
    builtin = BUILTINS.get((lit.name, len(lit.args)))
    if builtin is not None:
        *inputs, last = lit.args
        if not all(_bound(a, bound) for a in inputs):
            return None
        if _bound(last, bound):
            return 0
        # A builtin that produces its last argument binds an unbound variable there.
        return 0.5 if builtin.produce is not None and isinstance(last, Var) else None
    if any(isinstance(a, (ListTerm, Arith, EntityOf)) and not _bound(a, bound) for a in lit.args):
        return None
    free = sum(1 for a in lit.args if not _bound(a, bound))
    if free == 0:
        return 1
    if free == len(lit.args):
        return 50
    return 2 + free


def plan(
    body: tuple[Literal, ...], bound: set[str], outside: set[str], location: Location
) -> list[Literal]:
    """Order ``body`` for evaluation with ``bound`` variables known on entry.

    ``outside`` names the variables used outside this body (the head's, or the enclosing
    clause's for a negation). A negation runs once the variables it shares are bound; its other
    variables are local to it.

    Greedy: the cheapest literal that can run next (the first written, on a tie). A literal's
    cost depends only on which of its own variables are bound, so it is worked out again only
    when one of them becomes bound: O(n log n) for a body of n literals, not O(n^2).
    """
    bound = set(bound)
    variables = [set(literal_vars(lit)) for lit in body]
    shared = _shared_of_negations(body, variables, outside)
    users: dict[str, list[int]] = {}
    for i, names in enumerate(variables):
        for name in names:
            users.setdefault(name, []).append(i)
    costs: list[float | None] = [None] * len(body)
    heap: list[tuple[float, int]] = []
    done = [False] * len(body)

    def price(i: int) -> None:
        lit = body[i]
        negation = isinstance(lit, NotLit)
        cost = (1 if shared[i] <= bound else None) if negation else _cost(lit, bound)
        if cost is not None and cost != costs[i]:
            heapq.heappush(heap, (cost, i))
        costs[i] = cost

    for i in range(len(body)):
        price(i)
    ordered: list[Literal] = []
    while len(ordered) < len(body):
        while heap and (done[heap[0][1]] or costs[heap[0][1]] != heap[0][0]):
            heapq.heappop(heap)  # an entry left behind by a cost that changed
        if not heap:
            remaining = [lit for i, lit in enumerate(body) if not done[i]]
            missing = sorted({v for lit in remaining for v in literal_vars(lit)} - bound)
            raise PlanError(
                getattr(remaining[0], "location", location),
                f"cannot evaluate this rule: variable(s) {', '.join(missing) or '?'} are never bound "
                "(bind them with a call or '=' before comparing, negating or passing them to a builtin)",
            )
        _, best = heapq.heappop(heap)
        done[best] = True
        ordered.append(body[best])
        newly = variables[best] - bound
        bound |= newly
        touched = {i for name in newly for i in users[name] if not done[i]}
        for i in sorted(touched):
            price(i)
    return ordered


def _shared_of_negations(
    body: tuple[Literal, ...], variables: list[set[str]], outside: set[str]
) -> list[set[str]]:
    """Per literal of ``body``, for a negation, its variables also used elsewhere in the clause
    (in ``outside`` or in another literal), so bound before it runs; the others are its own."""
    uses: dict[str, int] = {}
    for names in variables:
        for name in names:
            uses[name] = uses.get(name, 0) + 1
    return [
        {v for v in names if v in outside or uses[v] > 1} if isinstance(lit, NotLit) else set()
        for lit, names in zip(body, variables, strict=True)
    ]


def negations_shared(body: tuple[Literal, ...], outside: set[str]) -> dict[int, set[str]]:
    """For each negation of ``body`` (by ``id``), the variables it shares with the clause."""
    variables = [set(literal_vars(lit)) for lit in body]
    shared = _shared_of_negations(body, variables, outside)
    return {id(lit): shared[i] for i, lit in enumerate(body) if isinstance(lit, NotLit)}
