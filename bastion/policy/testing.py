"""Runs a policy's ``test`` blocks: each on fresh facts from its ``setup``, asserting decisions."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from bastion.policy import LoadedPolicy, ast
from bastion.policy.errors import EvaluationLimit, Location


@dataclass(slots=True)
class AssertionResult:
    text: str
    location: Location
    passed: bool
    explanation: str | None = None


@dataclass(slots=True)
class TestResult:
    name: str
    location: Location
    assertions: list[AssertionResult] = field(default_factory=list)
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and all(a.passed for a in self.assertions)


def context_value(term: Any) -> Any:
    """A test's ``with context {...}`` literal as plain Python values."""
    if isinstance(term, ast.DictTerm):
        return {k: context_value(v) for k, v in term.items}
    if isinstance(term, ast.ListTerm):
        return [context_value(t) for t in term.items]
    if isinstance(term, ast.Const):
        return term.value
    raise ValueError("a test context holds only values, lists and objects")


def _list_text(term: ast.ListTerm) -> str:
    from bastion.policy.program import format_term

    return format_term(term)


def _call_text(call: ast.Call) -> str:
    from bastion.policy.program import format_term

    return f"{call.name}({', '.join(format_term(a) for a in call.args)})"


def setup_facts(entries: Any, fixtures: dict[str, ast.Fixture]) -> list[tuple]:
    """A test's setup as fact tuples, ``fixture name;`` included. Each fixture is expanded once
    however often it is included (so nesting cannot multiply the work), without recursion (so
    no chain of fixtures is too deep); a fixture that includes itself is an error."""
    from bastion.facts.model import FactError

    facts: list[tuple] = []
    state: dict[str, str] = {}  # fixture name -> "open" while expanding, "done" after
    stack: list[tuple[str | None, Any]] = [(None, iter(entries))]
    while stack:
        name, pending = stack[-1]
        entry = next(pending, None)
        if entry is None:
            stack.pop()
            if name is not None:
                state[name] = "done"
            continue
        if isinstance(entry, ast.FixtureRef):
            fixture = fixtures.get(entry.name)
            if fixture is None:
                known = ", ".join(sorted(fixtures)) or "none"
                raise FactError(f"{entry.location}: no test fixture {entry.name} (known: {known})")
            if state.get(entry.name) == "open":
                raise FactError(f"{entry.location}: fixture {entry.name} includes itself")
            if entry.name not in state:
                state[entry.name] = "open"
                stack.append((entry.name, iter(fixture.facts)))
            continue
        args = []
        for a in entry.args:
            if not isinstance(a, ast.Const):
                raise FactError(f"{entry.location}: setup facts take only values and entities")
            args.append(a.value)
        facts.append((entry.name, *args))
    return facts


def _holds(authz: Any, name: str, args: list, context: Any) -> bool:
    if name == "allow" and len(args) == 3:
        return authz.authorize(*args, context=context)
    return bool(authz.query(name, *args, context=context))


def _iff_values(authz: Any, call: ast.Call, iff: tuple, context: Any) -> set:
    """The values of an assertion's typed variable for which its call holds."""
    from bastion.decide import Variable
    from bastion.policy.program import has_type

    var, type_name, _ = iff
    program = authz._active.loaded.program
    if type_name == "Actor":
        resolved = program.actor_types.union(
            *(program.subtypes.get(t, ()) for t in program.actor_types)
        )
    elif type_name == "Resource":
        resolved = program.resource_types
    else:
        resolved = program.subtypes.get(type_name, frozenset([type_name]))
    args = [Variable(var) if isinstance(a, ast.Var) and a.name == var else a for a in call.args]
    if not all(isinstance(a, (ast.Const, Variable)) for a in args):
        raise ValueError("an iff assertion takes values, entities and its one typed variable")
    args = [a.value if isinstance(a, ast.Const) else a for a in args]
    pos = next(i for i, a in enumerate(args) if isinstance(a, Variable))
    candidates = {row[pos + 1] for row in authz.query(call.name, *args, context=context)}
    found = set()
    for value in candidates:
        if not has_type(value, resolved):
            continue
        concrete = [value if isinstance(a, Variable) else a for a in args]
        if _holds(authz, call.name, concrete, context):  # allow: and not deny
            found.add(value)
    return found


def run_tests(loaded: LoadedPolicy) -> list[TestResult]:
    from bastion.decide import Authorizer
    from bastion.facts.model import FactError

    fixtures = {f.name: f for f in loaded.fixtures}
    results = []
    for test in loaded.tests:
        result = TestResult(test.name, test.location)
        results.append(result)
        authz = Authorizer()
        authz._swap(loaded)
        try:
            authz.facts.apply(setup_facts(test.setup, fixtures), [])
        except FactError as err:
            result.error = f"setup: {err}"
            continue
        for assertion in test.assertions:
            call = assertion.call
            text = ("assert " if assertion.expect else "assert_not ") + _call_text(call)
            context = context_value(assertion.context) if assertion.context else None
            explanation = None
            if assertion.iff is not None:
                var, _, listed = assertion.iff
                if listed is not None:
                    text += f" iff {var} in {_list_text(listed)}"
                try:
                    found = _iff_values(authz, call, assertion.iff, context)
                    if listed is None:  # some value holds (assert_not: none does)
                        passed = bool(found) == assertion.expect
                    else:
                        expected = {context_value(t) for t in listed.items}
                        passed = (found == expected) == assertion.expect
                except (ValueError, EvaluationLimit) as err:
                    result.error = f"{assertion.location}: {err}"
                    break
                if not passed:
                    explanation = f"{var} takes {sorted(map(repr, found))}"
                result.assertions.append(
                    AssertionResult(text, assertion.location, passed, explanation)
                )
                continue
            if not all(isinstance(a, ast.Const) for a in call.args):
                result.error = f"{assertion.location}: assertions take only values and entities"
                break
            args = [a.value for a in call.args]
            try:
                outcome = _holds(authz, call.name, args, context)
                passed = outcome == assertion.expect
            except EvaluationLimit as limit:
                passed, explanation = False, str(limit)  # neither holds nor fails: refused
            if not passed and explanation is None and call.name == "allow" and len(args) == 3:
                explanation = str(authz.decide(*args, context=context).explanation)
            result.assertions.append(AssertionResult(text, assertion.location, passed, explanation))
    return results


def report(results: list[TestResult], elapsed: float, out: Any) -> bool:
    """Print pytest-like results; return True when every test passed."""
    for r in results:
        status = "PASSED" if r.passed else "FAILED"
        print(f'{r.location.source}::"{r.name}" {status}', file=out)
    failures = [r for r in results if not r.passed]
    for r in failures:
        print(f'\n____ "{r.name}" ({r.location}) ____', file=out)
        if r.error:
            print(f"  error: {r.error}", file=out)
        for a in r.assertions:
            if not a.passed:
                print(f"  {a.location}: {a.text} failed", file=out)
                if a.explanation:
                    for line in a.explanation.splitlines():
                        print(f"    {line}", file=out)
    passed = len(results) - len(failures)
    print(f"\n{passed} passed, {len(failures)} failed in {elapsed:.2f}s", file=out)
    return not failures


def run_and_report(loaded: LoadedPolicy, out: Any) -> bool:
    start = time.perf_counter()
    results = run_tests(loaded)
    return report(results, time.perf_counter() - start, out)
