"""`Backoff`: the waits between attempts at a step that keeps failing; `Outage`: what the log
says of it."""

from __future__ import annotations

import logging

from bastion.retries import Backoff, Outage, kind_of


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


def test_an_outage_is_said_once_again_when_its_error_changes_and_once_when_it_ends(caplog):
    caplog.set_level(logging.DEBUG, logger="tests.outage")
    outage = Outage(logging.getLogger("tests.outage"))
    assert not outage.ended("never failing: nothing to say")
    refused, lost = ConnectionRefusedError("refused"), ConnectionResetError("lost")
    said = [
        outage.failed("step failed: %s", e, kind=kind_of(e))
        for e in (refused, refused, ConnectionRefusedError("refused\nmore"), lost, lost)
    ]
    assert said == [True, False, False, True, False]
    assert outage.failing and outage.ended("step works again")
    assert not outage.ended("step works again")
    assert outage.failed("step failed: %s", refused, kind=kind_of(refused))  # a new outage
    loud = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno > logging.DEBUG]
    assert loud == [
        ("WARNING", "step failed: refused"),
        ("WARNING", "step failed: lost"),
        ("WARNING", "step works again"),
        ("WARNING", "step failed: refused"),
    ]
    # Each record names the line that failed, not the helper's.
    assert {r.filename for r in caplog.records} == {"test_retries.py"}
