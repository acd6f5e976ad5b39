"""Loading a policy: Polar source files parsed, merged, lowered and checked into a `LoadedPolicy`
(the first steps of docs/architecture.md's pipeline; `bastion.policy.compile` takes it on)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bastion.policy import ast
from bastion.policy.errors import Diagnostic, Location, PolicyError
from bastion.policy.limits import DEFAULT_LIMITS, PolicyLimits
from bastion.policy.lower import lower
from bastion.policy.parser import parse
from bastion.policy.program import Program


@dataclass(slots=True)
class LoadedPolicy:
    program: Program
    sources: list[tuple[str, str]]  # (name, text)
    warnings: list[Diagnostic] = field(default_factory=list)
    tests: list[ast.TestBlock] = field(default_factory=list)
    fixtures: list[ast.Fixture] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(text for _, text in self.sources)


def load(
    sources: list[tuple[str, str]], limits: PolicyLimits = DEFAULT_LIMITS, strict: bool = False
) -> LoadedPolicy:
    """Parse and check policy sources given as (name, text); raise `PolicyError` on any error,
    a policy over one of ``limits`` included. With ``strict``, a predicate that nothing
    defines and a type that no block declares are errors rather than warnings."""
    size = 0
    for name, text in sources:
        size += len(text.encode())
        if size > limits.policy_max_bytes:
            raise PolicyError(
                [
                    Diagnostic(
                        Location(name, 1, 1),
                        f"the policy text is larger than {limits.policy_max_bytes} bytes; the"
                        f" limit is policy_max_bytes = {limits.policy_max_bytes}",
                    )
                ]
            )
    merged = ast.Policy()
    errors: list[Diagnostic] = []
    for name, text in sources:
        try:
            policy = parse(text, name, limits)
        except PolicyError as err:
            errors.extend(err.diagnostics)
            continue
        except RecursionError:
            # Only with policy_max_nesting set beyond what the interpreter's stack allows.
            errors.append(
                Diagnostic(
                    Location(name, 1, 1),
                    "the policy is nested too deeply to parse; lower policy_max_nesting"
                    f" (now {limits.policy_max_nesting})",
                )
            )
            continue
        merged.blocks += policy.blocks
        merged.rules += policy.rules
        merged.declares += policy.declares
        merged.tests += policy.tests
        merged.fixtures += policy.fixtures
    seen: dict[str, ast.Fixture] = {}
    for fixture in merged.fixtures:
        if fixture.name in seen:
            errors.append(
                Diagnostic(
                    fixture.location,
                    f"test fixture {fixture.name} is declared twice (first at"
                    f" {seen[fixture.name].location})",
                )
            )
        seen.setdefault(fixture.name, fixture)
    if errors:
        raise PolicyError(errors)
    program, diagnostics = lower(merged, limits, strict)
    errors = [d for d in diagnostics if d.severity == "error"]
    if errors:
        raise PolicyError(errors)
    warnings = [d for d in diagnostics if d.severity != "error"]
    return LoadedPolicy(program, list(sources), warnings, merged.tests, merged.fixtures)
