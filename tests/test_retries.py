"""`Backoff`: the waits between attempts at a step that keeps failing."""

from __future__ import annotations

from bastion.retries import Backoff


def test_the_waits_double_up_to_the_longest_each_between_half_and_the_whole_then_start_again():
    backoff = Backoff(0.25, 30.0)
    ceilings = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    for _ in range(200):
        waits = [backoff.after_failure() for _ in ceilings]
        assert all(c / 2 <= w <= c for w, c in zip(waits, ceilings, strict=True)), waits
        backoff.succeeded()
    # Drawn, not fixed: replicas failing together do not all try again at one moment.
    assert len({backoff.after_failure() for _ in range(20)} - {30.0}) > 1


def test_a_step_failing_for_ever_never_waits_longer_than_the_longest():
    backoff = Backoff(0.25, 30.0)
    assert max(backoff.after_failure() for _ in range(5000)) <= 30.0
