"""Typed policy errors that say where the problem is: file, line and column."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Location:
    source: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.source}:{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem found while loading a policy. ``severity`` is "error" or "warning"."""

    location: Location
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.location}: {self.severity}: {self.message}"


class PolicyError(Exception):
    """A policy that cannot be loaded; ``diagnostics`` lists every error found."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        self.diagnostics = diagnostics
        super().__init__("\n".join(str(d) for d in diagnostics))


class UndecidedQuestion(PolicyError):
    """A question of strict code (`Node.strict`: a ``deny`` rule, an obligation whose holding
    restricts) asked with an argument left open, for which some answer cannot be decided
    (arithmetic with no result whose value a rule binds or passes on), or whose answer the
    obligation cannot use (a required scope that is not text): no answer can be named, so none
    is given. ``predicate`` names the rule (``"rate_limit"``). The decision contract
    refuses the request with ``reason`` "undecided" (`bastion.decide.contract`); a query
    answers it as the `PolicyError` it is."""

    reason = "undecided"

    def __init__(self, predicate: str, diagnostics: list[Diagnostic]) -> None:
        self.predicate = predicate
        super().__init__(diagnostics)


class Undecided(Exception):
    """Raised by strict code (see `compare_strict`) where a condition that has values cannot be
    decided and evaluation cannot go on past it: arithmetic with no result whose value is bound
    to a variable, passed to a rule or a builtin, or checked for a type; ``lower`` asked to bind
    its output from a value that is no string (`bastion.policy.builtins.Builtin.strict_produce`).
    Caught where the polarity turns back (`bastion.policy.runtime.proved_or_undecided`): a
    ``not`` in ordinary code then fails, and a ``deny`` rule holds.

    Oso's Polar stops the whole query with an error there; taking the condition as false would
    make the ``not`` hold, or the ``deny`` not fire, and widen access.
    """


class EvaluationLimit(Exception):
    """An evaluation that spent its budget: the question is refused (fail closed).

    ``limit`` names the budget that ran out, as its setting (``evaluation_max_steps``,
    ``evaluation_max_milliseconds``, ``evaluation_max_depth``, ``evaluation_max_term_size``);
    ``value`` is its value.
    """

    reason = "evaluation_limit"

    def __init__(self, limit: str, value: int, what: str) -> None:
        self.limit = limit
        self.value = value
        super().__init__(f"evaluation stopped: {what} (the limit is {limit} = {value})")


class CompilerBusy(Exception):
    """A shape of question not compiled yet, asked while a worker thread compiles another for
    the same policy (`CompiledPolicy.beside_decisions`): compile it there too, then ask again.
    Never a refusal: a server answers the question once its shapes are compiled."""

    def __init__(self, name: str, arity: int, mask: str) -> None:
        self.shape = (name, mask)
        super().__init__(f"{name}/{arity} ({mask}) is not compiled yet, and the compiler is busy")
