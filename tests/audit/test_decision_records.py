"""Decision records as stored: the ``record`` and ``principals`` columns hold the canonical JSON
of the record (sorted keys, compact, non-JSON values as text), byte for byte what the standard
library's encoder writes; decision ids are UUIDs version 7 in hex: the time, then random bits."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
import uuid
from datetime import UTC, datetime
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion import turns
from bastion.audit import decisions
from bastion.audit.buffered import flush_forever
from bastion.audit.commands import _line
from bastion.audit.decisions import (
    DecisionRecord,
    DecisionRecords,
    canonical_json,
    new_decision_id,
)
from bastion.db import Database
from bastion.signals.behavior import LocalBehavior
from tests.waits import PATIENCE

REFERENCE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode

VALUES = [
    "plain",
    'quotes " and \\ and é and \u2028 and \x00',
    0,
    -(2**70),
    1.5,
    -0.0,
    float("nan"),
    float("inf"),
    None,
    True,
    [1, (2, "3"), []],
    {"b": 1, "a": {"z": [datetime(2026, 12, 3, tzinfo=UTC)], "y": {}}},
    {1: "one", 2: "two"},
    {"set": {3}, "object": object.__name__, "bytes": b"x"},
]


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_canonical_json_is_the_standard_encoders_text(value):
    assert canonical_json(value) == REFERENCE(value)


def test_canonical_json_refuses_what_the_standard_encoder_refuses_and_goes_on():
    loop: list = []
    loop.append(loop)
    for refused, error in (({1: 1, "a": 2}, TypeError), (loop, ValueError)):
        with pytest.raises(error):
            REFERENCE(refused)
        with pytest.raises(error):
            canonical_json(refused)
    assert canonical_json([loop[:0], {"a": 1}]) == '[[],{"a":1}]'  # nothing left behind


def test_a_record_is_stored_as_the_canonical_json_of_its_fields(tmp_path):
    database = str(tmp_path / "records.db")
    records = DecisionRecords(Database(database))
    behavior = LocalBehavior(clock=lambda: 120.0)
    view = behavior.view("sam", "agent-1", 'Tool{"desk/search"}')
    view["agent"]["calls"]["minute"]  # read, as an alert or a rule reads it: recorded
    made = [
        DecisionRecord(
            new_decision_id(),
            1.25,
            "desk",
            "tools/call",
            'Tool{"desk/search"}',
            ('User{"sam"}', 'Agent{"agent-1"}'),
            "allow",
            "hmac-sha256:00",
            {"time": datetime(2026, 12, 3, tzinfo=UTC), "behavior": view, "é": ["\u2028"]},
            'Agent{"agent-1"}',
            ("allow(user, action, tool) if ...",),
            {"masks": ["customers.*.email"], "rate_limits": [], "required_scopes": ["a"]},
            "",
            321,
        ),
        DecisionRecord("early", 2.0, "desk", "tools/call", "T", ("U",), "deny", reason="stale"),
    ]
    for record in made:
        records.add(record)
    records.add(made[1], lambda: ("explained",))
    records.add(DecisionRecord("later", 3.0, "desk", "m", "T", (), "allow"), lambda: ("r",))
    assert records.flush() == 4
    with sqlite3.connect(database) as conn:
        rows = conn.execute(
            "SELECT seq, id, principals, record FROM audit_decisions ORDER BY seq"
        ).fetchall()
    later = DecisionRecord("later", 3.0, "desk", "m", "T", (), "allow", rules=("r",))
    # The second "early" is the same decision: not stored twice, and no sequence is skipped
    # (the hash chain links each row to the one stored before it).
    assert [(seq, i) for seq, i, _, _ in rows] == [(1, made[0].id), (2, "early"), (3, "later")]
    for (_, _, principals, text), record in zip(rows, [*made, later], strict=True):
        assert principals == REFERENCE(list(record.principals))
        assert text == REFERENCE(record.to_dict())
    assert records.get(made[0].id).context["behavior"] == json.loads(REFERENCE(view))


def test_a_flush_in_turns_writes_what_a_flush_in_one_turn_writes(tmp_path, monkeypatch):
    """A flush pauses whenever a turn's time is up, so that the event loop's thread gets the GIL;
    the records it writes, in their order, with the rules worked out at write time, are those a
    flush without a pause writes."""
    pauses: list[float] = []
    monkeypatch.setattr(turns.time, "sleep", pauses.append)

    def flushed(turn: float) -> list[tuple[int, dict]]:
        monkeypatch.setattr(turns, "TURN", turn)
        records = DecisionRecords(Database(str(tmp_path / f"{turn}.db")))
        for i in range(40):
            record = DecisionRecord(f"d{i}", float(i), "desk", "tools/call", "T", ("U",), "allow")
            records.add(record, (lambda i=i: (f"rule {i}",)) if i % 3 else None)
        assert records.flush() == 40
        return [(seq, record.to_dict()) for seq, record in records.after(0)]

    whole = flushed(3600.0)
    assert pauses == []
    # A turn over after every record: a pause after each, working out the rules, encoding and
    # chaining.
    assert flushed(0.0) == whole
    assert pauses == [turns.PAUSE] * 120
    assert [seq for seq, _ in whole] == list(range(1, 41))
    assert [r["rules"] for _, r in whole[:3]] == [[], ["rule 1"], ["rule 2"]]


def test_a_flush_waits_for_one_under_way_and_returns_with_every_record_written(
    tmp_path, monkeypatch
):
    """The record writer's flush takes the buffer and pauses between its turns; a flush asked
    meanwhile (at shutdown, or by a test) finds the buffer empty, and must not return before the
    records taken are written."""
    records = DecisionRecords(Database(str(tmp_path / "records.db")))
    for i in range(3):
        records.add(DecisionRecord(f"d{i}", float(i), "desk", "tools/call", "T", ("U",), "allow"))
    monkeypatch.setattr(turns, "TURN", 0.0)
    paused, go = threading.Event(), threading.Event()

    def pause(seconds: float) -> None:  # the writer's first pause holds it until `go`
        paused.set()
        go.wait()

    monkeypatch.setattr(turns.time, "sleep", pause)
    writer = threading.Thread(target=records.flush)
    writer.start()
    assert paused.wait(PATIENCE)
    threading.Timer(0.2, go.set).start()
    assert records.flush() == 0  # nothing was left for it: the writer had taken all three
    assert [r.id for _, r in records.after(0)] == ["d0", "d1", "d2"]
    writer.join(PATIENCE)


def test_a_record_whose_rules_cannot_be_worked_out_is_written_saying_why(tmp_path, caplog):
    """An explanation left to the record writer that raises must not cost the flush its records:
    each is written, the one without its rules saying why, and the failure is logged."""
    records = DecisionRecords(Database(str(tmp_path / "records.db")))

    def broken() -> tuple[str, ...]:
        raise RuntimeError("the policy changed under the explanation")

    for i in range(4):
        record = DecisionRecord(f"d{i}", float(i), "desk", "tools/call", "T", ("U",), "allow")
        records.add(record, broken if i == 1 else (lambda i=i: (f"rule {i}",)))
    with caplog.at_level("ERROR", logger="bastion.audit"):
        assert records.flush() == 4
    written = {r.id: r for _, r in records.after(0)}
    assert [written[f"d{i}"].rules for i in range(4)] == [("rule 0",), (), ("rule 2",), ("rule 3",)]
    assert written["d1"].unexplained == "RuntimeError: the policy changed under the explanation"
    assert [written[i].unexplained for i in ("d0", "d2", "d3")] == ["", "", ""]
    assert "1 decision records written without their rules" in caplog.text
    assert "decision d1, RuntimeError" in caplog.text
    assert " unexplained " in _line(written["d1"]) and "unexplained" not in _line(written["d0"])


def test_a_flush_stopped_while_explaining_keeps_its_records_for_the_next(tmp_path, monkeypatch):
    """A flush interrupted before it writes (here while working out rules) puts back what it took,
    in order, still to be explained; the next flush writes all of it."""
    records = DecisionRecords(Database(str(tmp_path / "records.db")))
    stop = [True]

    def interrupted() -> tuple[str, ...]:
        if stop[0]:
            raise KeyboardInterrupt
        return ("rule 1",)

    for i in range(3):
        record = DecisionRecord(f"d{i}", float(i), "desk", "tools/call", "T", ("U",), "allow")
        records.add(record, interrupted if i == 1 else None)
    with pytest.raises(KeyboardInterrupt):
        records.flush()
    assert records.waiting == 3
    stop[0] = False
    assert records.flush() == 3
    assert [(r.id, r.rules) for _, r in records.after(0)] == [
        ("d0", ()),
        ("d1", ("rule 1",)),
        ("d2", ()),
    ]


def _record(i: int, target: str = "T") -> DecisionRecord:
    return DecisionRecord(f"d{i}", float(i), "desk", "tools/call", target, ("U",), "allow")


def test_a_record_that_cannot_be_stored_holds_back_no_other(database_url, caplog):
    """A record holding text that is not Unicode (half of a surrogate pair, from an upstream
    say) fails the batch it is in at every try: it was put back at the front, and no record
    after it was ever written. Now the batch is written around it, and it alone is dropped,
    logged and counted."""
    records = DecisionRecords(Database(database_url))
    bad = {2, 7}
    for i in range(9):
        records.add(_record(i, "T\ud800" if i in bad else "T"))
    with caplog.at_level("ERROR", logger="bastion.audit"):
        assert records.flush() == 7
    assert [r.id for _, r in records.after(0)] == [f"d{i}" for i in range(9) if i not in bad]
    assert (records.unstorable, records.waiting, records.dropped) == (2, 0, 0)
    # What could not be stored is quoted, escaped: the log line itself is Unicode text.
    assert "decision record d2 ('tools/call' on 'T\\ud800') cannot be stored" in caplog.text
    assert caplog.text.encode("utf-8")
    assert "decision record d7 " in caplog.text
    records.add(_record(9))  # and the next is written as ever
    assert records.flush() == 1
    assert [r.id for _, r in records.after(0)][-1] == "d9"


def test_a_database_failure_while_writing_around_keeps_the_rest_for_the_next_flush(
    tmp_path, monkeypatch
):
    """Written around a record that cannot be stored, a batch may meet a database that fails:
    what is not written yet goes back, in order, to be written by the next flush."""
    from bastion.db import DatabaseUnavailable

    records = DecisionRecords(Database(str(tmp_path / "records.db")))
    for i in range(8):
        records.add(_record(i, "T\udfff" if i == 1 else "T"))
    write, calls = records._write, []

    def failing_once(batch):
        calls.append([r.id for r in batch])
        if len(calls) == 4:  # the whole, its first half, the first quarter; then the second
            raise DatabaseUnavailable("the database is unavailable (lost); retry")
        write(batch)

    monkeypatch.setattr(records, "_write", failing_once)
    with pytest.raises(DatabaseUnavailable):
        records.flush()
    assert calls[:4] == [
        [f"d{i}" for i in range(8)],
        ["d0", "d1", "d2", "d3"],
        ["d0", "d1"],
        ["d0"],
    ]
    # Nothing written; all eight back in order (d1 too: it is tried again, and dropped then).
    assert records.after(0) == [] and records.waiting == 8
    assert records.flush() == 7
    assert [r.id for _, r in records.after(0)] == [f"d{i}" for i in range(8) if i != 1]
    assert records.unstorable == 1


def test_decision_ids_are_uuid7_hex_in_the_order_they_are_made(monkeypatch):
    made = []
    for _ in range(1000):
        before = time.time_ns() // 1_000_000
        decision_id = new_decision_id()
        after = time.time_ns() // 1_000_000
        parsed = uuid.UUID(hex=decision_id)
        assert parsed.hex == decision_id and parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert before <= parsed.int >> 80 <= after  # RFC 9562: unix_ts_ms, the first 48 bits
        made.append((parsed.int >> 80, decision_id))
    # Made in a later millisecond, an id sorts after (as text too: the index orders them so).
    for (ms, earlier), (later_ms, later) in pairwise(made):
        assert ms < later_ms and earlier < later or ms == later_ms
    assert len({decision_id for _, decision_id in made}) == len(made)
    # The 74 bits after the time are drawn at random; the version and the variant are set:
    # 12 digits of milliseconds, 7 and three drawn, 8 to b (the variant) and fifteen drawn.
    monkeypatch.setattr(decisions.time, "time_ns", lambda: 0x0123456789AB * 1_000_000 + 999_999)
    for fill, expected in (
        (b"\x00", "0123456789ab70008000000000000000"),
        (b"\xff", "0123456789ab7fffbfffffffffffffff"),
        (b"\x5a", "0123456789ab7a5a9a5a5a5a5a5a5a5a"),
    ):
        monkeypatch.setattr(decisions.os, "urandom", lambda n, fill=fill: fill * n)
        assert new_decision_id() == expected


FULL = {
    "id": "d1",
    "at": 1.0,
    "server": "desk",
    "method": "tools/call",
    "target": "T",
    "principals": ("U",),
    "result": "allow",
    "arguments_digest": "hmac-sha256:00",
    "context": {"server": "desk"},
    "deciding_principal": "U",
    "rules": ("r",),
    "obligations": {"masks": []},
    "reason": "",
    "latency_us": 12,
}


@pytest.mark.parametrize(
    "given",
    [
        FULL,
        {
            k: FULL[k]
            for k in ("id", "at", "server", "method", "target", "principals", "result", "context")
        },
    ],
)
def test_a_record_made_from_its_fields_is_the_one_its_constructor_makes(given):
    made, constructed = DecisionRecord.of(given), DecisionRecord(**given)
    assert made == constructed and vars(made) == vars(constructed)
    if "obligations" not in given:  # a default dict is made for each record
        assert (
            made.obligations == {} and DecisionRecord.of(given).obligations is not made.obligations
        )
    with pytest.raises(AttributeError):
        made.result = "deny"  # frozen, as constructed


def test_a_record_made_from_wrong_fields_is_refused_as_its_constructor_refuses_it():
    with pytest.raises(TypeError, match="unexpected keyword argument 'extra'"):
        DecisionRecord.of({**FULL, "extra": 1})
    with pytest.raises(TypeError, match="'result'"):
        DecisionRecord.of({k: v for k, v in FULL.items() if k != "result"})


texts = st.text(max_size=8)  # any code point: escapes, non-ASCII, quotes
numbers = st.one_of(st.none(), st.integers(-2, 2), st.booleans(), st.floats(allow_nan=False))
records = st.builds(
    DecisionRecord,
    id=texts,
    at=st.floats(),
    server=texts,
    method=texts,
    target=texts,
    principals=st.lists(texts, max_size=3).map(tuple),
    result=texts,
    arguments_digest=texts,
    context=st.dictionaries(texts, st.one_of(numbers, texts), max_size=3),
    deciding_principal=texts,
    rules=st.lists(texts, max_size=2).map(tuple),
    obligations=st.dictionaries(texts, st.lists(texts, max_size=2), max_size=2),
    reason=texts,
    latency_us=st.integers(0, 10**6),
    unexplained=texts,
    policy_version=numbers,
    sequence=numbers,
    grant_id=texts,
    task=texts,
    session=texts,
    recovered=numbers,
)


@settings(max_examples=500, deadline=None)
@given(written=st.lists(records, min_size=1, max_size=6))
def test_a_row_holds_the_canonical_json_of_its_own_record_whatever_came_before(written):
    """What the records of one answer share is encoded once and kept: each row still holds its
    own record's text, byte for byte (the same values of another type included: 1 and True)."""
    for record in written + written[::-1]:
        row = decisions._row(record)
        assert row[5] == REFERENCE(list(record.principals))
        assert row[8] == REFERENCE(record.to_dict())


def test_a_flush_that_keeps_failing_the_same_way_is_logged_once_and_once_again(tmp_path, caplog):
    """The rounds that write buffered records (every 0.2 s) said a database outage once, but
    any other failure with a traceback at every round. Here the table is taken away (renamed
    by another connection: an operator's mistake) and given back: the failure is logged once,
    with its traceback, for as long as it stays the same, and once that records are written
    again; the rounds between at DEBUG."""
    caplog.set_level(logging.DEBUG, logger="bastion.audit")
    database = str(tmp_path / "records.db")
    records = DecisionRecords(Database(database))
    records.add(_record(0))
    assert records.flush() == 1
    other = sqlite3.connect(database, isolation_level=None)

    def said(level: int = logging.DEBUG) -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name == "bastion.audit" and r.levelno >= level and "records" in r.getMessage()
        ]

    async def scenario() -> None:
        rounds = asyncio.create_task(flush_forever(records, every=0.01))
        try:
            other.execute("ALTER TABLE audit_decisions RENAME TO audit_decisions_away")
            records.add(_record(1))
            async with asyncio.timeout(PATIENCE):
                while len(said()) < 6:  # rounds that failed
                    await asyncio.sleep(0.01)
            other.execute("ALTER TABLE audit_decisions_away RENAME TO audit_decisions")
            async with asyncio.timeout(PATIENCE):
                # Until the round that wrote them says so: ``waiting`` is 0 as soon as that
                # round's thread takes the records, before they are written and it is said.
                while not any("again" in r.getMessage() for r in said(logging.WARNING)):
                    await asyncio.sleep(0.01)
        finally:
            rounds.cancel()
            await asyncio.gather(rounds, return_exceptions=True)

    asyncio.run(scenario())
    other.close()
    loud = said(logging.WARNING)
    assert len(loud) == 2, [r.getMessage() for r in loud]
    assert loud[0].exc_info and "no such table" in str(loud[0].exc_info[1])
    assert "again" in loud[1].getMessage()
    assert [r.id for _, r in records.after(0)] == ["d0", "d1"]
