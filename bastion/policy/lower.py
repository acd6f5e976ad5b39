"""Syntax tree to program: expand shorthand rules, normalise bodies, and check the policy.

Checks made here, each reported with file, line and column: shorthand rules naming a role,
permission or relation the block does not declare; relations to undeclared types; negation
through recursion; recursion that builds ever larger terms (`recursion.py`); rules over the size
limits (`limits.py`); singleton variables (a warning); a context field that a rule which can
allow reads only under a 'not' (a warning: a request that leaves the field out is allowed).

Fact types are inferred from the rules, as Oso Cloud does: each call in a rule body to a
predicate that is not a builtin gives a fact signature, each argument typed by the caller's
specializers and ``matches`` on it, or by the literal written there; a variable with no type
accepts any value. A call to a predicate that no rule, declaration or builtin defines, and an
unknown type name, are warnings (a misspelling guard), or errors with ``strict``.
"""

from __future__ import annotations

import difflib
import itertools
from collections import defaultdict
from collections.abc import Callable
from typing import Any

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
    format_term,
    has_type,
    literal_vars,
    term_vars,
)
from bastion.policy.recursion import check_growth, recursive_groups

# Fact predicates that resource blocks imply, always accepted in rule bodies.
STANDARD_FACTS = {("has_role", 3), ("has_role", 2), ("has_relation", 3)}


class _Skip(Exception):
    """One name a shorthand rule's variable stands for does not apply to a related block."""


# What a variable in a shorthand rule stands for, by its name: ``role if role on "parent";``
# ranges over roles, ``permission if "admin" on "org";`` over permissions; another name over
# both.
_ROLE_NAMES = {"role", "roles"}
_PERMISSION_NAMES = {"permission", "permissions", "action", "actions"}


def _variable_kinds(name: str) -> tuple[str, ...]:
    if name in _ROLE_NAMES:
        return ("role",)
    if name in _PERMISSION_NAMES:
        return ("permission",)
    return ("role", "permission")


class _Lowering:
    def __init__(
        self, policy: ast.Policy, limits: PolicyLimits = DEFAULT_LIMITS, strict: bool = False
    ) -> None:
        self.policy = policy
        self.limits = limits
        self.strict = strict
        self.supertypes: dict[str, tuple[str, ...]] = {}
        self.unknown_types: set[str] = set()
        self.global_block = ast.Block("global", None, Location("<policy>", 1, 1))
        self.clause_count = 0
        self.suggestions_left = 20
        self.diagnostics: list[Diagnostic] = []
        self.blocks: dict[str, ast.Block] = {}
        self.global_roles: dict[str, Location] = {}
        self.fresh = itertools.count(1)
        self.entities_checked: set[tuple[Location, str]] = set()
        # Whether a rule of the policy relates entities (``has_relation`` rules): only then may
        # a relation hold an entity of another type than its block declares (stored facts are
        # checked against the declaration when written), and only then does a shorthand rule
        # check the type of what it follows (`relation_typed`).
        self.rules_relate = any(
            rule.name == "has_relation" and len(rule.params) == 3 for rule in policy.rules
        )

    def relation_typed(
        self, block: ast.Block, relation: str, hop: ast.Call, related: Any
    ) -> tuple[Any, ...]:
        """``hop`` (a has_relation call), and, where rules relate entities too, ``related`` of
        the type ``block`` declares for ``relation`` (or a subtype), as in Oso: a rule that
        relates another type must not pass that entity's roles off as the declared one's."""
        if not self.rules_relate:
            return (hop,)
        return (hop, ast.Matches(related, block.relations[relation][0], hop.location))

    def error(self, location: Location, message: str) -> None:
        self.diagnostics.append(Diagnostic(location, message))

    def warn(self, location: Location, message: str) -> None:
        self.diagnostics.append(Diagnostic(location, message, "warning"))

    def guard(self, location: Location, message: str) -> None:
        """A likely misspelling: a warning, or an error under ``strict``."""
        if self.strict:
            self.error(location, message)
        else:
            self.warn(location, message + " (an error with --strict)")

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
                self.global_block.roles.update(block.roles)
                self.global_block.permissions.update(block.permissions)
                self.global_block.shorthand.extend(block.shorthand)
                if block.relations:
                    self.error(block.location, "a global block has no relations")
                continue
            if block.name in self.blocks:
                self.error(block.location, f"type {block.name} is declared twice")
                continue
            if block.name in VALUE_TYPES or block.name in ("Actor", "Resource"):
                self.error(block.location, f"{block.name} is a built-in type name")
                continue
            self.blocks[block.name] = block
        for block in self.blocks.values():
            for sup in block.extends:
                if sup not in self.blocks and sup not in ("Actor", "Resource"):
                    self.error(
                        block.location,
                        f"{block.name} extends {sup}, which no actor or resource block declares",
                    )
            self.supertypes[block.name] = tuple(t for t in block.extends if t in self.blocks)
        self.collect_subtypes()
        self.actor_types = frozenset(n for n, b in self.blocks.items() if b.kind == "actor")
        # Actors are resources too (Oso Cloud's Actor extends Resource).
        self.resource_types = frozenset(self.blocks)
        for block in self.blocks.values():
            for rel, (typ, loc) in block.relations.items():
                if typ not in self.blocks:
                    self.error(
                        loc,
                        f"relation {rel!r} of {block.name} points to {typ}, which no actor or resource block declares",
                    )

    def collect_subtypes(self) -> None:
        """Each declared type's subtypes, through ``extends`` chains. A chain may be at most
        ``policy_max_nesting`` long, so that each type has few supertypes and this stays linear
        in the number of types; a cycle is an error. Iterative: no chain is too deep for it."""
        limit = self.limits.policy_max_nesting
        ancestors: dict[str, frozenset[str]] = {}
        for start in self.blocks:
            stack, on_path = [start], {start}  # a depth-first path, one supertype at a time
            while stack:
                name = stack[-1]
                if name in ancestors:
                    stack.pop()
                    on_path.discard(name)
                    continue
                after = next((t for t in self.supertypes[name] if t not in ancestors), None)
                if after is not None and after in on_path:
                    self.error(self.blocks[name].location, f"{name} extends itself through {after}")
                    self.supertypes[name] = tuple(t for t in self.supertypes[name] if t != after)
                    continue
                if after is not None:
                    stack.append(after)
                    on_path.add(after)
                    continue
                found = frozenset(self.supertypes[name]).union(
                    *(ancestors[t] for t in self.supertypes[name])
                )
                if len(found) > limit:
                    self.error(
                        self.blocks[name].location,
                        f"{name} extends more than {limit} types through 'extends'; the limit is"
                        f" policy_max_nesting = {limit}",
                    )
                    found = frozenset()
                ancestors[name] = found
                stack.pop()
                on_path.discard(name)
        below: dict[str, set[str]] = {name: {name} for name in self.blocks}
        for name, above in ancestors.items():
            for sup in above:
                below[sup].add(name)
        self._subtypes = {name: frozenset(types) for name, types in below.items()}

    def subtypes(self, name: str) -> frozenset[str]:
        """``name`` and every declared type that extends it."""
        found = self._subtypes.get(name)
        return frozenset([name]) if found is None else found

    def resolve_type(self, name: str, location: Location) -> frozenset[str] | None:
        if name == "Actor":
            return self.actor_types.union(*(self.subtypes(t) for t in self.actor_types))
        if name == "Resource":
            return self.resource_types
        if name in VALUE_TYPES:
            return frozenset([name])
        if name in self.blocks:
            return self.subtypes(name)
        # Oso Cloud takes a type no block declares as a type of its own; so does bastion,
        # with a warning in case it is a misspelling.
        if name not in self.unknown_types:
            self.unknown_types.add(name)
            hint = self.suggest(name, [*self.blocks, *VALUE_TYPES, "Actor", "Resource"])
            self.guard(
                location, f"type {name} is not declared by any actor or resource block{hint}"
            )
        return frozenset([name])

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
        self, block: ast.Block, name: str, subject: ast.Term | None, loc: Location
    ) -> ast.Expr | None:
        """The call a shorthand term means; ``subject`` None for a global role or permission."""
        kind = self.kind_of(block, name)
        actor = ast.Var("actor", loc)
        if subject is None and kind in ("role", "permission"):
            pred = "has_role" if kind == "role" else "has_permission"
            return ast.Call(pred, (actor, ast.Const(name, loc)), loc)
        if subject is None:
            self.error(loc, f"no global block declares the role or permission {name!r}")
            return None
        if kind == "role":
            return ast.Call("has_role", (actor, ast.Const(name, loc), subject), loc)
        if kind == "permission":
            return ast.Call("has_permission", (actor, ast.Const(name, loc), subject), loc)
        if kind == "relation":
            # The actor is the related entity: of the type the block declares, as in Oso,
            # whatever a has_relation rule relates.
            hop = ast.Call("has_relation", (subject, ast.Const(name, loc), actor), loc)
            typed = self.relation_typed(block, name, hop, actor)
            return typed[0] if len(typed) == 1 else ast.And(typed)
        declared = [*block.roles, *block.permissions, *block.relations]
        self.error(
            loc,
            f"{block.name} declares no role, permission or relation {name!r}{self.suggest(name, declared)}",
        )
        return None

    def names_of(self, block: ast.Block, kinds: tuple[str, ...]) -> list[str]:
        """The roles and/or permissions a block declares, as a shorthand variable ranges."""
        names = list(block.roles) if "role" in kinds else []
        return names + (list(block.permissions) if "permission" in kinds else [])

    def expand(
        self, block: ast.Block, expr: ast.Expr, subst: dict[str, str] | None = None
    ) -> ast.Expr | None:
        """A shorthand body as ordinary calls; ``subst`` gives the name each variable of the
        rule's head stands for in this expansion. Raises `_Skip` when a substituted name does
        not apply to the block a term reaches."""
        subst = subst or {}
        if isinstance(expr, ast.Shorthand) and expr.is_variable and expr.name not in subst:
            # A variable the head does not fix: any name of its kind on the block it reaches.
            target = block if expr.relation is None else self.related_block(block, expr)
            if target is None:
                return None
            names = self.names_of(target, _variable_kinds(expr.name))
            if not names:
                self.error(
                    expr.location,
                    f"{target.name or 'the global block'} declares no role or permission for"
                    f" {expr.name} to stand for",
                )
                return None
            alternatives = [
                self.expand(block, ast.Shorthand(n, expr.relation, expr.is_global, expr.location))
                for n in names
            ]
            return None if None in alternatives else ast.Or(tuple(alternatives))
        if isinstance(expr, ast.Shorthand):
            loc = expr.location
            name = subst.get(expr.name, expr.name) if expr.is_variable else expr.name
            if (
                expr.is_variable
                and self.kind_of(
                    block if expr.relation is None else self.related_block(block, expr) or block,
                    name,
                )
                is None
            ):
                raise _Skip
            if expr.is_global:
                return self.shorthand_call(self.global_block, name, None, loc)
            if block.kind == "global":
                if expr.relation is not None:
                    self.error(loc, "a global block has no relations to follow with 'on'")
                    return None
                return self.shorthand_call(block, name, None, loc)
            resource = ast.Var("resource", loc)
            if expr.relation is None:
                return self.shorthand_call(block, name, resource, loc)
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
            inner = self.shorthand_call(target, name, related, loc)
            if inner is None:
                return None
            hop = ast.Call("has_relation", (resource, ast.Const(expr.relation, loc), related), loc)
            return ast.And((*self.relation_typed(block, expr.relation, hop, related), inner))
        if isinstance(expr, ast.And):
            items = [self.expand(block, item, subst) for item in expr.items]
            return None if None in items else ast.And(tuple(items))
        if isinstance(expr, ast.Or):
            kept = []
            for item in expr.items:
                try:
                    kept.append(self.expand(block, item, subst))
                except _Skip:
                    continue
            if not kept:
                raise _Skip
            return None if None in kept else ast.Or(tuple(kept))
        if isinstance(expr, ast.Not):
            inner = self.expand(block, expr.item, subst)
            return None if inner is None else ast.Not(inner, expr.location)
        return expr

    def related_block(self, block: ast.Block, expr: ast.Shorthand) -> ast.Block | None:
        """The block a term ``... on "relation"`` reaches (reported if there is none)."""
        if expr.relation not in block.relations:
            declared = list(block.relations)
            self.error(
                expr.location,
                f"{block.name} declares no relation {expr.relation!r}"
                f"{self.suggest(expr.relation or '', declared)}",
            )
            return None
        return self.blocks.get(block.relations[expr.relation][0])

    def shorthand_rules(self) -> list[tuple[ast.Rule, str]]:
        rules = []
        blocks = [*self.blocks.values()]
        if self.global_block.shorthand:
            blocks.append(self.global_block)
        for block in blocks:
            for sh in block.shorthand:
                if sh.head_is_variable:
                    heads = self.names_of(block, _variable_kinds(sh.head))
                    if not heads:
                        self.error(
                            sh.head_location,
                            f"{block.name or 'the global block'} declares no role or permission"
                            f" for {sh.head} to stand for",
                        )
                        continue
                else:
                    heads = [sh.head]
                if not self.expansion_fits(block, sh, len(heads)):
                    continue
                for head in heads:
                    rule = self.shorthand_rule(block, sh, head)
                    if rule is not None:
                        rules.append(rule)
        return rules

    def expansion_fits(self, block: ast.Block, sh: ast.ShorthandRule, heads: int) -> bool:
        """Whether the rules a shorthand rule with variables stands for stay within
        ``policy_max_rules``, counted before any is built (each variable the head does not fix
        multiplies them by the names it ranges over)."""
        limit = self.limits.policy_max_rules
        total = heads
        for term in _shorthand_terms(sh.body):
            if not term.is_variable or sh.head_is_variable and term.name == sh.head:
                continue
            target = block
            if term.relation is not None:
                related = block.relations.get(term.relation)
                target = self.blocks.get(related[0]) if related else None
            if target is not None:
                total *= max(1, len(self.names_of(target, _variable_kinds(term.name))))
            if total > limit:
                break
        if total <= limit:
            return True
        self.error(
            sh.location,
            f"this shorthand rule stands for more than {limit} rules (one per name each of its"
            f" variables ranges over); the limit is policy_max_rules = {limit}",
        )
        return False

    def shorthand_rule(
        self, block: ast.Block, sh: ast.ShorthandRule, head: str
    ) -> tuple[ast.Rule, str] | None:
        """One shorthand rule of ``block`` as an ordinary rule, its head being ``head``."""
        kind = self.kind_of(block, head)
        where = block.name or "the global block"
        if kind not in ("role", "permission"):
            declared = [*block.roles, *block.permissions]
            self.error(
                sh.head_location,
                f"{where} declares no role or permission {head!r}{self.suggest(head, declared)}",
            )
            return None
        try:
            body = self.expand(block, sh.body, {sh.head: head} if sh.head_is_variable else None)
        except _Skip:
            return None  # the variable's name does not apply to what the body reaches
        if body is None:
            return None
        loc = sh.location
        name = "has_role" if kind == "role" else "has_permission"
        params = [
            ast.Param(ast.Var("actor", loc), "Actor", loc),
            ast.Param(ast.Const(head, loc), None, loc),
        ]
        if block.kind != "global":
            params.append(ast.Param(ast.Var("resource", loc), block.name, loc))
        what = f"resource {block.name}" if block.kind != "global" else "global"
        text = f'{what}: "{head}" if {_shorthand_text(sh.body)}'
        return ast.Rule(name, tuple(params), body, loc), text

    # -- normalisation ----------------------------------------------------------------------

    def rename_anonymous(self, term: ast.Term) -> ast.Term:
        if isinstance(term, ast.Var) and term.name == "_":
            return ast.Var(f"_{next(self.fresh)}", term.location)
        if isinstance(term, ast.ListTerm):
            return ast.ListTerm(tuple(self.rename_anonymous(t) for t in term.items), term.location)
        if isinstance(term, ast.Arith):
            left, right = self.rename_anonymous(term.left), self.rename_anonymous(term.right)
            return ast.Arith(term.op, left, right, term.location)
        if isinstance(term, ast.EntityOf):
            return ast.EntityOf(term.type, self.rename_anonymous(term.id), term.location)
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
        if isinstance(expr, ast.Truth):
            return [[]] if expr.value else []
        if isinstance(expr, ast.ForAll):
            # forall(C, R): there is no way C holds where R does not.
            inner = ast.And((expr.condition, ast.Not(expr.requirement, expr.location)))
            return self.dnf(ast.Not(inner, expr.location))
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
            if isinstance(
                term, (ast.ContextPath, ast.ListTerm, ast.DictTerm, ast.Arith, ast.EntityOf)
            ):
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
            self.check_entities_of(clause)
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
        # Clauses whose calls imply fact types, each with whether it came from a shorthand
        # rule (whose role, permission and relation calls the blocks already type).
        written: list[tuple[Clause, bool]] = []
        for rule, text in self.shorthand_rules():
            for clause in self.clauses_of(rule, text):
                clauses[(clause.name, len(clause.head))].append(clause)
                written.append((clause, True))
        for rule in self.policy.rules:
            key = (rule.name, len(rule.params))
            if key == ("has_relation", 3):
                self.check_relation_rule(rule)
            if key in BUILTINS:
                self.error(rule.location, f"{rule.name} is a builtin and cannot be redefined")
                continue
            clauses.setdefault(key, [])  # defined, even by a rule that never holds ('if false')
            for clause in self.clauses_of(rule, rule.text or None):
                clauses[key].append(clause)
                if not _is_default_allow(clause):
                    written.append((clause, False))
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
        self.check_calls(clauses, set(STANDARD_FACTS) | set(declared), written)
        for key, signatures in self.inferred_signatures(
            written, self.fact_signatures(declared)
        ).items():
            for signature in signatures:
                if signature not in declared[key]:
                    declared[key].append(signature)
        fact_predicates = set(STANDARD_FACTS) | set(declared)

        self.check_singletons(clauses)
        self.check_negated_context(clauses)
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
            subtypes=dict(self._subtypes),
        )

    def check_relation_rule(self, rule: ast.Rule) -> None:
        """A has_relation rule for a relation a block declares relates entities of the declared
        type (Oso refuses the rule otherwise); one that names another type is an error."""
        resource, name, related = rule.params
        if not isinstance(name.term, ast.Const) or related.type is None:
            return
        holders = self.resource_types
        if resource.type is not None:
            holders = self.resolve_type(resource.type, resource.location) or frozenset()
        declared = [
            (block.name, block.relations[name.term.value][0])
            for block in self.blocks.values()
            if name.term.value in block.relations
            and (block.name in holders or holders & self.subtypes(block.name))
        ]
        relates = self.resolve_type(related.type, related.location) or frozenset()
        if declared and not any(relates <= self.subtypes(typ) for _, typ in declared):
            owner, typ = declared[0]
            self.error(
                related.location,
                f"relation {name.term.value!r} of {owner} is declared as {typ}; this rule"
                f" relates a {related.type}",
            )

    def check_calls(self, clauses: dict, fact_predicates: set, written: list) -> None:
        """The misspelling guard: a call to a predicate that no rule, declaration, block or
        builtin defines is taken as a fact type (as Oso Cloud does), with a warning."""
        known = set(clauses) | fact_predicates | set(BUILTINS)
        names = sorted({name for name, _ in known})
        warned: set[tuple[str, int]] = set()
        for clause, _ in written:
            for lit in _walk(clause.body):
                if isinstance(lit, CallLit) and (
                    builtin := BUILTINS.get((lit.name, len(lit.args)))
                ):
                    self.check_builtin_types(clause, lit, builtin.types)
                    self.check_builtin_literals(lit, builtin.literal)
                key = (lit.name, len(lit.args)) if isinstance(lit, CallLit) else None
                if key is None or key in known or key in warned:
                    continue
                warned.add(key)
                arities = sorted(a for n, a in known if n == lit.name)
                if arities:
                    self.guard(
                        lit.location,
                        f"{lit.name} takes {' or '.join(map(str, arities))} arguments elsewhere,"
                        f" not {len(lit.args)}: {lit.name}/{len(lit.args)} is taken as a fact"
                        f" type of its own (declare it if that is intended)",
                    )
                else:
                    hint = self.suggest(lit.name, names)
                    self.guard(
                        lit.location,
                        f"{lit.name}/{len(lit.args)} is not defined by any rule, builtin or"
                        f" declaration{hint}; it is taken as a fact type inferred from its calls"
                        f" (declare it if that is intended: declare {lit.name}(...);)",
                    )

    def inferred_signatures(
        self, written: list, known: dict[tuple[str, int], list[tuple]]
    ) -> dict[tuple[str, int], list[tuple]]:
        """The fact signature each call in a rule body implies (see the module's docstring).

        A call that a signature of the blocks or of a declaration already fits implies nothing
        more: ``has_relation(repo, "parent", org)`` reads the facts the block's relation
        declares, and must not widen them to a parent of any type."""
        found: dict[tuple[str, int], list[tuple]] = defaultdict(list)
        fitted: dict[tuple, bool] = {}
        for clause, from_shorthand in written:
            types: dict[str, frozenset[str]] = {}
            for lit in clause.body:
                if isinstance(lit, TypeLit) and isinstance(lit.term, ast.Var):
                    seen = types.get(lit.term.name)
                    types[lit.term.name] = lit.types if seen is None else seen & lit.types
            for lit in _walk(clause.body):
                if not isinstance(lit, CallLit) or (lit.name, len(lit.args)) in BUILTINS:
                    continue
                if from_shorthand and lit.name in _SHORTHAND_CALLS:
                    continue
                key = (lit.name, len(lit.args))
                shape = (key, *(_arg_shape(arg, types) for arg in lit.args))
                fits = fitted.get(shape)
                if fits is None:  # the same shape of call recurs: checked once
                    sigs = known.get(key, ())
                    fits = fitted[shape] = any(_call_fits(lit.args, types, sig) for sig in sigs)
                if fits:
                    continue
                signature = tuple(_spec_of(arg, types) for arg in lit.args)
                if signature not in found[key]:
                    found[key].append(signature)
        return found

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
            elif isinstance(arg, ast.EntityOf):
                found = arg.type
            elif isinstance(arg, ast.Var) and arg.name in typed and want not in typed[arg.name]:
                found = " or ".join(sorted(typed[arg.name]))
            if found is not None:
                self.error(
                    lit.location,
                    f"argument {pos} of {lit.name} must be a {want}, not {found}",
                )

    def check_entities_of(self, clause: Clause) -> None:
        """Each ``Type{id}`` whose id is computed (`ast.EntityOf`): the type must be one an
        entity can have (declared, or taken as a type of its own with the misspelling guard's
        warning), and an id known when the policy loads not to be a String is an error where
        it is written (at evaluation such an id would make the condition false every time)."""
        typed = {
            lit.term.name: lit.types
            for lit in clause.body
            if isinstance(lit, TypeLit) and isinstance(lit.term, ast.Var)
        }
        for made in _entities_of(clause.body):
            if (made.location, made.type) in self.entities_checked:
                continue  # each alternative of an 'or' repeats the rule's terms
            self.entities_checked.add((made.location, made.type))
            if made.type in VALUE_TYPES or made.type in ("Actor", "Resource"):
                self.error(
                    made.location,
                    f"{made.type} is not an entity type: name the type of the entity"
                    f" ({made.type}{{...}} makes no entity)",
                )
                continue
            self.resolve_type(made.type, made.location)
            found = _not_a_string(made.id, typed)
            if found is not None:
                self.error(
                    made.location,
                    f"the id of a {made.type} must be a String, not {found}"
                    f" ({format_term(made)} would match nothing)",
                )

    def check_builtin_literals(
        self, lit: CallLit, literal: Callable[[int, Any], str | None] | None
    ) -> None:
        """A value written in the rule that the builtin cannot read (a time zone that does not
        exist, a time of day of 25:00) is an error: the builtin would be false on every request."""
        if literal is None:
            return
        for position, arg in enumerate(lit.args):
            if isinstance(arg, ast.Const) and (problem := literal(position, arg.value)):
                self.error(lit.location, f"argument {position + 1} of {lit.name}: {problem}")

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

    def check_negated_context(self, clauses: dict) -> None:
        """A context field that a rule which can allow reads only under a 'not': a request
        that leaves the field out makes the negated condition false and the 'not' true, so
        the rule allows (`allow ... if not context.device.compromised = true`). Rules that
        `allow` calls (not under a 'not') are checked as it is; guardrails (`deny`) and
        obligations are closed that way, and a rule called under a 'not' (`not archived(r)`,
        whose context field is an optional statement of the request) is left alone."""
        reached: set[tuple[str, int]] = set()
        todo = [key for key in _GRANTS if key in clauses]
        while todo:
            key = todo.pop()
            if key in reached:
                continue
            reached.add(key)
            for clause in clauses[key]:
                for lit in clause.body:
                    if isinstance(lit, CallLit) and (lit.name, len(lit.args)) in clauses:
                        todo.append((lit.name, len(lit.args)))
        for key in sorted(reached):
            for clause in clauses[key]:
                reads: list[tuple[tuple[str, ...], bool, Location]] = []
                for lit in clause.body:
                    _context_reads(lit, False, lit.location, reads)
                plain = {path for path, negated, _ in reads if not negated}
                warned: set[tuple[str, ...]] = set()
                for path, negated, where in reads:
                    if not negated or path in plain or path in warned or _always_there(path):
                        continue
                    warned.add(path)
                    field_ = "context." + ".".join(path)
                    # A warning, not an error under strict: a field read so on purpose (allowed
                    # when the request says nothing) has nothing else to silence it by.
                    self.warn(
                        where,
                        f"{field_} is read only under 'not' in this rule of {key[0]}, which"
                        " can allow: when a request leaves the field out, the negated condition"
                        " is false and the 'not' holds, so the rule allows; if the field must"
                        f" be there, read it outside the 'not' too ('{field_} matches String"
                        " and not ...', or the condition itself, 'x = false' for 'not x = true')",
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
        actors = _type_spec(self.resolve_type("Actor", Location("<policy>", 1, 1)) or frozenset())
        for name, block in self.blocks.items():
            if block.roles:
                sigs[("has_role", 3)].append(
                    (actors, ("values", frozenset(block.roles)), _type_spec(self.subtypes(name)))
                )
            for rel, (typ, _) in block.relations.items():
                sigs[("has_relation", 3)].append(
                    (
                        _type_spec(self.subtypes(name)),
                        ("values", frozenset([rel])),
                        _type_spec(self.subtypes(typ) if typ in self.blocks else frozenset([typ])),
                    )
                )
        if self.global_roles:
            sigs[("has_role", 2)].append((actors, ("values", frozenset(self.global_roles))))
        return dict(sigs)


def _type_spec(types: frozenset[str]) -> tuple:
    return ("types", types)


# The calls a shorthand rule's expansion makes, typed by the blocks rather than inferred.
_SHORTHAND_CALLS = {"has_role", "has_permission", "has_relation"}
_ANY = ("any", frozenset())
_VALUE_TYPE_OF = {str: "String", int: "Integer", bool: "Boolean", float: "Float"}


def _is_default_allow(clause: Clause) -> bool:
    """``allow(actor, action, resource) if has_permission(actor, action, resource);`` written
    out: the rule bastion supplies when a policy has none, so it implies no fact type either
    (``has_permission`` stays defined by the blocks alone, and costs nothing more per call)."""
    head = clause.head
    if clause.name != "allow" or len(head) != 3 or len(clause.body) != 1:
        return False
    (call,) = clause.body
    return (
        all(isinstance(t, ast.Var) for t in head)
        and len({t.name for t in head}) == 3
        and isinstance(call, CallLit)
        and call.name == "has_permission"
        and call.args == head
    )


def _arg_shape(arg: ast.Term, types: dict[str, frozenset[str]]) -> Any:
    """What `_call_fits` reads of an argument: a constant, a typed variable's types, or None."""
    if isinstance(arg, ast.Const):
        return ("c", type(arg.value), arg.value)
    if isinstance(arg, ast.Var) and arg.name in types:
        return ("t", types[arg.name])
    if isinstance(arg, ast.EntityOf):
        return ("e", arg.type)
    return None


def _call_fits(args: tuple, types: dict[str, frozenset[str]], signature: tuple) -> bool:
    """Whether some fact of ``signature`` could answer a call with these arguments."""
    from bastion.policy.program import has_type

    for arg, (kind, allowed) in zip(args, signature, strict=True):
        if kind == "any":
            continue
        if isinstance(arg, ast.Const):
            fits = arg.value in allowed if kind == "values" else has_type(arg.value, allowed)
        elif isinstance(arg, ast.Var) and arg.name in types:
            mine = types[arg.name]
            fits = "String" in mine if kind == "values" else bool(mine & allowed)
        elif isinstance(arg, ast.EntityOf):
            fits = kind == "types" and arg.type in allowed
        else:
            fits = True  # an untyped variable, a context field: may be anything
        if not fits:
            return False
    return True


def _spec_of(term: ast.Term, types: dict[str, frozenset[str]]) -> tuple:
    """What a call's argument says of the facts it reads: the types of a typed variable or of
    a literal; any value for an untyped variable, a context field or a list."""
    if isinstance(term, ast.Var):
        known = types.get(term.name)
        return _ANY if known is None else _type_spec(known)
    if isinstance(term, ast.Const):
        from bastion.facts.model import Entity

        if isinstance(term.value, Entity):
            return _type_spec(frozenset([term.value.type]))
        name = _VALUE_TYPE_OF.get(type(term.value))
        return _ANY if name is None else _type_spec(frozenset([name]))
    if isinstance(term, ast.EntityOf):
        return _type_spec(frozenset([term.type]))
    return _ANY


def _walk(body: tuple[Literal, ...]):
    for lit in body:
        yield lit
        if isinstance(lit, NotLit):
            yield from _walk(lit.body)


# The decisions a rule grants by holding (a guardrail or an obligation holding refuses).
_GRANTS = (("allow", 3), ("may_delegate", 3), ("approver", 4))


def _context_reads(lit: Literal, negated: bool, where: Location, out: list) -> None:
    """Each ``context.<path>`` ``lit`` reads, with whether an odd number of 'not's is around
    it, and ``where`` (the rule's literal that holds it)."""
    if isinstance(lit, NotLit):
        for sub in lit.body:
            _context_reads(sub, not negated, where, out)
        return
    if isinstance(lit, CallLit):
        terms = list(lit.args)
    elif isinstance(lit, CmpLit):
        terms = [lit.left, lit.right]
    else:
        terms = [lit.term]
    while terms:
        term = terms.pop()
        if isinstance(term, ast.ContextPath):
            out.append((term.path, negated, where))
        elif isinstance(term, ast.ListTerm):
            terms.extend(term.items)
        elif isinstance(term, ast.Arith):
            terms.extend((term.left, term.right))
        elif isinstance(term, ast.EntityOf):
            terms.append(term.id)


def _entities_of(body: tuple[Literal, ...]):
    """Every `ast.EntityOf` in ``body``, those inside another's id and under a 'not' too."""
    terms: list[Any] = []
    for lit in _walk(body):
        if isinstance(lit, CallLit):
            terms.extend(lit.args)
        elif isinstance(lit, CmpLit):
            terms.extend((lit.left, lit.right))
        elif isinstance(lit, TypeLit):
            terms.append(lit.term)
    while terms:
        term = terms.pop()
        if isinstance(term, ast.EntityOf):
            yield term
            terms.append(term.id)
        elif isinstance(term, ast.ListTerm):
            terms.extend(term.items)
        elif isinstance(term, ast.Arith):
            terms.extend((term.left, term.right))


def _not_a_string(term: ast.Term, typed: dict[str, frozenset[str]]) -> str | None:
    """What ``term`` is known, when the policy loads, to be instead of a String, if it is."""
    if isinstance(term, ast.Const):
        value = term.value
        if isinstance(value, Entity):
            return value.type
        return None if value.__class__ is str else _VALUE_TYPE_OF.get(type(value), "a value")
    if isinstance(term, ast.ListTerm):
        return "a list"
    if isinstance(term, ast.EntityOf):
        return term.type
    if isinstance(term, ast.Arith):
        return "a number"
    if isinstance(term, ast.Var) and term.name in typed and "String" not in typed[term.name]:
        return " or ".join(sorted(typed[term.name]))
    return None


def _always_there(path: tuple[str, ...]) -> bool:
    """``context.time`` (the time now when the request gives none) and built-in constants."""
    return not path or path[0] == "time" or path[0].startswith("@")


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
    if isinstance(expr, ast.ForAll):
        inner = ast.And((expr.condition, ast.Not(expr.requirement, expr.location)))
        return _expansion(ast.Not(inner, expr.location), cap)
    return 1, 1


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _shorthand_terms(expr: ast.Expr):
    """The shorthand terms of a shorthand rule's body."""
    if isinstance(expr, ast.Shorthand):
        yield expr
    elif isinstance(expr, (ast.And, ast.Or)):
        for item in expr.items:
            yield from _shorthand_terms(item)
    elif isinstance(expr, ast.Not):
        yield from _shorthand_terms(expr.item)


def _shorthand_text(expr: ast.Expr) -> str:
    if isinstance(expr, ast.Shorthand):
        if expr.is_global:
            return f'global "{expr.name}"'
        name = expr.name if expr.is_variable else f'"{expr.name}"'
        return name + (f' on "{expr.relation}"' if expr.relation else "")
    if isinstance(expr, ast.Truth):
        return "true" if expr.value else "false"
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
    policy: ast.Policy, limits: PolicyLimits = DEFAULT_LIMITS, strict: bool = False
) -> tuple[Program, list[Diagnostic]]:
    """Lower a parsed policy; the diagnostics include errors (fatal) and warnings. With
    ``strict``, the misspelling guard's warnings (an undefined predicate, an undeclared type)
    are errors."""
    lowering = _Lowering(policy, limits, strict)
    program = lowering.run()
    return program, lowering.diagnostics
