"""Join order: which literal of a clause body to evaluate next, given the variables bound so far.

Filters run as soon as their variables are bound; calls run with as many bound arguments as
possible (each bound argument narrows an index lookup); enumerating every entity of a type is
the last resort. The compiler and the explainer both follow this order.
"""

from __future__ import annotations

from bastion.policy.ast import ListTerm, Var
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
        return 0 if _bound(lit.term, bound) else 100
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
    if (lit.name, len(lit.args)) in BUILTINS:
        return 0 if all(_bound(a, bound) for a in lit.args) else None
    if any(isinstance(a, ListTerm) and not _bound(a, bound) for a in lit.args):
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
    """
    remaining = list(body)
    bound = set(bound)
    ordered: list[Literal] = []
    while remaining:
        best, best_cost = None, None
        for lit in remaining:
            if isinstance(lit, NotLit):
                cost = 1 if negation_shared(lit, body, outside) <= bound else None
            else:
                cost = _cost(lit, bound)
            if cost is not None and (best_cost is None or cost < best_cost):
                best, best_cost = lit, cost
        if best is None:
            lit = remaining[0]
            missing = sorted({v for lit in remaining for v in literal_vars(lit)} - bound)
            raise PlanError(
                getattr(lit, "location", location),
                f"cannot evaluate this rule: variable(s) {', '.join(missing) or '?'} are never bound "
                "(bind them with a call or '=' before comparing, negating or passing them to a builtin)",
            )
        remaining.remove(best)
        ordered.append(best)
        bound |= set(literal_vars(best))
    return ordered


def negation_shared(lit: NotLit, body: tuple[Literal, ...], head_vars: set[str]) -> set[str]:
    """Variables of a negation that are also used elsewhere in the clause (so bound outside it)."""
    elsewhere = set(head_vars)
    for other in body:
        if other is not lit:
            elsewhere |= set(literal_vars(other))
    return set(literal_vars(lit)) & elsewhere
