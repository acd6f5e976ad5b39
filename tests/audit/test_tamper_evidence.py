"""Tamper evidence: decision records, audit events and the decision service's stored decisions
(``decision_log = "database"``) are hash chains, and ``bastion audit verify`` finds a row altered, deleted, moved or given another hash in the real database, from
the oldest row retention kept; a chain rewritten whole, or cut short at its end, is caught by a
checkpoint the server logged before."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time

import pytest

from bastion.audit import chain, checkpoints, decision_log, decisions, log
from bastion.audit.decision_log import DecisionStore
from bastion.audit.decisions import DecisionRecord, DecisionRecords
from bastion.audit.log import AuditLog
from bastion.cli import main
from bastion.db import Database, DatabaseUnavailable
from tests.postgres_outage import CommitCut
from tests.waits import eventually_async

DAY = 86_400.0
NOW = float(int(time.time()))  # `audit prune --older-than` counts back from the present


def _record(n: int, at: float = NOW, writer: str = "w") -> DecisionRecord:
    return DecisionRecord(
        f"{writer}{n:06d}",
        at + n,
        "desk",
        "tools/call",
        'Tool{"desk/x"}',
        ('User{"sam"}',),
        "allow",
    )


def _decision(n: int, at: float = NOW, writer: str = "d") -> tuple:
    """A decision of the decision service, as its log keeps it (`DecisionStore.add`)."""
    request = {
        "actor": {"type": "User", "id": "sam"},
        "action": "read",
        "resource": {"type": "Repo", "id": f"r{n}"},
    }
    return (
        f"{writer}{n:06d}",
        "authorize",
        request,
        n % 2 == 0,
        n,
        1,
        at + n,
        None,
        None,
        "k1",
        "v1",
    )


def _store(db: Database, decisions: list[tuple]) -> None:
    """``decisions`` (`_decision`) written to ``decision_log`` as the decision service's writer
    writes them: buffered, then flushed."""
    store = DecisionStore(db)
    for fields in decisions:
        store.add(fields)
    store.flush()


def _trail(url: str, records: int = 10, events: int = 10, stored: int = 10) -> Database:
    """A database with ``records`` decision records, ``events`` audit events and ``stored``
    decisions of the decision service, chained."""
    db = Database(url)
    written = DecisionRecords(db)
    for n in range(1, records + 1):
        written.add(_record(n))
    written.flush()
    if stored:
        _store(db, [_decision(n) for n in range(1, stored + 1)])
    trail = AuditLog(db, clock=lambda: NOW)
    for n in range(events):
        trail.record("grant.revoked", subject="sam", reason="test", n=n)
    trail.chain()
    return db


def verify(capsys, url: str, *extra: str) -> tuple[int, str, str]:
    """``bastion audit verify`` -> (exit status, stdout, stderr)."""
    try:
        code = main(["audit", "verify", "--database", url, *extra])
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


TABLES = {"decisions": decisions.CHAIN, "events": log.CHAIN, "decision_log": decision_log.CHAIN}
# The option of `audit verify` that takes a checkpoint of each, as the checkpoint line names it.
CHECKPOINT = {
    "decisions": "--checkpoint",
    "events": "--events-checkpoint",
    "decision_log": "--decision-log-checkpoint",
}


def _rehash(db: Database, table: chain.Chain, seq: int, through: int | None = None) -> None:
    """What someone who knows the scheme does after altering a row: the hashes from ``seq`` on
    (to the end, or ``through``) computed again, so that the chain holds together."""
    columns = ", ".join(table.columns)
    prev = db.execute(f"SELECT prev_hash FROM {table.table} WHERE seq = ?", (seq,))[0][0]
    rows = db.execute(
        f"SELECT {columns} FROM {table.table} WHERE seq >= ? AND seq <= ? ORDER BY seq",
        (seq, through or 2**62),
    )
    for row in rows:
        digest = chain.link(prev, row)
        db.execute(
            f"UPDATE {table.table} SET prev_hash = ?, hash = ? WHERE seq = ?",
            (prev, digest, row[0]),
        )
        prev = digest


def _swap(db: Database, table: str, a: int, b: int) -> None:
    db.execute(f"UPDATE {table} SET seq = -1 WHERE seq = ?", (a,))
    db.execute(f"UPDATE {table} SET seq = ? WHERE seq = ?", (a, b))
    db.execute(f"UPDATE {table} SET seq = ? WHERE seq = -1", (b,))


def _documented_hash(prev_hash: str, row) -> str:
    """A row's hash as docs/operations.md defines it, written out apart from bastion's code:
    what an auditor recomputes."""
    import hashlib

    text = prev_hash
    for value in row:
        if value is None:
            text += "n;"
        elif isinstance(value, int):
            text += f"i{value};"
        elif isinstance(value, float):
            text += f"f{value!r};"
        else:
            text += f"s{len(value.encode())}:{value}"
    return hashlib.sha256(text.encode()).hexdigest()


def test_every_stored_hash_is_the_one_the_documented_form_gives(database_url):
    """Each row's hash can be recomputed from the docs alone: the stored columns, as read back
    from the database, in the table's order, written as the documented fields. Text that is
    not ASCII, quotes (a record is JSON) and NULLs (an event without a client) included."""
    db = _trail(database_url)
    try:
        AuditLog(db).record("user.created", subject='zoë "q"', client_id=None)
        AuditLog(db).chain()
        for table in TABLES.values():
            columns = ", ".join(table.columns)
            rows = db.execute(
                f"SELECT {columns}, prev_hash, hash FROM {table.table} WHERE seq > 0 ORDER BY seq"
            )
            assert len(rows) >= 10
            prev = chain.GENESIS
            for *values, prev_hash, stored in rows:
                assert prev_hash == prev
                assert stored == _documented_hash(prev, values), (table.table, values[0])
                prev = stored
    finally:
        db.close()


def test_an_untouched_trail_verifies_naming_its_range_and_head(database_url, capsys):
    db = _trail(database_url, records=1500, events=12, stored=1200)  # more than a page of the walk
    record_head = chain.head(db, decisions.CHAIN)
    event_head = chain.head(db, log.CHAIN)
    stored_head = chain.head(db, decision_log.CHAIN)
    db.close()
    code, out, err = verify(capsys, database_url)
    assert code == 0, err
    assert "audit_decisions: OK, seq 1 to 1500 (1500 decision records," in out
    assert f"head {record_head[0]}:{record_head[1]}" in out
    assert "audit_events: OK, seq 1 to 12 (12 audit events," in out
    assert f"head {event_head[0]}:{event_head[1]}" in out
    assert "decision_log: OK, seq 1 to 1200 (1200 decisions of the decision service," in out
    assert f"head {stored_head[0]}:{stored_head[1]}" in out


def test_a_database_where_the_decision_service_never_kept_its_decisions_verifies_without_it(
    database_url, capsys
):
    """``decision_log = "memory"`` (the default) made no table: verify walks the other two and
    makes none; a checkpoint of the decision service's chain given for it cannot be confirmed."""
    _trail(database_url, stored=0).close()
    code, out, err = verify(capsys, database_url)
    assert code == 0, err
    assert "audit_decisions: OK" in out and "decision_log" not in out
    code, _, err = verify(capsys, database_url, "--decision-log-checkpoint", "3:" + "a" * 64)
    assert code == 1
    assert "decision_log: BROKEN at seq 3: checkpoint 3:" in err
    assert "no decision service ever kept its decisions in this database" in err
    db = Database(database_url)
    try:
        assert not decision_log.kept_in(db)
    finally:
        db.close()


TAMPERING = {
    # name: (statements, where verify must stop, what it must say)
    "a record altered": (
        lambda db, t: db.execute(
            f"UPDATE {t.table} SET {t.columns[-1]} = {t.columns[-1]} || ' ' WHERE seq = 5"
        ),
        5,
        "altered",
    ),
    "a row deleted from the middle": (
        lambda db, t: db.execute(f"DELETE FROM {t.table} WHERE seq = 5"),
        5,
        "seq 5 missing: deleted",
    ),
    "rows deleted from the middle": (
        lambda db, t: db.execute(f"DELETE FROM {t.table} WHERE seq IN (5, 6, 7)"),
        5,
        "seqs 5 to 7 missing",
    ),
    "a hash changed": (
        lambda db, t: db.execute(f"UPDATE {t.table} SET hash = ? WHERE seq = 5", ("ab" * 32,)),
        5,
        "altered",
    ),
    "two rows swapped": (lambda db, t: _swap(db, t.table, 5, 6), 5, "reordered"),
    "a row altered and its hash computed again": (
        lambda db, t: (
            db.execute(f"UPDATE {t.table} SET at = at - 1 WHERE seq = 5"),
            _rehash(db, t, 5, through=5),
        ),
        6,
        "its previous hash is not seq 5's hash",
    ),
    "the hashes of the first rows removed": (
        lambda db, t: db.execute(
            f"UPDATE {t.table} SET hash = NULL, prev_hash = NULL WHERE seq < 3"
        ),
        3,
        "had their hashes removed",
    ),
    "a row's hash removed": (
        lambda db, t: db.execute(f"UPDATE {t.table} SET hash = NULL WHERE seq = 5"),
        5,
        "no hash",
    ),
}


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("tampering", TAMPERING)
def test_tampering_with_the_database_is_found_at_its_seq(database_url, capsys, table, tampering):
    change, broken_at, said = TAMPERING[tampering]
    if tampering == "the hashes of the first rows removed" and table != "decisions":
        # Rows from before the chain have seq 0 there: the first numbered one has no excuse.
        broken_at, said = 1, "it has no hash: "
    db = _trail(database_url)
    change(db, TABLES[table])
    db.close()
    code, out, err = verify(capsys, database_url)
    assert code == 1
    line = next(line for line in err.splitlines() if line.startswith(TABLES[table].table))
    assert line.startswith(f"{TABLES[table].table}: BROKEN at seq {broken_at}: "), line
    assert said in line
    for other in TABLES.keys() - {table}:  # the other chains, untouched, still verify
        assert f"{TABLES[other].table}: OK" in out


def _checkpoint(db: Database) -> dict[str, str]:
    """The server's checkpoint line, as the log shows it, taken apart."""
    line = checkpoints.checkpoint_line(db)
    return dict(part.split("=") for part in line.split())


@pytest.mark.parametrize("table", TABLES)
def test_a_chain_rewritten_whole_is_caught_by_a_checkpoint_logged_before(
    database_url, capsys, table
):
    db = _trail(database_url)
    logged = _checkpoint(db)[table]
    t = TABLES[table]
    db.execute(f"UPDATE {t.table} SET at = at + 1 WHERE seq = 3")
    _rehash(db, t, 3)
    db.close()
    option = CHECKPOINT[table]

    code, _, _ = verify(capsys, database_url)
    assert code == 0  # whole, as far as the database alone can tell (docs/security.md)
    code, _, err = verify(capsys, database_url, option, logged)
    assert code == 1
    assert f"BROKEN at seq 10: checkpoint {logged} does not match" in err
    assert "rewritten since the checkpoint was logged" in err


@pytest.mark.parametrize("table", TABLES)
def test_rows_deleted_from_the_end_are_caught_by_a_checkpoint(database_url, capsys, table):
    db = _trail(database_url)
    logged = _checkpoint(db)[table]
    t = TABLES[table]
    db.execute(f"DELETE FROM {t.table} WHERE seq > 7")
    db.close()
    option = CHECKPOINT[table]
    code, out, err = verify(capsys, database_url, option, logged)
    assert code == 1
    assert "is past the head (seq 7): rows were deleted from the end" in err


def test_a_checkpoint_in_the_chain_is_confirmed(database_url, capsys):
    db = _trail(database_url)
    logged = _checkpoint(db)
    written = DecisionRecords(db)  # the chains go on after the checkpoint
    written.add(_record(11))
    written.flush()
    _store(db, [_decision(11)])
    db.close()
    given = [arg for table, option in CHECKPOINT.items() for arg in (option, logged[table])]
    code, out, err = verify(capsys, database_url, *given)
    assert code == 0, err
    assert "audit_decisions: OK, seq 1 to 11" in out
    assert "decision_log: OK, seq 1 to 11" in out
    assert out.count("confirmed") == 3


@pytest.mark.parametrize(
    "given", ["10", "10:", "x:" + "a" * 64, "0:" + "a" * 64, "3:" + "A" * 64, "3:" + "a" * 63]
)
def test_a_malformed_checkpoint_is_refused_with_its_form(sqlite_url, capsys, given):
    code, _, err = verify(capsys, sqlite_url, "--checkpoint", given)
    assert code == 2
    assert "a checkpoint is SEQ:HASH as the server logs it" in err


def test_after_prune_the_chain_verifies_from_the_oldest_kept_row(database_url, capsys):
    db = Database(database_url)
    written = DecisionRecords(db)
    trail = AuditLog(db)
    old, new = NOW - 100 * DAY, NOW - DAY
    for n in range(1, 6):
        written.add(_record(n, at=old))
        trail.clock = lambda: old
        trail.record("grant.revoked", subject="sam", n=n)
    for n in range(6, 10):
        written.add(_record(n, at=new))
        trail.clock = lambda: new
        trail.record("grant.revoked", subject="sam", n=n)
    written.flush()
    trail.chain()
    logged = _checkpoint(db)
    first = chain.head(db, decisions.CHAIN)  # seq 9
    old_checkpoint = db.execute("SELECT seq, hash FROM audit_decisions WHERE seq = 2")[0]
    db.close()

    assert main(["audit", "prune", "--older-than", "90", "--database", database_url]) == 0
    capsys.readouterr()

    code, out, err = verify(
        capsys,
        database_url,
        "--checkpoint",
        logged["decisions"],
        "--events-checkpoint",
        logged["events"],
    )
    assert code == 0, err
    assert f"audit_decisions: OK, seq 6 to {first[0]} (4 decision records," in out
    assert "rows before seq 6 were pruned" in out
    # Events: the 4 kept, and the audit.pruned event the prune recorded after them (chained
    # by a running server; here not yet).
    assert "audit_events: OK, seq 6 to 9 (4 audit events," in out
    assert "1 audit events not chained yet" in out
    # A checkpoint older than what retention kept cannot be confirmed: a newer one must be used.
    code, _, err = verify(capsys, database_url, "--checkpoint", "{}:{}".format(*old_checkpoint))
    assert code == 1
    assert "is older than the oldest kept row (seq 6): it was pruned" in err


def test_pruning_the_decision_service_decisions_leaves_a_whole_chain_that_verifies(
    database_url, capsys
):
    """Retention deletes the oldest stored decisions only: one made before the cutoff but
    numbered after a newer one (a replica's, written late) stays, and a row stored before the
    chain (seq 0) goes by its age; what is left verifies, from the oldest kept row, against a
    checkpoint logged before."""
    db = Database(database_url)
    DecisionRecords(db), AuditLog(db)  # the other chains' tables, as a server makes them
    db.migrate(decision_log.COMPONENT, decision_log._MIGRATIONS[:2])  # as the version before
    db.execute(
        "INSERT INTO decision_log (id, kind, request, result, sequence, at) VALUES"
        " ('old', 'authorize', '{}', 'true', 1, ?)",
        (NOW - 200 * DAY,),
    )
    old, new = NOW - 100 * DAY, NOW - DAY
    ats = [old, old + 1, new, old + 2, new + 1]
    _store(db, [_decision(n, at=at - n) for n, at in enumerate(ats, start=1)])
    logged = _checkpoint(db)["decision_log"]
    db.close()

    assert main(["audit", "prune", "--older-than", "90", "--database", database_url]) == 0
    assert "3 decision_log" in capsys.readouterr().err
    db = Database(database_url)
    try:
        assert [r[0] for r in db.execute("SELECT seq FROM decision_log ORDER BY seq")] == [3, 4, 5]
    finally:
        db.close()
    code, out, err = verify(capsys, database_url, "--decision-log-checkpoint", logged)
    assert code == 0, err
    assert "decision_log: OK, seq 3 to 5 (3 decisions of the decision service," in out
    assert "rows before seq 3 were pruned" in out
    assert f"checkpoint {logged} confirmed" in out


def test_prune_deletes_only_the_oldest_so_a_record_written_late_leaves_the_chain_whole(
    database_url, capsys
):
    """A replica's records buffered through an outage are written after newer ones of another:
    numbered after them, made before them. Retention deleted every row made before its cutoff,
    which tore such a record out of the middle of the chain; it now deletes the oldest rows up
    to the first one it keeps."""
    db = Database(database_url)
    written = DecisionRecords(db)
    cutoff = NOW - 90 * DAY
    for n, at in enumerate([cutoff - 10, cutoff + 10, cutoff - 5, cutoff + 20], start=1):
        written.add(_record(n, at=at - n))
    written.flush()
    assert written.prune(cutoff) == 1
    assert [seq for seq, _ in written.after(0)] == [2, 3, 4]
    db.close()
    code, out, err = verify(capsys, database_url)
    assert code == 0, err
    assert "audit_decisions: OK, seq 2 to 4" in out


def test_two_writers_on_one_database_make_one_chain(database_url, capsys):
    """Two writers (two connections: two replicas' record writers) flush batches at once, and
    two chain events at once while events are recorded: each table is one chain."""
    writers = [DecisionRecords(Database(database_url)) for _ in range(2)]
    events = [AuditLog(Database(database_url)) for _ in range(2)]
    rounds, per_round = 30, 20
    errors: list[BaseException] = []
    together = threading.Barrier(2, timeout=30)

    def write(n: int) -> None:
        try:
            for r in range(rounds):
                for i in range(per_round):
                    writers[n].add(_record(r * per_round + i, writer=f"w{n}-"))
                    events[n].record("grant.revoked", subject=f"user{n}", r=r, i=i)
                together.wait()  # both flush, then both chain, at the same moment
                writers[n].flush()
                together.wait()
                events[n].chain()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    events[0].chain()
    for part in (*writers, *events):
        part.db.close()
    code, out, err = verify(capsys, database_url)
    assert code == 0, err
    total = 2 * rounds * per_round
    assert f"audit_decisions: OK, seq 1 to {total} ({total} decision records," in out
    assert f"audit_events: OK, seq 1 to {total} ({total} audit events," in out


def test_a_batch_written_again_after_its_commit_was_lost_leaves_one_chain(postgres_url, capsys):
    """The batch's COMMIT took effect, its answer was lost: the flush fails, and the batch is
    written again with later records. What is stored already is left out before the rest is
    numbered and chained: no seq skipped, no link to a row that is not there."""
    relay = CommitCut(postgres_url)
    db = Database(relay.url, role="bastion-records")
    buffered = DecisionRecords(db)
    for n in (1, 2):
        buffered.add(_record(n))
    relay.arm()
    with pytest.raises(DatabaseUnavailable, match="committing"):
        buffered.flush()
    assert relay.cut.is_set() and buffered.waiting == 2
    buffered.add(_record(3))
    buffered.flush()
    assert [(seq, r.id) for seq, r in buffered.after(0)] == [
        (1, "w000001"),
        (2, "w000002"),
        (3, "w000003"),
    ]
    db.close()
    relay.close()
    code, out, err = verify(capsys, postgres_url)
    assert code == 0, err
    assert "audit_decisions: OK, seq 1 to 3" in out


@pytest.mark.parametrize(
    ("writer", "made", "table"),
    [
        (DecisionRecords, _record, "audit_decisions"),
        (DecisionStore, _decision, "decision_log"),
    ],
)
def test_a_batch_written_again_after_its_commit_was_lost_leaves_one_chain_on_sqlite(
    sqlite_url, capsys, monkeypatch, writer, made, table
):
    """The gateway's record writer and the decision service's alike: the rows its lost COMMIT
    stored are left out before the rest is numbered, so no seq is skipped (a gap verify would
    take for a deletion) and no decision is written twice."""
    db = Database(sqlite_url)
    buffered = writer(db)
    for n in (1, 2):
        buffered.add(made(n))
    commit = Database._commit

    def committed_then_lost(self):
        commit(self)
        monkeypatch.setattr(Database, "_commit", commit)
        raise DatabaseUnavailable("the database connection was lost while committing")

    monkeypatch.setattr(Database, "_commit", committed_then_lost)
    with pytest.raises(DatabaseUnavailable):
        buffered.flush()
    buffered.add(made(3))
    buffered.flush()
    rows = db.execute(f"SELECT seq, id FROM {table} ORDER BY seq")
    assert [seq for seq, _ in rows] == [1, 2, 3] and len({i for _, i in rows}) == 3
    db.close()
    code, out, err = verify(capsys, sqlite_url)
    assert code == 0, err
    assert f"{table}: OK, seq 1 to 3" in out


def test_rows_written_before_the_chain_are_outside_it_and_said_so(database_url, capsys):
    """A database from before the chain: its rows have no hash. They stay as they are,
    outside the chain; verify counts them; the chain starts after them."""
    db = Database(database_url)
    db.migrate("audit_decisions", decisions._MIGRATIONS[:1])
    db.migrate("audit", log._MIGRATIONS[:2])
    db.migrate(decision_log.COMPONENT, decision_log._MIGRATIONS[:2])
    for n in (1, 2, 3):
        db.execute(
            "INSERT INTO decision_log (id, kind, request, result, sequence, at, api) VALUES"
            " (?, 'authorize', '{}', 'true', 1, ?, 'v1')",
            (f"old{n}", NOW),
        )
        db.execute(
            "INSERT INTO audit_decisions (seq, id, at, server, method, target, principals,"
            " result, arguments_digest, record) VALUES (?, ?, ?, 'desk', 'tools/call', 'T',"
            " '[]', 'allow', '', '{}')",
            (n, f"old{n}", NOW),
        )
        db.execute(
            "INSERT INTO audit_events (id, at, kind, detail) VALUES (?, ?, 'user.created', '{}')",
            (f"old{n}", NOW),
        )
    db.close()
    _trail(database_url, records=4, events=4, stored=4).close()
    code, out, err = verify(capsys, database_url)
    assert code == 0, err
    assert "audit_decisions: OK, seq 4 to 7 (4 decision records," in out
    assert "3 decision records written before the chain began are not covered" in out
    assert "audit_events: OK, seq 1 to 4 (4 audit events," in out
    assert "3 audit events written before the chain began are not covered" in out
    assert "decision_log: OK, seq 1 to 4 (4 decisions of the decision service," in out
    assert (
        "3 decisions of the decision service written before the chain began are not covered" in out
    )


def test_the_server_chains_events_and_logs_checkpoints_verify_takes(sqlite_url, capsys, caplog):
    """The server's own task, at log_level warning: the checkpoint lines are written all the
    same, and what they name is what verify confirms."""
    db = _trail(sqlite_url)
    trail = AuditLog(db, clock=lambda: NOW)
    trail.record("user.created", subject="late")  # not chained yet

    async def run() -> str:
        task = asyncio.create_task(checkpoints.keep_chains_forever(db, 0.05))

        def lines() -> list[str]:
            return [r.getMessage() for r in caplog.records if "checkpoint" in r.name]

        try:
            logged = await eventually_async(
                lambda: lines() and "events=11:" in lines()[-1], every=0.05
            )
            assert logged, f"no checkpoint line naming event 11: {caplog.text}"
            return lines()[-1]
        finally:
            task.cancel()

    root = logging.getLogger()
    level, root.level = root.level, logging.WARNING  # log_level = "warning"
    try:
        line = asyncio.run(run())
    finally:
        root.setLevel(level)
    db.close()
    found = re.fullmatch(r"audit checkpoint: decisions=(\S+) events=(\S+) decision_log=(\S+)", line)
    assert found, line
    code, out, err = verify(
        capsys,
        sqlite_url,
        "--checkpoint",
        found[1],
        "--events-checkpoint",
        found[2],
        "--decision-log-checkpoint",
        found[3],
    )
    assert code == 0, err
    assert "audit_events: OK, seq 1 to 11" in out and out.count("confirmed") == 3


def test_two_servers_on_one_postgresql_chain_events_into_one_chain_and_log_its_head(
    postgres_url, tmp_path, capsys
):
    """Two `bastion serve` replicas, at log_level warning, record events (API keys created
    through each at once) and chain them: one chain, whose head both log as a checkpoint that
    verify confirms."""
    from tests.server.conftest import POLICY, ServerProcess
    from tests.waits import eventually

    policy = tmp_path / "policy.polar"
    policy.write_text(POLICY)
    env = {"BASTION_LOG_LEVEL": "warning", "BASTION_AUDIT_CHECKPOINT_SECONDS": "0.2"}
    servers = [ServerProcess(postgres_url, tmp_path, str(policy), env).start() for _ in range(2)]
    try:
        clients = [server.client() for server in servers]
        answers: list[int] = []

        def create(n: int) -> None:
            for i in range(15):
                key = {"name": f"k{n}-{i}", "scopes": ["decide"]}
                answers.append(clients[n].post("/v1/keys", json=key).status_code)

        threads = [threading.Thread(target=create, args=(n,)) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for client in clients:
            client.close()
        assert answers == [201] * 30

        def logged_head(server) -> str | None:
            lines = re.findall(
                r"audit checkpoint: .*events=(30:[0-9a-f]{64})", server.log.read_text()
            )
            return lines[-1] if lines else None

        assert eventually(lambda: all(logged_head(s) for s in servers))
        heads = {logged_head(s) for s in servers}
    finally:
        for server in servers:
            server.stop()
    assert len(heads) == 1  # both replicas saw the one chain's head
    code, out, err = verify(capsys, postgres_url, "--events-checkpoint", heads.pop())
    assert code == 0, err
    assert "audit_events: OK, seq 1 to 30 (30 audit events," in out
    assert "checkpoint 30:" in out


def _insert_outside(db: Database, table: chain.Chain, seq: int | None) -> None:
    """A row copied from seq 3 under a new id and ``seq``, its hashes kept or dropped: what
    someone who writes to the database adds so that `audit show`, `audit events` and replay
    read it while the walk of the chain (``seq > 0``) never meets it."""
    columns = ", ".join(c for c in table.columns if c not in ("seq", "id"))
    db.execute(
        f"INSERT INTO {table.table} (seq, id, {columns}, prev_hash, hash)"
        f" SELECT ?, 'forged', {columns}, prev_hash, hash FROM {table.table} WHERE seq = 3",
        (seq,),
    )


# Where each table's writers never put a row: a seq below 0 anywhere; 0 and NULL in
# audit_decisions, whose rows are numbered as they are written (before the chain too).
OUTSIDE = [
    ("decisions", -1),
    ("decisions", 0),
    ("decisions", None),  # SQLite lets a BIGINT PRIMARY KEY hold NULL
    ("events", -7),
    ("decision_log", -1),
]


@pytest.mark.parametrize(("table", "seq"), OUTSIDE)
def test_a_row_inserted_outside_the_chains_numbering_is_refused(database_url, capsys, table, seq):
    """A forged row with a seq no bastion writes is read as a record (``audit show``, replay,
    ``audit events``): verify must not pass it over, nor count it as written before the chain
    began or as waiting to be chained."""
    chained = TABLES[table]
    db = _trail(database_url)
    try:
        if seq is None and database_url.startswith("postgresql"):
            with pytest.raises(Exception, match="not-null"):  # PostgreSQL's key holds no NULL
                _insert_outside(db, chained, seq)
            return
        _insert_outside(db, chained, seq)
        assert db.execute(f"SELECT COUNT(*) FROM {chained.table} WHERE id = 'forged'")[0][0] == 1
    finally:
        db.close()
    code, out, err = verify(capsys, database_url)
    assert code == 1, out
    line = next(line for line in err.splitlines() if line.startswith(chained.table))
    at = "NULL" if seq is None else seq
    assert line.startswith(f"{chained.table}: BROKEN at seq {at}: a row outside the chain"), line
    assert "(id 'forged')" in line and "inserted by hand" in line, line
    for other in TABLES.keys() - {table}:
        assert f"{TABLES[other].table}: OK" in out


@pytest.mark.parametrize("table", ["events", "decision_log"])
def test_every_hash_removed_does_not_pass_for_rows_from_before_the_chain(
    database_url, capsys, table
):
    """An event, or a decision of the decision service, from before the chain has seq 0: one
    numbered but with no hashes was never written so, even at the chain's start. (A decision
    record of then kept its number: there the same is said only with a checkpoint.)"""
    chained = TABLES[table]
    db = _trail(database_url)
    db.execute(f"UPDATE {chained.table} SET hash = NULL, prev_hash = NULL")
    db.close()
    code, out, err = verify(capsys, database_url)
    assert code == 1, out
    line = next(line for line in err.splitlines() if line.startswith(chained.table))
    assert line.startswith(f"{chained.table}: BROKEN at seq 1: it has no hash"), line
