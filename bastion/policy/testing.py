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


def _call_text(call: ast.Call) -> str:
    from bastion.policy.program import format_term

    return f"{call.name}({', '.join(format_term(a) for a in call.args)})"


def run_tests(loaded: LoadedPolicy) -> list[TestResult]:
    from bastion.decide import Authorizer
    from bastion.facts.model import FactError

    results = []
    for test in loaded.tests:
        result = TestResult(test.name, test.location)
        results.append(result)
        authz = Authorizer()
        authz._swap(loaded)
        try:
            facts = []
            for call in test.setup:
                args = []
                for a in call.args:
                    if not isinstance(a, ast.Const):
                        raise FactError(
                            f"{call.location}: setup facts take only values and entities"
                        )
                    args.append(a.value)
                facts.append((call.name, *args))
            authz.facts.apply(facts, [])
        except FactError as err:
            result.error = f"setup: {err}"
            continue
        for assertion in test.assertions:
            call = assertion.call
            text = ("assert " if assertion.expect else "assert_not ") + _call_text(call)
            if not all(isinstance(a, ast.Const) for a in call.args):
                result.error = f"{assertion.location}: assertions take only values and entities"
                break
            args = [a.value for a in call.args]
            context = context_value(assertion.context) if assertion.context else None
            explanation = None
            try:
                if call.name == "allow" and len(args) == 3:
                    outcome = authz.authorize(*args, context=context)
                else:
                    outcome = bool(authz.query(call.name, *args, context=context))
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
