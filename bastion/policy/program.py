"""The normalised program: every rule as a list of clauses whose bodies are flat conjunctions.

This is what the compiler, the explainer and the reference evaluator all read. Shorthand rules
are expanded, ``or`` is distributed into separate clauses, specializers become type checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bastion.facts.model import Entity
from bastion.policy.ast import Arith, Const, ContextPath, EntityOf, ListTerm, Var
from bastion.policy.errors import Location

Term = Var | Const | ContextPath | ListTerm | Arith | EntityOf

VALUE_TYPES = {"String": str, "Integer": int, "Boolean": bool, "Float": float}


@dataclass(frozen=True, slots=True)
class CallLit:
    name: str
    args: tuple[Term, ...]
    location: Location = field(compare=False)


@dataclass(frozen=True, slots=True)
class CmpLit:
    """A comparison; ``=`` unifies (binds an unbound side), ``in`` tests list membership."""

    op: str
    left: Term
    right: Term
    location: Location = field(compare=False)


@dataclass(frozen=True, slots=True)
class TypeLit:
    """The term is an entity of one of ``types`` (or a value of a value type such as String)."""

    term: Term
    types: frozenset[str]
    location: Location = field(compare=False)


@dataclass(frozen=True, slots=True)
class NotLit:
    """Negation as failure of a conjunction: true when the conjunction has no solution."""

    body: tuple[Literal, ...]
    location: Location = field(compare=False)


Literal = CallLit | CmpLit | TypeLit | NotLit


@dataclass(frozen=True, slots=True)
class Clause:
    name: str
    head: tuple[Term, ...]  # Var or Const (possibly entity) per argument
    body: tuple[Literal, ...]
    location: Location = field(compare=False)
    text: str = field(compare=False, default="")  # how the rule reads, for explanations


@dataclass(slots=True)
class Program:
    clauses: dict[tuple[str, int], list[Clause]]  # (name, arity) -> clauses
    fact_predicates: set[tuple[str, int]]  # predicates whose facts come from the store
    fact_signatures: dict[tuple[str, int], list[tuple[Any, ...]]]
    actor_types: frozenset[str]
    resource_types: frozenset[str]
    entity_types: frozenset[str]
    permissions: dict[str, tuple[str, ...]]  # resource type -> declared permissions
    has_deny: bool = False
    # Per declared type, itself and the types that extend it (``extends``).
    subtypes: dict[str, frozenset[str]] = field(default_factory=dict)
    # Join orders the explainer has worked out, by (clause, bound variables): planned once.
    plans: dict = field(default_factory=dict)


def has_type(value: Any, types: frozenset[str]) -> bool:
    """Whether ``value`` is an entity of one of ``types`` or a value of one of its value types."""
    if isinstance(value, Entity):
        return value.type in types
    return any(type(value) is VALUE_TYPES[t] for t in types if t in VALUE_TYPES)


def position_kinds(signatures: Any, pos: int) -> tuple[bool, bool]:
    """Whether facts of these signatures may hold a number, and a boolean, at ``pos``: a fact
    lookup (a set or dict, where ``True == 1`` and their hashes are one) must not take the one
    for the other where the position keeps to one of them."""
    numbers = booleans = False
    for signature in signatures:
        kind, allowed = signature[pos]
        if kind == "any":
            return True, True
        if kind == "types":
            numbers = numbers or bool(allowed & {"Integer", "Float"})
            booleans = booleans or "Boolean" in allowed
        elif kind == "values":
            numbers = numbers or any(v.__class__ in (int, float) for v in allowed)
            booleans = booleans or any(v.__class__ is bool for v in allowed)
    return numbers, booleans


def term_vars(term: Term) -> list[str]:
    if isinstance(term, Var):
        return [term.name]
    if isinstance(term, ListTerm):
        return [v for item in term.items for v in term_vars(item)]
    if isinstance(term, Arith):
        return term_vars(term.left) + term_vars(term.right)
    if isinstance(term, EntityOf):
        return term_vars(term.id)
    return []


def literal_vars(lit: Literal) -> list[str]:
    if isinstance(lit, CallLit):
        return [v for a in lit.args for v in term_vars(a)]
    if isinstance(lit, CmpLit):
        return term_vars(lit.left) + term_vars(lit.right)
    if isinstance(lit, TypeLit):
        return term_vars(lit.term)
    return [v for sub in lit.body for v in literal_vars(sub)]


def context_roots(program: Program) -> frozenset[str]:
    """The first names of every ``context.<name>...`` a rule of ``program`` reads: what a
    caller needs to put in the context (and may leave out, or not fetch, when absent)."""
    roots: set[str] = set()

    def term(t: Any) -> None:
        if isinstance(t, ContextPath):
            if t.path:
                roots.add(t.path[0])
        elif isinstance(t, ListTerm):
            for item in t.items:
                term(item)
        elif isinstance(t, Arith):
            term(t.left)
            term(t.right)
        elif isinstance(t, EntityOf):
            term(t.id)

    def literal(lit: Any) -> None:
        if isinstance(lit, CallLit):
            for a in lit.args:
                term(a)
        elif isinstance(lit, CmpLit):
            term(lit.left)
            term(lit.right)
        elif isinstance(lit, TypeLit):
            term(lit.term)
        else:
            for sub in lit.body:
                literal(sub)

    for clauses in program.clauses.values():
        for clause in clauses:
            for t in clause.head:
                term(t)
            for lit in clause.body:
                literal(lit)
    return frozenset(roots)


def names_type(program: Program, name: str, arity: int, entity_type: str) -> bool:
    """Whether a clause of ``name/arity`` is about ``entity_type`` by its first parameter: an
    entity of that type, or a parameter specialized to it (``_d: Device``); or whether facts
    of ``name/arity`` may be stored (any may name such an entity). An unspecialized parameter
    does not count: a policy names the type to be asked about it."""
    if (name, arity) in program.fact_predicates:
        return True
    for clause in program.clauses.get((name, arity), ()):
        first = clause.head[0]
        if isinstance(first, Const):
            if isinstance(first.value, Entity) and first.value.type == entity_type:
                return True
        elif any(
            isinstance(lit, TypeLit) and lit.term == first and entity_type in lit.types
            for lit in clause.body
        ):
            return True
    return False


def format_term(term: Term) -> str:
    from bastion.facts.model import format_arg

    if isinstance(term, Var):
        return term.name
    if isinstance(term, Const):
        return format_arg(term.value)
    if isinstance(term, ContextPath):
        if term.path and term.path[0].startswith("@"):
            return term.path[0]  # a built-in constant
        return ".".join(("context", *term.path))
    if isinstance(term, Arith):
        return f"({format_term(term.left)} {term.op} {format_term(term.right)})"
    if isinstance(term, EntityOf):
        return f"{term.type}{{{format_term(term.id)}}}"
    return "[" + ", ".join(format_term(t) for t in term.items) + "]"


def format_literal(lit: Literal) -> str:
    if isinstance(lit, CallLit):
        return f"{lit.name}({', '.join(format_term(a) for a in lit.args)})"
    if isinstance(lit, CmpLit):
        return f"{format_term(lit.left)} {lit.op} {format_term(lit.right)}"
    if isinstance(lit, TypeLit):
        return f"{format_term(lit.term)} matches {'|'.join(sorted(lit.types))}"
    return "not (" + " and ".join(format_literal(sub) for sub in lit.body) + ")"


def format_clause(clause: Clause) -> str:
    head = f"{clause.name}({', '.join(format_term(t) for t in clause.head)})"
    if not clause.body:
        return head
    return f"{head} if " + " and ".join(format_literal(lit) for lit in clause.body)
