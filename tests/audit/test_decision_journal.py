"""No decision record is lost when a gateway process is killed outright (SIGKILL, the OOM killer):
each decision is appended to a journal file before its call goes upstream, and the next start
writes every journalled decision the database lacks, marked as recovered."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.audit import chain
from bastion.audit import journal as journal_module
from bastion.audit.commands import _line
from bastion.audit.decision_log import CHAIN as SERVICE_CHAIN
from bastion.audit.decision_log import JOURNALLED as SERVICE
from bastion.audit.decision_log import DecisionStore, stored
from bastion.audit.decisions import DecisionRecord, DecisionRecords, new_decision_id
from bastion.audit.journal import (
    JOURNALED,
    DecisionJournal,
    database_identity,
    open_journal,
    recover_journals,
)
from bastion.audit.log import AuditLog
from bastion.db import Database, DatabaseUnavailable
from bastion.gateway.enforce import Enforcer
from bastion.server.api.decisions import DecisionLog
from bastion.server.api.decisions import DecisionRecord as LoggedRecord
from bastion.server.config import ConfigError, ServerConfig
from tests.gateway.streams import messages, modern_headers, modern_request
from tests.gateway.support import Running, bastion_serve, serve_quickstart, start, stop
from tests.waits import PATIENCE, eventually

QUICKSTART_PASSWORD = "quickstart-password"  # examples/quickstart/setup.py
SEARCH = 'Tool{"desk/search_customers"}'

# The quickstart's upstream, but a search for "slow" waits (after noting it was asked) until
# bastion, its parent, has died (at most 120 s: `tests.waits.PATIENCE`): a call still at its
# upstream when bastion dies, however long a busy machine takes to get there (a wait of 20 s
# could end first, and the call be recorded as any other).
SLOW_DESK = """
import os, sys, time
sys.path.insert(0, {folder!r})
import server as desk

noted = desk.trace

def trace(kind, **detail):
    noted(kind, **detail)
    if detail.get("query") == "slow":
        parent, deadline = os.getppid(), time.monotonic() + 120
        while os.getppid() == parent and time.monotonic() < deadline:
            time.sleep(0.05)

desk.trace = trace
desk.main()
"""


def _search(http: httpx.Client, url: str, token: str, query: str, request_id: int) -> dict:
    response = http.post(
        f"{url}/mcp/desk",
        json=modern_request(
            request_id, "tools/call", {"name": "search_customers", "arguments": {"query": query}}
        ),
        headers=modern_headers(token, "tools/call", "search_customers"),
    )
    assert response.status_code == 200, response.text
    return messages(response)[-1]


def _records(database: Path) -> list[dict]:
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT record FROM audit_decisions ORDER BY seq").fetchall()
    return [json.loads(row[0]) for row in rows]


def _traced(trace: Path, query: str) -> bool:
    return eventually(
        lambda: (
            trace.exists()
            and any(
                json.loads(line).get("query") == query for line in trace.read_text().splitlines()
            )
        ),
        every=0.02,
    )


def test_a_gateway_killed_outright_loses_no_decision_record(tmp_path):
    folder = str(Path(__file__).resolve().parents[2] / "examples" / "quickstart")
    (tmp_path / "slow_desk.py").write_text(SLOW_DESK.format(folder=folder))
    trace = tmp_path / "upstream-trace.jsonl"
    server, url = serve_quickstart(
        tmp_path,
        env={"DEMO_TRACE": str(trace)},
        replace={'"examples/quickstart/server.py"': json.dumps(str(tmp_path / "slow_desk.py"))},
    )
    try:
        with httpx.Client(timeout=httpx.Timeout(10, read=60)) as http:
            running = Running(url, None, None, None, http, None, password=QUICKSTART_PASSWORD)
            token = running.token("sam", "desk")
            # One call still at its upstream (which has acted on it) when bastion dies...
            waiting = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import httpx, json, sys;"
                    "httpx.post(sys.argv[1], json=json.loads(sys.argv[2]),"
                    " headers=json.loads(sys.argv[3]), timeout=60)",
                    f"{url}/mcp/desk",
                    json.dumps(
                        modern_request(
                            99,
                            "tools/call",
                            {"name": "search_customers", "arguments": {"query": "slow"}},
                        )
                    ),
                    json.dumps(modern_headers(token, "tools/call", "search_customers")),
                ],
                stderr=subprocess.DEVNULL,
            )
            try:
                assert _traced(trace, "slow"), "the slow call never reached the upstream"
                # ...and calls answered, the last just before it dies.
                answered = 0
                for n in range(20):
                    answer = _search(http, url, token, f"ada-{n}", n)
                    assert "result" in answer, answer
                    answered += 1
                server.send_signal(signal.SIGKILL)
                server.wait(PATIENCE)
            finally:
                waiting.wait(PATIENCE)
        searches = [r for r in _records(tmp_path / "bastion.db") if r["target"] == SEARCH]
        lost_on_kill = answered + 1 - len(searches)

        server, url = bastion_serve(tmp_path / "bastion.toml", url, {"DEMO_TRACE": str(trace)})
        searches = [r for r in _records(tmp_path / "bastion.db") if r["target"] == SEARCH]
        # Every call's decision is there, the one at its upstream too; those written from the
        # journal say so, and are all that SIGKILL had kept from the database.
        assert len(searches) == answered + 1, (lost_on_kill, searches)
        assert len({r["id"] for r in searches}) == answered + 1
        recovered = [r for r in searches if r.get("recovered")]
        assert len(recovered) == lost_on_kill
        assert all(r["result"] == "allow" and r["principals"] for r in recovered)
        assert all(r["arguments_digest"] for r in recovered)
        # The one at its upstream when bastion died can only have been recovered.
        assert recovered, "SIGKILL right after the answers kept no decision from the database"
        log = (tmp_path / "serve.log").read_text()
        assert f"recovered {lost_on_kill} decision records" in log, log
        with sqlite3.connect(tmp_path / "bastion.db") as db:
            detail = db.execute(
                "SELECT detail FROM audit_events WHERE kind = 'decisions.recovered'"
            ).fetchall()
        assert [json.loads(d)["recovered"] for (d,) in detail] == [lost_on_kill]
        # The dead process's journal is gone; the live one's is all that is left.
        journals = list((tmp_path / "bastion.db.decisions").glob("*.journal"))
        assert len(journals) == 1
    finally:
        if server.poll() is None:
            stop(server)


def test_a_live_gateway_recovers_the_journal_of_a_replica_that_died_beside_it(
    tmp_path, monkeypatch
):
    """Replicas sharing a journal directory: one that dies is recovered by a live one within a
    sweep, whether or not it is started again."""
    monkeypatch.setattr(journal_module, "SWEEP_SECONDS", 0.3)
    with start(tmp_path) as running:
        folder = Path(running.records.journal.directory)
        dead = DecisionJournal(folder, running.records.journal.database)
        taken = _decision(1)
        dead.append(taken)
        os.close(dead._fd)  # its process is killed
        # Removed once its records are stored.
        assert eventually(
            lambda: _journals(folder) == [running.records.journal.path], every=0.05
        ), "the live gateway never recovered the journal"
        assert running.records.get(taken["id"]).recovered
    # Stopped cleanly with every decision stored: its own journal goes too.
    assert _journals(folder) == []


def test_a_gateway_whose_journal_cannot_be_written_does_not_start(tmp_path):
    """Fail closed: a gateway that could lose its decisions to a kill never takes a call."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(AssertionError, match="decision_journal_dir: the gateway journals"):
        serve_quickstart(tmp_path, env={"BASTION_DECISION_JOURNAL_DIR": str(blocker / "j")})


# -- the journal itself, on a real SQLite file or PostgreSQL schema ------------------------------


def _decision(n: int, **more) -> dict:
    """The fields of a decision as the gateway gives them (`Enforcer._fields`)."""
    return {
        "id": new_decision_id() + f"{n:04d}",
        "at": 1_700_000_000.0 + n,
        "server": "desk",
        "method": "tools/call",
        "target": SEARCH,
        "principals": ('User{"sam"}', 'Agent{"agent-1"}'),
        "result": "allow",
        "arguments_digest": f"hmac-sha256:{n:064x}",
        "context": {"tool": "search_customers"},
        "deciding_principal": 'Agent{"agent-1"}',
        "rules": (),
        "obligations": {},
        "reason": "",
        "latency_us": 12,
        "policy_version": 3,
        "sequence": 41,
        "grant_id": "g-1",
        "task": "",
        "session": "s-1",
        **more,
    }


def _journals(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.journal"))


def test_a_journal_is_emptied_once_its_decisions_are_stored_and_removed_on_a_clean_stop(
    tmp_path, database_url
):
    records = DecisionRecords(Database(database_url))
    journal = records.journal = DecisionJournal(tmp_path / "j", database_identity(database_url))
    header = journal.path.read_bytes()
    taken = [_decision(n) for n in range(3)]
    for fields in taken:
        journal.append(fields)
    assert len(journal.path.read_bytes().splitlines()) == 4
    # Two answered and written; the third still at its upstream: the journal keeps all three.
    for fields in taken[:2]:
        records.add(DecisionRecord.of(fields))
    records.flush()
    assert journal.waiting == 1 and len(journal.path.read_bytes().splitlines()) == 4
    records.add(DecisionRecord.of(taken[2]))
    records.flush()
    assert journal.waiting == 0 and journal.path.read_bytes() == header
    journal.close()
    assert _journals(tmp_path / "j") == []


def test_a_journal_past_its_size_is_rewritten_with_only_the_decisions_not_stored(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(journal_module, "REWRITE_BYTES", 4096)
    database = str(tmp_path / "bastion.db")
    records = DecisionRecords(Database(database))
    journal = records.journal = DecisionJournal(tmp_path / "j", database_identity(database))
    at_upstream = _decision(0)
    journal.append(at_upstream)
    answered = [_decision(n) for n in range(1, 40)]
    for fields in answered:
        journal.append(fields)
        records.add(DecisionRecord.of(fields))
    path = journal.path
    before = os.stat(path).st_ino
    records.flush()
    # A new file in the same place, holding the header and the one decision not stored.
    assert _journals(tmp_path / "j") == [path] and os.stat(path).st_ino != before
    lines = path.read_bytes().splitlines()
    assert len(lines) == 2 and at_upstream["id"].encode() in lines[1]
    later = _decision(99)
    journal.append(later)  # goes to the new file
    assert later["id"].encode() in path.read_bytes()
    os.close(journal._fd)  # the process dies: nothing flushed, nothing removed
    assert recover_journals(tmp_path / "j", records, database_identity(database)) == 2
    assert {r.id for r in _stored(records) if r.recovered} == {at_upstream["id"], later["id"]}


# -- forced to the disk (`[server] decision_journal_fsync`) -------------------------------------
#
# A real power loss cannot be made here: the tests run on a kernel and a disk they do not own
# (cutting either would take the test with it, and a virtual disk's host may keep what the guest
# forced in a cache of its own). What they check is bastion's part: that the writer asks the
# kernel to put the journal on the disk (fsync on the journal's own file, counted by a wrapper of
# `os.fsync`) at each flush after something was appended, never on the call path (`append`), and
# not at all with the setting off.


def _forced(monkeypatch) -> list[tuple[int, str]]:
    """`os.fsync`, wrapped: the inode and name of each file or directory forced to the disk."""
    forced: list[tuple[int, str]] = []
    fsync = os.fsync

    def counted(fd: int) -> None:
        forced.append((os.fstat(fd).st_ino, os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", counted)
    return forced


def _times(forced: list[tuple[int, str]], inode: int) -> int:
    return sum(1 for synced, _ in forced if synced == inode)


def _appended_and_flushed(tmp_path, database_url, fsync: bool, forced) -> tuple[int, int, list]:
    """Three calls decided, two answered and written, one at its upstream; then flushes with
    nothing new, and after one more call. The journal's and its directory's inodes, and how
    often the journal was forced once made (its first line), and after each step."""
    records = DecisionRecords(Database(database_url))
    journal = DecisionJournal(tmp_path / "j", database_identity(database_url), fsync=fsync)
    records.journal = journal
    inode, folder = os.stat(journal.path).st_ino, os.stat(tmp_path / "j").st_ino
    counts = [_times(forced, inode)]
    taken = [_decision(n) for n in range(3)]
    for fields in taken:
        journal.append(fields)
    counts.append(_times(forced, inode))  # appended: the call path forces nothing
    for fields in taken[:2]:
        records.add(DecisionRecord.of(fields))
    records.flush()
    counts.append(_times(forced, inode))
    records.flush()  # nothing appended since
    counts.append(_times(forced, inode))
    journal.append(_decision(3))  # a call at its upstream, with no record to write yet
    records.flush()
    counts.append(_times(forced, inode))
    journal.close()
    return inode, folder, counts


def test_with_fsync_the_journal_is_forced_to_the_disk_at_each_flush(
    tmp_path, database_url, monkeypatch
):
    forced = _forced(monkeypatch)
    inode, folder, counts = _appended_and_flushed(tmp_path, database_url, True, forced)
    # Made (its first line, before it is put in place), then once per flush that follows an
    # append, never by the append itself.
    assert counts == [1, 1, 2, 2, 3]
    # Its name in the directory too, once (a new file's entry is the directory's to keep).
    assert _times(forced, folder) == 1


def test_without_fsync_the_journal_is_never_forced_to_the_disk(tmp_path, database_url, monkeypatch):
    forced = _forced(monkeypatch)
    inode, folder, counts = _appended_and_flushed(tmp_path, database_url, False, forced)
    assert counts == [0, 0, 0, 0, 0]
    assert _times(forced, folder) == 0


def test_with_fsync_a_rewritten_journal_is_on_the_disk_before_it_takes_the_old_ones_place(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(journal_module, "REWRITE_BYTES", 4096)
    forced = _forced(monkeypatch)
    database = str(tmp_path / "bastion.db")
    records = DecisionRecords(Database(database))
    journal = DecisionJournal(tmp_path / "j", database_identity(database), fsync=True)
    records.journal = journal
    at_upstream = _decision(0)
    journal.append(at_upstream)
    for fields in [_decision(n) for n in range(1, 40)]:
        journal.append(fields)
        records.add(DecisionRecord.of(fields))
    before = os.stat(journal.path).st_ino
    del forced[:]
    records.flush()
    after = os.stat(journal.path).st_ino
    assert after != before  # rewritten
    # Forced under its hidden name, before it was put in place; then its name in the directory.
    assert forced[0][0] == after and forced[0][1].endswith(".new"), forced
    assert _times(forced, os.stat(tmp_path / "j").st_ino) == 1
    journal.close()


def test_a_journal_that_cannot_be_forced_to_the_disk_is_logged_once_and_tried_again(
    tmp_path, monkeypatch, caplog
):
    """An fsync refused (an I/O error, a full disk) stops no flush and no call: logged at the
    first failure of the outage, tried again at each flush, and logged again once it succeeds."""
    caplog.set_level(logging.WARNING, logger="bastion.audit")
    database = str(tmp_path / "bastion.db")
    records = DecisionRecords(Database(database))
    journal = DecisionJournal(tmp_path / "j", database_identity(database), fsync=True)
    records.journal = journal
    inode = os.stat(journal.path).st_ino
    fsync, refused = os.fsync, []

    def failing(fd: int) -> None:
        if os.fstat(fd).st_ino == inode:
            refused.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    for n in range(3):
        journal.append(_decision(n))  # calls still at their upstreams
        records.flush()
    assert len(refused) == 3
    errors = [r for r in caplog.records if "cannot be forced to the disk" in r.getMessage()]
    assert len(errors) == 1 and errors[0].levelname == "ERROR"
    monkeypatch.setattr(os, "fsync", fsync)  # the disk is back
    forced = _forced(monkeypatch)
    records.flush()  # nothing appended since the last try: tried again all the same
    assert _times(forced, inode) == 1
    assert any("is forced to the disk again" in r.getMessage() for r in caplog.records)
    assert not journal.unsynced
    journal.close()


def test_a_gateway_forces_its_journal_to_the_disk_by_default_while_calls_are_at_their_upstreams(
    tmp_path, monkeypatch
):
    forced = _forced(monkeypatch)
    with start(tmp_path) as running:
        journal = running.records.journal
        inode = os.stat(journal.path).st_ino
        before = _times(forced, inode)
        # A call let through and still at its upstream: no record waits to be written.
        taken = _decision(1)
        journal.append(taken)
        assert eventually(lambda: _times(forced, inode) != before, every=0.05), (
            "the gateway never forced its journal to the disk"
        )
        running.records.add(DecisionRecord.of(taken))  # answered


@pytest.mark.parametrize(
    ("toml", "env"),
    [('decision_journal_fsync = "sometimes"', {}), ("", {"BASTION_DECISION_JOURNAL_FSYNC": "2"})],
)
def test_decision_journal_fsync_is_true_or_false_and_nothing_else(tmp_path, toml, env):
    file = tmp_path / "bastion.toml"
    file.write_text(f"[server]\n{toml}\n")
    with pytest.raises(ConfigError, match="decision_journal_fsync must be true or false, got"):
        ServerConfig.load(file, env=env)
    file.write_text("[server]\ndecision_journal_fsync = false\n")
    assert ServerConfig.load(file, env={}).decision_journal_fsync is False
    assert (
        ServerConfig.load(
            tmp_path / "bastion.toml", env={"BASTION_DECISION_JOURNAL_FSYNC": "on"}
        ).decision_journal_fsync
        is True
    )


def test_a_server_given_a_bad_decision_journal_fsync_does_not_start(tmp_path):
    with pytest.raises(
        AssertionError,
        match="BASTION_DECISION_JOURNAL_FSYNC: decision_journal_fsync must be true or false",
    ):
        serve_quickstart(tmp_path, env={"BASTION_DECISION_JOURNAL_FSYNC": "maybe"})


def _stored(records: DecisionRecords) -> list[DecisionRecord]:
    return [record for _, record in records.after(0, limit=10_000)]


def test_a_journal_with_a_torn_last_line_is_read_up_to_that_line(tmp_path, database_url):
    records = DecisionRecords(Database(database_url))
    database = database_identity(database_url)
    journal = DecisionJournal(tmp_path / "j", database)
    taken = [_decision(n) for n in range(3)]
    for fields in taken:
        journal.append(fields)
    records.add(DecisionRecord.of(taken[0]))  # its record was written before the process died
    records.flush()
    os.close(journal._fd)
    # The process died while the disk took a fourth line: half of it is there.
    last = _decision(3)
    with open(journal.path, "ab") as file:
        file.write(b'["' + last["id"].encode() + b'",1700000003.0,"desk","tools/c')
    assert recover_journals(tmp_path / "j", records, database) == 2
    stored = {record.id: record for record in _stored(records)}
    assert set(stored) == {fields["id"] for fields in taken}
    assert not stored[taken[0]["id"]].recovered
    for fields in taken[1:]:
        record = stored[fields["id"]]
        assert record.recovered
        # What the journal line kept of the decision, as the record would have said it.
        for name in JOURNALED:
            assert getattr(record, name) == fields[name], name
        assert record.context == {} and record.rules == () and record.obligations == {}
        assert " recovered " in _line(record)  # as `bastion audit tail` shows it
    assert _journals(tmp_path / "j") == []
    events = AuditLog(records.db).events("decisions.recovered")
    assert [e.detail for e in events] == [
        {
            "journal": journal.path.name,
            "recovered": 2,
            "decisions": 3,
            "unreadable": 0,
            "torn": True,
        }
    ]


@pytest.mark.parametrize(
    ("more", "result", "reason"),
    [
        ({"result": "deny", "reason": "labels_unavailable"}, "deny", "labels_unavailable"),
        ({"reason": "upstream did not answer"}, "allow", "upstream did not answer"),
    ],
)
def test_a_process_killed_after_refusing_a_call_it_allowed_recovers_the_refusal(
    tmp_path, database_url, more, result, reason
):
    """The gateway journals a decision as the policy took it, then bastion may refuse the call
    (its result withheld, its labels not kept, a relayed request never sent): a process killed
    before that record is stored must not leave the call recorded as allowed."""
    records = DecisionRecords(Database(database_url))
    database = database_identity(database_url)
    journal = records.journal = DecisionJournal(tmp_path / "j", database)
    enforcer = Enforcer(lambda: None, records)
    allowed, untouched = _decision(0), _decision(1)
    journal.append(allowed)
    journal.append(untouched)
    enforcer.write(allowed, **more)
    enforcer.write(untouched, obligations={"masks": ["ssn"]})  # no journalled value changed
    assert len(journal.path.read_bytes().splitlines()) == 4  # the header, three decisions
    os.close(journal._fd)  # killed before the writer's flush: nothing stored
    assert recover_journals(tmp_path / "j", DecisionRecords(records.db), database) == 2
    stored = {record.id: record for record in _stored(records)}
    assert (stored[allowed["id"]].result, stored[allowed["id"]].reason) == (result, reason)
    assert (stored[untouched["id"]].result, stored[untouched["id"]].reason) == ("allow", "")
    assert all(record.recovered for record in stored.values())


def test_a_rewritten_journal_keeps_the_last_word_on_each_decision(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "REWRITE_BYTES", 2048)
    database = str(tmp_path / "bastion.db")
    records = DecisionRecords(Database(database))
    journal = records.journal = DecisionJournal(tmp_path / "j", database_identity(database))
    refused, racing = _decision(0), _decision(1)
    journal.append(refused)
    journal.append(racing)
    journal.amend(refused, {"result": "deny", "reason": "answer_withheld"})
    answered = [_decision(n) for n in range(2, 30)]
    for fields in answered:
        journal.append(fields)
        records.add(DecisionRecord.of(fields))
    begin = journal._begin_file

    def amended_meanwhile(content: bytes):
        # The other decision is held while the rewrite writes its new file, outside the lock.
        journal.amend(racing, {"result": "held", "reason": "review_pending"})
        return begin(content)

    monkeypatch.setattr(journal, "_begin_file", amended_meanwhile)
    records.flush()  # past its size: rewritten with the two decisions not stored
    assert len(journal.path.read_bytes().splitlines()) == 4  # the header, two, one amended
    os.close(journal._fd)
    recovering = DecisionRecords(records.db)
    assert recover_journals(tmp_path / "j", recovering, database_identity(database)) == 2
    stored = {record.id: record for record in _stored(records)}
    assert (stored[refused["id"]].result, stored[refused["id"]].reason) == (
        "deny",
        "answer_withheld",
    )
    assert (stored[racing["id"]].result, stored[racing["id"]].reason) == ("held", "review_pending")


HOLDER = """
import sys, time
from bastion.audit.journal import DecisionJournal
journal = DecisionJournal(sys.argv[1], sys.argv[2])
journal.append({name: {"principals": [], "at": 1.0}.get(name, "x") for name in sys.argv[3:]})
print(journal.path, flush=True)
time.sleep(120)
"""


def test_a_journal_locked_by_a_live_process_is_not_touched_by_another(tmp_path):
    database = str(tmp_path / "bastion.db")
    records = DecisionRecords(Database(database))
    identity = database_identity(database)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "j"), identity, *JOURNALED],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        path = Path(holder.stdout.readline().strip())
        content = path.read_bytes()
        assert recover_journals(tmp_path / "j", records, identity) == 0
        assert path.read_bytes() == content and _stored(records) == []
    finally:
        holder.kill()
        holder.wait()
    # Once its process is dead, the next sweep takes it.
    assert recover_journals(tmp_path / "j", records, identity) == 1
    assert [record.recovered for record in _stored(records)] == [True]
    assert _journals(tmp_path / "j") == []


def test_two_processes_never_both_recover_the_same_journal(tmp_path, database_url):
    """Each recovery takes the journal's lock first: with several sweeping the same directory
    at once, each dead journal is recovered, and reported, by one of them."""
    database = database_identity(database_url)
    for n in range(4):
        journal = DecisionJournal(tmp_path / "j", database)
        for k in range(25):
            journal.append(_decision(n * 100 + k))
        os.close(journal._fd)
    counts: list[int] = []
    start = threading.Barrier(4)

    def sweep() -> None:
        records = DecisionRecords(Database(database_url))
        start.wait()
        counts.append(recover_journals(tmp_path / "j", records, database))

    sweepers = [threading.Thread(target=sweep) for _ in range(4)]
    for thread in sweepers:
        thread.start()
    for thread in sweepers:
        thread.join(PATIENCE)
    records = DecisionRecords(Database(database_url))
    assert sum(counts) == 100 and len(_stored(records)) == 100
    assert len(AuditLog(records.db).events("decisions.recovered")) == 4


# A gateway's journal and record writer, in a process of its own, told over stdin which decisions
# it takes (journalled, their calls at their upstreams) and which are answered (their records
# written); it answers with its journal's inode once the records are stored.
OWNER = """
import json, os, sys
from bastion.audit import journal
from bastion.audit.decisions import DecisionRecord, DecisionRecords
from bastion.db import Database
journal.REWRITE_BYTES = 4096
records = DecisionRecords(Database(sys.argv[1]))
records.journal = journal.DecisionJournal(sys.argv[2], journal.database_identity(sys.argv[1]))
print(records.journal.path, flush=True)
for line in sys.stdin:
    command, decisions = json.loads(line)
    for fields in decisions:
        if command == "take":
            records.journal.append(fields)
        else:
            records.add(DecisionRecord.of(fields))
    records.flush()
    print(os.stat(records.journal.path).st_ino, flush=True)
"""


def _tell(owner: subprocess.Popen, command: str, decisions: list[dict]) -> int:
    owner.stdin.write(json.dumps([command, decisions]) + "\n")
    owner.stdin.flush()
    return int(owner.stdout.readline())


def test_a_journal_rewritten_while_another_process_recovers_it_loses_no_decision_and_none_twice(
    tmp_path, database_url
):
    """A sweeper opens a live process's journal, and before it tries the lock the owner
    rewrites that journal (past `REWRITE_BYTES`: a new file put in its place, the old one
    closed, its lock with it). The lock the sweeper then gets is the old file's, no sign that
    its owner died: it recovers nothing and leaves the new file be. The call still at its
    upstream is stored once, by its owner; a decision the owner takes later is recovered once
    the owner is killed outright."""
    folder, database = tmp_path / "j", database_identity(database_url)
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, database_url, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        path = Path(owner.stdout.readline().strip())
        at_upstream, answered = _decision(0), [_decision(n) for n in range(1, 40)]
        first = _tell(owner, "take", [at_upstream, *answered])

        # The sweeper, in a thread, stops once it has opened the journal, before its lock.
        opened, go_on = threading.Event(), threading.Event()

        def pause(frame, event, arg) -> None:
            if (
                event == "c_return"
                and arg is os.open
                and frame.f_code is journal_module._recover.__code__
            ):
                opened.set()
                go_on.wait(PATIENCE)

        swept: list[int] = []

        def sweep() -> None:
            records = DecisionRecords(Database(database_url))
            sys.setprofile(pause)
            try:
                swept.append(recover_journals(folder, records, database))
            finally:
                sys.setprofile(None)

        sweeper = threading.Thread(target=sweep)
        sweeper.start()
        try:
            assert opened.wait(PATIENCE), "the sweeper never opened the journal"
            # Thirty-nine answered and stored: the journal, past 4 KiB, is rewritten.
            assert _tell(owner, "answered", answered) != first
        finally:
            go_on.set()
            sweeper.join(PATIENCE)
        assert swept == [0]
        records = DecisionRecords(Database(database_url))
        assert [r.id for r in _stored(records)] == [fields["id"] for fields in answered]
        assert _journals(folder) == [path] and at_upstream["id"].encode() in path.read_bytes()

        # The call at its upstream is answered; another is taken; then the owner is killed.
        later = _decision(40)
        _tell(owner, "answered", [at_upstream])
        _tell(owner, "take", [later])
    finally:
        owner.kill()
        owner.wait()
    assert recover_journals(folder, records, database) == 1
    stored = _stored(records)
    assert sorted(r.id for r in stored) == sorted(
        fields["id"] for fields in [*answered, at_upstream, later]
    )
    assert [r.id for r in stored if r.recovered] == [later["id"]]
    assert _journals(folder) == []


def test_a_journal_of_another_database_is_left_alone(tmp_path):
    ours, theirs = str(tmp_path / "ours.db"), str(tmp_path / "theirs.db")
    journal = DecisionJournal(tmp_path / "j", database_identity(theirs))
    journal.append(_decision(1))
    os.close(journal._fd)
    records = DecisionRecords(Database(ours))
    assert recover_journals(tmp_path / "j", records, database_identity(ours)) == 0
    assert _journals(tmp_path / "j") == [journal.path] and _stored(records) == []
    assert (
        recover_journals(
            tmp_path / "j", DecisionRecords(Database(theirs)), database_identity(theirs)
        )
        == 1
    )


def test_a_journal_stays_while_the_database_cannot_take_its_records(tmp_path, outage):
    """A sweep while the database is away leaves the journal in place; the next one, once it
    is back, recovers it."""
    url = outage.url(outage.role())
    records = DecisionRecords(Database(url))
    database = database_identity(url)
    journal = DecisionJournal(tmp_path / "j", database)
    journal.append(_decision(1))
    os.close(journal._fd)
    outage.block(outage.roles[0])
    with pytest.raises(DatabaseUnavailable):
        recover_journals(tmp_path / "j", records, database)
    assert _journals(tmp_path / "j") == [journal.path]
    outage.unblock(outage.roles[0])
    recovered: list[int] = []

    def recovers() -> bool:
        with contextlib.suppress(DatabaseUnavailable):
            recovered.append(recover_journals(tmp_path / "j", records, database))
        return bool(recovered)

    assert eventually(recovers, every=0.2), "the database never came back"
    assert recovered == [1]
    assert [record.recovered for record in _stored(records)] == [True]
    assert _journals(tmp_path / "j") == []


# -- the decision service's journal (decision_log = "database") ---------------------------------


def _service_decisions(log: DecisionLog) -> list[str]:
    """Three decisions as the routes record them: allowed with a context, refused by a spent
    budget, and an explained one."""
    request = {
        "actor": {"type": "User", "id": "alice"},
        "action": "read",
        "resource": {"type": "Repo", "id": "anvil"},
    }
    return [
        log.record(
            "authorize",
            {**request, "context": {"ip": "10.0.0.7", "n": [1, 2.5]}},
            True,
            7,
            2,
            asked_by="k1",
            api="v1",
        ),
        log.record(
            "authorize",
            request,
            False,
            7,
            2,
            refusal={"reason": "evaluation_limit", "limit": "steps"},
            asked_by="k1",
            api="authzen",
        ),
        log.record(
            "list",
            {**request, "resource_type": "Repo"},
            ["anvil", "é\u2028"],
            8,
            2,
            explanation={"allowed": True},
            asked_by="k2",
            api="oso_cloud",
        ),
    ]


def test_a_decision_service_journal_with_a_torn_last_line_is_recovered_up_to_it(
    tmp_path, database_url
):
    """A process killed with /v1 decisions answered and not written: the next one writes each
    as it was answered, once; a line cut off mid-write is counted, not fatal."""
    db = Database(database_url)
    database = database_identity(database_url)
    store = DecisionStore(db)
    open_journal(store, tmp_path / "j", fsync=False)
    journal = store.journal
    assert journal is not None and journal.path.name.endswith(".decision-log")
    log = DecisionLog(10, store)
    ids = _service_decisions(log)
    answered = {decision_id: log.get(decision_id) for decision_id in ids}
    store.flush()  # the first written before the process died...
    assert journal.waiting == 0
    more = _service_decisions(log)  # ...these not
    answered.update((decision_id, log.get(decision_id)) for decision_id in more)
    assert journal.waiting == 3
    os.close(journal._fd)  # killed outright
    with open(journal.path, "ab") as file:  # while the disk took a fourth line
        file.write(b'["' + ids[0].encode() + b'-9","authorize",{"actor":{"type":"Us')
    recovering = DecisionStore(db)
    assert recover_journals(tmp_path / "j", recovering, database) == 3
    for decision_id, record in answered.items():
        assert LoggedRecord(*recovering.get(decision_id)) == record, decision_id
    assert db.execute("SELECT COUNT(*) FROM decision_log")[0][0] == 6
    # The recovered rows go on the chain after those written before the process died.
    recovered_seqs = db.execute(
        f"SELECT seq FROM decision_log WHERE id IN ({', '.join('?' * 3)}) ORDER BY seq", more
    )
    assert [seq for (seq,) in recovered_seqs] == [4, 5, 6]
    found = chain.verify(db, SERVICE_CHAIN)
    assert found.ok and (found.first, found.last, found.rows) == (1, 6, 6), found.problem
    assert sorted((tmp_path / "j").iterdir()) == []
    events = AuditLog(db).events("decisions.recovered")
    assert [e.detail for e in events] == [
        {
            "journal": journal.path.name,
            "recovered": 3,
            "decisions": 3,
            "unreadable": 0,
            "torn": True,
        }
    ]
    db.close()


def test_the_gateway_and_the_decision_service_each_recover_only_their_own_journals(
    tmp_path, database_url
):
    """One directory holds both kinds (and an older version's gateway sweeps ``*.journal``
    only): each sweep reads its own kind's files, whose records go to its own table."""
    db = Database(database_url)
    database = database_identity(database_url)
    gateway = DecisionJournal(tmp_path / "j", database)
    gateway.append(_decision(1))
    os.close(gateway._fd)
    service = DecisionJournal(tmp_path / "j", database, kind=SERVICE)
    log = DecisionLog(10, DecisionStore(db))
    log.store.journal = service
    service_ids = _service_decisions(log)
    os.close(service._fd)
    assert recover_journals(tmp_path / "j", DecisionRecords(db), database) == 1
    assert sorted((tmp_path / "j").iterdir()) == [service.path]
    # A decision service journal renamed as a gateway's is not read as one.
    renamed = service.path.with_suffix(".journal")
    service.path.rename(renamed)
    assert recover_journals(tmp_path / "j", DecisionRecords(db), database) == 0
    renamed.rename(service.path)
    assert recover_journals(tmp_path / "j", DecisionStore(db), database) == 3
    assert sorted((tmp_path / "j").iterdir()) == []
    assert all(stored(db, decision_id) is not None for decision_id in service_ids)
    db.close()


def test_a_gateway_journal_an_older_version_left_is_recovered(tmp_path, database_url):
    """Its header and lines as the first version wrote them: no table named."""
    database = database_identity(database_url)
    (tmp_path / "j").mkdir()
    decision = _decision(1)
    header = {"bastion_decision_journal": 1, "database": database, "fields": list(JOURNALED)}
    line = [list(v) if isinstance(v, tuple) else v for v in (decision[n] for n in JOURNALED)]
    (tmp_path / "j" / "1234-abcdef.journal").write_text(
        json.dumps(header) + "\n" + json.dumps(line) + "\n"
    )
    records = DecisionRecords(Database(database_url))
    assert recover_journals(tmp_path / "j", records, database) == 1
    (record,) = _stored(records)
    assert (
        record.recovered
        and record.id == decision["id"]
        and record.principals == decision["principals"]
    )
    assert list((tmp_path / "j").iterdir()) == []


# -- a line, as written ------------------------------------------------------------------------

texts = st.text(max_size=12)  # any code point: escapes, non-ASCII, quotes


@settings(max_examples=300, deadline=None)
@given(
    shared=st.tuples(*[texts] * 3, st.lists(texts, max_size=3).map(tuple), *[texts] * 6),
    others=st.lists(
        st.tuples(*[texts] * 3, st.lists(texts, max_size=3).map(tuple), *[texts] * 6),
        max_size=3,
    ),
    version=st.one_of(st.none(), st.integers()),
    sequence=st.one_of(st.none(), st.integers()),
)
def test_a_line_is_the_json_of_the_journaled_values_of_its_decision(
    shared, others, version, sequence
):
    """Whatever lines were written before it (the part decisions of one answer share is kept),
    a line holds, in the order the header names them, its own decision's values."""
    for n, values in enumerate([shared, *others, shared]):
        fields = _decision(n, policy_version=version, sequence=sequence)
        fields.update(zip(journal_module._SHARED, values, strict=True))
        line = journal_module._line(fields)
        expected = json.dumps([fields[name] for name in JOURNALED], separators=(",", ":"))
        assert line == (expected + "\n").encode()
