"""The syntax tree of a policy, as the parser builds it (before shorthand rules are expanded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bastion.policy.errors import Location

# Terms ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Var:
    name: str
    location: Location = field(compare=False)


@dataclass(frozen=True, slots=True)
class Const:
    """A string, integer, float, boolean or entity (`Entity`) value."""

    value: Any
    location: Location = field(compare=False)


@dataclass(frozen=True, slots=True)
class ContextPath:
    """``context.a.b``: a field of the request's context, looked up at evaluation time."""

    path: tuple[str, ...]
    location: Location = field(compare=False)


@dataclass(frozen=True, slots=True)
class ListTerm:
    items: tuple[Term, ...]
    location: Location = field(compare=False)


@dataclass(frozen=True, slots=True)
class Arith:
    """``left op right`` on numbers: ``+``, ``-``, ``*``, ``/``, ``mod`` or ``rem``."""

    op: str
    left: Term
    right: Term
    location: Location = field(compare=False)


@dataclass(frozen=True, slots=True)
class DictTerm:
    """``{key: value, ...}``: only as the context of a test assertion."""

    items: tuple[tuple[str, Term], ...]
    location: Location = field(compare=False)


@dataclass(frozen=True, slots=True)
class EntityOf:
    """``Device{context.device.id}``, ``Device{x}``: the entity of ``type`` whose id is the
    value of ``id``, made at evaluation. An id that is not a non-empty string makes the
    condition that reads it false (a literal id, ``Device{"a"}``, is a `Const`)."""

    type: str
    id: Term
    location: Location = field(compare=False)


Term = Var | Const | ContextPath | ListTerm | Arith | DictTerm | EntityOf

# Expressions (rule bodies) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    name: str
    args: tuple[Term, ...]
    location: Location = field(compare=False)


@dataclass(frozen=True, slots=True)
class Compare:
    op: str  # == != < <= > >= = in
    left: Term
    right: Term
    location: Location = field(compare=False)


@dataclass(frozen=True, slots=True)
class Matches:
    term: Term
    type: str
    location: Location = field(compare=False)


@dataclass(frozen=True, slots=True)
class Shorthand:
    """``"reader"``, ``"reader" on "parent"`` or ``global "admin"`` inside a resource block;
    ``role on "parent"`` when ``is_variable`` (``name`` is then a variable's name)."""

    name: str
    relation: str | None
    is_global: bool
    location: Location = field(compare=False)
    is_variable: bool = False


@dataclass(frozen=True, slots=True)
class ForAll:
    """``forall(condition, requirement)``: every way ``condition`` holds, ``requirement``
    holds too (so it holds when ``condition`` never does)."""

    condition: Expr
    requirement: Expr
    location: Location = field(compare=False)


@dataclass(frozen=True, slots=True)
class Truth:
    """``true`` or ``false`` as a whole condition (``allow(...) if true;``)."""

    value: bool
    location: Location = field(compare=False)


@dataclass(frozen=True, slots=True)
class And:
    items: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Or:
    items: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Not:
    item: Expr
    location: Location = field(compare=False)


Expr = Call | Compare | Matches | Shorthand | Truth | ForAll | And | Or | Not

# Declarations --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Param:
    term: Term
    type: str | None  # the specializer, e.g. ``actor: User``
    location: Location = field(compare=False)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    params: tuple[Param, ...]
    body: Expr | None
    location: Location = field(compare=False)
    text: str = field(compare=False, default="")  # the rule as written


@dataclass(frozen=True, slots=True)
class ShorthandRule:
    head: str
    head_location: Location
    body: Expr
    location: Location = field(compare=False)
    head_is_variable: bool = False  # ``role if role on "parent";``


@dataclass(slots=True)
class Block:
    """``actor User { }``, ``resource Repo { ... }`` or ``global { ... }`` (name ``None``)."""

    kind: str  # "actor", "resource", "global"
    name: str | None
    location: Location
    extends: tuple[str, ...] = ()  # ``resource File extends Item { }``: its supertypes
    roles: dict[str, Location] = field(default_factory=dict)
    permissions: dict[str, Location] = field(default_factory=dict)
    relations: dict[str, tuple[str, Location]] = field(default_factory=dict)
    shorthand: list[ShorthandRule] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Declare:
    """``declare has_tag(User, Tag);``: a fact type the policy accepts."""

    name: str
    types: tuple[str, ...]
    location: Location


@dataclass(frozen=True, slots=True)
class Assertion:
    expect: bool  # assert (True) or assert_not (False)
    call: Call
    context: DictTerm | None
    location: Location
    # ``assert allow(User{"a"}, action: String, Repo{"r"}) iff action in ["read", "push"];``:
    # the typed variable of the call, its type, and the values it must take, exactly (None
    # without 'iff': some value must hold, or with assert_not none).
    iff: tuple[str, str, ListTerm | None] | None = None


@dataclass(frozen=True, slots=True)
class FixtureRef:
    """``fixture name;`` in a test's setup: the facts of ``test fixture name { ... }``."""

    name: str
    location: Location


@dataclass(frozen=True, slots=True)
class TestBlock:
    name: str
    setup: tuple[Call | FixtureRef, ...]
    assertions: tuple[Assertion, ...]
    location: Location


@dataclass(frozen=True, slots=True)
class Fixture:
    """``test fixture name { facts }``: facts that test setups include by name."""

    name: str
    facts: tuple[Call | FixtureRef, ...]
    location: Location


@dataclass(slots=True)
class Policy:
    blocks: list[Block] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    declares: list[Declare] = field(default_factory=list)
    tests: list[TestBlock] = field(default_factory=list)
    fixtures: list[Fixture] = field(default_factory=list)
