"""A deliberately simple reference evaluator, used only by tests.

Naive bottom-up evaluation: starting from the facts, apply every clause to everything known
until nothing new appears, stratum by stratum (so a negation only looks at finished predicates).
Variables that the body leaves unbound range over the active domain (every value in the facts,
the policy and the query). Slow and obviously correct, so the fast engine is checked against it.
"""

from __future__ import annotations

import itertools
from typing import Any

from bastion.facts.model import Entity
from bastion.policy.ast import Arith, Const, ContextPath, EntityOf, ListTerm, Var
from bastion.policy.builtins import BUILTINS
from bastion.policy.program import (
    VALUE_TYPES,
    CallLit,
    Clause,
    CmpLit,
    NotLit,
    Program,
    TypeLit,
)
from bastion.policy.program import term_vars as _term_vars

_MISSING = object()
# Arithmetic over values that gives none (a division by zero, a string operand): unlike a
# field left out, it may have held. Only a comparison of it is modelled (the engine's other
# uses of it, bound or passed on, stop the strict code around them; not generated here).
_UNDECIDED = object()


def _unix_time(context: dict | None) -> Any:
    """``@current_unix_time``: whole seconds of ``context.time`` (epoch seconds or ISO 8601 with
    an offset), or of now when the context has no time."""
    import math
    import time
    from datetime import datetime

    given = (context or {}).get("time")
    if given is None:
        return math.floor(time.time())
    if isinstance(given, bool):
        return _MISSING
    if isinstance(given, (int, float)):
        return math.floor(given) if math.isfinite(given) else _MISSING
    try:
        moment = datetime.fromisoformat(str(given).replace("Z", "+00:00"))
    except ValueError:
        return _MISSING
    return _MISSING if moment.tzinfo is None else math.floor(moment.timestamp())


def _arith(op: str, a: Any, b: Any) -> Any:
    """Polar arithmetic, written plainly: numbers only, integers within 64 bits, integer
    division toward zero, ``mod`` with the divisor's sign and ``rem`` with the dividend's."""
    import math

    def number(x: Any) -> bool:
        return type(x) in (int, float)

    if not (number(a) and number(b)):
        return _MISSING
    if any(type(x) is float and not math.isfinite(x) for x in (a, b)):
        return _MISSING
    if op in ("/", "mod", "rem") and b == 0:
        return _MISSING
    if op == "+":
        r = a + b
    elif op == "-":
        r = a - b
    elif op == "*":
        r = a * b
    elif type(a) is int and type(b) is int:
        toward_zero = a // b if (a >= 0) == (b > 0) or a % b == 0 else a // b + 1
        r = {"/": toward_zero, "rem": a - b * toward_zero, "mod": a - b * (a // b)}[op]
    else:
        remainder = math.fmod(a, b)
        if op == "mod" and remainder and (remainder < 0) != (b < 0):
            remainder += b  # the divisor's sign
        r = a / b if op == "/" else remainder
    if type(r) is int:
        return r if -(2**63) <= r < 2**63 else _MISSING
    return r if math.isfinite(r) else _MISSING


def _lookup(context: dict | None, path: tuple[str, ...]) -> Any:
    if path == ("@current_unix_time",):
        return _unix_time(context)
    value: Any = context or {}
    for name in path:
        if not isinstance(value, dict) or name not in value or value[name] is None:
            return _MISSING
        value = value[name]
    return tuple(value) if isinstance(value, list) else value  # a list, as written in a policy


def _both_text(a: Any, b: Any) -> bool:
    return type(a) is str and type(b) is str


def lower_text(text: str) -> str:
    """``lower``'s definition: each character in Unicode lower case on its own (Σ is σ wherever
    it stands), but one that is not ASCII and whose lower case holds ASCII (the Kelvin sign is
    "k", İ is "i" and a dot above) stays as it is: no letter becomes ASCII that was not."""
    out = []
    for c in text:
        low = c.lower()
        keep = ord(c) > 127 and any(ord(x) <= 127 for x in low)
        out.append(c if keep else low)
    return "".join(out)


# The string builtins, written out by the definition rather than with the engine's functions.
_STRINGS = {
    ("starts_with", 2): lambda t, p: _both_text(t, p) and t[: len(p)] == p,
    ("ends_with", 2): lambda t, s: _both_text(t, s) and (s == "" or t[-len(s) :] == s),
    ("contains", 2): lambda t, p: (
        _both_text(t, p) and any(t[i : i + len(p)] == p for i in range(len(t) - len(p) + 1))
    ),
    ("lower", 2): lambda t, low: _both_text(t, low) and lower_text(t) == low,
}


def _builtin(name: str, args: list) -> bool:
    check = _STRINGS.get((name, len(args)))
    return check(*args) if check is not None else BUILTINS[(name, len(args))].function(*args)


def _kind(value: Any) -> str:
    if isinstance(value, Entity):
        return "entity"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def _same(a: Any, b: Any) -> bool:
    """Equal and of one kind: a boolean is not a number, a list is not an entity (written here
    apart from the engine's ``runtime.same``, as the specification it is checked against)."""
    if _kind(a) != _kind(b):
        return False
    if _kind(a) == "list":
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _has_type(value: Any, types: frozenset[str]) -> bool:
    if isinstance(value, Entity):
        return value.type in types
    return any(type(value) is VALUE_TYPES[t] for t in types if t in VALUE_TYPES)


class Reference:
    def __init__(
        self, program: Program, facts: list[tuple], context: dict | None, extra: list[Any]
    ) -> None:
        self.program = program
        self.context = context
        # Two readings of every predicate: what holds (``db``), and what may hold (``maybe``),
        # where a condition that cannot be decided (values of two kinds, arithmetic with no
        # result) holds. A deny rule is read as ``maybe`` and a 'not' swaps the two for its
        # body: either way, what cannot be decided refuses (Kleene's three values, in two sets).
        self.db: set[tuple] = set(facts)
        self.maybe: set[tuple] = set(facts)
        # list() can only name resources that something mentions: those in the facts.
        self.known = {a for f in facts for a in f[1:] if isinstance(a, Entity)}
        # Keyed by kind too: a Python set keeps one of 0 and False (and of 1 and True).
        values = [a for f in facts for a in f[1:]] + list(extra)
        for clauses in program.clauses.values():
            for clause in clauses:
                values += [term.value for term in clause.head if isinstance(term, Const)]
        domain = {(value.__class__, value): value for value in values}
        self.domain = sorted(domain.values(), key=repr)
        self._run()

    def _strata(self) -> list[list[tuple[str, int]]]:
        """Predicates in an order where every negated predicate comes before its users."""
        preds = list(self.program.clauses)
        deps: dict = {p: set() for p in preds}
        for p in preds:
            for clause in self.program.clauses[p]:
                for lit in clause.body:
                    for sub in _calls(lit):
                        if (sub.name, len(sub.args)) in self.program.clauses:
                            deps[p].add((sub.name, len(sub.args)))
        # Group mutually recursive predicates together; order groups by dependency.
        reach = {p: _closure(deps, p) for p in preds}
        groups: list[list] = []
        for p in preds:
            for g in groups:
                if p in reach[g[0]] and g[0] in reach[p]:
                    g.append(p)
                    break
            else:
                groups.append([p])
        ordered: list[list] = []
        while groups:
            for g in groups:
                if all(d in g or any(d in o for o in ordered) for p in g for d in deps[p]):
                    ordered.append(g)
                    groups.remove(g)
                    break
            else:
                raise AssertionError("unstratifiable")
        return ordered

    def _run(self) -> None:
        for group in self._strata():
            for strict, db in ((False, self.db), (True, self.maybe)):
                while True:
                    new = set()
                    for pred in group:
                        for clause in self.program.clauses[pred]:
                            new |= self._apply(clause, strict)
                    if new <= db:
                        break
                    db |= new

    def _apply(self, clause: Clause, strict: bool) -> set[tuple]:
        out = set()
        head = {v for t in clause.head if isinstance(t, Var) for v in [t.name]}
        # A negation's variables that are used elsewhere must be bound before it runs; the
        # others are local to it ("there is no ... such that").
        self.shared = {}

        def share(body: tuple, outside: set) -> None:  # a negation inside one too (forall)
            for lit in body:
                if isinstance(lit, NotLit):
                    elsewhere = outside.union(*(set(_vars(o)) for o in body if o is not lit))
                    self.shared[id(lit)] = set(_vars(lit)) & elsewhere
                    share(lit.body, self.shared[id(lit)])

        share(clause.body, set(head))
        for env in self._solve(list(clause.body), {}, strict):
            head_vars = [t.name for t in clause.head if isinstance(t, Var) and t.name not in env]
            for values in itertools.product(self.domain, repeat=len(set(head_vars))):
                full = dict(env)
                full.update(zip(dict.fromkeys(head_vars), values, strict=True))
                out.add(
                    (
                        clause.name,
                        *(full[t.name] if isinstance(t, Var) else t.value for t in clause.head),
                    )
                )
        return out

    def _value(self, term: Any, env: dict) -> Any:
        if isinstance(term, Const):
            return term.value
        if isinstance(term, Var):
            return env[term.name]
        if isinstance(term, ContextPath):
            return _lookup(self.context, term.path)
        if isinstance(term, Arith):
            left, right = self._value(term.left, env), self._value(term.right, env)
            if _MISSING in (left, right):
                return _MISSING
            if _UNDECIDED in (left, right):
                return _UNDECIDED
            result = _arith(term.op, left, right)
            return _UNDECIDED if result is _MISSING else result
        if isinstance(term, EntityOf):  # the entity with that id: a string, and not ""
            made = self._value(term.id, env)
            return Entity(term.type, made) if type(made) is str and made != "" else _MISSING
        items = [self._value(t, env) for t in term.items]
        return _MISSING if _MISSING in items or _UNDECIDED in items else tuple(items)

    def _bound(self, term: Any, env: dict) -> bool:
        if isinstance(term, Var):
            return term.name in env
        if isinstance(term, ListTerm):
            return all(self._bound(t, env) for t in term.items)
        if isinstance(term, Arith):
            return self._bound(term.left, env) and self._bound(term.right, env)
        if isinstance(term, EntityOf):
            return self._bound(term.id, env)
        return True

    def _solve(self, body: list, env: dict, strict: bool):
        """Every way ``body`` holds (``strict``: may hold) in ``env``."""
        if not body:
            yield env
            return
        # The first literal whose inputs are bound; unbound variables range over the domain.
        for i, lit in enumerate(body):
            if self._ready(lit, env):
                rest = body[:i] + body[i + 1 :]
                for env2 in self._literal(lit, env, strict):
                    yield from self._solve(rest, env2, strict)
                return
        lit = body[0]
        if isinstance(lit, NotLit):
            candidates = self.shared.get(id(lit), set())
        elif isinstance(lit, CallLit) and (lit.name, len(lit.args)) in BUILTINS:
            # A producing builtin's inputs first: its output is then produced, never ranged
            # over values it could not have (the engine binds it from the inputs).
            candidates = {v for a in _inputs(lit, env) for v in _term_vars(a)} - set(env)
        else:
            candidates = _vars(lit)
        var = next(v for v in sorted(candidates) if v not in env)
        for value in self.domain:
            yield from self._solve(body, {**env, var: value}, strict)

    def _ready(self, lit: Any, env: dict) -> bool:
        if isinstance(lit, CallLit):
            # An entity made from a value needs that value: it is no pattern to match facts by.
            needed = (
                _inputs(lit, env)
                if (lit.name, len(lit.args)) in BUILTINS
                else [a for a in lit.args if isinstance(a, EntityOf)]
            )
            return all(self._bound(a, env) for a in needed)
        if isinstance(lit, NotLit):
            return all(v in env for v in self.shared.get(id(lit), ()))
        return all(v in env for v in _vars(lit))

    def _literal(self, lit: Any, env: dict, strict: bool):
        if isinstance(lit, CallLit):
            args = [self._value(a, env) if self._bound(a, env) else None for a in lit.args]
            if _MISSING in args or _UNDECIDED in args:
                return
            builtin = BUILTINS.get((lit.name, len(args)))
            if builtin is not None:
                inputs = _inputs(lit, env)
                if len(inputs) < len(args):
                    # An unbound output (lower's) ranges over the domain, where the definition
                    # holds; in strict code, every value if the inputs cannot be read.
                    output = lit.args[-1].name
                    undecided = strict and not builtin.decidable(*args[:-1])
                    for value in self.domain:
                        if undecided or _builtin(lit.name, [*args[:-1], value]):
                            yield {**env, output: value}
                    return
                # Strict: what cannot be decided of its arguments may hold.
                if _builtin(lit.name, args) or (strict and not builtin.decidable(*args)):
                    yield env
                return
            for atom in self.maybe if strict else self.db:
                if atom[0] != lit.name or len(atom) != len(args) + 1:
                    continue
                env2 = dict(env)
                ok = True
                for term, arg, value in zip(lit.args, args, atom[1:], strict=True):
                    if arg is not None:
                        ok = ok and _same(arg, value)
                    elif isinstance(term, Var):
                        if term.name in env2 and not _same(env2[term.name], value):
                            ok = False
                        env2[term.name] = value
                if ok:
                    yield env2
        elif isinstance(lit, NotLit):
            # Holds when its body cannot hold: read the other way (what may hold, in ordinary
            # code; what holds, in strict code).
            if next(iter(self._solve(list(lit.body), env, not strict)), None) is None:
                yield env
        elif isinstance(lit, TypeLit):
            if _has_type(self._value(lit.term, env), lit.types):
                yield env
        elif isinstance(lit, CmpLit):
            a, b = self._value(lit.left, env), self._value(lit.right, env)
            if a is _MISSING or b is _MISSING:
                return
            if a is _UNDECIDED or b is _UNDECIDED:
                if strict:
                    yield env
                return
            ok = {
                "=": lambda: _same(a, b),
                "==": lambda: _same(a, b),
                "!=": lambda: not _same(a, b),
                "in": lambda: isinstance(b, (list, tuple)) and any(_same(a, x) for x in b),
            }.get(lit.op)
            if ok is None:
                numbers = all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and x == x
                    for x in (a, b)
                )  # NaN (x != x) is in no order with anything
                if not (numbers or type(a) is type(b) is str):
                    if strict:
                        yield env
                    return
                ok = {
                    "<": lambda: a < b,
                    "<=": lambda: a <= b,
                    ">": lambda: a > b,
                    ">=": lambda: a >= b,
                }[lit.op]
            if ok():
                yield env

    # -- the three questions ----------------------------------------------------------------

    def allowed(self, actor: Any, action: Any, resource: Any) -> bool:
        """Allowed, and no deny rule may hold."""
        return ("allow", actor, action, resource) in self.db and (
            "deny",
            actor,
            action,
            resource,
        ) not in self.maybe

    def list(self, actor: Any, action: Any, resource_type: str) -> list[str]:
        return sorted(
            a[3].id
            for a in self.db
            if a[0] == "allow" and len(a) == 4 and a[1] == actor and a[2] == action
            and isinstance(a[3], Entity) and a[3].type == resource_type and a[3] in self.known
            and self.allowed(actor, action, a[3])
        )  # fmt: skip

    def actions(self, actor: Any, resource: Any) -> set[str]:
        return {
            a[2]
            for a in self.db
            if a[0] == "allow" and len(a) == 4 and a[1] == actor and a[3] == resource
            and isinstance(a[2], str) and self.allowed(actor, a[2], resource)
        }  # fmt: skip

    def holds(self, predicate: str, *args: Any) -> set[tuple]:
        return {
            a for a in self.db
            if a[0] == predicate and len(a) == len(args) + 1
            and all(x is None or x == y for x, y in zip(args, a[1:], strict=True))
        }  # fmt: skip


def _inputs(lit: CallLit, env: dict) -> tuple:
    """The arguments a builtin needs bound: all, but a producing one's (``lower``'s) output
    while that is an unbound variable."""
    last = lit.args[-1]
    producing = BUILTINS[(lit.name, len(lit.args))].produce is not None
    if producing and isinstance(last, Var) and last.name not in env:
        return lit.args[:-1]
    return lit.args


def _vars(lit: Any) -> list[str]:
    from bastion.policy.program import literal_vars

    return literal_vars(lit)


def _calls(lit: Any):
    if isinstance(lit, CallLit):
        yield lit
    elif isinstance(lit, NotLit):
        for sub in lit.body:
            yield from _calls(sub)


def _closure(deps: dict, start: Any) -> set:
    seen, stack = set(), [start]
    while stack:
        p = stack.pop()
        for d in deps.get(p, ()):
            if d not in seen:
                seen.add(d)
                stack.append(d)
    return seen
