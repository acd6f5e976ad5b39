"""The settings of the tests that draw their cases with hypothesis (the fuzz tests against a
real server, the contract's fast paths against the full decision)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings


def fuzzed(examples: int) -> settings:
    """The settings of a test that draws its cases: ``examples`` draws, the same on
    every run (derandomized: CI fails on a draw anyone can run again, not on luck), no time
    limit per draw (a request to a process), no example database, no health check (the
    strategies are slow and filtered on purpose)."""
    return settings(
        derandomize=True,
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
