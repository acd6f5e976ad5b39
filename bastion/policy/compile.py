"""Program to Python: each shape of call to a predicate becomes one generated Python function.

A shape (`Node`) says, per argument, whether it is bound at run time ("b"), a constant known at
compile time ("c"), or free ("f"). Constants are specialised away: a call such as
``has_role(user, "reader", repo)`` gets a function holding only the clauses whose head can be
"reader", so a role hierarchy compiles to straight calls with no search. When most clauses of a
predicate differ by a constant in one bound argument (say, the action), the function dispatches
on it with one dict lookup. Shapes are generated on first use and cached: each question is
planned once, never per call.

A function whose every argument is bound returns a bool; otherwise it is a generator of the free
arguments (a value when one is free, else a tuple). Facts are read straight from the index's sets
and dicts, which the generated code holds by reference. Shapes that call each other in a cycle
(found with Tarjan's algorithm as they are generated) are evaluated with tabling, so recursion
over cyclic data terminates.

A shape is ordinary or strict (`Node.strict`): strict where holding refuses (a ``deny`` rule,
what a ``not`` in ordinary code negates, and the rules they call; each ``not`` turns it over).
There a condition that has values but cannot be decided holds, or raises `Undecided` where
evaluation cannot go on, which the caller takes as holding; in ordinary code it is false.

Each literal of a body opens one block inside the previous one. Past `_MAX_DEPTH` blocks the
rest of the body moves into a function of its own (a continuation), so that a rule of any
length compiles within CPython's limits (100 indentation levels, 20 nested loops). The
evaluation budget (see `runtime.py`) is spent where work can pile up: when a rule fetches the
facts, entities or list items it will iterate over, in recursive calls, and at the entry of a
shape whose one call makes more than `_FANOUT` calls of uncounted shapes. Compiling spends
`PolicyLimits.policy_max_compiled_literals`, a shape's rules all at once before any is generated;
a load counts first what its shapes will certainly spend (`refuse_over_budget`). A compile that
fails for any reason is a `PolicyError` naming the rule.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from bastion.facts.index import FactIndex, Many
from bastion.facts.model import Entity, same_value
from bastion.policy.ast import Arith, Const, ContextPath, EntityOf, ListTerm, Var
from bastion.policy.builtins import BUILTINS
from bastion.policy.builtins.arithmetic import arith
from bastion.policy.builtins.entities import entity_of
from bastion.policy.errors import (
    CompilerBusy,
    Diagnostic,
    EvaluationLimit,
    Location,
    PolicyError,
)
from bastion.policy.limits import DEFAULT_LIMITS, PolicyLimits
from bastion.policy.plan import PlanError, negations_shared, plan
from bastion.policy.program import (
    VALUE_TYPES,
    CallLit,
    Clause,
    CmpLit,
    Literal,
    NotLit,
    Program,
    TypeLit,
    has_type,
    literal_vars,
    position_kinds,
    term_vars,
)
from bastion.policy.runtime import (
    MISSING,
    PolicyList,
    built,
    compare,
    compare_strict,
    contains,
    counted_members,
    exhausted,
    proved_or_undecided,
    same,
    spent,
    undecided,
)

# Blocks one generated function may nest before the rest of a body moves to a continuation.
_MAX_DEPTH = 12
# A shape whose one call makes more calls than this (counted from its code, each loop taken
# once) spends that many steps of the budget at entry; below it, calls cost no bookkeeping.
_FANOUT = 16
# Fact predicates whose facts are the usual way they hold (roles and relations).
_ROLE_FACTS = {("has_role", 3), ("has_role", 2), ("has_relation", 3)}
# The Python names generated code gives its run-time values (arguments and bound variables).
_LOCAL = re.compile(r"a\d+|v_\w+")
# A function that passes its arguments, in order, to one other and answers what it answers.
_FORWARD_HEAD = re.compile(r"def @\(q((?:, a\d+)*)\):")
_FORWARD_CALL = re.compile(r"        if (p_\w+)\(q((?:, a\d+)*)\):")


@dataclass(frozen=True, slots=True)
class Node:
    """One shape of call: predicate, per-argument mode, the compile-time constants in order."""

    name: str
    arity: int
    mask: str  # "b" bound at run time, "c" constant, "f" free
    consts: tuple = ()
    facts: bool = True  # False for the specialised functions a dispatcher calls after its facts
    types: tuple = ()  # per argument: the entity types a bound argument is known to have, or None
    # Strict code: where holding refuses (a deny rule, what a 'not' in ordinary code negates,
    # and what they call), so what cannot be decided holds (see `CompiledPolicy._negation`).
    strict: bool = False

    def type_of(self, pos: int) -> frozenset | None:
        return self.types[pos] if self.types else None


class _DeadClause(Exception):
    """A clause that can never match this shape (a constant or type check fails statically)."""


class _OverBudget(Exception):
    """Compiling needs more literals than `PolicyLimits.policy_max_compiled_literals`."""

    def __init__(self, location: Location, limit: int) -> None:
        self.location = location
        self.limit = limit
        super().__init__(
            f"compiling this policy needs more than {limit} literals (a rule is compiled once"
            " for every way it is called: each constant it is called with, each type); the"
            f" limit is policy_max_compiled_literals = {limit}"
        )


def _cost(clause: Any) -> int:
    """What compiling ``clause`` once spends of the compile budget: its literals and its head."""
    return len(clause.body) + 1


@dataclass(slots=True)
class _Body:
    """A conjunction being generated: a clause's body, or what a negation negates."""

    literals: tuple[Literal, ...]
    shared: dict[int, set[str]]  # per negation in it (by id): the variables it shares
    is_bool: bool  # its functions return True on success, or else yield answers
    leaf: Callable[[_Emitter, dict, int], None]  # emits what follows when every literal holds
    # Per variable, the position in the planned order of the last literal that reads it (the
    # leaf's variables: past the end); per literal (by id), its position.
    last_use: dict[str, int]
    position: dict[int, int]


def _body_of(
    literals: tuple[Literal, ...],
    order: list[Literal],
    outside: set[str],
    is_bool: bool,
    leaf: Callable[[_Emitter, dict, int], None],
    leaf_vars: set[str],
) -> _Body:
    last_use = {v: len(order) for v in leaf_vars}
    position = {}
    for i, lit in enumerate(order):
        position[id(lit)] = i
        for v in literal_vars(lit):
            last_use[v] = max(last_use.get(v, i), i)
    return _Body(literals, negations_shared(literals, outside), is_bool, leaf, last_use, position)


class _Heads:
    """What the heads of one predicate's clauses fix at one argument, by clause number: the
    constant there (``by_value``), the entity type a constant or a specialised variable there
    has (``by_type``), the specialised variables (``typed``: any constant may match, its type is
    checked when compiled), and the clauses that fix nothing there (``open``)."""

    __slots__ = ("by_value", "by_type", "typed", "open")

    def __init__(self, clauses: Any, pos: int) -> None:
        self.by_value: dict[tuple, list[int]] = defaultdict(list)
        self.by_type: dict[str, list[int]] = defaultdict(list)
        self.typed: list[int] = []
        self.open: list[int] = []
        for i, clause in enumerate(clauses):
            term = clause.head[pos]
            required = _required_types(clause, pos)
            if isinstance(term, Const) and _simple_constant(term.value):
                self.by_value[_head_key(term.value)].append(i)
                if isinstance(term.value, Entity):
                    self.by_type[term.value.type].append(i)
            elif isinstance(term, Var) and required is not None:
                self.typed.append(i)
                for t in required:
                    self.by_type[t].append(i)
            else:
                self.open.append(i)


def _head_key(value: Any) -> tuple:
    """A constant as `same_value` compares it: a boolean is not the integer 1 or 0."""
    return (value.__class__ is bool, value)


class _Emitter:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)


def _simple_constant(value: Any) -> bool:
    return isinstance(value, (str, int, bool, Entity)) and not isinstance(value, float)


class CompiledPolicy:
    """The generated functions for one program over one fact index."""

    def __init__(
        self,
        program: Program,
        index: FactIndex,
        limits: PolicyLimits = DEFAULT_LIMITS,
        index_lock: Any = None,
    ) -> None:
        self.program = program
        self.index = index
        self.limits = limits
        # Held while reading or indexing the facts, when compiling beside running decisions
        # (a policy compiled in a worker thread); None when the caller holds the fact lock.
        self.index_lock = index_lock
        # Past loading, a question that needs more compiling than the budget allows is refused
        # (`EvaluationLimit`), not the policy.
        self.serving = False
        # Held while shapes are generated: one compile at a time (see `beside_decisions`).
        self._compiling = threading.Lock()
        self.namespace: dict[str, Any] = {
            "MISSING": MISSING,
            "Entity": Entity,
            "Many": Many,
            "_compare": compare,
            "_compare_strict": compare_strict,
            "_proved_or_undecided": proved_or_undecided,
            "_undecided": undecided,
            "_contains": contains,
            "_same": same,
            "_members": counted_members,
            "_built": built,
            "_exhausted": exhausted,
            "_spent": spent,
            "_arith": arith,
            "_entity_of": entity_of,
        }
        for (name, arity), builtin in BUILTINS.items():
            self.namespace[f"B_{name}_{arity}"] = builtin.compiled(builtin.function, arity)
            self.namespace[f"S_{name}_{arity}"] = builtin.compiled(builtin.strict, arity)
            if builtin.produce is not None:
                produce, strict_produce = builtin.produce, builtin.strict_produce
                self.namespace[f"P_{name}_{arity}"] = builtin.compiled(produce, arity - 1)
                self.namespace[f"SP_{name}_{arity}"] = builtin.compiled(strict_produce, arity - 1)
        self._names: dict[Node, str] = {}
        self._constants: dict[Any, str] = {}
        self._counter = itertools.count()
        # Whether the code being emitted is strict (`Node.strict`): there, a condition that has
        # values but cannot be decided holds, or raises `Undecided` (see `_negation`).
        self._strict = False
        self._groups = itertools.count()
        # Tarjan's algorithm, run over shapes as they are generated.
        self._tick = itertools.count()
        self._index: dict[Node, int] = {}
        self._low: dict[Node, int] = {}
        self._stack: list[Node] = []
        self._on_stack: set[Node] = set()
        self._callers: list[Node] = []
        self._edges: dict[Node, set[Node]] = defaultdict(set)
        self._pending: dict[Node, str] = {}
        self._dispatch: list[tuple[dict, Any, str]] = []
        # Per (fact predicate, position): whether its facts may hold a number, a boolean.
        self._kinds: dict[tuple, tuple[bool, bool]] = {}
        # Entity types known for the variables of the clause being generated.
        self._vtypes: dict[str, frozenset] = {}
        # Per generated shape, the calls one call of it makes that spend no steps (0 for a
        # shape that counts its own, or a recursive one); per shape being generated, the sum.
        self._weights: dict[Node, int] = {}
        self._fanout: list[int] = []
        self._literals = 0  # compiled so far, against policy_max_compiled_literals
        # Functions a shape's code calls (negations, continuations), defined with its group.
        self._helpers: dict[Node, list[str]] = defaultdict(list)
        # Per (predicate, position): the clauses whose head fixes that argument, by constant or
        # by entity type, and those that do not (see `_candidates`).
        self._heads: dict[tuple, _Heads] = {}
        self._signature_index: dict[tuple, dict] = {}
        self._output_shapes: dict[tuple, dict[int, frozenset | None]] = {}
        # Per shape read from a fact index by key: the name of that index, for callers that
        # read it inline (see `_call`).
        self._fact_modes: dict[Node, str] = {}
        # Per shape whose function only passes its arguments on to one other: that one, which
        # its name is bound to instead (see `_forwarded`).
        self._aliases: dict[Node, str] = {}

    # -- entry points -----------------------------------------------------------------------

    @property
    def literals(self) -> int:
        """What compiling has spent of `PolicyLimits.policy_max_compiled_literals` so far."""
        return self._literals

    def refuse_over_budget(self, shapes: Iterable[tuple[str, int, str, bool]]) -> None:
        """Refuse, before compiling any of them, shapes of question (predicate, arity, mask of
        "b" and "f", strict) whose own rules need more literals than the compile budget holds.

        A shape with no constant and no known type compiles every rule of its predicate at
        least once: in its own function, or in a function specialised to the constant or the
        type its dispatch routes the rule to (`_candidates` leaves out no rule for it, nor for
        those the rules routed there). Two such shapes share none of those functions, so the
        sum over distinct shapes of their rules' literals is at most what compiling them
        spends (the rules they call come on top, and are counted as they are compiled). A
        policy over it is refused as compiling it would be, without the seconds compiling
        takes to get there: an 'and' of 13 'or's is 8,192 rules, compiled for each shape of
        allow.
        """
        limit = self.limits.policy_max_compiled_literals
        spent = self._literals
        for name, arity, mask, _strict in dict.fromkeys(shapes):
            if "c" in mask:  # a constant leaves rules out: not counted so
                raise ValueError(f"a shape counted before compiling has no constant, got {mask}")
            for clause in self.program.clauses.get((name, arity), ()):
                spent += _cost(clause)
                if spent > limit:
                    refused = _OverBudget(clause.location, limit)
                    raise PolicyError([Diagnostic(clause.location, str(refused))])

    def function(self, name: str, arity: int, mask: str, strict: bool = False) -> Any:
        """The compiled function for ``name/arity`` called with ``mask`` ("b"/"f" per argument);
        ``strict``, as a ``deny`` rule is asked (`Node.strict`: it may raise `Undecided`, which
        `proved_or_undecided` takes as holding).

        Raises `PolicyError` if it cannot be compiled; once `serving`, `EvaluationLimit` if the
        compile budget is spent, and `CompilerBusy` if it must be compiled while a worker thread
        compiles another shape (`beside_decisions`).
        """
        fname = self._names.get(Node(name, arity, mask, strict=strict))
        if fname is not None and (fn := self.namespace.get(fname)) is not None:
            # Defined, and so are the shapes it calls (a group is defined after the groups it
            # calls: `_finish_group`): nothing of the compiler's state is read, so this is
            # safe beside a compile on another thread.
            return fn
        if not self._compiling.acquire(blocking=False):
            # Held by a compile beside the decisions, which may wait for the fact lock that
            # this caller holds: not waited for here.
            raise CompilerBusy(name, arity, mask)
        try:
            return self._compiled(name, arity, mask, strict)
        finally:
            self._compiling.release()

    @contextlib.contextmanager
    def beside_decisions(self, facts_lock: Any) -> Iterator[Callable[[str, int, str], Any]]:
        """Compile shapes on a worker thread while decisions go on: gives `function` without its
        fast path, for the holder alone; ``facts_lock`` is held only to read or index the facts
        (`index_lock`), as when a policy is loaded. `function` on another thread, for a shape not
        yet defined, meanwhile raises `CompilerBusy` rather than wait."""
        with self._compiling:
            self.index_lock = facts_lock
            try:
                yield self._compiled
            finally:
                self.index_lock = None

    def _compiled(self, name: str, arity: int, mask: str, strict: bool = False) -> Any:
        """`function`, the caller holding `_compiling`."""
        try:
            fname = self._ensure(Node(name, arity, mask, strict=strict))
        except BaseException as err:
            # Forget the shapes this call left half made, so a later call starts clean.
            self._stack.clear()
            self._on_stack.clear()
            self._callers.clear()
            self._pending.clear()
            self._fanout.clear()
            for node, fname in list(self._names.items()):
                if fname not in self.namespace:
                    del self._names[node]
                    self._weights.pop(node, None)
                    self._helpers.pop(node, None)
            if isinstance(err, _OverBudget):
                if self.serving:
                    raise EvaluationLimit(
                        "policy_max_compiled_literals", err.limit, "the compile budget is spent"
                    ) from None
                raise PolicyError([Diagnostic(err.location, str(err))]) from None
            if isinstance(err, RecursionError):
                raise PolicyError(
                    [
                        Diagnostic(
                            self._first_location(name, arity),
                            f"{name} cannot be compiled: its rules call one another in a chain"
                            " too long to compile (shorten the chain of rules)",
                        )
                    ]
                ) from None
            raise
        return self.namespace[fname]

    def close(self) -> None:
        """Replaced by another policy, and run by no decision any more (the caller makes sure):
        its generated functions let go of one another (each one's globals are the namespace
        that holds them all), so it is freed when the last reference goes, without waiting for
        a pass of the cyclic garbage collector (which a replica keeps its facts out of the
        sight of: `bastion.server.replica`)."""
        self.namespace.clear()

    def defines(self, name: str, arity: int) -> bool:
        key = (name, arity)
        return key in self.program.clauses or key in self.program.fact_predicates

    # -- shapes and their order of generation -----------------------------------------------

    def _first_location(self, name: str, arity: int) -> Location:
        clauses = self.program.clauses.get((name, arity))
        return clauses[0].location if clauses else Location("<policy>", 1, 1)

    def _facts_lock(self) -> Any:
        return self.index_lock if self.index_lock is not None else contextlib.nullcontext()

    def _define(self, text: str, filename: str, location: Location) -> None:
        """Compile generated source into the namespace; any failure is a `PolicyError`."""
        try:
            code = compile(text, filename, "exec")
            exec(code, self.namespace)
        except (SyntaxError, RecursionError, MemoryError, ValueError, OverflowError) as err:
            # Generated code stays within CPython's limits; should it not, the policy is
            # refused with a place to look, never a server error.
            raise PolicyError(
                [
                    Diagnostic(
                        location,
                        f"this rule could not be compiled ({type(err).__name__}: {err}); split"
                        " it into smaller rules",
                    )
                ]
            ) from None

    def _const(self, value: Any) -> str:
        if isinstance(value, (str, int, float, bool)) and not isinstance(value, Entity):
            return repr(value)
        key = (type(value), value)
        name = self._constants.get(key)
        if name is None:
            name = self._constants[key] = f"K{next(self._counter)}"
            if isinstance(value, Entity):
                with self._facts_lock():
                    value = self.index.intern(value)
            self.namespace[name] = value
        return name

    def _ensure(self, node: Node) -> str:
        caller = self._callers[-1] if self._callers else None
        if caller is not None:
            self._edges[caller].add(node)
        name = self._names.get(node)
        if name is not None:
            if caller is not None and node in self._on_stack:
                self._low[caller] = min(self._low[caller], self._index[node])
            return name
        strict = "s" if node.strict else ""
        name = self._names[node] = (
            f"p_{node.name}_{node.arity}_{node.mask}{strict}_{next(self._counter)}"
        )
        self._index[node] = self._low[node] = next(self._tick)
        self._stack.append(node)
        self._on_stack.add(node)
        self._callers.append(node)
        outer_types = self._vtypes  # the caller's clause is mid-generation
        try:
            self._pending[node] = self._generate(node)
        finally:
            self._callers.pop()
            self._vtypes = outer_types
        if self._low[node] == self._index[node]:
            self._finish_group(node)
        if caller is not None:
            self._low[caller] = min(self._low[caller], self._low[node])
        return name

    def _finish_group(self, root: Node) -> None:
        """Define the functions of one strongly connected group of shapes."""
        group = []
        while True:
            node = self._stack.pop()
            self._on_stack.discard(node)
            group.append(node)
            if node == root:
                break
        recursive = len(group) > 1 or root in self._edges[root]
        gid = next(self._groups)
        source = []
        for node in group:
            source += self._helpers.pop(node, ())
            name = self._names[node]
            params = [f"a{i}" for i, m in enumerate(node.mask) if m == "b"]
            if recursive:
                raw = f"{name}_r"
                tup = f"({', '.join(params)},)" if params else "()"
                source.append(self._pending.pop(node).replace("def @(", f"def {raw}(", 1))
                source.append(
                    f"def {name}(q{''.join(', ' + p for p in params)}):\n"
                    f"    return q.tabled({gid}, {raw}, ({name!r}, {tup}), {tup}, {'f' not in node.mask})\n"
                )
            elif self._aliases.get(node) in self.namespace:
                self._pending.pop(node)
                source.append(f"{name} = {self._aliases[node]}\n")
            else:
                source.append(self._pending.pop(node).replace("def @(", f"def {name}(", 1))
        text = "\n".join(source)
        self._define(
            text,
            f"<policy {root.name}/{root.arity}>",
            self._first_location(root.name, root.arity),
        )
        still = []
        for table, key, fname in self._dispatch:
            if fname in self.namespace:
                table[key] = self.namespace[fname]
            else:
                still.append((table, key, fname))
        self._dispatch[:] = still  # in place: a caller may hold the list

    # -- one shape --------------------------------------------------------------------------

    def _generate(self, node: Node) -> str:
        self._fanout.append(1)
        try:
            out = self._generate_lines(node)
        finally:
            weight = self._fanout.pop()
        if weight > _FANOUT:
            # Many calls for one: spend them at once, here, rather than nothing anywhere.
            out.lines[1:1] = [f"    q.steps -= {weight}", "    if q.steps < 0: _exhausted(q)"]
            weight = 0
        else:
            callee = _forwarded(out.lines)
            if callee is not None:
                self._aliases[node] = callee
        self._weights[node] = weight
        return "\n".join(out.lines) + "\n"

    def _generate_lines(self, node: Node) -> _Emitter:
        # A rule called from strict code is strict too: compiled apart from its ordinary shape.
        strict, self._strict = self._strict, node.strict
        try:
            return self._generate_clauses(node)
        finally:
            self._strict = strict

    def _generate_clauses(self, node: Node) -> _Emitter:
        out = _Emitter()
        params = [f"a{i}" for i, m in enumerate(node.mask) if m == "b"]
        is_bool = "f" not in node.mask
        out.emit(0, f"def @(q{''.join(', ' + p for p in params)}):")
        consts = iter(node.consts)
        args = [
            f"a{i}" if m == "b" else self._const(next(consts)) if m == "c" else None
            for i, m in enumerate(node.mask)
        ]
        key = (node.name, node.arity)
        if node.facts and key in self.program.fact_predicates:
            self._facts(out, node, args, is_bool)
        clauses = self._candidates(node)
        clauses = self._dispatch_on_constant(out, node, clauses, args, is_bool)
        clauses = self._dispatch_on_type(out, node, clauses, is_bool)
        # Spent for the whole shape before any of its rules is generated: a shape the budget
        # cannot hold is refused without the seconds its thousands of rules would take.
        self._spend(clauses)
        for clause in clauses:
            try:
                self._clause(out, clause, node, args, is_bool)
            except _DeadClause:
                continue
            except PlanError as err:
                raise PolicyError([Diagnostic(err.location, f"{err} (in {clause.text})")]) from None
        if is_bool:
            out.emit(1, "return False")
        else:
            out.emit(1, "return")
            out.emit(1, "yield")
        return out

    def _candidates(self, node: Node) -> list[Clause]:
        """The clauses of ``node``'s predicate whose head can take its constants and the entity
        types known of its arguments, in the order written.

        A predicate of n rules told apart by a constant (one per permission) or by a type (one
        per resource type) is specialised n ways; were every clause compiled (and counted) for
        each, only to be found dead, that would be n^2. Looked up by head, it is n.
        """
        key = (node.name, node.arity)
        clauses = self.program.clauses.get(key, ())
        best: set[int] | None = None
        consts = iter(node.consts)
        for pos, m in enumerate(node.mask):
            if m == "c":
                value = next(consts)
                heads = self._heads_at(key, clauses, pos)
                found = set(heads.open).union(heads.typed, heads.by_value.get(_head_key(value), ()))
            elif node.type_of(pos) is not None:
                heads = self._heads_at(key, clauses, pos)
                found = set(heads.open).union(
                    *(heads.by_type.get(t, ()) for t in node.type_of(pos))
                )
            else:
                continue
            if best is None or len(found) < len(best):
                best = found
        if best is None:
            return list(clauses)
        return [clauses[i] for i in sorted(best)]

    def _spend(self, clauses: Any) -> None:
        """Charge ``clauses`` to the compile budget (`_cost`)."""
        limit = self.limits.policy_max_compiled_literals
        for clause in clauses:
            self._literals += _cost(clause)
            if self._literals > limit:
                raise _OverBudget(clause.location, limit)

    def _heads_at(self, key: tuple, clauses: Any, pos: int) -> _Heads:
        heads = self._heads.get((key, pos))
        if heads is None:
            heads = self._heads[(key, pos)] = _Heads(clauses, pos)
        return heads

    def _facts(self, out: _Emitter, node: Node, args: list, is_bool: bool) -> None:
        with self._facts_lock():
            self._read_facts(out, node, args, is_bool)

    def _read_facts(self, out: _Emitter, node: Node, args: list, is_bool: bool) -> None:
        pf = self.index.predicate(node.name, node.arity)
        bound = [a for a in args if a is not None]
        key = (node.name, node.arity)
        # A predicate that rules define and that facts may add to (a fact type inferred from
        # a call, such as has_permission): its facts are usually none, and an empty set costs
        # one truth test, not a lookup.
        rare = key in self.program.clauses and key not in _ROLE_FACTS
        guard = self._kind_guard(
            key, {i: a for i, (a, m) in enumerate(zip(args, node.mask, strict=True)) if m == "b"}
        )
        if is_bool:
            fa = f"FA_{node.name}_{node.arity}"
            self.namespace[fa] = pf.all
            check = f"{fa} and " if rare else ""
            out.emit(1, f"if {guard}{check}({''.join(a + ', ' for a in args)}) in {fa}:")
            out.emit(2, "return True")
        elif not bound:
            fa = f"FA_{node.name}_{node.arity}"
            self.namespace[fa] = pf.all
            out.emit(1, f"q.steps -= len({fa})")  # every fact of the predicate
            out.emit(1, "if q.steps < 0: _exhausted(q)")
            out.emit(1, f"yield from {fa}" if node.arity > 1 else f"for _t in {fa}: yield _t[0]")
        else:
            fact_mask = "".join("f" if a is None else "b" for a in args)
            values = iter(node.consts)
            fixed = tuple((i, next(values)) for i, m in enumerate(node.mask) if m == "c")
            fm = f"FM{next(self._counter)}_{node.name}_{node.arity}_{node.mask}"
            self.namespace[fm] = pf.mode(fact_mask, fixed)
            self._fact_modes[node] = fm
            keys = [f"a{i}" for i, m in enumerate(node.mask) if m == "b"]
            key = keys[0] if len(keys) == 1 else f"({''.join(k + ', ' for k in keys)})"
            d = 1
            if rare:
                fa = f"FA_{node.name}_{node.arity}"
                self.namespace[fa] = pf.all
                out.emit(1, f"if {fa}:")
                d = 2
            if guard:
                out.emit(d, f"_v = {fm}.get({key}) if {guard[: -len(' and ')]} else None")
            else:
                out.emit(d, f"_v = {fm}.get({key})")
            out.emit(d, "if _v is not None:")
            out.emit(d + 1, "if _v.__class__ is Many:")
            out.emit(d + 2, "q.steps -= len(_v)")  # several facts under this key
            out.emit(d + 2, "if q.steps < 0: _exhausted(q)")
            out.emit(d + 2, "yield from _v")
            out.emit(d + 1, "else:")
            out.emit(d + 2, "yield _v")

    def _kind_guard(self, key: tuple, bound: dict[int, str]) -> str:
        """Conditions (each followed by " and ") that keep a fact lookup from taking a boolean
        for the number 1 or 0, or one of those for a boolean: a dict or set finds the fact
        ``level(u, 1)`` for ``level(u, true)`` (Python's ``True == 1``, same hash). Only for
        the arguments, bound at run time, whose position the fact types keep to numbers or to
        booleans; a position that takes any value holds either (docs: known limits)."""
        found = []
        for pos, expr in bound.items():
            numbers, booleans = self._position_kinds(key, pos)
            if numbers and not booleans:
                found.append(f"({expr}).__class__ is not bool and ")
            elif booleans and not numbers:
                found.append(
                    f"({expr}).__class__ is not int and ({expr}).__class__ is not float and "
                )
        return "".join(found)

    def _position_kinds(self, key: tuple, pos: int) -> tuple[bool, bool]:
        """`position_kinds` of ``key``'s fact types, worked out once per position."""
        cached = self._kinds.get((key, pos))
        if cached is None:
            signatures = self.program.fact_signatures.get(key, ())
            cached = self._kinds[(key, pos)] = position_kinds(signatures, pos)
        return cached

    def _dispatch_on_constant(
        self, out: _Emitter, node: Node, clauses: Any, args: list, is_bool: bool
    ) -> list:
        """Route on the first run-time argument that most clauses fix to a constant.

        Clauses with a constant head there move into one specialised function per constant,
        found with one dict lookup; the others stay in this function.
        """
        for pos, m in enumerate(node.mask):
            if m != "b":
                continue
            groups: dict[Any, list[Clause]] = defaultdict(list)
            rest = []
            for clause in clauses:
                term = clause.head[pos]
                # Strings and entities only: a table keyed by 1 would be found by true.
                if isinstance(term, Const) and term.value.__class__ in (str, Entity):
                    groups[(type(term.value), term.value)].append(clause)
                else:
                    rest.append(clause)
            if len(groups) < 2:
                continue
            mask = node.mask[:pos] + "c" + node.mask[pos + 1 :]
            before = node.mask[:pos].count("c")
            targets = {}
            for _, value in groups:
                consts = node.consts[:before] + (value,) + node.consts[before:]
                targets[value] = Node(
                    node.name, node.arity, mask, consts, False, node.types, node.strict
                )
            rest_params = [f"a{i}" for i, mm in enumerate(node.mask) if mm == "b" and i != pos]
            self._emit_dispatch(out, f"a{pos}", targets, rest_params, is_bool)
            return rest
        return list(clauses)

    def _dispatch_on_type(self, out: _Emitter, node: Node, clauses: list, is_bool: bool) -> list:
        """Route on the entity type of the first run-time argument whose type clauses differ by.

        A clause whose specializer fixes that argument to one type moves into a function
        specialised to the type, where its type checks are settled at compile time.
        """
        for pos, m in enumerate(node.mask):
            if m != "b" or node.type_of(pos) is not None:
                continue
            groups: dict[str, list[Clause]] = defaultdict(list)
            rest = []
            for clause in clauses:
                required = _required_types(clause, pos)
                if required is not None and len(required) == 1:
                    groups[next(iter(required))].append(clause)
                else:
                    rest.append(clause)
            if len(groups) < 2 and not (groups and not rest and len(clauses) > 1):
                continue
            targets = {}
            for typ in groups:
                types = list(node.types or (None,) * node.arity)
                types[pos] = frozenset([typ])
                targets[typ] = Node(
                    node.name, node.arity, node.mask, node.consts, False, tuple(types), node.strict
                )
            params = [f"a{i}" for i, mm in enumerate(node.mask) if mm == "b"]
            key = f"a{pos}[0] if a{pos}.__class__ is Entity else None"
            self._emit_dispatch(out, key, targets, params, is_bool)
            return rest
        return clauses

    def _emit_dispatch(
        self, out: _Emitter, key: str, targets: dict[Any, Node], params: list[str], is_bool: bool
    ) -> None:
        """One dict lookup on ``key`` picks the specialised function to call (if any)."""
        table: dict[Any, Any] = {}
        tname = f"D{next(self._counter)}"
        self.namespace[tname] = table
        heaviest = 0  # one target runs per call
        for value, target in targets.items():
            self._dispatch.append((table, value, self._ensure(target)))
            heaviest = max(heaviest, self._weights.get(target, 0))
        self._fanout[-1] += heaviest
        call = f"_f(q{''.join(', ' + p for p in params)})"
        out.emit(1, f"_f = {tname}.get({key})")
        if is_bool:
            out.emit(1, f"if _f is not None and {call}:")
            out.emit(2, "return True")
        else:
            out.emit(1, "if _f is not None:")
            out.emit(2, f"yield from {call}")

    def _clause(self, out: _Emitter, clause: Clause, node: Node, args: list, is_bool: bool) -> None:
        env: dict[str, str] = {}
        statics: dict[str, Any] = {}  # variables bound to compile-time constants
        self._vtypes = {}
        consts = iter(node.consts)
        lines = _Emitter()
        depth = 2
        for pos, (term, m, arg) in enumerate(zip(clause.head, node.mask, args, strict=True)):
            if m == "f":
                continue
            value = next(consts) if m == "c" else None
            if isinstance(term, Var) and term.name not in env and node.type_of(pos) is not None:
                self._vtypes[term.name] = node.type_of(pos)
            if isinstance(term, Const):
                if m == "c":
                    if not same_value(term.value, value):
                        raise _DeadClause
                elif term.value.__class__ is str:  # a string equals only a string
                    lines.emit(depth, f"if {arg} != {self._const(term.value)}: break")
                else:
                    same_ = _equal(arg, self._const(term.value), None, term)
                    lines.emit(depth, f"if not ({same_}): break")
            elif term.name in env:
                lines.emit(depth, f"if not _same({arg}, {env[term.name]}): break")
            else:
                env[term.name] = arg
                if m == "c":
                    statics[term.name] = value
        head_vars = {v for t in clause.head for v in term_vars(t)}

        def leaf(out: _Emitter, env: dict, depth: int) -> None:
            outputs = []
            for term, m in zip(clause.head, node.mask, strict=True):
                if m != "f":
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

        order = plan(clause.body, set(env), head_vars, clause.location)
        body = _body_of(clause.body, order, head_vars, is_bool, leaf, head_vars)
        self._body(lines, body, order, env, statics, depth)
        out.emit(1, f"# {_summary(clause.text)}")
        out.emit(1, "while True:")  # a block to 'break' out of when a head check fails
        out.lines.extend(lines.lines)
        out.emit(2, "break")

    def _expr(self, term: Any, env: dict, lookups: list[tuple[str, tuple, str]]) -> str:
        """An expression for a bound term. Each context field it reads is added to ``lookups``
        (a name and a path), to be read and checked for MISSING by `_guard` first."""
        if isinstance(term, Const):
            return self._const(term.value)
        if isinstance(term, Var):
            return env[term.name]
        if isinstance(term, ContextPath):
            tmp = f"c{next(self._counter)}"
            lookups.append((tmp, term.path, "lookup"))
            return tmp
        if isinstance(term, Arith):
            # Computed with the context fields, before the condition that uses it: a result
            # with no value (MISSING) makes that condition false.
            left = self._expr(term.left, env, lookups)
            right = self._expr(term.right, env, lookups)
            tmp = f"c{next(self._counter)}"
            lookups.append((tmp, (term.op, left, right), "arith"))
            return tmp
        if isinstance(term, EntityOf):
            # Made with the context fields, before the condition that uses it: an id that is
            # not a non-empty string makes no entity (MISSING), and that condition false.
            made = self._expr(term.id, env, lookups)
            tmp = f"c{next(self._counter)}"
            lookups.append((tmp, (term.type, made), "entity"))
            return tmp
        # A list of values known at compile time is made once, of a known size; one built from
        # run-time values is measured against the budget.
        if _constant(term):
            return self._const(_constant_value(term))
        items = "(" + "".join(self._expr(item, env, lookups) + ", " for item in term.items) + ")"
        return f"_built(q, {items})"

    def _guard(
        self,
        out: _Emitter,
        lookups: list[tuple[str, tuple, str]],
        depth: int,
        check: str | None = None,
    ) -> int:
        """Read the context fields an expression needs; the rest runs only if all are there,
        and ``check`` (a condition over them, if given) holds.

        In strict code, arithmetic whose operands have values but that gives none cannot be
        decided: under a ``check`` the condition holds; elsewhere (its value bound, passed on,
        or checked for a type) there is no value to go on with, and it raises `Undecided`.
        """
        if not lookups:
            if check is None:
                return depth
            out.emit(depth, f"if {check}:")
            return depth + 1
        undecided = []
        for tmp, path, read in lookups:
            if read == "arith":
                op, left, right = path
                out.emit(depth, f"{tmp} = _arith({op!r}, {left}, {right})")
                if self._strict:  # values that give no result: not a missing field
                    given = "".join(
                        f" and {operand} is not MISSING"
                        for operand in (left, right)
                        if operand.isidentifier()  # a constant in the rule is a value
                    )
                    if check is None:
                        out.emit(depth, f"if {tmp} is MISSING{given}: _undecided()")
                    else:
                        undecided.append(f"{tmp} is MISSING{given}")
            elif read == "entity":
                type_name, made = path
                out.emit(depth, f"{tmp} = _entity_of({type_name!r}, {made})")
            else:
                out.emit(depth, f"{tmp} = q.{read}({path!r})")
        if undecided:
            plain = [f"{tmp} is not MISSING" for tmp, _, read in lookups if read != "arith"]
            computed = [f"{tmp} is not MISSING" for tmp, _, read in lookups if read == "arith"]
            holds = " or ".join([*undecided, f"({' and '.join(computed)} and {check})"])
            out.emit(depth, f"if {''.join(g + ' and ' for g in plain)}({holds}):")
            return depth + 1
        out.emit(depth, f"if {' and '.join(f'{tmp} is not MISSING' for tmp, _, _ in lookups)}:")
        if check is None:
            return depth + 1
        out.emit(depth + 1, f"if {check}:")
        return depth + 2

    def _value(self, out: _Emitter, term: Any, env: dict, depth: int) -> tuple[str, int]:
        """An expression for a bound term, with its context fields read and checked first."""
        lookups: list[tuple[str, tuple, str]] = []
        expr = self._expr(term, env, lookups)
        return expr, self._guard(out, lookups, depth)

    def _bind(self, var: str, env: dict) -> str:
        name = f"v_{var}_{next(self._counter)}"
        env[var] = name
        return name

    def _body(
        self, out: _Emitter, body: _Body, order: list[Literal], env: dict, statics: dict, depth: int
    ) -> None:
        """Emit ``order`` (the body's literals, planned), each nested in the one before, then
        the body's leaf."""
        for i, lit in enumerate(order):
            if depth >= _MAX_DEPTH:
                self._continuation(out, body, order[i:], env, statics, depth)
                return
            if isinstance(lit, TypeLit):
                depth = self._type_check(out, lit, env, statics, depth)
            elif isinstance(lit, CmpLit):
                depth = self._comparison(out, lit, env, depth)
            elif isinstance(lit, NotLit):
                depth = self._negation(out, lit, body, env, statics, depth)
            else:
                depth = self._call(out, lit, env, statics, depth)
        body.leaf(out, env, depth)

    def _continuation(
        self, out: _Emitter, body: _Body, rest: list[Literal], env: dict, statics: dict, depth: int
    ) -> None:
        """The rest of a body as a function of its own, called with the values bound so far."""
        fname = f"k{next(self._counter)}"
        start = body.position[id(rest[0])]
        names = (name for v, name in sorted(env.items()) if body.last_use.get(v, -1) >= start)
        params = [name for name in dict.fromkeys(names) if _LOCAL.fullmatch(name)]
        args = "".join(", " + p for p in params)
        inner = _Emitter()
        inner.emit(0, f"def {fname}(q{args}):")
        self._body(inner, body, rest, env, statics, 1)
        if body.is_bool:
            inner.emit(1, "return False")
            out.emit(depth, f"if {fname}(q{args}):")
            out.emit(depth + 1, "return True")
        else:
            inner.emit(1, "return")
            inner.emit(1, "yield")
            out.emit(depth, f"yield from {fname}(q{args})")
        self._helpers[self._callers[-1]].append("\n".join(inner.lines) + "\n")

    def _type_check(self, out: _Emitter, lit: TypeLit, env: dict, statics: dict, depth: int) -> int:
        term = lit.term
        if isinstance(term, Var) and term.name in statics:
            if not has_type(statics[term.name], lit.types):
                raise _DeadClause
            return depth
        if isinstance(term, Const):
            if not has_type(term.value, lit.types):
                raise _DeadClause
            return depth
        entity_types = frozenset(t for t in lit.types if t not in VALUE_TYPES)
        if isinstance(term, Var) and term.name not in env:
            var = self._bind(term.name, env)
            self._vtypes[term.name] = entity_types
            found = f"e{next(self._counter)}"
            out.emit(depth, f"{found} = q.index.entities_of({self._const(entity_types)})")
            out.emit(depth, f"q.steps -= len({found})")  # every entity of those types
            out.emit(depth, "if q.steps < 0: _exhausted(q)")
            out.emit(depth, f"for {var} in {found}:")
            return depth + 1
        known = self._vtypes.get(term.name) if isinstance(term, Var) else None
        if known is not None:
            if known <= lit.types:
                return depth  # settled at compile time
            if not known & lit.types:
                raise _DeadClause
        if isinstance(term, Var) and entity_types and entity_types == lit.types:
            self._vtypes[term.name] = entity_types & known if known is not None else entity_types
        expr, depth = self._value(out, term, env, depth)
        checks = []
        if entity_types:
            checks.append(
                f"({expr}.__class__ is Entity and {expr}[0] in {self._const(entity_types)})"
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
            out.emit(depth, f"for {self._bind(lit.left.name, env)} in _members(q, {expr}):")
            return depth + 1
        lookups: list[tuple[str, tuple, str]] = []
        left = self._expr(lit.left, env, lookups)
        if lit.op == "in" and isinstance(lit.right, ContextPath):
            # Only searched: the list as the request gave it, not made a policy value first.
            right = f"c{next(self._counter)}"
            lookups.append((right, lit.right.path, "read"))
        else:
            right = self._expr(lit.right, env, lookups)
        if lit.op in ("=", "=="):
            check = _equal(left, right, lit.left, lit.right)
        elif lit.op == "!=":
            check = f"not ({_equal(left, right, lit.left, lit.right)})"
        elif lit.op == "in":
            check = f"_contains(q, {right}, {left})"
        else:
            compare = "_compare_strict" if self._strict else "_compare"
            check = f"{compare}({lit.op!r}, {left}, {right})"
        return self._guard(out, lookups, depth, check)

    def _negation(
        self, out: _Emitter, lit: NotLit, body: _Body, env: dict, statics: dict, depth: int
    ) -> int:
        shared = sorted(body.shared[id(lit)])
        fname = f"n{next(self._counter)}"
        params = [env[v] for v in shared]
        inner = _Emitter()
        inner.emit(0, f"def {fname}(q{''.join(', ' + p for p in params)}):")
        inner_env = {v: env[v] for v in shared}
        inner_statics = {v: statics[v] for v in shared if v in statics}
        order = plan(lit.body, set(shared), set(shared), lit.location)
        negated = _body_of(lit.body, order, set(shared), True, _succeed, set())
        # A 'not' turns the polarity: the body of one in ordinary code is strict (what cannot
        # be decided may hold, so the 'not' fails), and the body of one in strict code is
        # ordinary (what cannot be decided is false, so the 'not' holds, and the strict code
        # around it, a deny rule say, holds too). Either way the answer fails closed.
        outer = self._strict
        self._strict = not outer
        try:
            self._body(inner, negated, order, inner_env, inner_statics, 1)
        except _DeadClause:
            return depth  # the negated conjunction can never hold: 'not' is always true
        finally:
            self._strict = outer
        inner.emit(1, "return False")
        self._helpers[self._callers[-1]].append("\n".join(inner.lines) + "\n")
        args = "".join(", " + p for p in params)
        if outer:  # an ordinary body: it raises nothing
            out.emit(depth, f"if not {fname}(q{args}):")
        else:  # a strict body that cannot be decided: taken as holding, so the 'not' fails
            out.emit(depth, f"if not _proved_or_undecided({fname}, q{args}):")
        return depth + 1

    def _output_types(
        self, lit: CallLit, mask: list, consts: list, types: list
    ) -> dict[str, frozenset]:
        """Types of the variables a call binds, when the fact types the policy declares settle
        them (a predicate with facts only: ``has_relation(Repo, "parent", Org)``)."""
        key = (lit.name, len(lit.args))
        if key in self.program.clauses or "f" not in mask:
            return {}
        values = iter(consts)
        fixed = [next(values) if m == "c" else None for m in mask]
        shape = (key, tuple(mask), tuple(fixed), tuple(types))
        per_position = self._output_shapes.get(shape)
        if per_position is None:  # the same call recurs in many rules: worked out once
            per_position = self._output_shapes[shape] = self._output_positions(
                key, mask, fixed, types
            )
        found: dict[str, set] = {}
        for pos, allowed in per_position.items():
            a = lit.args[pos]
            if isinstance(a, Var):
                if allowed is None:
                    found[a.name] = {None}
                else:
                    found.setdefault(a.name, set()).update(allowed)
        return {n: frozenset(t) for n, t in found.items() if None not in t and t}

    def _output_positions(
        self, key: tuple, mask: list, fixed: list, types: list
    ) -> dict[int, frozenset | None]:
        """Per free argument of a call to fact predicate ``key`` that some declared signature
        fits: the entity types it may take, or None when it may take a value."""
        found: dict[int, set | None] = {}
        for signature in self._signatures_for(key, mask, fixed, types):
            fits = True
            for (kind, allowed), m, value, known in zip(signature, mask, fixed, types, strict=True):
                if kind == "any":
                    fits = True
                elif m == "c":
                    fits = value in allowed if kind == "values" else has_type(value, allowed)
                elif m == "b" and known is not None and kind == "types":
                    fits = bool(known & allowed)
                if not fits:
                    break
            if not fits:
                continue
            for pos, ((kind, allowed), m) in enumerate(zip(signature, mask, strict=True)):
                if m != "f" or (pos in found and found[pos] is None):
                    continue
                if kind != "types" or allowed & VALUE_TYPES.keys():
                    found[pos] = None
                else:
                    found.setdefault(pos, set()).update(allowed)
        return {pos: None if t is None else frozenset(t) for pos, t in found.items()}

    def _signatures_for(self, key: tuple, mask: list, fixed: list, types: list) -> list:
        """The declared fact signatures of ``key`` that may fit a call's constants and known
        types (a superset, in the order declared): found by argument, not by going through
        every signature for every call (a policy of n resource types has n of ``has_role``)."""
        signatures = self.program.fact_signatures.get(key, ())
        best: set[int] | None = None
        for pos, (m, value, known) in enumerate(zip(mask, fixed, types, strict=True)):
            if m == "c":
                by = self._signatures_at(key, signatures, pos)
                found = set(by.get(("any",), ())).union(
                    by.get(("value", value), ()),
                    *(by.get(("type", t), ()) for t in _types_of(value)),
                )
            elif m == "b" and known is not None:
                by = self._signatures_at(key, signatures, pos)
                found = set(by.get(("values",), ())).union(
                    by.get(("any",), ()), *(by.get(("type", t), ()) for t in known)
                )
            else:
                continue
            if best is None or len(found) < len(best):
                best = found
        if best is None:
            return list(signatures)
        return [signatures[i] for i in sorted(best)]

    def _signatures_at(self, key: tuple, signatures: Any, pos: int) -> dict:
        """Signature numbers of ``key`` by what they allow at ``pos``: ("type", t) for an entity
        type, ("value", v) for a value, and ("values",) for every one that lists values."""
        by = self._signature_index.get((key, pos))
        if by is None:
            by = defaultdict(list)
            for i, signature in enumerate(signatures):
                kind, allowed = signature[pos]
                if kind == "any":
                    by[("any",)].append(i)
                elif kind == "values":
                    by[("values",)].append(i)
                    for v in allowed:
                        by[("value", v)].append(i)
                else:
                    for t in allowed:
                        by[("type", t)].append(i)
            by = self._signature_index[(key, pos)] = dict(by)
        return by

    def _call(self, out: _Emitter, lit: CallLit, env: dict, statics: dict, depth: int) -> int:
        key = (lit.name, len(lit.args))
        lookups: list[tuple[str, tuple, str]] = []
        if key in BUILTINS:
            # One that reads texts is called with the query, to spend on them (`Builtin.reads`).
            paid = ["q"] if BUILTINS[key].reads is not None else []
            last = lit.args[-1]
            if isinstance(last, Var) and last.name not in env:  # planned: a builtin's output
                args = paid + [self._expr(a, env, lookups) for a in lit.args[:-1]]
                depth = self._guard(out, lookups, depth)
                var = self._bind(last.name, env)
                # In strict code, inputs it cannot read raise `Undecided` (`strict_produce`).
                kind = "SP" if self._strict else "P"
                call = f"{kind}_{lit.name}_{len(lit.args)}({', '.join(args)})"
                out.emit(depth, f"for {var} in {call}:")
                return depth + 1
            args = paid + [self._expr(a, env, lookups) for a in lit.args]
            depth = self._guard(out, lookups, depth)
            # In strict code, what cannot be decided of its arguments holds (`Builtin.strict`).
            kind = "S" if self._strict else "B"
            out.emit(depth, f"if {kind}_{lit.name}_{len(lit.args)}({', '.join(args)}):")
            return depth + 1
        mask, consts, bound_args, targets, checks, types = [], [], [], [], [], []
        new_vars: dict[str, str] = {}
        for a in lit.args:
            if isinstance(a, EntityOf):  # of its type, or no value at all
                types.append(frozenset([a.type]))
            else:
                types.append(
                    self._vtypes.get(a.name) if isinstance(a, Var) and a.name in env else None
                )
            if isinstance(a, Var) and a.name not in env:
                if a.name in new_vars:  # the same unbound variable twice: compare after binding
                    tmp = f"t{next(self._counter)}"
                    targets.append(tmp)
                    checks.append(f"_same({tmp}, {new_vars[a.name]})")
                else:
                    new_vars[a.name] = f"v_{a.name}_{next(self._counter)}"
                    targets.append(new_vars[a.name])
                mask.append("f")
            elif isinstance(a, Const) and _simple_constant(a.value):
                mask.append("c")
                consts.append(a.value)
            elif isinstance(a, Var) and a.name in statics:
                mask.append("c")
                consts.append(statics[a.name])
            else:
                bound_args.append(self._expr(a, env, lookups))
                mask.append("b")
        depth = self._guard(out, lookups, depth)
        typed = tuple(t if m == "b" else None for t, m in zip(types, mask, strict=True))
        target_node = Node(
            lit.name,
            len(lit.args),
            "".join(mask),
            tuple(consts),
            True,
            typed if any(typed) else (),
            self._strict and key in self.program.clauses,  # facts decide alike either way
        )
        fname = self._ensure(target_node)
        self._fanout[-1] += self._weights.get(target_node, 0)
        call = f"{fname}(q{''.join(', ' + b for b in bound_args)})"
        for name, found in self._output_types(lit, mask, consts, types).items():
            if name in new_vars:
                self._vtypes[name] = found
        # A predicate that only facts make true is read here, as its function would read it:
        # a call less, and for a lookup by key no generator to make and close.
        facts_only = key not in self.program.clauses and key in self.program.fact_predicates
        if not targets:
            if facts_only:
                bound, values = iter(bound_args), iter(consts)
                parts = [next(bound) if m == "b" else self._const(next(values)) for m in mask]
                guard = self._kind_guard(
                    key,
                    {i: p for i, (p, m) in enumerate(zip(parts, mask, strict=True)) if m == "b"},
                )
                fa = f"FA_{lit.name}_{len(lit.args)}"
                out.emit(depth, f"if {guard}({''.join(p + ', ' for p in parts)}) in {fa}:")
            else:
                out.emit(depth, f"if {call}:")
            return depth + 1
        env.update(new_vars)
        target = targets[0] if len(targets) == 1 else "(" + ", ".join(targets) + ")"
        fm = self._fact_modes.get(target_node) if facts_only else None
        if fm is not None:
            found = f"_x{next(self._counter)}"
            by = (
                bound_args[0]
                if len(bound_args) == 1
                else f"({''.join(b + ', ' for b in bound_args)})"
            )
            bound = iter(bound_args)
            guard = self._kind_guard(key, {i: next(bound) for i, m in enumerate(mask) if m == "b"})
            if guard:
                out.emit(depth, f"{found} = {fm}.get({by}) if {guard[: -len(' and ')]} else None")
            else:
                out.emit(depth, f"{found} = {fm}.get({by})")
            out.emit(depth, f"if {found} is not None:")
            depth += 1
            out.emit(
                depth,
                f"for {target} in ({found},) if {found}.__class__ is not Many"
                f" else _spent(q, {found}):",
            )
        else:
            out.emit(depth, f"for {target} in {call}:")
        depth += 1
        if checks:
            out.emit(depth, f"if {' and '.join(checks)}:")
            depth += 1
        return depth


def _summary(text: str, width: int = 100) -> str:
    """A clause's text for a comment in generated code: bounded, since every alternative of an
    'or' shares its rule's whole text (n alternatives would make n copies of n of them)."""
    return text if len(text) <= width else text[: width - 3] + "..."


def _forwarded(lines: list[str]) -> str | None:
    """The function a generated true/false function only calls with its own arguments (one
    rule, ``allow(a, b, c) if has_permission(a, b, c)``), if it is one: naming that function
    instead gives the same answers for one call less."""
    if len(lines) != 7 or lines[2:] != [
        "    while True:",
        lines[3],
        "            return True",
        "        break",
        "    return False",
    ]:
        return None
    params = _FORWARD_HEAD.fullmatch(lines[0])
    call = _FORWARD_CALL.fullmatch(lines[3])
    if params is None or call is None or params[1] != call[2]:
        return None
    return call[1]


def _succeed(out: _Emitter, env: dict, depth: int) -> None:
    out.emit(depth, "return True")


def _constant(term: Any) -> bool:
    if isinstance(term, ListTerm):
        return all(_constant(item) for item in term.items)
    return isinstance(term, Const)


def _constant_value(term: Any) -> Any:
    """The value of a term made of constants (`_constant`): a list is a `PolicyList`."""
    if isinstance(term, ListTerm):
        return PolicyList(_constant_value(item) for item in term.items)
    return term.value


def _equal(left: str, right: str, left_term: Any, right_term: Any) -> str:
    """An expression for whether two values are the same value (`same`), for which ``true``
    is not ``1`` and a list not an entity: inline when one side is a string, a number or an
    entity written in the policy, else a call of `same`."""
    for term, other in ((left_term, right), (right_term, left)):
        if not isinstance(term, Const):
            continue
        cls = term.value.__class__
        if cls is str:
            return f"{left} == {right}"
        # ``other`` may be a number written out (a variable bound to a constant): parenthesised.
        if cls is int or cls is float:
            return f"({left} == {right} and ({other}).__class__ is not bool)"
        if cls is Entity:
            return f"({left} == {right} and ({other}).__class__ is Entity)"
    return f"_same({left}, {right})"


def _types_of(value: Any) -> tuple[str, ...]:
    """The type names a constant has, as signatures name them."""
    if isinstance(value, Entity):
        return (value.type,)
    return tuple(t for t, py in VALUE_TYPES.items() if value.__class__ is py)


def _required_types(clause: Clause, pos: int) -> frozenset | None:
    """The entity types a clause's specializer demands of argument ``pos``, if any."""
    term = clause.head[pos]
    if isinstance(term, Const):
        return frozenset([term.value.type]) if isinstance(term.value, Entity) else None
    for lit in clause.body:
        if isinstance(lit, TypeLit) and isinstance(lit.term, Var) and lit.term.name == term.name:
            if lit.types & VALUE_TYPES.keys():
                return None
            return lit.types
    return None
