"""Program to Python: each (predicate, binding mode) becomes one generated Python function.

A mode says which arguments are bound when the predicate is called ("bbf": first two bound).
For a mode with every argument bound the function returns a bool; otherwise it is a generator of
the free arguments (a value when one is free, else a tuple). Functions are generated on first use
of their mode and cached, so each shape of question is planned once and never per call. Facts are
read straight from the index's sets and dicts, which the compiled code holds by reference.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

from bastion.facts.index import FactIndex
from bastion.facts.model import Entity
from bastion.policy.ast import Const, ContextPath, Var
from bastion.policy.builtins import BUILTINS
from bastion.policy.errors import Diagnostic, PolicyError
from bastion.policy.plan import PlanError, negation_shared, plan
from bastion.policy.program import (
    VALUE_TYPES,
    CallLit,
    Clause,
    CmpLit,
    Literal,
    NotLit,
    Program,
    TypeLit,
    term_vars,
)
from bastion.policy.runtime import MISSING, compare, contains, members


def recursive_groups(program: Program) -> dict[tuple[str, int], int]:
    """Predicates that take part in recursion, each mapped to the id of its group (SCC)."""
    edges: dict[tuple, set] = defaultdict(set)
    for key, clauses in program.clauses.items():
        for clause in clauses:
            for lit in _all_literals(clause.body):
                if isinstance(lit, CallLit):
                    edges[key].add((lit.name, len(lit.args)))
    index, low, stack, on_stack, result = {}, {}, [], set(), {}
    counter = itertools.count()
    group = itertools.count()

    def strongconnect(v):  # Tarjan's algorithm
        index[v] = low[v] = next(counter)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members_ = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                members_.append(w)
                if w == v:
                    break
            if len(members_) > 1 or v in edges.get(v, ()):
                gid = next(group)
                for m in members_:
                    result[m] = gid

    for v in list(edges):
        if v not in index:
            strongconnect(v)
    return result


def _all_literals(body):
    for lit in body:
        yield lit
        if isinstance(lit, NotLit):
            yield from _all_literals(lit.body)


class _Emitter:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)


class CompiledPolicy:
    """The generated functions for one program over one fact index."""

    def __init__(self, program: Program, index: FactIndex) -> None:
        self.program = program
        self.index = index
        self.groups = recursive_groups(program)
        self.namespace: dict[str, Any] = {
            "MISSING": MISSING,
            "Entity": Entity,
            "_compare": compare,
            "_contains": contains,
            "_members": members,
        }
        for (name, arity), builtin in BUILTINS.items():
            self.namespace[f"B_{name}_{arity}"] = builtin.function
        self._functions: dict[tuple[str, int, str], str] = {}
        self._constants: dict[Any, str] = {}
        self._counter = itertools.count()
        self.sources: list[str] = []

    # -- entry points -----------------------------------------------------------------------

    def function(self, name: str, arity: int, mask: str) -> Any:
        """The compiled function for predicate ``name/arity`` called in ``mask`` mode."""
        fname = self._ensure(name, arity, mask)
        return self.namespace[fname]

    def defines(self, name: str, arity: int) -> bool:
        return (name, arity) in self.program.clauses or (
            name,
            arity,
        ) in self.program.fact_predicates

    # -- generation -------------------------------------------------------------------------

    def _const(self, value: Any) -> str:
        if isinstance(value, (str, int, float, bool)) and not isinstance(value, Entity):
            return repr(value)
        key = (type(value), value)
        name = self._constants.get(key)
        if name is None:
            name = self._constants[key] = f"K{next(self._counter)}"
            self.namespace[name] = self.index._intern(value) if isinstance(value, Entity) else value
        return name

    def _ensure(self, name: str, arity: int, mask: str) -> str:
        key = (name, arity, mask)
        fname = self._functions.get(key)
        if fname is not None:
            return fname
        fname = f"p_{name}_{arity}_{mask}"
        self._functions[key] = fname
        group = self.groups.get((name, arity))
        raw = f"r_{name}_{arity}_{mask}" if group is not None else fname
        source = self._generate(raw, name, arity, mask)
        if group is not None:
            params = ", ".join(f"a{i}" for i, m in enumerate(mask) if m == "b")
            tup = f"({params},)" if params else "()"
            source += (
                f"\ndef {fname}(q{', ' + params if params else ''}):\n"
                f"    return q.tabled({group}, {raw}, ({fname!r}, {tup}), {tup}, {mask.count('f') == 0})\n"
            )
        self.sources.append(source)
        exec(compile(source, f"<policy {name}/{arity} {mask}>", "exec"), self.namespace)
        return fname

    def _generate(self, fname: str, name: str, arity: int, mask: str) -> str:
        out = _Emitter()
        bound_params = [f"a{i}" for i, m in enumerate(mask) if m == "b"]
        is_bool = "f" not in mask
        out.emit(0, f"def {fname}(q{''.join(', ' + p for p in bound_params)}):")
        if (name, arity) in self.program.fact_predicates:
            pf = self.index.predicate(name, arity)
            if is_bool:
                fa = f"FA_{name}_{arity}"
                self.namespace[fa] = pf.all
                out.emit(1, f"if ({''.join(p + ', ' for p in bound_params)}) in {fa}:")
                out.emit(2, "return True")
            elif not bound_params:
                fa = f"FA_{name}_{arity}"
                self.namespace[fa] = pf.all
                out.emit(1, f"yield from {fa}" if arity > 1 else f"for _t in {fa}: yield _t[0]")
            else:
                fm = f"FM_{name}_{arity}_{mask}"
                self.namespace[fm] = pf.mode(mask)
                key = bound_params[0] if len(bound_params) == 1 else f"({', '.join(bound_params)})"
                out.emit(1, f"yield from {fm}.get({key}, ())")
        for clause in self.program.clauses.get((name, arity), ()):
            try:
                self._clause(out, clause, mask, is_bool)
            except PlanError as err:
                raise PolicyError(
                    [Diagnostic(err.location, f"{err} (in {clause.text}, mode {mask})")]
                ) from None
        if is_bool:
            out.emit(1, "return False")
        else:
            out.emit(1, "return")
            out.emit(1, "yield")
        return "\n".join(out.lines) + "\n"

    def _clause(self, out: _Emitter, clause: Clause, mask: str, is_bool: bool) -> None:
        env: dict[str, str] = {}
        depth = 1
        out.emit(depth, f"# {clause.text}")
        out.emit(depth, "while True:")  # a block to 'break' out of when a head check fails
        depth += 1
        for i, (term, m) in enumerate(zip(clause.head, mask, strict=True)):
            if m != "b":
                continue
            if isinstance(term, Const):
                out.emit(depth, f"if a{i} != {self._const(term.value)}: break")
            elif isinstance(term, Var):
                if term.name in env:
                    out.emit(depth, f"if a{i} != {env[term.name]}: break")
                else:
                    env[term.name] = f"a{i}"
        head_vars = {v for t in clause.head for v in term_vars(t)}
        order = plan(clause.body, set(env), head_vars, clause.location)
        depth = self._body(out, order, clause.body, env, depth, head_vars)
        outputs = []
        for term, m in zip(clause.head, mask, strict=True):
            if m == "b":
                continue
            if isinstance(term, Const):
                outputs.append(self._const(term.value))
            elif term.name in env:
                outputs.append(env[term.name])
            else:
                raise PlanError(
                    clause.location,
                    f"variable {term.name} is never bound, so this rule cannot list its values",
                )
        if is_bool:
            out.emit(depth, "return True")
        elif len(outputs) == 1:
            out.emit(depth, f"yield {outputs[0]}")
        else:
            out.emit(depth, f"yield ({', '.join(outputs)})")
        out.emit(2, "break")

    def _value(self, out: _Emitter, term: Any, env: dict, depth: int) -> tuple[str, int]:
        """An expression for a bound term; context lookups are checked for MISSING first."""
        if isinstance(term, Const):
            return self._const(term.value), depth
        if isinstance(term, Var):
            return env[term.name], depth
        if isinstance(term, ContextPath):
            tmp = f"c{next(self._counter)}"
            out.emit(depth, f"{tmp} = q.lookup({term.path!r})")
            out.emit(depth, f"if {tmp} is not MISSING:")
            return tmp, depth + 1
        items = []
        for item in term.items:
            expr, depth = self._value(out, item, env, depth)
            items.append(expr)
        return "(" + "".join(i + ", " for i in items) + ")", depth

    def _bind(self, var: str, env: dict) -> str:
        name = f"v_{var}_{next(self._counter)}"
        env[var] = name
        return name

    def _body(
        self,
        out: _Emitter,
        order: list[Literal],
        body: tuple,
        env: dict,
        depth: int,
        outside: set[str],
    ) -> int:
        for lit in order:
            if isinstance(lit, TypeLit):
                depth = self._type_check(out, lit, env, depth)
            elif isinstance(lit, CmpLit):
                depth = self._comparison(out, lit, env, depth)
            elif isinstance(lit, NotLit):
                depth = self._negation(out, lit, body, env, depth, outside)
            else:
                depth = self._call(out, lit, env, depth)
        return depth

    def _type_check(self, out: _Emitter, lit: TypeLit, env: dict, depth: int) -> int:
        term = lit.term
        if isinstance(term, Var) and term.name not in env:
            entity_types = frozenset(t for t in lit.types if t not in VALUE_TYPES)
            var = self._bind(term.name, env)
            out.emit(depth, f"for {var} in q.index.entities_of({self._const(entity_types)}):")
            return depth + 1
        expr, depth = self._value(out, term, env, depth)
        checks = []
        entity_types = sorted(t for t in lit.types if t not in VALUE_TYPES)
        if entity_types:
            checks.append(
                f"({expr}.__class__ is Entity and {expr}[0] in {self._const(frozenset(entity_types))})"
            )
        for t in sorted(lit.types & VALUE_TYPES.keys()):
            py = VALUE_TYPES[t].__name__
            checks.append(
                f"{expr}.__class__ is {py}" if t != "Float" else f"{expr}.__class__ in (int, float)"
            )
        out.emit(depth, f"if {' or '.join(checks) or 'False'}:")
        return depth + 1

    def _comparison(self, out: _Emitter, lit: CmpLit, env: dict, depth: int) -> int:
        left_bound = all(v in env for v in term_vars(lit.left))
        right_bound = all(v in env for v in term_vars(lit.right))
        if lit.op in ("=", "==") and not (left_bound and right_bound):
            var, other = (lit.right, lit.left) if left_bound else (lit.left, lit.right)
            expr, depth = self._value(out, other, env, depth)
            out.emit(depth, f"{self._bind(var.name, env)} = {expr}")
            return depth
        if lit.op == "in" and not left_bound:
            expr, depth = self._value(out, lit.right, env, depth)
            out.emit(depth, f"for {self._bind(lit.left.name, env)} in _members({expr}):")
            return depth + 1
        left, depth = self._value(out, lit.left, env, depth)
        right, depth = self._value(out, lit.right, env, depth)
        if lit.op in ("=", "=="):
            out.emit(depth, f"if {left} == {right}:")
        elif lit.op == "!=":
            out.emit(depth, f"if {left} != {right}:")
        elif lit.op == "in":
            out.emit(depth, f"if _contains({right}, {left}):")
        else:
            out.emit(depth, f"if _compare({lit.op!r}, {left}, {right}):")
        return depth + 1

    def _negation(
        self, out: _Emitter, lit: NotLit, body: tuple, env: dict, depth: int, outside: set[str]
    ) -> int:
        shared = sorted(negation_shared(lit, body, outside))
        fname = f"n{next(self._counter)}"
        inner = _Emitter()
        inner.emit(0, f"def {fname}(q{''.join(', ' + env[v] for v in shared)}):")
        inner_env = {v: env[v] for v in shared}
        order = plan(lit.body, set(shared), set(shared), lit.location)
        inner_depth = self._body(inner, order, lit.body, inner_env, 1, set(shared))
        inner.emit(inner_depth, "return True")
        inner.emit(1, "return False")
        source = "\n".join(inner.lines) + "\n"
        self.sources.append(source)
        exec(compile(source, "<policy negation>", "exec"), self.namespace)
        out.emit(depth, f"if not {fname}(q{''.join(', ' + env[v] for v in shared)}):")
        return depth + 1

    def _call(self, out: _Emitter, lit: CallLit, env: dict, depth: int) -> int:
        key = (lit.name, len(lit.args))
        if key in BUILTINS:
            args = []
            for a in lit.args:
                expr, depth = self._value(out, a, env, depth)
                args.append(expr)
            out.emit(depth, f"if B_{lit.name}_{len(lit.args)}({', '.join(args)}):")
            return depth + 1
        mask, bound_args, targets, checks = [], [], [], []
        new_vars: dict[str, str] = {}
        for a in lit.args:
            if isinstance(a, Var) and a.name not in env:
                if a.name in new_vars:  # the same unbound variable twice: compare after binding
                    tmp = f"t{next(self._counter)}"
                    targets.append(tmp)
                    checks.append(f"{tmp} == {new_vars[a.name]}")
                else:
                    new_vars[a.name] = f"v_{a.name}_{next(self._counter)}"
                    targets.append(new_vars[a.name])
                mask.append("f")
            else:
                expr, depth = self._value(out, a, env, depth)
                bound_args.append(expr)
                mask.append("b")
        fname = self._ensure(lit.name, len(lit.args), "".join(mask))
        call = f"{fname}(q{''.join(', ' + b for b in bound_args)})"
        if not targets:
            out.emit(depth, f"if {call}:")
            return depth + 1
        env.update(new_vars)
        target = targets[0] if len(targets) == 1 else "(" + ", ".join(targets) + ")"
        out.emit(depth, f"for {target} in {call}:")
        depth += 1
        if checks:
            out.emit(depth, f"if {' and '.join(checks)}:")
            depth += 1
        return depth
