"""A full disk under PostgreSQL: a write PostgreSQL cannot store is refused with 503 saying the
storage is full, whole (no fact, key or record half-applied); decisions and reads go on;
/readyz and ``bastion_storage_full`` say so; and the write goes in once there is room, without
a restart. The same guarantees as `tests/security/test_full_disk.py` gives SQLite.

The disk is real: a small tmpfs (the tests need root) owned by the PostgreSQL server's user, a
tablespace on it and a database of the test's own in that tablespace, so every table, index and
temporary file bastion's database has lives there; a test fills the tmpfs with a file of zeros
and removes it to make room. PostgreSQL's WAL stays on its own disk, as in most deployments.

What PostgreSQL really answers there (15, seen here): ``could not extend file ...: No space left
on device`` (SQLSTATE 53100, ``disk_full``) at the statement that needs a new page, or at COMMIT
for a deferred trigger's, and ``could not write to file ...pgsql_tmp...`` (53100 too) for a sort
spilled to temporary files. A write that fits in the free room of pages the tables already have
needs no new page and goes in: so each test writes until one is refused.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from starlette.testclient import TestClient

from bastion.db import Database, StorageFull, storage_full_report
from bastion.server.app import create_app
from bastion.server.config import ServerConfig
from tests.approvals.support import store_policy_and_facts
from tests.conftest import POSTGRES_URL, require_service, unavailable
from tests.security.test_full_disk import FULL, Disk, _record, assert_full, fact, may_send
from tests.server.conftest import ADMIN_KEY, POLICY, ServerProcess, role

# Writes a test makes at most before one needs a page the full disk cannot give: far more than
# the free room of a few pages.
TRIES = 400


def _server_process() -> int:
    """The user id the PostgreSQL server runs as (read off this connection's backend process),
    if it runs on this machine and sees its mounts, and lets this test make a tablespace;
    `unavailable` otherwise."""
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        superuser = conn.execute("SELECT current_setting('is_superuser')").fetchone()[0]
        if superuser != "on":
            unavailable("CREATE TABLESPACE needs a PostgreSQL superuser")
        try:
            same = os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
        except OSError:
            same = False
        if not same:
            unavailable(
                f"PostgreSQL at {urlsplit(POSTGRES_URL).netloc} does not run on this machine in"
                " this mount namespace: it cannot use a tmpfs mounted here"
            )
        return os.stat(f"/proc/{pid}").st_uid


@contextmanager
def postgres_on_small_disk(size: str = "16m") -> Iterator[tuple[Disk, str]]:
    """A database of its own, whose default tablespace is a tmpfs of ``size`` mounted for it;
    yields the disk and the database's URL. Database, tablespace and mount are removed after,
    whatever happened."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    owner = _server_process()
    name = f"bastion_full_{uuid.uuid4().hex[:10]}"
    # In the system's temporary folder (/tmp), which the server's user can reach; pytest's own
    # is root's alone.
    where = Path(tempfile.gettempdir()) / name
    where.mkdir(mode=0o700)
    admin = psycopg.connect(POSTGRES_URL, autocommit=True)
    mounted = False
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            unavailable(f"a tmpfs cannot be mounted here ({done.stderr.strip()}; needs root)")
        mounted = True
        os.chown(where, owner, -1)
        admin.execute(f"CREATE TABLESPACE {name} LOCATION '{where}'")
        if not os.listdir(where):
            unavailable(f"PostgreSQL made its tablespace {where} somewhere this test cannot see")
        admin.execute(f"CREATE DATABASE {name} TABLESPACE {name}")
        url = urlunsplit(urlsplit(POSTGRES_URL)._replace(path=f"/{name}"))
        yield Disk(where), url
    finally:
        try:
            if mounted:
                _drop(admin, name, where)
                subprocess.run(["umount", "-l", str(where)], check=False)
            where.rmdir()
        finally:
            admin.close()


def _drop(admin: psycopg.Connection, name: str, where: Path) -> None:
    """Drop the database and tablespace ``name``, with room made first: a checkpoint (which
    DROP DATABASE asks for) fails while a page of theirs cannot be written. Should that still
    fail, the tmpfs is left mounted, not pulled from under a tablespace PostgreSQL knows."""
    Disk(where).make_room()
    try:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"DROP TABLESPACE IF EXISTS {name}")
    except psycopg.Error as e:
        raise RuntimeError(
            f"drop database and tablespace {name}, then umount {where}, by hand: {e}"
        ) from e


@pytest.fixture(scope="module")
def postgres_disk() -> Iterator[tuple[Disk, str]]:
    with postgres_on_small_disk() as made:
        yield made


@pytest.fixture(scope="module")
def server(postgres_disk, tmp_path_factory) -> Iterator[ServerProcess]:
    """`bastion serve` on the database on the small disk (a policy where a has_role fact on
    Tool{"crm/send"} lets its user call it)."""
    _, url = postgres_disk
    store_policy_and_facts(url)
    process = ServerProcess(url, tmp_path_factory.mktemp("full-disk-postgres"))
    process.start()
    try:
        yield process
    finally:
        process.stop()


def facts_stored(url: str, mark: str) -> int:
    """How many facts whose arguments contain ``mark`` the database holds: read there, not from
    a replica that may not have caught up yet."""
    db = Database(url)
    try:
        return db.execute("SELECT count(*) FROM facts WHERE args LIKE ?", (f"%{mark}%",))[0][0]
    finally:
        db.close()


# -- the API -------------------------------------------------------------------------------


def test_facts_written_on_a_full_postgres_disk_are_refused_whole_and_go_in_once_there_is_room(
    postgres_disk, server
):
    disk, url = postgres_disk
    run = uuid.uuid4().hex[:6]
    with server.client() as api:
        last = api.get("/readyz").json()["sequence"]
        with disk.full():
            for batch in range(TRIES):
                users = [f"{run}-{batch}-{i}" for i in range(20)]
                r = api.post("/v1/facts", json={"facts": [fact(u) for u in users]})
                if r.status_code != 200:
                    break
                last = r.json()["sequence"]
            assert_full(r)
            # Nothing of the batch refused is logged or decided; the batches before it are.
            assert api.get("/readyz").json()["sequence"] == last
            assert facts_stored(url, f"{run}-{batch}-") == 0
            assert not any(may_send(server, u) for u in users)
            assert batch == 0 or may_send(server, f"{run}-{batch - 1}-19")
        r = api.post("/v1/facts", json={"facts": [fact(u) for u in users]})
        assert r.status_code == 200, r.text
        assert r.json()["sequence"] == last + 1
    assert all(may_send(server, u) for u in users)
    assert facts_stored(url, f"{run}-{batch}-") == 20


def test_an_api_key_made_on_a_full_postgres_disk_is_refused_and_none_is_left(postgres_disk, server):
    disk, _ = postgres_disk
    run = uuid.uuid4().hex[:6]
    with server.client() as api:
        with disk.full():
            for i in range(TRIES):
                name = f"k-{run}-{i}-" + "n" * 100  # rows of some size: a page fills sooner
                r = api.post("/v1/keys", json={"name": name, "scopes": ["decide"]})
                if r.status_code != 201:
                    break
            assert_full(r)
            listed = [k["name"] for k in api.get("/v1/keys").json()["keys"]]  # read while full
            assert name not in listed
            assert i == 0 or f"k-{run}-{i - 1}-" + "n" * 100 in listed
        r = api.post("/v1/keys", json={"name": name, "scopes": ["decide"]})
        assert r.status_code == 201, r.text


def test_readyz_says_the_postgres_storage_is_full_until_a_write_goes_in_and_stays_ready(
    postgres_disk, server
):
    disk, _ = postgres_disk
    run = uuid.uuid4().hex[:6]
    with server.client() as api:
        with disk.full():
            for i in range(TRIES):
                facts = [fact(f"{run}-{i}-{j}") for j in range(20)]
                r = api.post("/v1/facts", json={"facts": facts})
                if r.status_code != 200:
                    break
            assert_full(r)
            r = api.get("/readyz")
            assert r.status_code == 200, r.text  # it still decides
            assert FULL in r.json()["storage"] and "could not extend" in r.json()["storage"]
            assert "\nbastion_storage_full 1.0\n" in api.get("/metrics").text
        r = api.post("/v1/facts", json={"facts": [fact(f"{run}-again")]})
        assert r.status_code == 200, r.text
        assert "storage" not in api.get("/readyz").json()
        assert "\nbastion_storage_full 0.0\n" in api.get("/metrics").text


def test_the_cli_says_in_one_line_that_facts_were_refused_for_want_of_room_on_postgres(
    postgres_disk, server
):
    """500 facts in one command: more than the free room of the pages the facts have."""
    disk, url = postgres_disk
    run = uuid.uuid4().hex[:6]
    lines = [f'has_role(User{{"{run}-{i}"}}, "caller", Tool{{"crm/send"}})' for i in range(500)]
    insert = [sys.executable, "-m", "bastion.cli", "facts", "insert", "--database", url, *lines]
    env = {**os.environ, "BASTION_CONFIG": "/nonexistent"}
    with disk.full():
        done = subprocess.run(insert, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("bastion: ") and FULL in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert facts_stored(url, run) == 0
    done = subprocess.run(insert, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert facts_stored(url, run) == 500


# -- the decision records ---------------------------------------------------------------------


def test_records_made_on_a_full_postgres_disk_wait_and_are_stored_once_there_is_room(
    postgres_disk,
):
    from bastion.audit.decisions import DecisionRecords

    disk, url = postgres_disk
    run = uuid.uuid4().hex[:6]
    records = DecisionRecords(Database(url), max_buffer=1000)
    try:
        with disk.full():
            for batch in range(TRIES):
                ids = [f"{run}-{batch}-{i}" for i in range(20)]
                for decision_id in ids:
                    records.add(_record(decision_id))
                try:
                    records.flush()
                except StorageFull as e:
                    assert FULL in str(e)
                    break
            else:
                raise AssertionError(f"{TRIES} flushes went in on a full disk")
            assert records.waiting == 20 and records.dropped == 0
        assert records.flush() == 20
        stored = [r.id for _, r in records.after(limit=100_000) if r.id.startswith(run)]
        assert stored[-20:] == ids and len(stored) == len(set(stored)) == 20 * (batch + 1)
    finally:
        records.db.close()


# -- every form PostgreSQL says it in ---------------------------------------------------------


@contextmanager
def scratch_table(url: str) -> Iterator[tuple[Database, str]]:
    """A table ``(v text)`` of its own in the database on the small disk, its first page
    written, and a `Database` on it."""
    db = Database(url)
    table = f"scratch_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE TABLE {table} (v text)")
    db.execute(f"INSERT INTO {table} (v) VALUES ('first')")
    try:
        yield db, table
    finally:
        db.close()


def test_a_bulk_load_refused_for_want_of_room_leaves_no_row_on_postgres(postgres_disk):
    """COPY (`copy_rows`, as a large facts write uses) and a pipelined `executemany`, each
    outside a transaction: refused whole, said as the storage full, and nothing of it stored."""
    disk, url = postgres_disk
    rows = [("r" * 500,)] * 2000  # 1 MB: more than a page's room, less than the disk
    with scratch_table(url) as (db, table), disk.full():
        for load in (
            lambda: db.copy_rows(table, ["v"], rows),
            lambda: db.executemany(f"INSERT INTO {table} (v) VALUES (?)", rows),
        ):
            with pytest.raises(StorageFull, match="nothing was written"):
                load()
            assert db.execute(f"SELECT count(*) FROM {table}") == [(1,)]


def test_a_write_refused_at_commit_on_postgres_rolls_the_transaction_back_as_storage_full(
    postgres_disk,
):
    """A deferred trigger's insert runs at COMMIT: the disk full there is a `StorageFull` too,
    and nothing of the transaction is stored."""
    disk, url = postgres_disk
    with scratch_table(url) as (db, table):
        db.execute(
            f"CREATE FUNCTION {table}_fill() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            f" INSERT INTO {table} (v) SELECT repeat('t', 500) FROM generate_series(1, 2000);"
            " RETURN NULL; END $$"
        )
        db.execute(
            f"CREATE CONSTRAINT TRIGGER fill_at_commit AFTER INSERT ON {table} DEFERRABLE"
            " INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.v = 'fill')"
            f" EXECUTE FUNCTION {table}_fill()"
        )
        with disk.full():
            statements = 0
            refused = pytest.raises(StorageFull, match="the transaction was rolled back")
            with refused, db.transaction():
                db.execute(f"INSERT INTO {table} (v) VALUES ('fill')")
                statements += 1  # the statement went in: the refusal comes at COMMIT
            assert statements == 1
            assert FULL in (storage_full_report() or "")
            assert db.execute(f"SELECT count(*) FROM {table}") == [(1,)]


def test_a_read_whose_sort_spills_to_a_full_postgres_disk_is_refused_as_storage_full(
    postgres_disk,
):
    """PostgreSQL's temporary files are in the database's tablespace too: a sort past
    ``work_mem`` is refused for want of room there (``could not write to file``, 53100)."""
    disk, url = postgres_disk
    db = Database(url)
    # Past work_mem (64 kB) by some 2 MB of temporary files, not 7: what the module's earlier tests
    # wrote on the 16 MB disk must leave room for the sort once the filler is gone.
    sort = "SELECT max(g) FROM (SELECT g FROM generate_series(1, 100000) g ORDER BY g OFFSET 0) s"
    try:
        db.execute("SET work_mem = '64kB'")
        with disk.full(), pytest.raises(StorageFull, match="could not write to file"):
            db.execute(sort)
        assert db.execute(sort) == [(100000,)]
    finally:
        db.close()


# -- a quota or a file size limit: XX000, told by its message ----------------------------------
#
# PostgreSQL gives ``disk_full`` (53100) to ENOSPC alone: a quota (EDQUOT) or a file size limit
# (EFBIG) reached on a table's or a temporary file's write is ``internal_error`` (XX000), with
# the OS's text in its message: ``could not extend file "base/...": Disk quota exceeded``. No
# quota can be set in this kernel, nor a file size limit on a server that is not the tests' to
# restart: so the server raises that very error by hand (RAISE ... ERRCODE 'XX000' from
# plpgsql), and it reaches bastion as a real one does: a server error on the statement, psycopg's
# InternalError_ with its SQLSTATE and message, through `Database` and the API's handlers.

QUOTA = f'could not extend file "base/16384/16385": {os.strerror(errno.EDQUOT)}'
SIZE_LIMIT = f'could not extend file "base/16384/16385.1": {os.strerror(errno.EFBIG)}'
BLOCK = f'could not write block 7 in file "base/16384/16385": {os.strerror(errno.EDQUOT)}'
TEMPORARY = f'could not write to file "base/pgsql_tmp/pgsql_tmp9.0": {os.strerror(errno.EFBIG)}'


def raise_(message: str, code: str = "XX000") -> str:
    """plpgsql that raises ``message`` under SQLSTATE ``code``, with the hint PostgreSQL gives
    a file it could not extend."""
    assert "'" not in message and "$" not in message
    return (
        f"RAISE EXCEPTION USING ERRCODE = '{code}', MESSAGE = '{message}',"
        " HINT = 'Check free disk space.';"
    )


def raised(message: str, code: str = "XX000") -> str:
    """A statement on which the server raises ``message`` under SQLSTATE ``code``."""
    return f"DO $$ BEGIN {raise_(message, code)} END $$"


@pytest.mark.parametrize("message", [QUOTA, SIZE_LIMIT, BLOCK, TEMPORARY])
def test_a_quota_or_file_size_limit_on_postgres_is_refused_as_storage_full(postgres_url, message):
    db = Database(postgres_url)
    try:
        db.execute("CREATE TABLE t (n integer)")
        with pytest.raises(StorageFull, match="nothing was written") as refused:
            db.execute(raised(message))
        assert isinstance(refused.value.__cause__, psycopg.errors.InternalError_)
        assert message in str(refused.value)
        assert storage_full_report() == str(refused.value)
        with pytest.raises(StorageFull, match="the transaction was rolled back"), db.transaction():
            db.execute("INSERT INTO t VALUES (1)")
            db.execute(raised(message))
        assert db.execute("SELECT count(*) FROM t") == [(0,)]
        db.execute("INSERT INTO t VALUES (2)")  # there is room again: /readyz says so
        assert storage_full_report() is None
    finally:
        db.close()


@pytest.mark.parametrize(
    ("code", "message"),
    [
        # Another I/O error on the same file: not for want of room, so not a 503 to retry.
        ("XX000", 'could not extend file "base/16384/16385": Input/output error'),
        ("XX000", 'could not read block 7 in file "base/16384/16385": Input/output error'),
        # The OS's text alone, in another error's message (a function's own), is not the OS's.
        ("XX000", f"an extension failed: {os.strerror(errno.EDQUOT)}"),
        ("P0001", QUOTA),
    ],
)
def test_other_postgres_errors_that_read_alike_are_not_storage_full(postgres_url, code, message):
    db = Database(postgres_url)
    try:
        with pytest.raises(psycopg.Error) as refused:
            db.execute(raised(message, code))
        assert not isinstance(refused.value, StorageFull)
        assert refused.value.sqlstate == code
    finally:
        db.close()


def test_a_facts_write_refused_by_a_quota_on_postgres_is_a_503_storage_full(postgres_url, tmp_path):
    """Through the API: a trigger on the facts table raises the quota's error under the facts
    write (COPY or INSERT alike), as the server does when the table's file cannot grow."""
    policy = tmp_path / "policy.polar"
    policy.write_text(POLICY)
    config = ServerConfig(database=postgres_url, admin_key=ADMIN_KEY, policy_file=str(policy))
    with TestClient(create_app(config)) as api:
        api.headers["authorization"] = f"Bearer {ADMIN_KEY}"
        facts = {"facts": [role("quota-alice", "member", "Org", "acme")]}
        db = Database(postgres_url)
        try:
            db.execute(
                "CREATE FUNCTION over_quota() RETURNS trigger LANGUAGE plpgsql AS"
                f" $$ BEGIN {raise_(QUOTA)} RETURN NULL; END $$"
            )
            db.execute(
                "CREATE TRIGGER over_quota BEFORE INSERT ON facts"
                " FOR EACH STATEMENT EXECUTE FUNCTION over_quota()"
            )
            body = assert_full(api.post("/v1/facts", json=facts))
            assert body["title"] == "Storage full" and QUOTA in body["detail"]
            # (Not /readyz: only the facts table is "full" here, so another write of the app's
            # own, an audit checkpoint's, may go in meanwhile and rightly clear it.)
            assert facts_stored(postgres_url, "quota-alice") == 0
            db.execute("DROP TRIGGER over_quota ON facts")
        finally:
            db.close()
        r = api.post("/v1/facts", json=facts)
        assert r.status_code == 200, r.text
        assert facts_stored(postgres_url, "quota-alice") == 1
