"""The policy decision point: authorize, decide (with an explanation), list, actions and query.

`Authorizer` holds one policy in force and one fact index. Loading a policy compiles it fully
before it replaces the one in force, so a policy that fails to load changes nothing; decisions
go on meanwhile, on the policy in force. Decisions take the fact lock briefly, so a batch of
writes is seen whole or not at all.

Every evaluation has a budget (`PolicyLimits`): one that spends it is refused with
`EvaluationLimit` (``authorize``, ``list``, ``actions``, ``query``), or answered not allowed
with ``reason == "evaluation_limit"`` (``decide``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion.facts.index import GENERATIONS, CopiedRows, FactIndex
from bastion.facts.model import Entity, FactError, check_fact, format_fact
from bastion.policy import LoadedPolicy, load
from bastion.policy.compile import CompiledPolicy
from bastion.policy.errors import (
    Diagnostic,
    EvaluationLimit,
    Location,
    PolicyError,
    UndecidedQuestion,
)
from bastion.policy.explain import Explanation, explain, over_budget, prove
from bastion.policy.limits import DEFAULT_LIMITS, PolicyLimits
from bastion.policy.parser import parse_fact
from bastion.policy.program import context_roots, has_type, names_type
from bastion.policy.runtime import (
    Query,
    Undecided,
    first_chunk,
    proved_or_undecided,
    stack_exhausted,
)
from bastion.turns import Turns

if TYPE_CHECKING:
    from bastion.decide.contract import ChainDecision


@dataclass(frozen=True, slots=True)
class Variable:
    """An unbound argument of `Authorizer.query`."""

    name: str = "_"


# The questions the decision contract (`bastion.decide.contract.decide_chain`) asks of every
# allowed decision, as (predicate, mask). They are compiled with the policy, so that serving
# never compiles them (on the event loop), and questions through `query`, which spend what is
# left of the compile budget, cannot leave the decisions without them.
CONTRACT_SHAPES = (
    ("requires_scope", "bbf"),
    ("mask", "bbbf"),
    ("rate_limit", "bbbff"),
    ("requires_approval", "bbb"),
    ("requires_review", "bbb"),
    ("approval_grant", "bbbb"),
    ("read_only", "bb"),  # bastion.signals.read_only
    ("requires_recent_auth", "bbbf"),  # bastion.signals.step_up
    # Freshness of live signals (`bastion.signals.store`).
    ("requires_signal", "bff"),
    ("signal", "bbfff"),
    # Asked when a call is held or answered (`bastion.approvals.service.Approvals.terms`).
    ("approver", "fbbb"),
    ("approver", "bbbb"),
    ("approvals_required", "bbbf"),
    ("approval_window", "bbbf"),
    ("approval_expires", "bbbf"),
    ("self_approval_forbidden", "bbb"),
    # Shadow rules: what a rule would have done (`bastion.signals.shadow`).
    ("would", "bbbff"),
    # Alerts a decision raises (`bastion.signals.alerts`): alert(actor, name, severity).
    ("alert", "bff"),
    # Token exchange (`bastion.decide.contract.decide_delegation`).
    ("may_delegate", "bbb"),
    ("delegated_scope", "bbbbb"),
    # Information-flow labels a released result carries (`bastion.delegation.labels`).
    ("label", "bf"),
)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    explanation: Explanation
    # Why it is refused when the policy did not decide: "evaluation_limit" (the evaluation
    # spent its budget; the explanation says which). None otherwise.
    reason: str | None = None

    def __bool__(self) -> bool:
        return self.allowed


class _Active:
    """A loaded policy with its compiled entry points, swapped in as one object."""

    __slots__ = (
        "loaded",
        "compiled",
        "allow",
        "deny",
        "fact_shapes",
        "shapes",
        "context_roots",
        "device_signals",
    )

    def __init__(
        self,
        loaded: LoadedPolicy,
        index: FactIndex,
        limits: PolicyLimits = DEFAULT_LIMITS,
        index_lock: Any = None,
    ) -> None:
        self.loaded = loaded
        self.context_roots = context_roots(loaded.program)
        # Whether a requires_signal rule names a Device: only then is the call's device asked
        # about (`bastion.decide.contract`), so a policy without one pays nothing for it and its
        # rules about any actor (untyped) go on asking the chain's principals alone.
        self.device_signals = names_type(loaded.program, "requires_signal", 3, "Device")
        self.fact_shapes: set[tuple] = set()  # shapes of facts already found acceptable
        # (predicate, mask, strict) -> compiled function (`_shape_key`)
        self.shapes: dict[tuple[str, str, bool], Any] = {}
        # ``index_lock``: compiled beside running decisions, holding the fact lock only to read
        # the facts; later shapes are compiled by decisions, which hold it already.
        self.compiled = CompiledPolicy(loaded.program, index, limits, index_lock)
        defines = self.compiled.defines
        asked = [_shape_key(name, mask) for name, mask in CONTRACT_SHAPES]
        asked += [_shape_key(name, mask, True) for name, mask in STRICT_TOO]
        # What compiling the shapes below certainly spends, counted first: a policy over the
        # budget is refused before seconds of compiling find it so.
        shapes = []
        if defines("allow", 3):
            shapes += [("allow", 3, mask, False) for mask in ("bbb", "bbf", "bfb")]
        if defines("deny", 3):
            shapes.append(("deny", 3, "bbb", True))
        shapes += [(name, n, "b" * n, strict(name, n)) for name, n in loaded.program.clauses]
        shapes += [(name, len(mask), mask, is_strict) for name, mask, is_strict in asked]
        self.compiled.refuse_over_budget(shapes)
        self.allow = self.compiled.function("allow", 3, "bbb") if defines("allow", 3) else None
        # Strict (`Node.strict`): a deny rule whose body may hold but cannot be decided holds.
        # Every caller asks it through `proved_or_undecided` (or catches `Undecided`).
        self.deny = (
            self.compiled.function("deny", 3, "bbb", strict=True) if defines("deny", 3) else None
        )
        # Compile the shapes that list and actions use now, and every rule with all its
        # arguments given (the easiest shape): a rule that cannot run even so is a load error.
        if self.allow is not None:
            self.compiled.function("allow", 3, "bbf")
            self.compiled.function("allow", 3, "bfb")
        for name, arity in loaded.program.clauses:
            self.compiled.function(name, arity, "b" * arity, strict(name, arity))
        for key in asked:
            name, mask, is_strict = key
            if defines(name, len(mask)):
                self.shapes[key] = self.compiled.function(name, len(mask), mask, is_strict)
            else:
                # Asked of every decision whether the policy has the rule or not: answered
                # at once, not by looking the predicate up each time.
                self.shapes[key] = _undefined
        self.compiled.index_lock = None
        self.compiled.serving = True


# The predicates asked as strict code (`Node.strict`): those whose holding restricts (``deny``,
# and the obligations the contract adds to an allowed request), and whose answers combine so
# that more never restricts less (the union of masks, scopes, labels and alerts; every rate
# limit; the fewest seconds since sign-in; the most approvals; the soonest expiry). What their
# rules cannot decide then holds: refuses, or applies the obligation. Those whose holding widens
# (``allow``, ``approver``, ``approval_grant``, ``approval_window``, ``may_delegate``,
# ``delegated_scope``, ``signal``) and shadow rules (``would``, which only record) stay ordinary:
# there what cannot be decided does not hold. ``approval_window`` is asked both ways
# (`STRICT_TOO`): whether there is a window at all widens, and is read ordinarily; how long it
# is, the shortest its rules give, is read strictly, so that a shorter window whose condition
# cannot be decided shortens it.
STRICT = frozenset(
    {
        ("deny", 3),
        ("requires_scope", 3),
        ("mask", 4),
        ("rate_limit", 5),
        ("requires_approval", 3),
        ("requires_review", 3),
        ("read_only", 2),
        ("requires_recent_auth", 4),
        ("requires_signal", 3),
        ("approvals_required", 4),
        ("approval_expires", 4),
        ("self_approval_forbidden", 3),
        ("alert", 3),
        ("label", 2),
    }
)


# Contract questions of a widening predicate asked as strict code too, beside their ordinary
# reading (`Session.rows` with ``strict=True``), compiled with the policy as `CONTRACT_SHAPES`
# are: where its answers combine to the least (the shortest ``approval_window``,
# `bastion.approvals.service.Approvals._terms_in`), a rule that cannot be decided may narrow
# what another rule gives, and never gives anything alone.
STRICT_TOO = (("approval_window", "bbbf"),)


def strict(predicate: str, arity: int) -> bool:
    """Whether ``predicate/arity`` is asked as strict code (`Node.strict`, `STRICT`): its
    holding restricts, so that what its rules cannot decide restricts too."""
    return (predicate, arity) in STRICT


def _shape_key(predicate: str, mask: str, reading: bool | None = None) -> tuple[str, str, bool]:
    """Where a compiled shape of question is kept (`_Active.shapes`): the predicate, the mask,
    and whether it is read as strict code, by default as the predicate is asked (`strict`);
    ``reading`` asks it the other way (`STRICT_TOO`)."""
    return predicate, mask, strict(predicate, len(mask)) if reading is None else reading


def _refusing(refused: Exception) -> Any:
    """A shape of question that could not be compiled (`Authorizer.prepare`): asked, it raises
    what compiling it raised."""

    def refusal(q: Query, *bound: Any) -> Any:
        raise refused.with_traceback(None)  # not a traceback grown by each asking

    return refusal


def _undefined(q: Query, *bound: Any) -> tuple:
    """A contract question the policy defines no rule for: nothing holds."""
    return ()


def _epoch(value: datetime | float | int | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value)


def _live(
    pairs: Iterable[tuple[tuple, float | None]], now: float | None = None
) -> Iterator[tuple[tuple, float | None]]:
    """The ``(fact, expires_at)`` pairs not expired at ``now`` (by default, now)."""
    now = time.time() if now is None else now
    return (pair for pair in pairs if pair[1] is None or pair[1] > now)


def _remove_matching(index: FactIndex, patterns: list[tuple]) -> int:
    """Remove the facts that fit each pattern; return how many. The caller holds the lock."""
    removed = sum(index.remove(fact) for pattern in patterns for fact in _matching(index, pattern))
    # The removed facts' tuples are let go of: what only they named is forgotten.
    index.let_go_of_released()
    return removed


def _matching(index: FactIndex, pattern: tuple) -> list[tuple]:
    return list(index.matching(pattern))


# Up to this many facts a write adds one by one (`FactIndex.add`); more go in together
# (`FactIndex.add_all`), in fewer steps a fact but more steps in all for a few.
_ONE_BY_ONE = 32


class FactSet:
    """The facts of an `Authorizer`: insert, delete, get, and atomic batches."""

    def __init__(self, authorizer: Authorizer) -> None:
        self._authz = authorizer
        self._index = authorizer._index

    def _parse(self, fact: tuple | str, pattern: bool = False) -> tuple:
        if isinstance(fact, str):
            fact = parse_fact(fact)
        return check_fact(tuple(fact), pattern=pattern)

    def validate(self, fact: tuple | str) -> tuple:
        """The fact as a checked tuple; `FactError` if malformed or if the policy cannot use it."""
        return self.usable(self._parse(fact))

    def usable(self, fact: tuple) -> tuple:
        """``fact``, as `check_fact` returns it (`fact_from_json` does too), if the policy in
        force can use it; else `FactError`."""
        active = self._authz._active
        shape = _shape(fact)
        if shape is not None and shape in active.fact_shapes:
            return fact
        program = active.loaded.program
        key = (fact[0], len(fact) - 1)
        signatures = program.fact_signatures.get(key)
        if not signatures:
            uses = sorted(f"{n}/{a}" for n, a in program.fact_signatures)
            raise FactError(
                f"{format_fact(fact)}: the policy has no use for {key[0]}/{key[1]} facts "
                f"(it uses {', '.join(uses) or 'no facts'}; declare new fact types with 'declare')"
            )
        for signature in signatures:
            if all(_fits(spec, arg) for spec, arg in zip(signature, fact[1:], strict=True)):
                if shape is not None:
                    if len(active.fact_shapes) > 10_000:
                        active.fact_shapes.clear()
                    active.fact_shapes.add(shape)
                return fact
        expected = "; ".join(
            f"{key[0]}({', '.join(_describe(s) for s in sig)})" for sig in signatures
        )
        raise FactError(
            f"{format_fact(fact)} does not fit any {key[0]} fact the policy uses: expected {expected}"
        )

    def insert(self, fact: tuple | str, expires_at: datetime | float | None = None) -> bool:
        """Add a fact (optionally until ``expires_at``); return False if it was already there."""
        return self.apply([fact], [], expires_at=expires_at) > 0

    def delete(self, pattern: tuple | str) -> int:
        """Remove every fact matching ``pattern`` (``None`` or ``_`` is a wildcard); return how many."""
        return -self.apply([], [pattern])

    def get(self, pattern: tuple | str) -> list[tuple]:
        pattern = self._parse(pattern, pattern=True)
        with self._index.lock:
            self._purge()
            return sorted(self._index.matching(pattern), key=format_fact)

    def expiry(self, fact: tuple | str) -> float | None:
        """When the fact expires (epoch seconds), or None."""
        return self._index.expiry_of(self._parse(fact))

    def apply(
        self, inserts: list, deletes: list, expires_at: datetime | float | None = None
    ) -> int:
        """Delete the patterns in ``deletes``, then insert ``inserts``, as one atomic change.

        Every insert is validated first; if any is refused nothing changes. Returns the number of
        facts added minus the number removed.
        """
        expiry = _epoch(expires_at)
        checked = [(self.validate(f), expiry) for f in inserts]
        return self._commit(checked, [self._parse(p, pattern=True) for p in deletes])

    def load(self, facts: Iterable[tuple], deletes: Iterable = ()) -> list[tuple]:
        """Delete ``deletes``, then insert every usable fact, as one atomic change.

        ``facts`` holds ``(fact, expires_at)`` pairs, each with its own expiry (or None). Facts
        the policy in force cannot use are left out and returned as such pairs, so that a store
        can offer them again after a policy change; a malformed fact raises `FactError`.
        """
        checked, refused = self.check(facts)
        self.load_checked(checked, deletes)
        return refused

    def check(
        self, facts: Iterable[tuple], turns: Turns | None = None
    ) -> tuple[list[tuple], list[tuple]]:
        """The first half of `load`, which needs no lock: each ``(fact, expires_at)`` parsed and
        checked against the policy in force, as (those it can use, those it cannot); a
        malformed fact raises `FactError`. With ``turns``, on a worker thread: a tick after
        each fact (`bastion.turns`)."""
        checked, refused = [], []
        for fact, expires_at in facts:
            fact = self._parse(fact)
            try:
                checked.append((self.usable(fact), _epoch(expires_at)))
            except FactError:
                refused.append((fact, expires_at))
            if turns is not None:
                turns.tick()
        return checked, refused

    def load_checked(
        self, checked: list[tuple], deletes: Iterable = (), shared: bool = False
    ) -> None:
        """The second half of `load`: ``deletes`` applied, then the facts `check` found usable
        (under the policy in force still: the caller makes sure) added, as one atomic change.
        ``shared``: ``checked`` went through `shared` too."""
        self._commit(checked, [self._parse(p, pattern=True) for p in deletes], shared)

    def fill(self, checked: list[tuple], turns: Turns, deletes: Iterable = ()) -> None:
        """`load_checked` of facts `shared` made, on a worker thread: under one hold of the lock,
        ``deletes`` applied, then the facts added a `CHUNK` at a time, a tick after each, so that
        no C call holds the GIL long. Into facts that nothing decides on yet (a replica's next
        `Authorizer`), or into those in force: their decisions then wait for the lock (see
        `bastion.server.replica.Replica.in_force`), and see the change whole or not at all."""
        patterns = [self._parse(p, pattern=True) for p in deletes]
        index = self._index
        with index.lock:
            _remove_matching(index, patterns)
            for chunk in turns.chunks(_live(checked)):
                index.add_all(chunk, shared=True)

    def shared(self, checked: list[tuple], turns: Turns | None = None) -> list[tuple]:
        """Facts `check` found usable, their values as the index stores them (`FactIndex.shared`),
        made without the lock: what is left to `load_checked` is adding them."""
        return self._index.shared(checked, turns)

    def load_rows(
        self,
        name: str,
        arity: int,
        rows: list[tuple],
        expiries: dict[tuple, float],
    ) -> list[tuple]:
        """`load` for the argument tuples of one predicate that were checked when written (a
        fact snapshot's), checking each distinct shape against the policy once rather than
        each fact. Returns the refused facts as ``(fact, expires_at)`` pairs, as `load` does.
        """
        now = time.time()
        if expiries:
            gone = {v for v, at in expiries.items() if at <= now}
            if gone:
                rows = [v for v in rows if v not in gone]
                expiries = {v: at for v, at in expiries.items() if v not in gone}
        refused = self._refused_rows(name, arity, rows)
        if refused:
            rows = [v for v in rows if v not in refused]
            expiries = {v: at for v, at in expiries.items() if v not in refused}
        with self._index.lock:
            self._index.add_rows(name, arity, rows, expiries)
        return [((name, *v), expiries.get(v)) for v in refused]

    def _refused_rows(self, name: str, arity: int, rows: list[tuple]) -> set[tuple]:
        """The rows the policy in force cannot use. What `validate` decides depends only on a
        fact's `_shape` (with every string's value), so one fact per distinct shape is asked."""
        parts: list | None = []
        for i in range(arity):
            column = list(map(itemgetter(i), rows))
            kinds = set(map(type, column))
            if kinds == {Entity}:
                parts.append(list(map(_ENTITY_TYPE, column)))
            elif kinds == {str}:
                parts.append(column)  # each value is its own part (kinds never mix here)
            elif bool in kinds and int in kinds:
                # True == 1 as a dict key: too rare to be worth a fast path.
                parts = None
                break
            else:
                parts.append(list(map({v: _part(v) for v in set(column)}.__getitem__, column)))

        def shapes() -> Iterator[tuple]:
            # Made twice rather than kept: a list of a million shapes is 60 MB at its peak.
            if parts is None:
                return (tuple(_part(a) for a in v) for v in rows)
            return zip(*parts, strict=True) if parts else iter([()] * len(rows))

        refused_shapes = set()
        for shape, example in dict(zip(shapes(), rows, strict=True)).items():
            try:
                self.validate((name, *example))
            except FactError:
                refused_shapes.add(shape)
        if not refused_shapes:
            return set()
        return {v for v, s in zip(rows, shapes(), strict=True) if s in refused_shapes}

    def rows(self) -> CopiedRows:
        """A copy of every fact held (see `FactIndex.rows`), taken under the lock."""
        with self._index.lock:
            return self._index.rows()

    def _commit(
        self,
        inserts: list[tuple[tuple, float | None]],
        patterns: list[tuple],
        shared: bool = False,
    ) -> int:
        index = self._index
        now = time.time()
        with index.lock:
            removed = _remove_matching(index, patterns)
            if shared or len(inserts) > _ONE_BY_ONE:
                added = index.add_all(list(_live(inserts, now)), shared)
            else:
                added = 0
                for fact, expiry in inserts:
                    if expiry is None or expiry > now:
                        added += index.add(fact, expiry)
        return added - removed

    @contextmanager
    def batch(self) -> Iterator[_Batch]:
        """``with authz.facts.batch() as b: b.insert(...); b.delete(...)``: all or nothing."""
        b = _Batch()
        yield b
        self.apply(b.inserts, b.deletes)

    def crowded_expiry(self, limit: int) -> float | None:
        """The earliest time by which more than ``limit`` facts will have expired, or infinity
        (`FactIndex.crowded_expiry`): cheap, whatever the facts held. None, without waiting,
        while the fact lock is held (a change going in, on a worker thread, say)."""
        index = self._index
        if not index.lock.acquire(blocking=False):
            return None
        try:
            return index.crowded_expiry(limit)
        finally:
            index.lock.release()

    def purge_at(self, at: float, turns: Turns) -> int:
        """On a worker thread: once ``at`` has passed, drop every fact expired by then, under one
        hold of the fact lock and in ``turns`` (`FactIndex.purge_expired`); return how many.
        Decisions wait for the lock meanwhile, and see all those facts or none: each decision
        drops what has expired before it evaluates, so none uses a fact past its expiry,
        whoever drops it."""
        while (left := at - time.time()) > 0:
            time.sleep(left)
        with self._index.lock:
            return self._index.purge_expired(time.time(), turns)

    def _purge(self) -> None:
        """Drop expired facts; the caller holds the lock."""
        if self._index.next_expiry <= time.time():
            self._index.purge_expired(time.time())

    def __len__(self) -> int:
        with self._index.lock:
            self._purge()
            return self._index.count

    @property
    def held(self) -> int:
        """How many facts are held, read without waiting for the fact lock (for `/readyz` and
        the metrics, which must answer while a large change goes in): expired facts not yet
        dropped are counted."""
        return self._index.count

    def __iter__(self) -> Iterator[tuple]:
        with self._index.lock:
            self._purge()
            return iter(list(self._index))


class _Batch:
    def __init__(self) -> None:
        self.inserts: list = []
        self.deletes: list = []

    def insert(self, fact: tuple | str) -> None:
        self.inserts.append(fact)

    def delete(self, pattern: tuple | str) -> None:
        self.deletes.append(pattern)


def _shape(fact: tuple) -> tuple | None:
    """What validating a fact depends on: its predicate, entity types, value kinds, and string
    values (role and relation names are checked by value). None for a fact not worth caching."""
    shape: list[Any] = [fact[0]]
    for a in fact[1:]:
        if a.__class__ is Entity:
            shape.append(a.type)
        elif a.__class__ is str:
            if len(a) > 64:
                return None
            shape.append((a,))
        else:
            shape.append(type(a))
    return tuple(shape)


_ENTITY_TYPE = itemgetter(0)


def _part(a: Any) -> Any:
    """One argument's part of a fact's shape (see `_shape`), any string's value included."""
    if a.__class__ is Entity:
        return a.type
    if a.__class__ is str:
        return (a,)
    return type(a)


def _fits(spec: tuple, arg: Any) -> bool:
    kind, allowed = spec
    if kind == "values":
        return isinstance(arg, str) and arg in allowed
    if kind == "any":  # an untyped argument of a fact type inferred from a rule
        return True
    return has_type(arg, allowed)


def _describe(spec: tuple) -> str:
    kind, allowed = spec
    if kind == "any":
        return "_"
    if kind == "values":
        return "|".join(f'"{v}"' for v in sorted(allowed))
    return "|".join(sorted(allowed)) or "nothing"


class _Same:
    """The context of the session (`Session.allowed`): None is a context of its own."""


_SAME = _Same()


class Session:
    """Questions asked under one lock (see `Authorizer.session`)."""

    __slots__ = ("_authz", "_active", "_q")

    def __init__(self, authz: Authorizer, active: _Active, q: Query) -> None:
        self._authz, self._active, self._q = authz, active, q

    def allowed(
        self, actor: Any, action: Any, resource: Any, context: dict | None | _Same = _SAME
    ) -> bool:
        """The same answer as `Authorizer.authorize`; with ``context``, in that context instead
        of the session's. Every question of a session spends one evaluation budget."""
        q = self._q
        if context is not _SAME and context is not q.context:
            self.use_context(context)
        return self._authz._allowed(self._active, q, actor, action, resource)

    def use_context(self, context: dict | None) -> None:
        """Ask the session's next questions in ``context`` (they still spend its one budget)."""
        q = self._q
        if context is not q.context:
            q.context = context
            # What was worked out may depend on the context it was asked in, and the lists and
            # objects read from it as policy values are those of the context before.
            q.tables = None
            q.frozen = None

    def explain(self, actor: Any, action: Any, resource: Any) -> Explanation:
        """`allowed` with the rules and facts that proved it, or the paths that failed (an
        interpreter, not the compiled code: tens to hundreds of microseconds)."""
        try:
            allowed = self.allowed(actor, action, resource)
        except EvaluationLimit as limit:
            return over_budget((actor, action, resource), limit)
        program = self._active.loaded.program
        q = self._q
        return explain(program, q.index, (actor, action, resource), q.context, allowed, q.limits)

    def prove(self, predicate: str, *args: Any) -> Explanation:
        """Why ``predicate(*args)`` holds, such as an obligation's rule: the rules and facts of
        its first proof (the interpreter, as `explain`)."""
        q = self._q
        program = self._active.loaded.program
        # As `rows` asks it: an obligation's rule that cannot be decided is shown holding.
        is_strict = strict(predicate, len(args))
        return prove(program, q.index, predicate, args, q.context, q.limits, is_strict)

    @property
    def generation(self) -> int:
        """Which facts and policy these answers come from: the same generation, the same
        answers (see `FactIndex.generation`)."""
        return self._q.index.generation

    @property
    def device_signals(self) -> bool:
        """Whether a ``requires_signal`` rule of the policy in force names a ``Device``."""
        return self._active.device_signals

    def values(self, predicate: str, *args: Any) -> set:
        """The values of the `Variable` (or None) arguments for which ``predicate(*args)`` holds:
        a set of single values when one argument is open, of tuples when several are; with none
        open, ``{()}`` if it holds. Empty when the policy does not define the predicate.
        ``allow/3`` holds where `authorize` allows: a ``deny`` rule that holds takes it back."""
        mask = mask_of(args)
        return self.rows(predicate, mask, *(a for a, m in zip(args, mask, strict=True) if m == "b"))

    def rows(self, predicate: str, mask: str, *bound: Any, strict: bool | None = None) -> set:
        """`values` with the shape given: ``mask`` has "b" per bound argument (given in order in
        ``bound``) and "f" per open one. For callers that ask the same shape many times.
        ``strict``: read as strict code (True) or ordinary code (False) rather than as the
        predicate is asked (`STRICT`); the shapes asked so are compiled with the policy
        (`STRICT_TOO`)."""
        # `_shape_key`, written out: asked of most decisions, a call less each time.
        is_strict = (predicate, len(mask)) in STRICT if strict is None else strict
        key = (predicate, mask, is_strict)
        fn = self._active.shapes.get(key)
        if fn is None:
            if not self._active.compiled.defines(predicate, len(mask)):
                return set()
            fn = self._active.compiled.function(predicate, len(mask), mask, is_strict)
            self._active.shapes[key] = fn
        deny = self._active.deny if predicate == "allow" and len(mask) == 3 else None
        q = self._q
        try:
            if "f" not in mask:
                if is_strict:
                    return {()} if proved_or_undecided(fn, q, *bound) else set()
                held = fn(q, *bound) and not (deny and proved_or_undecided(deny, q, *bound))
                return {()} if held else set()
            found = set(fn(q, *bound))
            if deny is not None:
                # `allow` is what `authorize` answers, here too: deny wins over it.
                found = {
                    hit
                    for hit in found
                    if not proved_or_undecided(deny, q, *_spread(mask, bound, hit))
                }
            return found
        except Undecided:
            # Strict code with an answer left open: arithmetic with no result (or lower of a
            # value that is no string), whose value a rule binds or passes on, leaves no answer to give (with every argument given,
            # the rule holds instead). The decision contract refuses on it.
            raise self.undecided(
                predicate,
                len(mask),
                "cannot be decided for some answer of this question (arithmetic with no result,"
                " or lower of a value that is no string, bound or passed on); ask with every"
                " argument given",
            ) from None
        except RecursionError:
            stack_exhausted(q)

    def undecided(self, predicate: str, arity: int, why: str) -> UndecidedQuestion:
        """The refusal of a question of ``predicate/arity`` whose answers cannot be named or
        used (``why``), placed at its first rule: what `rows` raises for strict code left
        open, and what the decision contract raises for an obligation's value it cannot use
        (a required scope that is not text)."""
        clauses = self._active.loaded.program.clauses.get((predicate, arity), ())
        where = clauses[0].location if clauses else Location("<policy>", 1, 1)
        return UndecidedQuestion(predicate, [Diagnostic(where, f"{predicate}/{arity} {why}")])


def mask_of(args: Sequence[Any]) -> str:
    """The shape of a question's arguments: "f" for each open one (a `Variable` or None), "b"
    for each given."""
    return "".join("f" if a is None or isinstance(a, Variable) else "b" for a in args)


def _spread(mask: str, bound: tuple, hit: Any) -> list:
    """The arguments of one answer of a query: ``bound`` and the ``hit``'s values (one, or a
    tuple of several) in the places ``mask`` gives them ("b" bound, "f" open)."""
    given, found = iter(bound), iter((hit,) if mask.count("f") == 1 else hit)
    return [next(given) if m == "b" else next(found) for m in mask]


def _check_arguments(*args: Any) -> None:
    """Raise a clear error for a decision argument that is neither an entity nor a value."""
    for name, arg in zip(("actor", "action", "resource"), args, strict=False):
        if not isinstance(arg, (Entity, str, int, float, bool)) or (
            isinstance(arg, Entity) and not all(isinstance(x, str) for x in arg)
        ):
            raise FactError(
                f"{name} must be an Entity or a string, integer or boolean, got {arg!r}"
            )


class Authorizer:
    """A policy in force over a set of facts. Thread-safe.

    ``limits`` bounds the policies it loads and the work of each evaluation (`PolicyLimits`).
    """

    def __init__(
        self,
        policy: str = "",
        *,
        source: str = "<policy>",
        limits: PolicyLimits = DEFAULT_LIMITS,
    ) -> None:
        self.limits = limits
        self._index = FactIndex()
        self._query = Query(None, self._index, limits)
        self._steps = first_chunk(limits.evaluation_max_steps)  # `Query.start`, inline
        self._active: _Active | None = None
        self.load_policy(policy, source=source)

    @property
    def facts(self) -> FactSet:
        """Its facts. Made on each use rather than kept: kept, it would refer back to this
        `Authorizer` (a cycle), which then waits for a pass of the cyclic garbage collector to
        be freed with every fact it holds (see `__del__`)."""
        return FactSet(self)

    def copy(self, turns: Turns) -> Authorizer:
        """A new `Authorizer` with this one's policy (compiled again) and facts, built on a
        worker thread in ``turns`` while this one goes on deciding (`FactIndex.fill_from`)."""
        copy = Authorizer("", limits=self.limits)
        copy._swap(self.policy)
        copy._index.fill_from(self._index, turns)
        return copy

    def let_go(self, turns: Turns) -> None:
        """Empty its facts a part at a time (`FactIndex.let_go`), for an `Authorizer` that
        nothing decides with any more (a replica's, replaced by one loaded again)."""
        self._index.let_go(turns)

    def __del__(self) -> None:
        # Nothing refers to this `Authorizer` any more, so no decision runs its policy: the
        # compiled policy breaks its own cycle (`CompiledPolicy.close`), and the facts are freed
        # by reference counting, at once, where the last reference went, never by the
        # collector (which a replica keeps its facts out of the sight of).
        active = getattr(self, "_active", None)  # None if the first policy did not load
        if active is not None:
            active.compiled.close()

    @classmethod
    def from_files(cls, *paths: str | Path) -> Authorizer:
        authz = cls()
        authz.load_files(*paths)
        return authz

    # -- policy -----------------------------------------------------------------------------

    def load_files(self, *paths: str | Path) -> list[Diagnostic]:
        return self._swap(load([(str(p), Path(p).read_text()) for p in paths], self.limits))

    def load_policy(self, text: str, *, source: str = "<policy>") -> list[Diagnostic]:
        """Check, compile and put ``text`` in force; return its warnings.

        Raises `PolicyError` with every problem found; the policy in force then stays.
        """
        return self._swap(load([(source, text)], self.limits))

    def check_policy(
        self, text: str, *, source: str = "<policy>", strict: bool = False
    ) -> list[Diagnostic]:
        """Check and compile ``text`` without putting it in force; return its warnings (with
        ``strict``, the misspelling guard's are errors: `PolicyError`; the decision contract's
        stay warnings)."""
        loaded = load([(source, text)], self.limits, strict=strict)
        _Active(loaded, FactIndex(), self.limits).compiled.close()
        return policy_warnings(loaded)

    def _swap(self, loaded: LoadedPolicy) -> list[Diagnostic]:
        # Compiled fully before it is in force, and beside the decisions made meanwhile: the
        # fact lock is held only to read the facts (compiling builds fact indexes, which writes
        # must not disturb), so a long compile in a worker thread never stalls a decision.
        active = _Active(loaded, self._index, self.limits, self._index.lock)
        with self._index.lock:
            replaced, self._active = self._active, active
            self._index.generation = next(GENERATIONS)
            # Every decision takes the policy in force under the lock: none runs this one now.
            if replaced is not None:
                replaced.compiled.close()
        return policy_warnings(loaded)

    @property
    def policy(self) -> LoadedPolicy:
        return self._active.loaded

    @property
    def entity_types(self) -> frozenset[str]:
        """The types the policy declares with ``actor`` and ``resource`` blocks."""
        return self._active.loaded.program.entity_types

    @property
    def policy_text(self) -> str:
        return self._active.loaded.text

    # -- decisions ---------------------------------------------------------------------------
    #
    # Every decision holds the fact lock while it evaluates (a batch of writes is seen whole or
    # not at all) and reuses one query state, which is safe because the lock serialises them.

    def _begin(self, context: dict | None) -> Query:
        index = self._index
        if index.next_expiry <= time.time():
            with index.lock:
                index.purge_expired(time.time())
        index.lock.acquire()
        q = self._query
        q.context = context
        q.frozen = None
        q.tables = None
        q.steps = q.granted = self._steps
        return q

    @contextmanager
    def session(
        self, context: dict | None = None, *, facts: Sequence[tuple] = ()
    ) -> Iterator[Session]:
        """Ask several questions as one: one policy, one view of the facts, one lock.

        ``with authz.session(ctx) as s: s.allowed(...); s.values("mask", ...)``. The facts cannot
        change between its questions, and it costs less than asking them one by one. Its
        questions spend one evaluation budget together: a session is bounded as one question.

        ``facts`` (checked with `FactSet.validate`) hold for the session's questions only, as
        if stored: Oso Cloud's context facts.
        """
        q = self._begin(context)
        active = self._active  # under the lock, as in `authorize`
        added = self._assume(facts) if facts else ()
        try:
            yield Session(self, active, q)
        finally:
            if added:
                self._forget(added)
            self._index.lock.release()

    def _assume(self, facts: Sequence[tuple]) -> list[tuple]:
        """Add the ``facts`` the index does not hold yet, for one question; the caller holds the
        lock and takes them away again (`_forget`) before it lets go, so no other question, and
        no write, ever sees them."""
        index = self._index
        added = []
        for fact in facts:
            # A fact already held stays as it is (and keeps its expiry).
            if next(index.matching(fact), None) is None:
                index.add(fact)
                added.append(fact)
        return added

    def _forget(self, added: list[tuple]) -> None:
        index = self._index
        for fact in added:
            index.remove(fact)
        fact = None  # this frame's last fact: what only the question's facts named goes
        index.let_go_of_released()

    def _allowed(self, active: _Active, q: Query, actor: Any, action: Any, resource: Any) -> bool:
        try:
            if active.allow is None or not active.allow(q, actor, action, resource):
                return False
            return active.deny is None or not active.deny(q, actor, action, resource)
        except Undecided:
            return False  # a deny rule that may hold but cannot be decided refuses
        except TypeError:
            _check_arguments(actor, action, resource)  # say which argument is wrong
            raise
        except RecursionError:
            stack_exhausted(q)

    def authorize(
        self, actor: Any, action: Any, resource: Any, context: dict | None = None
    ) -> bool:
        """True when the policy allows ``actor`` to ``action`` ``resource`` and no deny rule fires.

        Raises `EvaluationLimit` (a refusal) when the evaluation spends its budget.
        """
        # `_begin` and `_allowed`, written out: on this path a Python call costs about as much
        # as the rest of a check's work put together (docs/benchmarks.md).
        index = self._index
        if index.next_expiry <= time.time():
            with index.lock:
                index.purge_expired(time.time())
        index.lock.acquire()
        active = self._active  # under the lock: the policy it replaced is closed (`_swap`)
        try:
            q = self._query
            q.context = context
            q.frozen = None
            q.tables = None
            q.steps = q.granted = self._steps
            if active.allow is None or not active.allow(q, actor, action, resource):
                return False
            return active.deny is None or not active.deny(q, actor, action, resource)
        except Undecided:
            return False  # a deny rule that may hold but cannot be decided refuses
        except TypeError:
            _check_arguments(actor, action, resource)  # say which argument is wrong
            raise
        except RecursionError:
            stack_exhausted(q)
        finally:
            index.lock.release()

    def authorize_chain(
        self,
        principals: Iterable[Any],
        action: str,
        resource: Any,
        context: dict | None = None,
        scopes: Iterable[str] | None = None,
    ) -> ChainDecision:
        """Decide for a chain of principals (the user, the agent acting for them, any
        sub-agent): allowed only if every one is, with the obligations of each; ``refused_by``
        names the first that is not. The gateway's contract (`bastion.decide.contract`);
        ``scopes``, when given, are the token's, checked against ``requires_scope``."""
        from bastion.decide.contract import decide_chain

        return decide_chain(self, tuple(principals), action, resource, context, scopes)

    def decide(
        self, actor: Any, action: Any, resource: Any, context: dict | None = None
    ) -> Decision:
        """Like `authorize`, with the rules and facts that proved the answer (or failed to).

        An evaluation that spends its budget is not allowed, with ``reason`` "evaluation_limit"
        and an explanation that says which budget ran out.
        """
        with self.session(context) as s:
            explanation = s.explain(actor, action, resource)
        reason = EvaluationLimit.reason if explanation.limit else None
        return Decision(explanation.allowed, explanation, reason)

    def list(
        self,
        actor: Any,
        action: Any,
        resource_type: str,
        context: dict | None = None,
        *,
        facts: Sequence[tuple] = (),
    ) -> list[str]:
        """Ids of the resources of ``resource_type`` that ``actor`` may ``action``, sorted.

        Only resources that some fact mentions can be listed. ``facts``: as for `session`.
        """
        _check_arguments(actor, action)
        q = self._begin(context)
        active = self._active  # under the lock, as in `authorize`
        if active.allow is None:
            self._index.lock.release()
            return []
        added = self._assume(facts) if facts else ()
        try:
            fn = active.compiled.function("allow", 3, "bbf")  # compiled on first use, locked
            found = {
                r for r in fn(q, actor, action) if r.__class__ is Entity and r[0] == resource_type
            }
            if active.deny is not None:
                found = {
                    r for r in found if not proved_or_undecided(active.deny, q, actor, action, r)
                }
            # Ids, not the entities: a context fact's entity is let go of with the fact.
            ids = sorted(r[1] for r in found)
            del found
        except RecursionError:
            stack_exhausted(q)
        finally:
            if added:
                self._forget(added)
            self._index.lock.release()
        return ids

    def actions(
        self,
        actor: Any,
        resource: Any,
        context: dict | None = None,
        *,
        facts: Sequence[tuple] = (),
    ) -> set[str]:
        """Every action ``actor`` may take on ``resource``. ``facts``: as for `session`."""
        _check_arguments(actor, "", resource)
        q = self._begin(context)
        active = self._active  # under the lock, as in `authorize`
        if active.allow is None:
            self._index.lock.release()
            return set()
        added = self._assume(facts) if facts else ()
        try:
            fn = active.compiled.function("allow", 3, "bfb")  # compiled on first use, locked
            found = {a for a in fn(q, actor, resource) if isinstance(a, str)}
            if active.deny is not None:
                found = {
                    a for a in found if not proved_or_undecided(active.deny, q, actor, a, resource)
                }
        except RecursionError:
            stack_exhausted(q)
        finally:
            if added:
                self._forget(added)
            self._index.lock.release()
        return found

    def settled_generation(self) -> int | None:
        """The generation of the facts and policy in force (`FactIndex.generation`: the same
        generation, the same answers), or None while a fact has expired and is not purged yet
        (the next question purges it, which starts a new generation)."""
        index = self._index
        # The expiry first: a purge moves it on after it has started a new generation.
        if index.next_expiry <= time.time():
            return None
        return index.generation

    def reads_context(self, name: str) -> bool:
        """Whether a rule of the policy in force reads ``context.<name>``: a caller may skip
        working out a costly field no rule reads."""
        active = self._active
        return active is not None and name in active.context_roots

    def defines(self, predicate: str, arity: int) -> bool:
        """True when the policy in force has rules or facts for ``predicate/arity``."""
        return self._active.compiled.defines(predicate, arity)

    def stores_facts(self, predicate: str, arity: int) -> bool:
        """True when ``predicate/arity`` is a fact predicate (its values come from the store,
        whether or not rules add to them), False for one that rules alone define."""
        return (predicate, arity) in self._active.loaded.program.fact_predicates

    def holds(self, predicate: str, *args: Any, context: dict | None = None) -> bool:
        """True when ``predicate(*args)`` holds (every argument bound); False if undefined."""
        with self.session(context) as s:
            return bool(s.values(predicate, *args))

    def prepared(self, shapes: Iterable[tuple[str, str]]) -> bool:
        """Whether each shape of question (``(predicate, mask)``, as `Session.rows` takes them)
        is compiled for the policy in force, so asking it compiles nothing."""
        active = self._active
        return all(
            _shape_key(*shape) in active.shapes
            or not active.compiled.defines(shape[0], len(shape[1]))
            for shape in shapes
        )

    def prepare(self, shapes: Iterable[tuple[str, str]]) -> None:
        """Compile the shapes of question not compiled yet for the policy in force, on the
        calling thread (a worker thread of a server), beside the decisions made meanwhile: the
        fact lock is held only to read the facts, as when a policy is loaded. A server's event
        loop then asks them without compiling (a new shape of `query` may compile for seconds
        on a large policy). A shape that cannot be compiled (`PolicyError`, `EvaluationLimit`
        once the compile budget is spent) is kept as what it raised: asked, it raises that
        again, and is not compiled again on the loop."""
        active = self._active
        compiled = active.compiled
        keys = (_shape_key(name, mask) for name, mask in shapes)
        wanted = [
            key
            for key in keys
            if key not in active.shapes and compiled.defines(key[0], len(key[1]))
        ]
        if not wanted:
            return
        try:
            with compiled.beside_decisions(self._index.lock) as compile_shape:
                for key in wanted:
                    name, mask, is_strict = key
                    try:
                        fn = compile_shape(name, len(mask), mask, is_strict)
                    except (PolicyError, EvaluationLimit) as refused:
                        fn = _refusing(refused)
                    active.shapes[key] = fn
        except Exception:
            if self._active is active:
                raise
            # Replaced meanwhile (and closed: `_swap`): the shapes are asked of the policy in
            # force, which compiles them in turn.

    def query(self, predicate: str, *args: Any, context: dict | None = None) -> list[tuple]:
        """Every ``(predicate, *values)`` that holds, with `Variable` (or None) args left open."""
        if not self.defines(predicate, len(args)):
            raise FactError(f"the policy defines no {predicate}/{len(args)}")
        open_positions = [i for i, a in enumerate(args) if a is None or isinstance(a, Variable)]
        with self.session(context) as s:
            hits = s.values(predicate, *args)
        rows = []
        for hit in hits:
            row = list(args)
            values = hit if len(open_positions) != 1 else (hit,)
            for i, v in zip(open_positions, values, strict=True):
                row[i] = v
            rows.append((predicate, *row))
        return sorted(rows, key=repr)


def policy_warnings(loaded: LoadedPolicy) -> list[Diagnostic]:
    """The warnings of a policy that loads: the language's (`bastion.policy.lower`), then the
    decision contract's (`bastion.decide.contract_warnings`: a mask path that cannot be read,
    an obligation the gateway never acts on), each list in the order of the text."""
    # Imported here: the contract is built on the `Authorizer` this module defines.
    from bastion.decide.contract_warnings import contract_warnings

    return loaded.warnings + contract_warnings(loaded.program)
