"""`Backoff`: the waits between attempts at a step that keeps failing; `Outage`: what the log
says of it."""

from __future__ import annotations

import logging
import sqlite3

from bastion.db import Database, DatabaseUnavailable, round_failed
from bastion.retries import Backoff, Outage, kind_of
from tests.relays import Relay
from tests.waits import eventually


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


def test_a_round_says_the_database_away_once_without_a_traceback_and_another_error_with_one(
    caplog,
):
    """`round_failed`, what background rounds say of a failure: the database away is one
    warning naming why for as long as it lasts, whatever each attempt's message; another error
    is said at ERROR with its traceback, once per kind; each record names the round's line."""
    caplog.set_level(logging.DEBUG, logger="tests.outage")
    outage = Outage(logging.getLogger("tests.outage"))
    lost = DatabaseUnavailable("the database connection was lost (terminated); retry")
    away = DatabaseUnavailable("the database is unavailable (connection refused); retry")
    missing = sqlite3.OperationalError("no such table: tasks")
    said = [
        round_failed(outage, e, "sweeping failed") for e in (lost, away, away, missing, missing)
    ]
    assert said == [True, False, False, True, False]
    loud = [r for r in caplog.records if r.levelno > logging.DEBUG]
    assert [(r.levelname, r.getMessage(), bool(r.exc_info)) for r in loud] == [
        ("WARNING", f"sweeping failed ({lost}); trying again", False),
        ("ERROR", "sweeping failed (no such table: tasks); trying again", True),
    ]
    assert {r.filename for r in caplog.records} == {"test_retries.py"}


def test_a_database_connection_says_its_loss_once_and_once_that_it_connected_again(
    postgres_url, caplog
):
    """`Database`: a connection lost is a warning, the attempts to connect while the database
    is away are DEBUG (a warning at each, every half second a statement asked, would flood),
    and one that opens again is a warning. The outage is the test's own: a relay it cuts."""
    caplog.set_level(logging.DEBUG, logger="bastion.db")
    with Relay(("127.0.0.1", 5432)) as relay:
        db = Database(postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}"))
        try:
            assert db.execute("SELECT 1") == [(1,)]
            relay.cut()

            def tried() -> int:
                refused = 0
                try:
                    db.execute("SELECT 1")
                except DatabaseUnavailable:
                    refused = 1
                assert refused
                return sum("cannot connect" in r.getMessage() for r in caplog.records)

            assert eventually(lambda: tried() >= 3)  # attempts to connect that failed
            relay.restore()
            assert eventually(lambda: _answers(db))
        finally:
            db.close()
    loud = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG]
    assert len(loud) == 2, loud
    assert "connection lost" in loud[0] and loud[1].endswith("connected to PostgreSQL again")


def _answers(db: Database) -> bool:
    try:
        return db.execute("SELECT 1") == [(1,)]
    except DatabaseUnavailable:
        return False
