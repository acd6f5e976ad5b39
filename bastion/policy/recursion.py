"""Recursive groups of rules, and the load-time check that recursion cannot grow without end.

Rules that call each other in a cycle form a recursive group (a strongly connected component of
the call graph). Evaluation of a group is tabled, so it ends on cyclic facts; it would not end if
each round built a larger term than the last, as in ``grow(x) if grow([x, x]);``. Such a policy
is refused: within a group, a list built from values that flow around the cycle may not be
passed back into the group, nor returned by a rule of the group from what its recursive call
returned.
"""

from __future__ import annotations

from collections import defaultdict

from bastion.policy.ast import ListTerm, Var
from bastion.policy.errors import Diagnostic
from bastion.policy.program import (
    CallLit,
    Clause,
    CmpLit,
    Literal,
    NotLit,
    format_literal,
    literal_vars,
)


def _callees(clause: Clause) -> list[CallLit]:
    found: list[CallLit] = []
    stack: list[Literal] = list(clause.body)
    while stack:
        lit = stack.pop()
        if isinstance(lit, CallLit):
            found.append(lit)
        elif isinstance(lit, NotLit):
            stack.extend(lit.body)
    return found


def recursive_groups(clauses: dict[tuple, list[Clause]]) -> dict[tuple, int]:
    """The group of every predicate that has rules; predicates in one cycle share a number.
    Numbered callees first (Tarjan's algorithm, without recursion: groups can be long)."""
    edges = {
        key: sorted({(c.name, len(c.args)) for cl in cls for c in _callees(cl)} & clauses.keys())
        for key, cls in clauses.items()
    }
    index: dict[tuple, int] = {}
    low: dict[tuple, int] = {}
    on_stack: set[tuple] = set()
    stack: list[tuple] = []
    group: dict[tuple, int] = {}
    counter = groups = 0
    for root in clauses:
        if root in index:
            continue
        work = [(root, 0)]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, i = work[-1]
            targets = edges[node]
            if i < len(targets):
                work[-1] = (node, i + 1)
                target = targets[i]
                if target not in index:
                    index[target] = low[target] = counter
                    counter += 1
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, 0))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group[member] = groups
                    if member == node:
                        break
                groups += 1
    return group


class _Flow:
    """What may flow into each variable of one clause: values derived from the head's
    arguments ("h") or from a call to the clause's own group ("r": its arguments may be bound by
    it), and whether it may hold a list built from such values (``built``: the literals that
    built it, at most two kept, enough to tell "built by this call alone" from "built before
    it"; ``built_from_r``: built in this clause from "r" values)."""

    def __init__(
        self, clause: Clause, group: set[tuple], builds: set[tuple], rules: set[tuple]
    ) -> None:
        self.clause = clause
        self.group = group  # empty when the clause's rule is not recursive
        self.builds = builds  # (predicate, position): may return a list it built
        self.rules = rules  # predicates defined by rules (not facts, not builtins)
        self.taint: dict[str, set[str]] = defaultdict(set)
        self.built: dict[str, set[int]] = defaultdict(set)
        self.built_from_r: set[str] = set()
        for term in clause.head:
            if isinstance(term, Var):
                self.taint[term.name].add("h")
        self._run()

    def _vars(self, term) -> list[str]:
        if isinstance(term, Var):
            return [term.name]
        if isinstance(term, ListTerm):
            return [v for item in term.items for v in self._vars(item)]
        return []

    def _built_here(self, term) -> set[str]:
        """For a list written in the clause with variables that carry values from the head or
        the recursion: where those values come from ("h", "r"); empty for anything else."""
        if not isinstance(term, ListTerm):
            return set()
        inner = self._vars(term)
        return set().union(*(self.taint[v] for v in inner)) if inner else set()

    def _add(self, var: str, taint: set[str], built: set[int], from_r: bool) -> bool:
        changed = False
        if not taint <= self.taint[var]:
            self.taint[var] |= taint
            changed = True
        have = self.built[var]
        for source in built:
            if len(have) >= 2:
                break
            if source not in have:
                have.add(source)
                changed = True
        if from_r and var not in self.built_from_r:
            self.built_from_r.add(var)
            changed = True
        return changed

    def _transfer(self, i: int, lit: Literal) -> list[str]:
        """Apply literal ``i``; return the variables whose facts changed."""
        changed: list[str] = []
        if isinstance(lit, CmpLit) and lit.op in ("=", "=="):
            for a, b in ((lit.left, lit.right), (lit.right, lit.left)):
                if not isinstance(a, Var):
                    continue
                if isinstance(b, Var):
                    o = b.name
                    if self._add(
                        a.name, set(self.taint[o]), set(self.built[o]), o in self.built_from_r
                    ):
                        changed.append(a.name)
                elif isinstance(b, ListTerm):
                    inner = self._vars(b)
                    taint = set().union(*(self.taint[v] for v in inner)) if inner else set()
                    if taint and self._add(a.name, taint, {i}, "r" in taint):
                        changed.append(a.name)
        elif isinstance(lit, CmpLit) and lit.op == "in" and isinstance(lit.left, Var):
            # An item of a list: derived from it, and possibly a list built with it.
            inner = self._vars(lit.right)
            taint = set().union(*(self.taint[v] for v in inner)) if inner else set()
            built = set().union(*(self.built[v] for v in inner)) if inner else set()
            from_r = any(v in self.built_from_r for v in inner)
            if isinstance(lit.right, ListTerm):
                # An item written as a list (``y in [[x, x]]``) is a list built here.
                for item in lit.right.items:
                    made = self._built_here(item)
                    if made:
                        built.add(i)
                        from_r = from_r or "r" in made
            if self._add(lit.left.name, taint, built, from_r):
                changed.append(lit.left.name)
        elif isinstance(lit, CallLit):
            key = (lit.name, len(lit.args))
            if key in self.group:
                for pos, arg in enumerate(lit.args):
                    if isinstance(arg, Var):
                        # An answer passed through is no growth: only building from it is.
                        built = {i} if (key, pos) in self.builds else set()
                        if self._add(arg.name, {"r"}, built, False):
                            changed.append(arg.name)
            elif key in self.rules:
                inner = [v for a in lit.args for v in self._vars(a)]
                taint = set().union(*(self.taint[v] for v in inner)) if inner else set()
                # A list built here and passed in may come back whole, or its items may (a
                # rule that picks an item of a list of lists): what it binds may be built here.
                given = set().union(*(self._built_here(a) for a in lit.args))
                if taint:
                    for pos, arg in enumerate(lit.args):
                        if isinstance(arg, Var):
                            built = {i} if (key, pos) in self.builds or given else set()
                            from_r = (key, pos) in self.builds and "r" in taint or "r" in given
                            if self._add(arg.name, taint, built, from_r):
                                changed.append(arg.name)
        return changed

    def _run(self) -> None:
        body = self.clause.body
        uses: dict[str, list[int]] = defaultdict(list)
        for i, lit in enumerate(body):
            if not isinstance(lit, NotLit):  # nothing flows out of a negation
                for v in set(literal_vars(lit)):
                    uses[v].append(i)
        pending = list(range(len(body)))
        queued = set(pending)
        while pending:
            i = pending.pop()
            queued.discard(i)
            if isinstance(body[i], NotLit):
                continue
            for var in self._transfer(i, body[i]):
                for j in uses[var]:
                    if j not in queued:
                        queued.add(j)
                        pending.append(j)

    def problems(self) -> list[Diagnostic]:
        found = []
        for i, lit in enumerate(self.clause.body):
            if not (isinstance(lit, CallLit) and (lit.name, len(lit.args)) in self.group):
                continue
            for arg in lit.args:
                if isinstance(arg, ListTerm):
                    grown = [v for v in self._vars(arg) if self.taint[v]]
                elif isinstance(arg, Var) and self.built[arg.name] - {i}:
                    grown = [arg.name]
                else:
                    continue
                if grown:
                    found.append(
                        Diagnostic(
                            lit.location,
                            f"{format_literal(lit)} calls {lit.name} again with a list built from"
                            f" {grown[0]}, whose value comes round the recursion: each round"
                            " would build a larger term, so evaluating it would never end"
                            " (a recursive rule may not pass lists it builds back into"
                            " its own recursion)",
                        )
                    )
                    break
        if any(
            isinstance(lit, CallLit) and (lit.name, len(lit.args)) in self.group
            for lit in self.clause.body
        ):
            for term in self.clause.head:
                if isinstance(term, Var) and term.name in self.built_from_r:
                    found.append(
                        Diagnostic(
                            self.clause.location,
                            f"{self.clause.name} returns {term.name}, a list built from values"
                            " its own recursive call binds: each round would build a larger"
                            " answer, so evaluating it would never end (a recursive rule may"
                            " not build its answers from those of its own recursion)",
                        )
                    )
                    break
        return found


def check_growth(clauses: dict[tuple, list[Clause]], groups: dict[tuple, int]) -> list[Diagnostic]:
    """Errors for recursion that builds ever larger terms (see the module's docstring)."""
    members: dict[int, set[tuple]] = defaultdict(set)
    for key, number in groups.items():
        members[number].add(key)
    rules = set(clauses)
    builds: set[tuple] = set()  # (predicate, position) that may return a list it built
    diagnostics: list[Diagnostic] = []
    for number in sorted(members):  # callees first
        group = members[number]
        recursive = len(group) > 1 or any(
            (c.name, len(c.args)) in group
            for key in group
            for clause in clauses[key]
            for c in _callees(clause)
        )
        flows: list[_Flow] = []
        while True:  # the group's own summaries, to a fixpoint
            before = len(builds)
            flows = []
            for key in sorted(group):
                for clause in clauses[key]:
                    flow = _Flow(clause, group if recursive else set(), builds, rules)
                    flows.append(flow)
                    for pos, term in enumerate(clause.head):
                        if isinstance(term, Var) and flow.built[term.name]:
                            builds.add((key, pos))
            if len(builds) == before or not recursive:
                break
        if recursive:
            for flow in flows:
                diagnostics += flow.problems()
    return diagnostics
