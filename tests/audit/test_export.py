"""Exporting the audit trail: ``bastion audit export`` writes a chained table as JSON lines whose
hashes an auditor recomputes from each line alone, resumes after a seq, and follows new rows; a
copy kept elsewhere lets ``bastion audit verify --export`` catch what a chain inside the database
alone cannot (a chain rewritten whole, or cut at its end), and tell rows pruned since from rows
deleted."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.audit import chain, decisions, export, log
from bastion.audit.decisions import DecisionRecords
from bastion.audit.log import AuditLog
from bastion.cli import main
from bastion.db import Database
from tests.audit.test_tamper_evidence import (
    DAY,
    NOW,
    TABLES,
    _decision,
    _documented_hash,
    _record,
    _rehash,
    _store,
    _trail,
    verify,
)
from tests.waits import eventually

ROOT = Path(__file__).resolve().parents[2]
OPTION = {"decisions": "--decisions", "events": "--events", "decision_log": "--decision-log"}


def run_export(capsys, url: str, *extra: str) -> tuple[int, str, str]:
    """``bastion audit export`` -> (exit status, stdout, stderr)."""
    try:
        code = main(["audit", "export", "--database", url, *extra])
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def exported(capsys, url: str, table: str, file: Path, *extra: str) -> list[dict]:
    code, _, err = run_export(capsys, url, OPTION[table], "--output", str(file), *extra)
    assert code == 0, err
    return [json.loads(text) for text in file.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("table", TABLES)
def test_an_export_holds_each_row_as_stored_and_each_line_hashes_as_documented(
    database_url, tmp_path, capsys, table
):
    """Every row, oldest first, every column as stored: each line's hash is computed again from
    the line alone, by the documented form (docs/operations.md), and each follows the one
    before. More rows than a page; text that is not ASCII, quotes and NULLs included."""
    db = _trail(database_url, records=1200, events=1200, stored=1200)
    AuditLog(db).record("user.created", subject='zoë "q"\n', client_id=None)
    AuditLog(db).chain()
    t = TABLES[table]
    stored = db.execute(
        f"SELECT {', '.join(t.columns)}, prev_hash, hash FROM {t.table} ORDER BY seq"
    )
    db.close()
    file = tmp_path / "copy.jsonl"

    lines = exported(capsys, database_url, table, file)

    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert len(lines) == len(stored) >= 1200
    prev = chain.GENESIS
    for values, row in zip(lines, stored, strict=True):
        assert list(values) == ["table", *t.columns, "prev_hash", "hash"]
        assert values["table"] == t.table
        assert [values[c] for c in (*t.columns, "prev_hash", "hash")] == list(row)
        assert values["prev_hash"] == prev
        assert values["hash"] == _documented_hash(prev, [values[c] for c in t.columns])
        prev = values["hash"]
    code, out, err = verify(capsys, database_url, "--export", str(file))
    assert code == 0, err
    assert f"export {file} ({t.table}, seq 1 to {len(stored)}): OK" in out
    assert f"seq 1 to {len(stored)} stored as exported" in out


def test_an_export_to_standard_output_is_the_same_lines(sqlite_url, tmp_path, capsys):
    _trail(sqlite_url).close()
    code, out, _ = run_export(capsys, sqlite_url, "--events")
    assert code == 0
    file = tmp_path / "copy.jsonl"
    exported(capsys, sqlite_url, "events", file)
    assert out == file.read_text(encoding="utf-8")


@pytest.mark.parametrize("table", TABLES)
def test_an_export_resumed_after_the_last_seq_gives_the_rest_with_no_gap_and_no_overlap(
    database_url, tmp_path, capsys, table
):
    db = _trail(database_url)
    first = exported(capsys, database_url, table, tmp_path / "1.jsonl")
    _more(db, 5)
    db.close()
    rest = exported(
        capsys, database_url, table, tmp_path / "2.jsonl", "--after", str(first[-1]["seq"])
    )
    assert [r["seq"] for r in first + rest] == list(range(1, 16))
    assert rest[0]["prev_hash"] == first[-1]["hash"]
    code, out, err = verify(
        capsys,
        database_url,
        "--export",
        str(tmp_path / "1.jsonl"),
        "--export",
        str(tmp_path / "2.jsonl"),
    )
    assert code == 0, err
    assert "seq 1 to 15 stored as exported" in out
    # Given out of order, the files do not go on from one another: bad input.
    code, _, err = verify(
        capsys,
        database_url,
        "--export",
        str(tmp_path / "2.jsonl"),
        "--export",
        str(tmp_path / "1.jsonl"),
    )
    assert code == 2
    assert "1.jsonl begins at seq 1, and" in err and "ends at seq 15" in err


def _more(db: Database, n: int, start: int = 11) -> None:
    """``n`` more decision records, audit events and stored decisions, chained."""
    written = DecisionRecords(db)
    for k in range(start, start + n):
        written.add(_record(k))
    written.flush()
    _store(db, [_decision(k) for k in range(start, start + n)])
    trail = AuditLog(db, clock=lambda: NOW)
    for k in range(n):
        trail.record("grant.revoked", subject="sam", n=100 + k)
    trail.chain()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("table", TABLES)
def test_a_following_export_writes_rows_recorded_after_it_started_and_stops_on_a_whole_line(
    database_url, tmp_path, capsys, table, stop
):
    """A real ``bastion audit export --follow`` process: it writes what is there, then the rows
    written after it started, as the writers write them; stopped, it exits 0 and its file ends
    with a whole line, which verify takes."""
    db = _trail(database_url)
    file = tmp_path / "follow.jsonl"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            # Ctrl-C as a terminal's process has it: a runner started in the background (a
            # shell's `&`) passes SIGINT on ignored, and Python then keeps it so (as nohup
            # wants), which left nothing for this test to stop.
            "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler);"
            " from bastion.cli import main; sys.exit(main())",
            "audit",
            "export",
            OPTION[table],
            "--follow",
            "--output",
            str(file),
            "--database",
            database_url,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
        text=True,
    )

    def lines() -> int:
        return file.read_text(encoding="utf-8").count("\n") if file.exists() else 0

    try:
        assert eventually(lambda: lines() == 10), (lines(), process.poll())
        _more(db, 5)
        assert eventually(lambda: lines() == 15), lines()
        _more(db, 300, start=16)  # and stopped while it may be writing them
        process.send_signal(stop)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    db.close()
    assert process.returncode == 0, err
    text = file.read_text(encoding="utf-8")
    assert text.endswith("\n")
    seqs = [json.loads(line)["seq"] for line in text.splitlines()]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 15
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    code, _, err = verify(capsys, database_url, "--export", str(file))
    assert code == 0, err


def test_a_following_export_never_writes_over_a_file(sqlite_url, tmp_path, capsys):
    _trail(sqlite_url).close()
    file = tmp_path / "copy.jsonl"
    file.write_text("kept\n")
    code, _, err = run_export(capsys, sqlite_url, "--decisions", "--follow", "--output", str(file))
    assert code == 2
    assert "exists: --follow writes a new file" in err
    assert file.read_text() == "kept\n"


def test_an_interrupted_export_leaves_the_file_as_it_was(sqlite_url, tmp_path, capsys, monkeypatch):
    _trail(sqlite_url, records=2500).close()
    file = tmp_path / "copy.jsonl"
    file.write_text("the export before\n")
    written = export.line
    count = 0

    def interrupted(*args):
        nonlocal count
        count += 1
        if count == 1500:  # in the second page
            raise KeyboardInterrupt
        return written(*args)

    monkeypatch.setattr(export, "line", interrupted)
    code, _, _ = run_export(capsys, sqlite_url, "--decisions", "--output", str(file))
    assert code == 130
    assert file.read_text() == "the export before\n"
    left = [p.name for p in tmp_path.iterdir() if not p.name.startswith("bastion.db")]
    assert left == ["copy.jsonl"]  # and no draft beside it


def _alter(db, t):
    db.execute(f"UPDATE {t.table} SET {t.columns[-1]} = {t.columns[-1]} || ' ' WHERE seq = 5")


def _rewrite_whole(db, t):
    db.execute(f"UPDATE {t.table} SET at = at + 1 WHERE seq = 1")
    _rehash(db, t, 1)


AFTER_THE_EXPORT = {
    # name: (what is done to the database, verify alone finds it, where, what it says)
    "a row altered": (_alter, True, 5, "altered since the export: {last} differs"),
    "a row deleted from the middle": (
        lambda db, t: db.execute(f"DELETE FROM {t.table} WHERE seq = 5"),
        True,
        5,
        "seq 5 is missing: deleted from the middle since the export",
    ),
    "the whole chain rewritten, every hash computed again": (
        _rewrite_whole,
        False,
        1,
        "altered since the export: at, hash differ (at: ",
    ),
    "rows cut from the end": (
        lambda db, t: db.execute(f"DELETE FROM {t.table} WHERE seq > 7"),
        False,
        8,
        "cut: seqs 8 to 10 were deleted from the end of the chain since the export (the"
        " database's newest row is now seq 7)",
    ),
}


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("tampering", AFTER_THE_EXPORT)
def test_tampering_after_an_export_is_caught_against_it(
    database_url, tmp_path, capsys, table, tampering
):
    change, seen_alone, broken_at, said = AFTER_THE_EXPORT[tampering]
    t = TABLES[table]
    db = _trail(database_url)
    file = tmp_path / "copy.jsonl"
    exported(capsys, database_url, table, file)
    change(db, t)
    db.close()

    code, _, _ = verify(capsys, database_url)
    assert (code == 1) is seen_alone  # what the database alone tells
    code, out, err = verify(capsys, database_url, "--export", str(file))
    assert code == 1
    line = next(line for line in err.splitlines() if line.startswith("export "))
    assert line.startswith(f"export {file} ({t.table}, seq 1 to 10): BROKEN at seq {broken_at}: ")
    assert said.format(last=t.columns[-1]) in line


@pytest.mark.parametrize("table", TABLES)
def test_rows_pruned_after_an_export_are_said_pruned_not_altered(
    database_url, tmp_path, capsys, table
):
    db = Database(database_url)
    written = DecisionRecords(db)
    trail = AuditLog(db)
    for n, at in enumerate([NOW - 100 * DAY] * 5 + [NOW - DAY] * 4, start=1):
        written.add(_record(n, at=at))
        trail.clock = lambda at=at: at
        trail.record("grant.revoked", subject="sam", n=n)
    written.flush()
    trail.chain()
    _store(
        db,
        [
            _decision(n, at=at)
            for n, at in enumerate([NOW - 100 * DAY] * 5 + [NOW - DAY] * 4, start=1)
        ],
    )
    db.close()
    file = tmp_path / "copy.jsonl"
    exported(capsys, database_url, table, file)
    assert main(["audit", "prune", "--older-than", "90", "--database", database_url]) == 0
    capsys.readouterr()

    code, out, err = verify(capsys, database_url, "--export", str(file))
    assert code == 0, err
    assert f"export {file} ({TABLES[table].table}, seq 1 to 9): OK" in out
    assert "seqs 1 to 5 pruned since the export (the oldest rows only" in out
    assert "seq 6 to 9 stored as exported" in out
    assert "altered" not in out + err


def test_a_chain_rewritten_after_its_copy_was_pruned_is_caught_where_it_follows_the_copy(
    database_url, tmp_path, capsys
):
    """Everything the copy holds pruned since, and the rest of the chain rewritten from a new
    anchor: the database alone holds together; the row after the copy's last no longer names
    its hash."""
    db = Database(database_url)
    written = DecisionRecords(db)
    for n in range(1, 6):
        written.add(_record(n, at=NOW - 100 * DAY))
    written.flush()
    file = tmp_path / "copy.jsonl"
    exported(capsys, database_url, "decisions", file)
    for n in range(6, 9):
        written.add(_record(n, at=NOW - DAY))
    written.flush()
    assert written.prune(NOW - 90 * DAY) == 5
    db.execute("UPDATE audit_decisions SET prev_hash = ? WHERE seq = 6", ("ab" * 32,))
    _rehash(db, decisions.CHAIN, 6)
    db.close()

    code, _, _ = verify(capsys, database_url)
    assert code == 0
    code, _, err = verify(capsys, database_url, "--export", str(file))
    assert code == 1
    assert "BROKEN at seq 6: the chain does not go on from the copy's last row" in err


CORRUPT = {
    "a line cut short": (lambda text: text[: len(text) // 2], "not a JSON object"),
    "the last line without its end": (lambda text: text.rstrip("\n"), "the last line is cut short"),
    "a key twice": (lambda text: text.replace('{"table"', '{"seq":3,"table"'), "'seq' comes twice"),
    "a column missing": (lambda text: text.replace('"hash":', '"hush":'), "no hash; unknown hush"),
    "not a table of the trail": (lambda text: text.replace("audit_", "x_"), "table must be"),
    "a number that is not JSON": (lambda text: text.replace('"seq":3', '"seq":NaN'), "NaN"),
    "not UTF-8": (lambda text: text.replace("grant", "gr\udcffnt"), "not UTF-8 text"),
}


@pytest.mark.parametrize("corruption", CORRUPT)
def test_a_corrupted_export_line_is_refused_with_its_line_number(
    sqlite_url, tmp_path, capsys, corruption
):
    corrupt, said = CORRUPT[corruption]
    _trail(sqlite_url).close()
    file = tmp_path / "copy.jsonl"
    exported(capsys, sqlite_url, "events", file)
    lines = file.read_text(encoding="utf-8").splitlines(keepends=True)
    index = 2 if corruption != "the last line without its end" else len(lines) - 1
    lines[index] = corrupt(lines[index])
    if corruption == "a line cut short":
        lines[index] += "\n"
    file.write_bytes("".join(lines).encode("utf-8", "surrogateescape"))

    code, _, err = verify(capsys, sqlite_url, "--export", str(file))
    assert code == 2
    assert f"bastion: {file}:{index + 1}: " in err
    assert said in err


def test_a_line_altered_in_the_copy_is_caught_at_its_line(sqlite_url, tmp_path, capsys):
    _trail(sqlite_url).close()
    file = tmp_path / "copy.jsonl"
    exported(capsys, sqlite_url, "decisions", file)
    text = file.read_text(encoding="utf-8").splitlines(keepends=True)
    text[2] = text[2].replace('"result":"allow"', '"result":"deny"')
    file.write_text("".join(text), encoding="utf-8")
    code, _, err = verify(capsys, sqlite_url, "--export", str(file))
    assert code == 1
    assert f"BROKEN at {file}:3: seq 3's columns do not hash to its hash" in err


def test_events_from_before_the_chain_are_exported_marked_so_and_compared(
    database_url, tmp_path, capsys
):
    db = Database(database_url)
    db.migrate("audit", log._MIGRATIONS[:2])
    for n in (1, 2, 3):
        db.execute(
            "INSERT INTO audit_events (id, at, kind, detail) VALUES (?, ?, 'user.created', '{}')",
            (f"old{n}", NOW - n),
        )
    db.close()
    db = _trail(database_url, records=1, events=4)
    file = tmp_path / "copy.jsonl"
    lines = exported(capsys, database_url, "events", file)
    assert [(r["id"], r["seq"], r.get("before_chain")) for r in lines[:3]] == [
        ("old3", 0, True),
        ("old2", 0, True),
        ("old1", 0, True),
    ]
    assert [r["seq"] for r in lines[3:]] == [1, 2, 3, 4]
    assert lines[3]["prev_hash"] == chain.GENESIS and "before_chain" not in lines[3]
    code, out, err = verify(capsys, database_url, "--export", str(file))
    assert code == 0, err
    assert "3 rows from before the chain: 3 stored as exported" in out
    # Resumed after a seq, they are not written again.
    assert [r["seq"] for r in exported(capsys, database_url, "events", file, "--after", "2")] == [
        3,
        4,
    ]

    db.execute("UPDATE audit_events SET kind = 'user.deleted' WHERE id = 'old2'")
    db.close()
    file = tmp_path / "copy.jsonl"
    exported_before = tmp_path / "before.jsonl"
    exported_before.write_text(
        "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in lines)
    )
    code, _, err = verify(capsys, database_url, "--export", str(exported_before))
    assert code == 1
    assert "id old2, from before the chain, altered: kind differs" in err


def test_decision_records_from_before_the_chain_pruned_since_are_said_pruned(
    database_url, tmp_path, capsys
):
    """Decision records from before the chain have their seq and no hash: exported marked so,
    compared by seq, and the oldest of them pruned since are counted with the pruned rows."""
    db = Database(database_url)
    db.migrate("audit_decisions", decisions._MIGRATIONS[:1])
    for n in (1, 2, 3):
        db.execute(
            "INSERT INTO audit_decisions (seq, id, at, server, method, target, principals,"
            " result, arguments_digest, record) VALUES (?, ?, ?, 'desk', 'tools/call', 'T',"
            " '[]', 'allow', '', '{}')",
            (n, f"old{n}", NOW - 100 * DAY),
        )
    db.close()
    db = _trail(database_url, records=4, events=1)
    file = tmp_path / "copy.jsonl"
    lines = exported(capsys, database_url, "decisions", file)
    assert [(r["seq"], r.get("before_chain")) for r in lines] == [
        (1, True),
        (2, True),
        (3, True),
        (4, None),
        (5, None),
        (6, None),
        (7, None),
    ]
    assert DecisionRecords(db).prune(NOW - 90 * DAY) == 3
    db.close()
    code, out, err = verify(capsys, database_url, "--export", str(file))
    assert code == 0, err
    assert "seqs 1 to 3 pruned since the export" in out
    assert "3 rows from before the chain: 0 stored as exported" in out
