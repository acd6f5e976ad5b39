"""Explanations: which rules and facts proved a decision, or which paths were tried and failed.

A small top-down interpreter over the same clauses and join order as the compiled code, that
keeps a proof tree as it goes. It is slower than the compiled functions and only runs when an
explanation is asked for (`Authorizer.decide`, ``bastion policy explain``, failing tests). It
spends a budget of its own (`PolicyLimits.explanation_max_steps`, counted as an evaluation's
steps are): an explanation that runs out of it says so, and stops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from bastion.facts.index import FactIndex
from bastion.facts.model import format_arg, format_fact
from bastion.policy.ast import Arith, Const, ContextPath, EntityOf, Var
from bastion.policy.builtins import BUILTINS, spend_on_texts
from bastion.policy.builtins.arithmetic import arith
from bastion.policy.builtins.entities import entity_of
from bastion.policy.errors import EvaluationLimit
from bastion.policy.limits import DEFAULT_LIMITS, PolicyLimits
from bastion.policy.plan import PlanError, plan
from bastion.policy.program import (
    VALUE_TYPES,
    CallLit,
    Clause,
    CmpLit,
    Literal,
    NotLit,
    Program,
    TypeLit,
    format_literal,
    has_type,
    position_kinds,
    term_vars,
)
from bastion.policy.runtime import (
    MISSING,
    Query,
    Undecided,
    built,
    compare,
    compare_strict,
    contains,
    counted_members,
    exhausted,
    orderable,
    same,
    stack_exhausted,
)

MAX_DEPTH = 64
# What an explanation says of a condition that strict code takes as holding (`compare_strict`).
UNDECIDED = (
    "cannot be decided (values of two kinds, arithmetic with no result, or a value a builtin"
    " cannot read): taken as holding"
)
MAX_SOLUTIONS = 64
MAX_FAILED_PATHS = 16


@dataclass(slots=True)
class Step:
    """One goal in a proof (``ok``) or in a failed search (not ``ok``)."""

    goal: str
    ok: bool
    kind: str  # "rule", "fact", "builtin", "check", "not", "none"
    rule: str | None = None
    location: str | None = None
    reason: str | None = None
    children: list[Step] = field(default_factory=list)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"goal": self.goal, "ok": self.ok, "kind": self.kind}
        for name in ("rule", "location", "reason"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.children:
            out["children"] = [c.to_dict() for c in self.children]
        return out

    def lines(self, indent: int = 0) -> list[str]:
        mark = "✓" if self.ok else "✗"
        text = f"{'  ' * indent}{mark} {self.goal}"
        if self.kind == "attempt":
            text = f"{'  ' * indent}{mark} via {self.rule}" + (
                f" @ {self.location}" if self.location else ""
            )
        elif self.rule:
            text += f"    [{self.rule}" + (f" @ {self.location}" if self.location else "") + "]"
        elif self.kind == "fact" and self.ok:
            text += "    [fact]"
        if self.reason:
            text += f"    ({self.reason})"
        return [text] + [line for child in self.children for line in child.lines(indent + 1)]


@dataclass(slots=True)
class Explanation:
    allowed: bool
    query: str
    steps: list[Step]
    # Every ``context`` path the search looked at, with the value it saw. The same question
    # over the same facts, with a context that agrees on these paths, has this explanation.
    reads: dict[tuple[str, ...], Any] = field(default_factory=dict)
    # Set when the evaluation spent its budget: the limit's setting (the question is then
    # refused; the one step says what ran out).
    limit: str | None = None

    def rules(self) -> list[str]:
        """The rules that decided: for an allow, those of the proof; for a deny, the deny rules
        that fired, or none (nothing allowed it)."""
        found: list[str] = []

        def walk(step: Step) -> None:
            if step.ok and step.rule and step.rule not in found:
                found.append(step.rule)
            for child in step.children:
                if step.ok:
                    walk(child)

        for step in self.steps:
            if step.ok:
                walk(step)
        return found

    def facts(self) -> list[str]:
        found: list[str] = []

        def walk(step: Step) -> None:
            if step.ok and step.kind == "fact" and step.goal not in found:
                found.append(step.goal)
            if step.ok:
                for child in step.children:
                    walk(child)

        for step in self.steps:
            walk(step)
        return found

    def to_dict(self) -> dict:
        out = {
            "allowed": self.allowed,
            "query": self.query,
            "rules": self.rules(),
            "facts": self.facts(),
            "steps": [s.to_dict() for s in self.steps],
        }
        if self.limit is not None:
            out["limit"] = self.limit
        return out

    def __str__(self) -> str:
        head = f"{'ALLOW' if self.allowed else 'DENY'} {self.query}"
        return "\n".join([head] + [line for s in self.steps for line in s.lines(1)])


def _fmt(value: Any) -> str:
    return "_" if value is None else format_arg(value)


def _goal(name: str, args: tuple) -> str:
    return f"{name}({', '.join(_fmt(a) for a in args)})"


# Steps of an explanation handed out at a time (`Query.meter`): its steps cost several
# microseconds each, so the first chunk, which is not timed, takes a few milliseconds.
EXPLANATION_CHUNK = 1_000


class _Interpreter:
    def __init__(
        self, program: Program, index: FactIndex, context: dict | None, limits: PolicyLimits
    ) -> None:
        self.program = program
        self.index = index
        self.q = Query(context, index, limits)
        self.q.meter("explanation_max_steps", EXPLANATION_CHUNK)
        self.in_progress: set[tuple] = set()
        self.reads: dict[tuple[str, ...], Any] = {}
        # Whether the literal being solved is in strict code (`Node.strict`: a deny rule, the
        # body of a 'not' in ordinary code, what they call), as compiled code decides it.
        self.strict = False

    def value(self, term: Any, env: dict) -> Any:
        if isinstance(term, Const):
            return term.value
        if isinstance(term, Var):
            return env.get(term.name)
        if isinstance(term, ContextPath):
            value = self.reads[term.path] = self.q.lookup(term.path)
            return value
        if isinstance(term, Arith):
            left, right = self.value(term.left, env), self.value(term.right, env)
            result = arith(term.op, left, right)
            if result is MISSING and self.strict and left is not MISSING and right is not MISSING:
                raise Undecided  # values that give no result: not a missing field
            return result
        if isinstance(term, EntityOf):
            return entity_of(term.type, self.value(term.id, env))
        items = [self.value(t, env) for t in term.items]
        if any(i is MISSING or i is None for i in items):
            return MISSING
        return built(self.q, tuple(items))

    def spend(self, steps: int) -> None:
        self.q.steps -= steps
        if self.q.steps < 0:
            exhausted(self.q)

    # -- solving ----------------------------------------------------------------------------

    def solve(self, name: str, args: tuple, depth: int) -> list[tuple[tuple, Step]]:
        """Solutions of ``name(args)`` (None = unbound): the full argument tuples and proofs."""
        key = (name, args, self.strict)  # a called rule is as strict as its caller
        if depth > MAX_DEPTH or key in self.in_progress:
            return []
        self.spend(1)
        self.in_progress.add(key)
        try:
            out: list[tuple[tuple, Step]] = []
            facts = (name, len(args)) in self.program.fact_predicates
            if facts and self.kinds_fit(name, args):
                for fact in self.index.matching((name, *args)):
                    self.spend(1)
                    out.append((fact[1:], Step(format_fact(fact), True, "fact")))
                    if len(out) >= MAX_SOLUTIONS:
                        return out
            for clause in self.program.clauses.get((name, len(args)), ()):
                for values, step in self.solve_clause(clause, args, depth):
                    out.append((values, step))
                    if len(out) >= MAX_SOLUTIONS:
                        return out
            return out
        finally:
            self.in_progress.discard(key)

    def kinds_fit(self, name: str, args: tuple) -> bool:
        """Whether a fact lookup of ``args`` may find what it finds, as the compiled lookup
        decides (`CompiledPolicy._kind_guard`): no boolean where the facts hold only numbers,
        and no number where they hold only booleans."""
        signatures = self.program.fact_signatures.get((name, len(args)), ())
        for pos, value in enumerate(args):
            cls = value.__class__
            if cls is bool or cls is int or cls is float:
                numbers, booleans = position_kinds(signatures, pos)
                if (cls is bool and numbers and not booleans) or (
                    cls is not bool and booleans and not numbers
                ):
                    return False
        return True

    def head_env(self, clause: Clause, args: tuple) -> dict | None:
        env: dict[str, Any] = {}
        for term, arg in zip(clause.head, args, strict=True):
            if arg is None:
                continue
            if isinstance(term, Const):
                if not same(term.value, arg):
                    return None
            elif term.name in env:
                if not same(env[term.name], arg):
                    return None
            else:
                env[term.name] = arg
        return env

    def order(self, clause: Clause, env: dict) -> list[Literal]:
        key = (id(clause), frozenset(env))
        found = self.program.plans.get(key)
        if found is None:
            head_vars = {v for t in clause.head for v in term_vars(t)}
            try:
                found = plan(clause.body, set(env), head_vars, clause.location)
            except PlanError:
                found = list(clause.body)
            self.program.plans[key] = found
        return found

    def solve_clause(self, clause: Clause, args: tuple, depth: int):
        env = self.head_env(clause, args)
        if env is None:
            return
        for env2, steps in self.solve_body(self.order(clause, env), env, clause.body, depth):
            values = tuple(self.value(t, env2) for t in clause.head)
            goal = _goal(clause.name, values)
            yield (
                values,
                Step(goal, True, "rule", clause.text, str(clause.location), children=steps),
            )

    def solve_body(self, order: list[Literal], env: dict, body: tuple, depth: int):
        """Every way the literals of ``order`` hold in turn: (env, steps). Depth-first, with a
        stack of its own rather than one Python call per literal (bodies can be long)."""
        if not order:
            yield env, []
            return
        ways = [iter(self.solve_literal(order[0], env, body, depth))]
        chosen: list[Step | None] = [None]  # the step of each literal's current way
        while ways:
            got = next(ways[-1], None)
            if got is None:
                ways.pop()
                chosen.pop()
                continue
            env2, chosen[-1] = got
            if len(ways) == len(order):
                yield env2, [step for step in chosen if step]
            else:
                ways.append(iter(self.solve_literal(order[len(ways)], env2, body, depth)))
                chosen.append(None)

    def solve_literal(self, lit: Literal, env: dict, body: tuple, depth: int):
        """Yield (env, step) for each way ``lit`` holds; step is None for silent checks."""
        if isinstance(lit, TypeLit):
            if isinstance(lit.term, Var) and lit.term.name not in env:
                found = self.index.entities_of(
                    frozenset(t for t in lit.types if t not in VALUE_TYPES)
                )
                self.spend(len(found))
                for e in found:
                    yield {**env, lit.term.name: e}, None
                return
            v = self.value(lit.term, env)
            if has_type(v, lit.types):
                yield env, None
            return
        if isinstance(lit, CmpLit):
            yield from self.solve_comparison(lit, env)
            return
        if isinstance(lit, NotLit):
            # The planner ran it once the variables it shares are bound; the rest are its own.
            key = (id(lit), frozenset(env))
            order = self.program.plans.get(key)
            if order is None:
                order = self.program.plans[key] = plan(lit.body, set(env), set(env), lit.location)
            outer = self.strict
            self.strict = not outer  # a 'not' turns the polarity (`CompiledPolicy._negation`)
            try:
                for _ in self.solve_body(order, env, lit.body, depth + 1):
                    return
            except Undecided:
                if outer:
                    raise  # an ordinary body raises nothing; kept for what called it
                return  # a strict body that cannot be decided may hold: the 'not' fails
            finally:
                self.strict = outer
            yield env, Step(self.describe(lit, env), True, "not")
            return
        builtin = BUILTINS.get((lit.name, len(lit.args)))
        last = lit.args[-1] if lit.args else None
        if builtin is not None and isinstance(last, Var) and last.name not in env:
            inputs = tuple(self.value(a, env) for a in lit.args[:-1])
            if any(a is MISSING for a in inputs):
                return
            if builtin.reads is not None:
                spend_on_texts(self.q, builtin.reads(*inputs))
            # Planned: it produces. In strict code, inputs it cannot read raise `Undecided`.
            produce = builtin.strict_produce if self.strict else builtin.produce
            for value in produce(*inputs):  # type: ignore[misc]
                yield (
                    {**env, last.name: value},
                    Step(_goal(lit.name, (*inputs, value)), True, "builtin"),
                )
            return
        args = tuple(self.value(a, env) for a in lit.args)
        if any(a is MISSING for a in args):
            return
        if builtin is not None:
            if builtin.reads is not None:
                spend_on_texts(self.q, builtin.reads(*args))
            if builtin.function(*args):
                yield env, Step(_goal(lit.name, args), True, "builtin")
            elif self.strict and not builtin.decidable(*args):  # as `Builtin.strict`
                yield env, Step(_goal(lit.name, args), True, "builtin", reason=UNDECIDED)
            return
        for values, step in self.solve(lit.name, args, depth + 1):
            env2 = dict(env)
            ok = True
            for term, value in zip(lit.args, values, strict=True):
                if isinstance(term, Var):
                    if term.name in env2 and not same(env2[term.name], value):
                        ok = False
                        break
                    env2[term.name] = value
            if ok:
                yield env2, step

    def solve_comparison(self, lit: CmpLit, env: dict):
        left_free = isinstance(lit.left, Var) and lit.left.name not in env
        right_free = isinstance(lit.right, Var) and lit.right.name not in env
        if lit.op in ("=", "==") and (left_free or right_free):
            var, other = (lit.left, lit.right) if left_free else (lit.right, lit.left)
            v = self.value(other, env)
            if v is not MISSING:
                yield (
                    {**env, var.name: v},
                    Step(self.describe(lit, {**env, var.name: v}), True, "check"),
                )
            return
        if lit.op == "in" and left_free:
            for item in counted_members(self.q, self.value(lit.right, env)):
                yield {**env, lit.left.name: item}, None
            return
        try:
            left, right = self.value(lit.left, env), self.value(lit.right, env)
        except Undecided:  # strict code: arithmetic with no result, in a check that may hold
            yield env, Step(self.describe(lit, env), True, "check", reason=UNDECIDED)
            return
        if left is MISSING or right is MISSING:
            return
        reason = None
        if lit.op in ("=", "=="):
            ok = same(left, right)
        elif lit.op == "!=":
            ok = not same(left, right)
        elif lit.op == "in":
            ok = contains(self.q, right, left)
        elif self.strict:
            ok = compare_strict(lit.op, left, right)
            reason = None if orderable(left, right) else UNDECIDED
        else:
            ok = compare(lit.op, left, right)
        if ok:
            yield env, Step(self.describe(lit, env), True, "check", reason=reason)

    def describe(self, lit: Literal, env: dict) -> str:
        """The literal's text with bound variables replaced by their values."""
        if isinstance(lit, CallLit):
            return _goal(lit.name, tuple(self.value(a, env) for a in lit.args))
        text = format_literal(lit)
        for name, value in sorted(env.items(), key=lambda kv: -len(kv[0])):
            if not name.startswith("_"):
                text = _replace_var(text, name, _fmt(value))
        return text

    # -- failures ---------------------------------------------------------------------------

    def why_not(self, name: str, args: tuple, depth: int, budget: list[int]) -> Step:
        """A failed goal: for each rule that could have proved it, where its search stopped."""
        step = Step(_goal(name, args), False, "goal")
        reasons = []
        if (name, len(args)) in self.program.fact_predicates:
            reasons.append("no matching fact")
        applicable = [
            (clause, env)
            for clause in self.program.clauses.get((name, len(args)), ())
            if (env := self.head_env(clause, args)) is not None and self.head_types_fit(clause, env)
        ]
        reasons.append("no rule proved it" if applicable else "no rule applies")
        step.reason = "; ".join(reasons)
        for clause, env in applicable:
            if budget[0] <= 0 or depth > MAX_DEPTH:
                break
            budget[0] -= 1
            step.children.append(self.why_not_clause(clause, env, depth, budget))
        return step

    def head_types_fit(self, clause: Clause, env: dict) -> bool:
        """False when a specializer on a bound argument already rules the clause out."""
        for lit in clause.body:
            if (
                isinstance(lit, TypeLit)
                and isinstance(lit.term, Var)
                and lit.term.name in env
                and not has_type(env[lit.term.name], lit.types)
            ):
                return False
        return True

    def why_not_clause(self, clause: Clause, env: dict, depth: int, budget: list[int]) -> Step:
        order = self.order(clause, env)
        # Walk the body with the first solution of each literal; stop at the first that fails.
        current = env
        done: list[Step] = []
        for lit in order:
            got = next(iter(self.solve_literal(lit, current, clause.body, depth + 1)), None)
            if got is None:
                failed = Step(self.describe(lit, current), False, "check", reason="false")
                if isinstance(lit, CallLit) and (lit.name, len(lit.args)) not in BUILTINS:
                    args = tuple(self.value(a, current) for a in lit.args)
                    if not any(a is MISSING for a in args):
                        failed = self.why_not(lit.name, args, depth + 1, budget)
                    else:
                        failed.reason = "a context field it needs is missing or unusable"
                elif _touches_missing(lit, current, self):
                    failed.reason = "a context field it needs is missing or unusable"
                return Step(
                    "",
                    False,
                    "attempt",
                    clause.text,
                    str(clause.location),
                    children=[*done, failed],
                )
            current, step = got
            if step is not None:
                done.append(step)
        goal = _goal(clause.name, tuple(self.value(t, current) for t in clause.head))
        return Step(goal, True, "rule", clause.text, str(clause.location), children=done)


def _touches_missing(lit: Literal, env: dict, interp: _Interpreter) -> bool:
    terms = []
    if isinstance(lit, CmpLit):
        terms = [lit.left, lit.right]
    elif isinstance(lit, TypeLit):
        terms = [lit.term]
    return any(
        isinstance(t, (ContextPath, EntityOf)) and interp.value(t, env) is MISSING for t in terms
    )


def _replace_var(text: str, name: str, value: str) -> str:
    return re.sub(rf"(?<![\w\"]){re.escape(name)}(?![\w\"])", value, text)


def over_budget(query: tuple, limit: EvaluationLimit) -> Explanation:
    """The explanation of a question whose evaluation spent its budget: refused, and why."""
    text = _goal("allow", query)
    step = Step(text, False, "limit", reason=str(limit))
    return Explanation(False, text, [step], limit=limit.limit)


def explain(
    program: Program,
    index: FactIndex,
    query: tuple,
    context: dict | None,
    allowed: bool,
    limits: PolicyLimits = DEFAULT_LIMITS,
) -> Explanation:
    """Explain ``allow(actor, action, resource)`` (and ``deny``) for the decision ``allowed``.

    An explanation that spends the evaluation budget keeps the decision and says it stopped.
    """
    interp = _Interpreter(program, index, context, limits)
    try:
        try:
            return _explain(interp, program, query, allowed)
        except RecursionError:
            stack_exhausted(interp.q)
    except EvaluationLimit as limit:
        message = f"the explanation stopped: {limit}"
        text = _goal("allow", query)
        step = Step(text, allowed, "limit", reason=message)
        return Explanation(allowed, text, [step], interp.reads)


def _explain(interp: _Interpreter, program: Program, query: tuple, allowed: bool) -> Explanation:
    text = _goal("allow", query)
    steps: list[Step] = []
    proofs = interp.solve("allow", query, 0)
    if allowed and not proofs:
        # Only when the proof is deeper than MAX_DEPTH: say so rather than show a false path.
        steps.append(
            Step(text, True, "rule", reason=f"proved, but deeper than {MAX_DEPTH} steps to show")
        )
    elif proofs:
        steps.append(proofs[0][1])
        if program.has_deny:
            interp.strict = True  # as `Authorizer` asks deny (`Node.strict`)
            try:
                denials = interp.solve("deny", query, 0)
            except Undecided:  # no result (arithmetic, lower), bound or passed on: it may hold
                denials = [((), Step(_goal("deny", query), True, "rule", reason=UNDECIDED))]
            finally:
                interp.strict = False
            if denials:
                steps.append(denials[0][1])
            else:
                steps.append(
                    Step(_goal("deny", query), False, "rule", reason="no deny rule applies")
                )
    else:
        steps.append(interp.why_not("allow", query, 0, [MAX_FAILED_PATHS]))
    return Explanation(allowed, text, steps, interp.reads)


def prove(
    program: Program,
    index: FactIndex,
    name: str,
    args: tuple,
    context: dict | None,
    limits: PolicyLimits = DEFAULT_LIMITS,
    strict: bool = False,
) -> Explanation:
    """Why ``name(*args)`` holds (an obligation such as ``requires_approval``): its first proof,
    or a refusal with no steps. Spends the explanation budget as `explain` does. ``strict``:
    read as strict code (`Node.strict`), as `Authorizer` asks an obligation whose holding
    restricts: a condition that cannot be decided is shown holding."""
    interp = _Interpreter(program, index, context, limits)
    interp.strict = strict
    text = _goal(name, args)
    try:
        try:
            proofs = interp.solve(name, args, 0)
        except RecursionError:
            stack_exhausted(interp.q)
        except Undecided:  # no result (arithmetic, lower), bound or passed on: it may hold
            proofs = [((), Step(text, True, "rule", reason=UNDECIDED))]
    except EvaluationLimit as limit:
        step = Step(text, False, "limit", reason=f"the explanation stopped: {limit}")
        return Explanation(False, text, [step], interp.reads, limit=limit.limit)
    steps = [proofs[0][1]] if proofs else []
    return Explanation(bool(proofs), text, steps, interp.reads)
