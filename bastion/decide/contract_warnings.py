"""What a policy loads with that the decision contract cannot act on as its author wrote it:
warnings, never errors (the policy loads, and decides, as it would without them).

- `mask_path_warnings`: a mask path that cannot be read (the whole result is withheld).
- `unenforced_obligations`: a rule whose head can only match an action and resource on which
  the gateway does nothing with its obligation (docs/policy-language.md, Load-time checks).

What the gateway does with each obligation, by the action and the entity it asks it of (its
MCP mapping, `bastion.decide.mcp`; `bastion.gateway.enforce`, `bastion.gateway.gateway`):

- ``connect``, asked of a ``McpServer`` on every message: a required scope, an approval, a rate
  limit, a sign-in age and a read-only downgrade act on it; a mask has no result to apply to,
  and a review holds nothing (every message goes on, recorded, or is refused where nobody may
  review: docs/gateway.md, Known limits);
- an upstream's request to a client (``sampling/createMessage``, ``elicitation/create``,
  ``roots/list``), asked of its ``McpServer``: its masks apply to the client's answer, and any
  hold or step-up refuses it;
- ``call`` of a ``Tool``, ``read`` of a ``McpResource``, ``get`` of a ``Prompt``: every
  obligation;
- ``list`` of a ``Tool``, ``McpResource`` or ``Prompt``: a list page is filtered by ``allow`` and
  ``deny`` alone, no obligation is asked;
- any other action of those entities is never asked;
- ``label(resource, label)``: added with a released result of a call, read or get, never for a
  ``McpServer``; ``read_only(actor, server)``: asked of ``McpServer{server}`` only.

``alert`` and ``requires_signal`` name no action or resource: nothing to tell from their head.
A rule whose action is a variable that may be another action, or whose resource is of no type
the gateway decides on (another enforcement point may ask it), is not warned of; a resource of
no written type is taken as a ``McpServer`` for ``connect`` only, the one entity it is asked of.
"""

from __future__ import annotations

from collections.abc import Iterable

from bastion.decide.contract import path_keys
from bastion.decide.mcp import CLIENT_REQUESTS, MESSAGE_ACTIONS
from bastion.facts.model import Entity
from bastion.policy.ast import Const, EntityOf, ListTerm, Var
from bastion.policy.errors import Diagnostic
from bastion.policy.program import Clause, CmpLit, Program, Term, TypeLit

# The actions the gateway asks of each entity of its MCP mapping.
ASKED: dict[str, tuple[str, ...]] = {
    type_: ("connect", *CLIENT_REQUESTS) if type_ == "McpServer" else ("list", action)
    for type_, action in MESSAGE_ACTIONS.items()
}
# The obligations asked of an action and a resource: (name, arity) -> their positions.
OBLIGATIONS: dict[tuple[str, int], tuple[int, int]] = {
    ("requires_scope", 3): (0, 1),
    ("mask", 4): (1, 2),
    ("rate_limit", 5): (1, 2),
    ("requires_approval", 3): (1, 2),
    ("requires_review", 3): (1, 2),
    ("requires_recent_auth", 4): (1, 2),
}


# The other rules of the contract whose head says where they can have an effect.
OTHERS = (("label", 2), ("read_only", 2))


def contract_warnings(program: Program) -> list[Diagnostic]:
    """Every warning of the decision contract for ``program``, in the order of the text."""
    found = mask_path_warnings(program) + unenforced_obligations(program)
    return sorted(found, key=lambda d: (d.location.source, d.location.line, d.location.column))


def mask_path_warnings(program: Program) -> list[Diagnostic]:
    """A warning for each ``mask`` rule whose path, written in its head, cannot be read (or is
    not a string): under it every JSON value of a result is withheld whole, which is safe but
    surely not what its author meant. Warnings only: such a policy loads as it always did. A
    path that names a key no result has cannot be told from the policy alone."""
    found = []
    for clause in program.clauses.get(("mask", 4), ()):
        path = clause.head[3]
        if not isinstance(path, Const):
            continue
        if not isinstance(path.value, str):
            message = (
                f"a mask path is a string, not {path.value!r}: every JSON value of a result it"
                " applies to is withheld whole"
            )
        elif path_keys(path.value) is None:
            message = (
                f"the mask path {path.value!r} cannot be read (keys separated by dots, * for"
                " every element or key, as customers.*.email): every JSON value of a result it"
                " applies to is withheld whole"
            )
        else:
            continue
        found.append(Diagnostic(path.location, message, "warning"))
    return found


def unenforced_obligations(program: Program) -> list[Diagnostic]:
    """A warning for each rule whose head can only match an action and resource where the
    gateway does nothing with its obligation, naming the rule and why: a rule of several
    clauses (an ``or``) only when none of them can have an effect."""
    found = []
    for (name, arity), clauses in program.clauses.items():
        if (name, arity) not in OBLIGATIONS and (name, arity) not in OTHERS:
            continue
        for rule in _rules(clauses):
            reasons = [_unenforced_clause(clause) for clause in rule]
            if all(reasons):
                clause = rule[0]
                message = f"{_head(clause)} is never applied by the gateway: {reasons[0]}"
                found.append(Diagnostic(clause.location, message, "warning"))
    return found


def _unenforced_clause(clause: Clause) -> str | None:
    """Why ``clause``'s obligation does nothing wherever its head matches; None when it may."""
    if clause.name == "label":
        return _label_unenforced(clause)
    if clause.name == "read_only":
        return _read_only_unenforced(clause)
    action_at, resource_at = OBLIGATIONS[clause.name, len(clause.head)]
    return _action_unenforced(
        clause.name,
        _actions(clause, clause.head[action_at]),
        clause,
        clause.head[resource_at],
    )


def _action_unenforced(
    name: str, actions: frozenset[str] | None, clause: Clause, resource: Term
) -> str | None:
    """Why ``name`` asked of any of ``actions`` on ``resource`` does nothing; None when it may."""
    if not actions:
        return None
    types = _types(clause, resource)
    if types is None and actions == {"connect"}:
        types = frozenset({"McpServer"})  # the one entity connect is asked of
    if not types:
        return None
    reasons = [_unenforced(name, action, t) for action in sorted(actions) for t in sorted(types)]
    return reasons[0] if all(reasons) else None


def _unenforced(name: str, action: str, type_: str) -> str | None:
    asked = ASKED.get(type_)
    if asked is None:
        return None  # not the gateway's entity: another enforcement point may act on it
    if action not in asked:
        return (
            f"the gateway never asks {_quoted(action)} of a {type_} (it asks"
            f" {', '.join(_quoted(a) for a in asked)})"
        )
    if action == "list":
        return (
            f"a list page is filtered by allow and deny alone; {name} is asked of a message's"
            f" own target only ({_quoted(MESSAGE_ACTIONS[type_])} of a {type_})"
        )
    if action == "connect" and name == "mask":
        return (
            "a connect has no result to mask (connect is asked of every message to the server,"
            " before the message's own decision, whose result is masked): mask the result of"
            ' a target, as mask(actor, "call", Tool{"<server>/<tool>"}, path)'
        )
    if action == "connect" and name == "requires_review":
        return (
            "a connect has no result to hold for review: every message goes on, decided and"
            " recorded each time (refused where nobody may review); hold the results of the"
            ' targets, as requires_review(actor, "call", tool: Tool)'
        )
    return None


def _label_unenforced(clause: Clause) -> str | None:
    types = _types(clause, clause.head[0])
    if types is None or types != {"McpServer"}:
        return None
    return (
        "no label of a McpServer is ever added (labels are added with a released result of a"
        " call, read or get, whose target is a Tool, McpResource or Prompt): label those"
    )


def _read_only_unenforced(clause: Clause) -> str | None:
    types = _types(clause, clause.head[1])
    if types is None or "McpServer" in types:
        return None
    return (
        'read_only is asked of a McpServer only (read_only(actor, McpServer{"<server>"}), the'
        " server of the call): this rule never holds"
    )


def _rules(clauses: Iterable[Clause]) -> list[list[Clause]]:
    """The clauses grouped by the rule they come from (an ``or`` is distributed into clauses
    of one place), in the order of the text."""
    rules: dict[object, list[Clause]] = {}
    for clause in clauses:
        rules.setdefault(clause.location, []).append(clause)
    return list(rules.values())


def _bindings(clause: Clause, var: Var) -> list[Term]:
    """What ``var`` is made equal to (``=``), or taken from (``in`` a list), in ``clause``'s
    body, outside any ``not``: each a `Const`, an `EntityOf` or a `ListTerm`."""
    found: list[Term] = []
    for lit in clause.body:
        if not isinstance(lit, CmpLit):
            continue
        if lit.op == "=":
            for one, other in ((lit.left, lit.right), (lit.right, lit.left)):
                if (
                    isinstance(one, Var)
                    and one.name == var.name
                    and isinstance(other, (Const, EntityOf))
                ):
                    found.append(other)
        elif (
            lit.op == "in"
            and isinstance(lit.left, Var)
            and lit.left.name == var.name
            and isinstance(lit.right, ListTerm)
        ):
            found.append(lit.right)
    return found


def _actions(clause: Clause, term: Term) -> frozenset[str] | None:
    """The actions ``term`` can be in ``clause``: the one written, or that a variable is bound
    to; None where it may be any other."""
    if isinstance(term, Const):
        return frozenset({term.value}) if isinstance(term.value, str) else None
    if not isinstance(term, Var):
        return None
    for bound in _bindings(clause, term):
        if isinstance(bound, Const) and isinstance(bound.value, str):
            return frozenset({bound.value})
        if isinstance(bound, ListTerm) and all(
            isinstance(i, Const) and isinstance(i.value, str) for i in bound.items
        ):
            return frozenset(i.value for i in bound.items)  # type: ignore[union-attr]
    return None


def _types(clause: Clause, term: Term) -> frozenset[str] | None:
    """The entity types ``term`` can be of in ``clause``: written, bound, or checked (a
    specializer, ``matches``); None where nothing says."""
    if isinstance(term, Const):
        return frozenset({term.value.type}) if isinstance(term.value, Entity) else None
    if not isinstance(term, Var):
        return None
    for bound in _bindings(clause, term):
        if isinstance(bound, Const) and isinstance(bound.value, Entity):
            return frozenset({bound.value.type})
        if isinstance(bound, EntityOf):
            return frozenset({bound.type})
    checked = [
        lit.types
        for lit in clause.body
        if isinstance(lit, TypeLit) and isinstance(lit.term, Var) and lit.term.name == term.name
    ]
    if not checked:
        return None
    types = checked[0]
    for more in checked[1:]:
        types = types & more
    return types


def _head(clause: Clause) -> str:
    """The rule's head as written (its text up to the parenthesis that closes it)."""
    text = clause.text
    depth, quoted, escaped = 0, False, False
    for at, char in enumerate(text):
        if quoted:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth == 0 and char == ")":
                return text[: at + 1]
    return f"this {clause.name} rule"


def _quoted(action: str) -> str:
    return '"' + action.replace("\\", "\\\\").replace('"', '\\"') + '"'
