"""Syntax tree to program: expand shorthand rules, normalise bodies, and check the policy.

Checks made here, each reported with file, line and column: shorthand rules naming a role,
permission or relation the block does not declare; relations to undeclared types; unknown type
names; calls to predicates that no rule, declaration or builtin defines (or with the wrong number
of arguments); negation through recursion; recursion that builds ever larger terms
(`recursion.py`); rules over the size limits (`limits.py`); singleton variables (a warning).
"""

from __future__ import annotations

import difflib
import itertools
from collections import defaultdict

from bastion.facts.model import Entity
from bastion.policy import ast
from bastion.policy.builtins import BUILTINS
from bastion.policy.errors import Diagnostic, Location
from bastion.policy.limits import DEFAULT_LIMITS, PolicyLimits
from bastion.policy.program import (
    VALUE_TYPES,
    CallLit,
    Clause,
    CmpLit,
    Literal,
    NotLit,
    Program,
    TypeLit,
    format_clause,
    has_type,
    literal_vars,
    term_vars,
)
from bastion.policy.recursion import check_growth, recursive_groups

# Fact predicates that resource blocks imply, always accepted in rule bodies.
STANDARD_FACTS = {("has_role", 3), ("has_role", 2), ("has_relation", 3)}


class _Lowering:
    def __init__(self, policy: ast.Policy, limits: PolicyLimits = DEFAULT_LIMITS) -> None:
        self.policy = policy
        self.limits = limits
        self.clause_count = 0
        self.suggestions_left = 20
        self.diagnostics: list[Diagnostic] = []
        self.blocks: dict[str, ast.Block] = {}
        self.global_roles: dict[str, Location] = {}
        self.fresh = itertools.count(1)

    def error(self, location: Location, message: str) -> None:
        self.diagnostics.append(Diagnostic(location, message))

    def warn(self, location: Location, message: str) -> None:
        self.diagnostics.append(Diagnostic(location, message, "warning"))

    def suggest(self, name: str, candidates: list[str]) -> str:
        """ " (did you mean ...?)" for a near miss. Each costs a scan of every candidate, so
        only the first errors of a policy get one: a policy of thousands of misspelt calls is
        still checked in time proportional to its size."""
        if self.suggestions_left <= 0:
            return ""
        self.suggestions_left -= 1
        return _suggest(name, candidates)

    # -- types ------------------------------------------------------------------------------

    def collect_blocks(self) -> None:
        for block in self.policy.blocks:
            if block.kind == "global":
                self.global_roles.update(block.roles)
                if block.shorthand:
                    self.error(
                        block.shorthand[0].location,
                        "shorthand rules belong in actor or resource blocks",
                    )
                continue
            if block.name in self.blocks:
                self.error(block.location, f"type {block.name} is declared twice")
                continue
            if block.name in VALUE_TYPES or block.name in ("Actor", "Resource"):
                self.error(block.location, f"{block.name} is a built-in type name")
                continue
            self.blocks[block.name] = block
        self.actor_types = frozenset(n for n, b in self.blocks.items() if b.kind == "actor")
        self.resource_types = frozenset(n for n, b in self.blocks.items() if b.kind == "resource")
        for block in self.blocks.values():
            for rel, (typ, loc) in block.relations.items():
                if typ not in self.blocks:
                    self.error(
                        loc,
                        f"relation {rel!r} of {block.name} points to {typ}, which no actor or resource block declares",
                    )

    def resolve_type(self, name: str, location: Location) -> frozenset[str] | None:
        if name == "Actor":
            return self.actor_types
        if name == "Resource":
            return self.resource_types
        if name in VALUE_TYPES or name in self.blocks:
            return frozenset([name])
        hint = self.suggest(name, [*self.blocks, *VALUE_TYPES, "Actor", "Resource"])
        self.error(location, f"unknown type {name}{hint}")
        return None

    # -- shorthand expansion ----------------------------------------------------------------

    def kind_of(self, block: ast.Block, name: str) -> str | None:
        if name in block.roles:
            return "role"
        if name in block.permissions:
            return "permission"
        if name in block.relations:
            return "relation"
        return None

    def shorthand_call(
        self, block: ast.Block, name: str, subject: ast.Term, loc: Location
    ) -> ast.Expr | None:
        kind = self.kind_of(block, name)
        actor = ast.Var("actor", loc)
        if kind == "role":
            return ast.Call("has_role", (actor, ast.Const(name, loc), subject), loc)
        if kind == "permission":
            return ast.Call("has_permission", (actor, ast.Const(name, loc), subject), loc)
        if kind == "relation":
            return ast.Call("has_relation", (subject, ast.Const(name, loc), actor), loc)
        declared = [*block.roles, *block.permissions, *block.relations]
        self.error(
            loc,
            f"{block.name} declares no role, permission or relation {name!r}{self.suggest(name, declared)}",
        )
        return None

    def expand(self, block: ast.Block, expr: ast.Expr) -> ast.Expr | None:
        if isinstance(expr, ast.Shorthand):
            loc = expr.location
            if expr.is_global:
                if expr.name not in self.global_roles:
                    self.error(loc, f"no global block declares the role {expr.name!r}")
                    return None
                return ast.Call("has_role", (ast.Var("actor", loc), ast.Const(expr.name, loc)), loc)
            resource = ast.Var("resource", loc)
            if expr.relation is None:
                return self.shorthand_call(block, expr.name, resource, loc)
            if expr.relation not in block.relations:
                declared = list(block.relations)
                self.error(
                    loc,
                    f"{block.name} declares no relation {expr.relation!r}{self.suggest(expr.relation, declared)}",
                )
                return None
            target = self.blocks.get(block.relations[expr.relation][0])
            if target is None:
                return None  # already reported as an undeclared relation type
            related = ast.Var(f"_related{next(self.fresh)}", loc)
            inner = self.shorthand_call(target, expr.name, related, loc)
            if inner is None:
                return None
            hop = ast.Call("has_relation", (resource, ast.Const(expr.relation, loc), related), loc)
            return ast.And((hop, inner))
        if isinstance(expr, (ast.And, ast.Or)):
            items = [self.expand(block, item) for item in expr.items]
            return None if None in items else type(expr)(tuple(items))
        if isinstance(expr, ast.Not):
            inner = self.expand(block, expr.item)
            return None if inner is None else ast.Not(inner, expr.location)
        return expr

    def shorthand_rules(self) -> list[tuple[ast.Rule, str]]:
        rules = []
        for block in self.blocks.values():
            for sh in block.shorthand:
                kind = self.kind_of(block, sh.head)
                if kind not in ("role", "permission"):
                    declared = [*block.roles, *block.permissions]
                    self.error(
                        sh.head_location,
                        f"{block.name} declares no role or permission {sh.head!r}{self.suggest(sh.head, declared)}",
                    )
                    continue
                body = self.expand(block, sh.body)
                if body is None:
                    continue
                loc = sh.location
                name = "has_role" if kind == "role" else "has_permission"
                params = (
                    ast.Param(ast.Var("actor", loc), "Actor", loc),
                    ast.Param(ast.Const(sh.head, loc), None, loc),
                    ast.Param(ast.Var("resource", loc), block.name, loc),
                )
                text = f'resource {block.name}: "{sh.head}" if {_shorthand_text(sh.body)}'
                rules.append((ast.Rule(name, params, body, loc), text))
        return rules

    # -- normalisation ----------------------------------------------------------------------

    def rename_anonymous(self, term: ast.Term) -> ast.Term:
        if isinstance(term, ast.Var) and term.name == "_":
            return ast.Var(f"_{next(self.fresh)}", term.location)
        if isinstance(term, ast.ListTerm):
            return ast.ListTerm(tuple(self.rename_anonymous(t) for t in term.items), term.location)
        return term

    def dnf(self, expr: ast.Expr) -> list[list[Literal]]:
        """The body as a disjunction of conjunctions of literals."""
        if isinstance(expr, ast.Or):
            return [conj for item in expr.items for conj in self.dnf(item)]
        if isinstance(expr, ast.And):
            result: list[list[Literal]] = [[]]
            for item in expr.items:
                alternatives = self.dnf(item)
                if len(alternatives) == 1:  # the usual case: no copy per conjunct
                    for conj in result:
                        conj.extend(alternatives[0])
                else:
                    result = [a + b for a in result for b in alternatives]
            return result
        if isinstance(expr, ast.Not):
            # not (A or B) == not A and not B
            return [[NotLit(tuple(conj), expr.location) for conj in self.dnf(expr.item)]]
        if isinstance(expr, ast.Call):
            return [
                [
                    CallLit(
                        expr.name, tuple(self.rename_anonymous(a) for a in expr.args), expr.location
                    )
                ]
            ]
        if isinstance(expr, ast.Compare):
            if isinstance(expr.left, ast.DictTerm) or isinstance(expr.right, ast.DictTerm):
                self.error(expr.location, "object literals are only allowed in test contexts")
                return [[]]
            return [
                [
                    CmpLit(
                        expr.op,
                        self.rename_anonymous(expr.left),
                        self.rename_anonymous(expr.right),
                        expr.location,
                    )
                ]
            ]
        if isinstance(expr, ast.Matches):
            types = self.resolve_type(expr.type, expr.location)
            return [[TypeLit(expr.term, types or frozenset(), expr.location)]]
        self.error(
            getattr(expr, "location", Location("<policy>", 0, 0)),
            "shorthand terms are only allowed in resource blocks",
        )
        return [[]]

    def clauses_of(self, rule: ast.Rule, text: str | None = None) -> list[Clause]:
        head: list[ast.Term] = []
        checks: list[Literal] = []
        for param in rule.params:
            term = self.rename_anonymous(param.term)
            if isinstance(term, (ast.ContextPath, ast.ListTerm, ast.DictTerm)):
                self.error(param.location, "a rule parameter is a variable or a value")
                continue
            head.append(term)
            if param.type is not None:
                types = self.resolve_type(param.type, param.location)
                if types is not None:
                    checks.append(TypeLit(term, types, param.location))
        if not self.within_limits(rule):
            return []
        bodies = self.dnf(rule.body) if rule.body is not None else [[]]
        clauses = []
        for body in bodies:
            clause = Clause(rule.name, tuple(head), tuple(checks + body), rule.location)
            clauses.append(
                Clause(
                    clause.name,
                    clause.head,
                    clause.body,
                    clause.location,
                    text or format_clause(clause),
                )
            )
        return clauses

    def within_limits(self, rule: ast.Rule) -> bool:
        """Whether the rule's body, once ``or`` is distributed, stays within the limits on rules
        and literals per rule. Measured on the syntax tree, before anything is expanded: an
        ``and`` of ``or``s multiplies into exponentially many rules."""
        limits = self.limits
        cap = max(limits.policy_max_rules, limits.policy_max_rule_literals) + 1
        alternatives, literals = _expansion(rule.body, cap) if rule.body is not None else (1, 0)
        if alternatives + self.clause_count > limits.policy_max_rules:
            self.error(
                rule.location,
                f"the policy has more than {limits.policy_max_rules} rules once 'or' is"
                f" distributed (this rule alone makes {alternatives}: each alternative of an 'or'"
                " is a rule, and 'and' over several 'or's multiplies them); the limit is"
                f" policy_max_rules = {limits.policy_max_rules}",
            )
            return False
        if literals > limits.policy_max_rule_literals:
            self.error(
                rule.location,
                f"this rule has more than {limits.policy_max_rule_literals} conditions in one"
                " body (calls, comparisons, type checks and negations, those inside a 'not'"
                f" included; split it into smaller rules); the limit is"
                f" policy_max_rule_literals = {limits.policy_max_rule_literals}",
            )
            return False
        self.clause_count += alternatives
        return True

    # -- whole program ----------------------------------------------------------------------

    def run(self) -> Program:
        self.collect_blocks()
        clauses: dict[tuple[str, int], list[Clause]] = defaultdict(list)
        for rule, text in self.shorthand_rules():
            for clause in self.clauses_of(rule, text):
                clauses[(clause.name, len(clause.head))].append(clause)
        for rule in self.policy.rules:
            if (rule.name, len(rule.params)) in BUILTINS:
                self.error(rule.location, f"{rule.name} is a builtin and cannot be redefined")
                continue
            for clause in self.clauses_of(rule, rule.text or None):
                clauses[(clause.name, len(clause.head))].append(clause)
        if not any(name == "allow" for name, _ in clauses) and ("has_permission", 3) in clauses:
            loc = Location("<implied>", 1, 1)
            implied = ast.Rule(
                "allow",
                tuple(
                    ast.Param(ast.Var(v, loc), None, loc) for v in ("actor", "action", "resource")
                ),
                ast.Call(
                    "has_permission",
                    (ast.Var("actor", loc), ast.Var("action", loc), ast.Var("resource", loc)),
                    loc,
                ),
                loc,
            )
            clauses[("allow", 3)].extend(self.clauses_of(implied))

        declared: dict[tuple[str, int], list[tuple]] = defaultdict(list)
        for decl in self.policy.declares:
            types = [self.resolve_type(t, decl.location) or frozenset() for t in decl.types]
            declared[(decl.name, len(decl.types))].append(tuple(_type_spec(t) for t in types))
        fact_predicates = set(STANDARD_FACTS) | set(declared)

        self.check_calls(clauses, fact_predicates)
        self.check_singletons(clauses)
        groups = recursive_groups(clauses)
        self.check_stratified(clauses, groups)
        self.diagnostics += check_growth(clauses, groups)
        return Program(
            clauses=dict(clauses),
            fact_predicates=fact_predicates,
            fact_signatures=self.fact_signatures(declared),
            actor_types=self.actor_types,
            resource_types=self.resource_types,
            entity_types=frozenset(self.blocks),
            permissions={n: tuple(b.permissions) for n, b in self.blocks.items()},
            has_deny=("deny", 3) in clauses,
        )

    def check_calls(self, clauses: dict, fact_predicates: set) -> None:
        known = set(clauses) | fact_predicates | set(BUILTINS)
        names = sorted({name for name, _ in known})
        for clause in itertools.chain.from_iterable(clauses.values()):
            for lit in _walk(clause.body):
                if isinstance(lit, CallLit) and (
                    builtin := BUILTINS.get((lit.name, len(lit.args)))
                ):
                    self.check_builtin_types(clause, lit, builtin.types)
                if not isinstance(lit, CallLit) or (lit.name, len(lit.args)) in known:
                    continue
                arities = sorted(a for n, a in known if n == lit.name)
                if arities:
                    self.error(
                        lit.location,
                        f"{lit.name} takes {' or '.join(map(str, arities))} arguments, not {len(lit.args)}",
                    )
                else:
                    hint = self.suggest(lit.name, names)
                    self.error(
                        lit.location,
                        f"{lit.name}/{len(lit.args)} is not defined by any rule, builtin or declaration{hint}"
                        f" (if it is a fact, declare its type: declare {lit.name}(...);)",
                    )

    def check_builtin_types(self, clause: Clause, lit: CallLit, types: tuple[str, ...]) -> None:
        """A builtin argument known, when the policy loads, to be of another type than the
        builtin takes (a literal, a list, a variable the rule types otherwise) is an error; a
        value that only turns out wrong at evaluation makes the builtin false."""
        if not types:
            return
        typed = {
            t.term.name: t.types
            for t in clause.body
            if isinstance(t, TypeLit) and isinstance(t.term, ast.Var)
        }
        for pos, (arg, want) in enumerate(zip(lit.args, types, strict=True), 1):
            found = None
            if isinstance(arg, ast.Const) and not has_type(arg.value, frozenset({want})):
                value = arg.value
                found = value.type if isinstance(value, Entity) else type(value).__name__
                found = {"str": "String", "int": "Integer", "bool": "Boolean"}.get(found, found)
            elif isinstance(arg, ast.ListTerm):
                found = "a list"
            elif isinstance(arg, ast.Var) and arg.name in typed and want not in typed[arg.name]:
                found = " or ".join(sorted(typed[arg.name]))
            if found is not None:
                self.error(
                    lit.location,
                    f"argument {pos} of {lit.name} must be a {want}, not {found}",
                )

    def check_singletons(self, clauses: dict) -> None:
        for clause in itertools.chain.from_iterable(clauses.values()):
            if clause.location.source == "<implied>":
                continue
            counts: dict[str, int] = defaultdict(int)
            typed = {
                lit.term.name
                for lit in clause.body
                if isinstance(lit, TypeLit) and isinstance(lit.term, ast.Var)
            }
            for term in clause.head:
                for v in term_vars(term):
                    counts[v] += 1
            for lit in clause.body:
                if (
                    isinstance(lit, TypeLit)
                    and isinstance(lit.term, ast.Var)
                    and lit.term.name in typed
                ):
                    continue  # a specializer is not a use
                for v in literal_vars(lit):
                    counts[v] += 1
            for v, n in counts.items():
                if n == 1 and not v.startswith("_") and v not in typed:
                    self.warn(
                        clause.location,
                        f"variable {v} is used only once in {clause.name}; name it _{v} or _ if that is intended",
                    )

    def check_stratified(self, clauses: dict, groups: dict[tuple, int]) -> None:
        """Negation must not go through recursion (the meaning of such a policy is unclear):
        no rule may negate a call to a rule of its own recursive group."""
        for key, cls in clauses.items():
            for clause in cls:
                for lit in clause.body:
                    for sub, neg in _calls(lit, False):
                        target = (sub.name, len(sub.args))
                        if neg and target in groups and groups[target] == groups.get(key):
                            self.error(
                                sub.location,
                                f"{key[0]} depends on 'not {target[0]}', which depends on {key[0]} again: negation through recursion",
                            )

    def fact_signatures(self, declared: dict) -> dict:
        sigs: dict[tuple[str, int], list[tuple]] = defaultdict(list)
        for key, signatures in declared.items():
            sigs[key].extend(signatures)
        actors = _type_spec(self.actor_types)
        for name, block in self.blocks.items():
            if block.roles:
                sigs[("has_role", 3)].append(
                    (actors, ("values", frozenset(block.roles)), _type_spec(frozenset([name])))
                )
            for rel, (typ, _) in block.relations.items():
                sigs[("has_relation", 3)].append(
                    (
                        _type_spec(frozenset([name])),
                        ("values", frozenset([rel])),
                        _type_spec(frozenset([typ])),
                    )
                )
        if self.global_roles:
            sigs[("has_role", 2)].append((actors, ("values", frozenset(self.global_roles))))
        return dict(sigs)


def _type_spec(types: frozenset[str]) -> tuple:
    return ("types", types)


def _walk(body: tuple[Literal, ...]):
    for lit in body:
        yield lit
        if isinstance(lit, NotLit):
            yield from _walk(lit.body)


def _calls(lit: Literal, negated: bool):
    if isinstance(lit, CallLit):
        yield lit, negated
    elif isinstance(lit, NotLit):
        for sub in lit.body:
            yield from _calls(sub, True)


def _expansion(expr: ast.Expr, cap: int) -> tuple[int, int]:
    """(alternatives, literals) of ``expr`` in disjunctive normal form: how many rules it
    becomes, and the most literals in one of them (each capped at ``cap``)."""
    if isinstance(expr, ast.Or):
        parts = [_expansion(item, cap) for item in expr.items]
        return min(cap, sum(a for a, _ in parts)), max(n for _, n in parts)
    if isinstance(expr, ast.And):
        alternatives, literals = 1, 0
        for item in expr.items:
            a, n = _expansion(item, cap)
            alternatives, literals = min(cap, alternatives * a), min(cap, literals + n)
        return alternatives, literals
    if isinstance(expr, ast.Not):
        # not (A or B) is not A and not B: one negation per alternative of the inside.
        a, n = _expansion(expr.item, cap)
        return 1, min(cap, a * n)
    return 1, 1


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _shorthand_text(expr: ast.Expr) -> str:
    if isinstance(expr, ast.Shorthand):
        if expr.is_global:
            return f'global "{expr.name}"'
        return f'"{expr.name}"' + (f' on "{expr.relation}"' if expr.relation else "")
    if isinstance(expr, ast.And):
        return " and ".join(_shorthand_text(i) for i in expr.items)
    if isinstance(expr, ast.Or):
        return " or ".join(_shorthand_text(i) for i in expr.items)
    if isinstance(expr, ast.Not):
        return f"not {_shorthand_text(expr.item)}"
    if isinstance(expr, ast.Call):
        from bastion.policy.program import format_term

        return f"{expr.name}({', '.join(format_term(a) for a in expr.args)})"
    return "..."


def lower(
    policy: ast.Policy, limits: PolicyLimits = DEFAULT_LIMITS
) -> tuple[Program, list[Diagnostic]]:
    """Lower a parsed policy; the diagnostics include errors (fatal) and warnings."""
    lowering = _Lowering(policy, limits)
    program = lowering.run()
    return program, lowering.diagnostics
