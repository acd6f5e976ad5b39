"""A full disk: every write bastion makes is refused with a clear error (503 saying the storage
is full; the CLI's one ``bastion: ...`` line), changes nothing half-way (no fact, token, grant,
answer or key half-applied), leaves reads and decisions answered, is reported on /readyz, and
goes in once there is room again, without a restart.

The disk is real: a small tmpfs (mounted for the module, so the tests need root) holding the
database, its WAL, the key files and the decision journal of a real `bastion serve`; a test fills
it with a file of zeros and removes that file to make room. SQLite answers ``database or disk
is full`` (SQLITE_FULL) there, as on a real disk. PostgreSQL's full disk is
`tests/security/test_full_disk_postgres.py`.
"""

from __future__ import annotations

import fcntl
import os
import resource
import sqlite3
import struct
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from bastion.db import Database
from bastion.oauth.store import OAuthStore
from bastion.oauth.users import create_user
from tests import clients
from tests.approvals.support import SEND, Holder, config, store_policy_and_facts
from tests.conftest import unavailable
from tests.oauth.support import PASSWORD, log_in_and_consent, pkce_pair
from tests.server.conftest import POLICY, ServerProcess, role

FULL = "storage is full"


class Disk:
    """A tmpfs of a few megabytes: `full` fills it for the block, then makes room again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 16, 512, 1):  # down to the last byte
                try:
                    while True:
                        os.write(fd, bytes(size))
                except OSError:
                    pass
        finally:
            os.close(fd)

    def make_room(self) -> None:
        self.filler.unlink(missing_ok=True)

    @contextmanager
    def full(self) -> Iterator[None]:
        # The WAL is emptied first: a write that fitted in its old frames would need no room.
        db = self.path / "bastion.db"
        if db.exists():
            with sqlite3.connect(db) as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
        self.fill()
        try:
            yield
        finally:
            self.make_room()


@contextmanager
def small_disk(where: Path, size: str = "16m") -> Iterator[Disk]:
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        unavailable(f"a tmpfs cannot be mounted here ({mounted.stderr.strip()}; needs root)")
    try:
        yield Disk(where)
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> Iterator[Disk]:
    with small_disk(tmp_path_factory.mktemp("full-disk") / "disk") as mounted:
        yield mounted


class Bastion:
    def __init__(self, server: ServerProcess, disk: Disk, holder: Holder, config: Path) -> None:
        self.server, self.disk, self.holder, self.config = server, disk, holder, config
        self.url = server.url
        self.resource = f"{server.url}/mcp/crm"

    def admin(self) -> httpx.Client:
        return self.server.client()

    def anonymous(self) -> httpx.Client:
        return clients.client(base_url=self.url, timeout=60, follow_redirects=False)

    def register(self) -> dict:
        with self.anonymous() as http:
            r = http.post("/register", json=CLIENT)
        assert r.status_code == 201, r.text
        return r.json()

    def authorization_url(self, client: dict, challenge: str) -> str:
        params = {
            "response_type": "code",
            "client_id": client["client_id"],
            "redirect_uri": client["redirect_uris"][0],
            "state": "s",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "resource": self.resource,
            "scope": "crm",
        }
        return f"{self.url}/authorize?{urlencode(params)}"

    def code_for(self, client: dict) -> tuple[str, str]:
        verifier, challenge = pkce_pair()
        with self.anonymous() as browser:
            r = log_in_and_consent(
                self.url, self.authorization_url(client, challenge), "alice", PASSWORD, browser
            )
        assert r.status_code in (302, 303), r.text
        return parse_qs(urlsplit(r.headers["location"]).query)["code"][0], verifier

    def redeem(self, client: dict, code: str, verifier: str) -> httpx.Response:
        with self.anonymous() as http:
            return http.post(
                "/token",
                data={
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": client["redirect_uris"][0],
                    "code_verifier": verifier,
                    "client_id": client["client_id"],
                },
            )

    def refresh(self, client: dict, refresh_token: str) -> httpx.Response:
        with self.anonymous() as http:
            return http.post(
                "/token",
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": refresh_token,
                    "client_id": client["client_id"],
                },
            )

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "bastion.cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "BASTION_CONFIG": str(self.config)},
        )


CLIENT = {
    "client_name": "Full disk agent",
    "redirect_uris": ["http://127.0.0.1:9/callback"],
    "token_endpoint_auth_method": "none",
    "grant_types": ["authorization_code", "refresh_token"],
}


@pytest.fixture(scope="module")
def bastion(disk, tmp_path_factory) -> Iterator[Bastion]:
    """`bastion serve` with OAuth, a gateway and approvals, all its files on ``disk``."""
    tmp = tmp_path_factory.mktemp("full-disk-serve")
    database = str(disk.path / "bastion.db")
    store_policy_and_facts(database)
    db = Database(database)
    try:
        create_user(OAuthStore(db), "alice", PASSWORD, 1.0, actor="test")
    finally:
        db.close()
    server = ServerProcess(database, tmp)
    path = disk.path / "bastion.toml"
    path.write_text(config(server.url, database, disk.path / "keys"))
    server.env["BASTION_CONFIG"] = str(path)
    server.start()
    holder = Holder(database, disk.path / "keys", server.url)
    try:
        yield Bastion(server, disk, holder, path)
    finally:
        holder.close()
        server.stop()


def assert_full(r: httpx.Response) -> dict:
    """A 503 whose body says the storage is full, in the shape of its endpoint."""
    assert r.status_code == 503, r.text
    assert r.headers.get("retry-after"), r.headers
    body = r.json()
    said = body.get("detail") or body.get("error_description") or body.get("message")
    assert said and FULL in said, body
    return body


def fact(user: str) -> dict:
    return {
        "predicate": "has_role",
        "args": [{"type": "User", "id": user}, "caller", {"type": "Tool", "id": "crm/send"}],
    }


def run_python(code: str) -> None:
    """Run ``code`` in a Python process of its own (limits it sets, and its death, stay its
    own), with this tree on its path; it must end with status 0."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert done.returncode == 0, done.stderr


def may_send(server: ServerProcess, user: str) -> bool:
    """Whether ``user`` may call Tool{"crm/send"}: a decision, which needs no write."""
    with server.client() as api:
        r = api.post(
            "/v1/authorize",
            json={
                "actor": {"type": "User", "id": user},
                "action": "call",
                "resource": {"type": "Tool", "id": "crm/send"},
            },
        )
    assert r.status_code == 200, r.text
    return r.json()["allowed"]


# -- the admin API --------------------------------------------------------------------------


def test_a_fact_written_on_a_full_disk_is_refused_and_goes_in_once_there_is_room(bastion):
    user = f"u-{uuid.uuid4().hex[:8]}"
    with bastion.admin() as api:
        before = api.get("/readyz").json()["sequence"]
        with bastion.disk.full():
            assert_full(api.post("/v1/facts", json={"facts": [fact(user)]}))
            assert api.get("/readyz").json()["sequence"] == before
            assert not may_send(bastion.server, user)  # decisions are still answered
        r = api.post("/v1/facts", json={"facts": [fact(user)]})
        assert r.status_code == 200, r.text
    assert may_send(bastion.server, user)


def test_an_api_key_made_on_a_full_disk_is_refused_and_none_is_left(bastion):
    name = f"k-{uuid.uuid4().hex[:8]}"
    with bastion.admin() as api:
        with bastion.disk.full():
            assert_full(api.post("/v1/keys", json={"name": name, "scopes": ["decide"]}))
        assert name not in [k["name"] for k in api.get("/v1/keys").json()["keys"]]
        r = api.post("/v1/keys", json={"name": name, "scopes": ["decide"]})
        assert r.status_code == 201, r.text


def test_an_approval_answered_on_a_full_disk_is_refused_and_stays_pending(bastion):
    held = bastion.holder.hold(SEND, {"to": "ceo@example.com"})
    with bastion.admin() as api:
        with bastion.disk.full():
            assert_full(api.post(f"/v1/approvals/{held.id}/approve", json={"approver": "avery"}))
            found = api.get(f"/v1/approvals/{held.id}").json()  # read while full
            assert found["status"] == "pending" and found["answers"] == [], found
        r = api.post(f"/v1/approvals/{held.id}/approve", json={"approver": "avery"})
        assert r.status_code == 200, r.text
        assert api.get(f"/v1/approvals/{held.id}").json()["status"] == "approved"


def test_a_call_held_on_a_full_disk_is_refused_as_unavailable_and_nothing_is_held(bastion):
    from bastion.db import StorageFull

    with bastion.admin() as api:
        before = api.get("/v1/approvals", params={"status": "pending"}).json()["approvals"]
        with bastion.disk.full(), pytest.raises(StorageFull):
            bastion.holder.hold(SEND, {"to": "cfo@example.com"})
        after = api.get("/v1/approvals", params={"status": "pending"}).json()["approvals"]
    assert after == before


# -- OAuth ----------------------------------------------------------------------------------


def test_a_registration_on_a_full_disk_is_refused_and_registers_once_there_is_room(bastion):
    with bastion.disk.full(), bastion.anonymous() as http:
        assert_full(http.post("/register", json=CLIENT))
    bastion.register()


def test_a_sign_in_begun_on_a_full_disk_is_refused_and_begins_once_there_is_room(bastion):
    """Refused at the authorization request's row: the sign-in form's key was made at start
    (docs/operations.md, "Loaded at start"), and no write is left to a first use."""
    client = bastion.register()
    _, challenge = pkce_pair()
    url = bastion.authorization_url(client, challenge)
    for _ in range(2):
        with bastion.disk.full(), bastion.anonymous() as browser:
            assert_full(browser.get(url))
        bastion.code_for(client)
    assert (bastion.disk.path / "keys" / "form-tokens.key").exists()


def test_a_code_redeemed_on_a_full_disk_issues_no_token_and_is_redeemed_once_there_is_room(
    bastion,
):
    client = bastion.register()
    code, verifier = bastion.code_for(client)
    with bastion.disk.full():
        assert_full(bastion.redeem(client, code, verifier))
    r = bastion.redeem(client, code, verifier)
    assert r.status_code == 200, r.text
    assert "access_token" in r.json() and "refresh_token" in r.json()


def test_a_refresh_on_a_full_disk_rotates_nothing_and_the_token_still_refreshes(bastion):
    client = bastion.register()
    code, verifier = bastion.code_for(client)
    tokens = bastion.redeem(client, code, verifier).json()
    with bastion.disk.full():
        assert_full(bastion.refresh(client, tokens["refresh_token"]))
    r = bastion.refresh(client, tokens["refresh_token"])  # not taken for a reuse
    assert r.status_code == 200, r.text
    again = bastion.refresh(client, r.json()["refresh_token"])
    assert again.status_code == 200, again.text


# -- readiness ------------------------------------------------------------------------------


def test_readyz_says_the_storage_is_full_while_a_write_fails_for_it_and_stays_ready(bastion):
    with bastion.admin() as api:
        with bastion.disk.full():
            assert_full(api.post("/v1/facts", json={"facts": [fact("ready-check")]}))
            r = api.get("/readyz")
            assert r.status_code == 200, r.text  # it still decides
            assert FULL in r.json()["storage"], r.json()
            assert "\nbastion_storage_full 1.0\n" in api.get("/metrics").text
        r = api.post("/v1/facts", json={"facts": [fact("ready-check")]})
        assert r.status_code == 200, r.text
        assert "storage" not in api.get("/readyz").json()
        assert "\nbastion_storage_full 0.0\n" in api.get("/metrics").text


# -- the CLI --------------------------------------------------------------------------------


def test_the_cli_says_a_fact_was_refused_for_want_of_room_in_one_line(bastion):
    line = 'has_role(User{"cli-user"}, "caller", Tool{"crm/send"})'
    database = str(bastion.disk.path / "bastion.db")
    with bastion.disk.full():
        done = bastion.cli("facts", "insert", "--database", database, line)
    assert done.returncode != 0
    assert done.stderr.startswith("bastion: ") and FULL in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not may_send(bastion.server, "cli-user")
    assert bastion.cli("facts", "insert", "--database", database, line).returncode == 0


def test_a_signing_key_rotated_on_a_full_disk_leaves_no_key_file_behind(bastion, tmp_path):
    """Its private key is written first (to a folder with room), then its row: the row refused,
    the key file goes too, and no key the database does not know is left on disk."""
    database = str(bastion.disk.path / "bastion.db")
    elsewhere = tmp_path / "keys"
    settings = tmp_path / "bastion.toml"
    settings.write_text(config(bastion.url, database, elsewhere))
    with bastion.disk.full():
        done = subprocess.run(
            [sys.executable, "-m", "bastion.cli", "signing-keys", "rotate", "--config"]
            + [str(settings)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode != 0
    assert done.stderr.startswith("bastion: ") and FULL in done.stderr, done.stderr
    assert not elsewhere.exists() or [p.name for p in elsewhere.iterdir()] == []


def test_a_signing_key_file_refused_for_want_of_room_is_said_in_one_line(bastion):
    with bastion.disk.full():
        done = bastion.cli("signing-keys", "rotate")
    assert done.returncode != 0
    assert done.stderr.startswith("bastion: ") and FULL in done.stderr, done.stderr
    assert str(bastion.disk.path / "keys") in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not [p for p in (bastion.disk.path / "keys").iterdir() if ".tmp" in p.name]
    assert bastion.cli("signing-keys", "rotate").returncode == 0


# -- the decision records and the journal -----------------------------------------------------


def _record(decision_id: str):
    from bastion.audit.decisions import DecisionRecord

    return DecisionRecord(
        id=decision_id,
        at=1.0,
        server="crm",
        method="tools/call",
        target="send",
        principals=("User:sam",),
        result="allow",
        reason="allowed",
    )


def test_records_made_on_a_full_disk_wait_and_are_stored_once_there_is_room(tmp_path):
    from bastion.audit.decisions import DecisionRecords
    from bastion.audit.journal import DecisionJournal
    from bastion.db import StorageFull

    with small_disk(tmp_path / "disk", "4m") as disk:
        database = str(disk.path / "bastion.db")
        records = DecisionRecords(Database(database), max_buffer=100)
        records.journal = DecisionJournal(disk.path / "journal", database)
        try:
            with disk.full():
                for i in range(5):
                    record = _record(f"d-{i}")
                    records.journal.append(vars(record))
                    records.add(record)
                with pytest.raises(StorageFull, match=FULL):
                    records.flush()
                assert records.waiting == 5 and records.dropped == 0
            assert records.flush() == 5
            assert [r.id for _, r in records.after()] == [f"d-{i}" for i in range(5)]
            assert records.journal.waiting == 0
        finally:
            records.journal.close()
            records.db.close()


def test_a_journal_line_cut_short_by_a_full_disk_costs_no_later_decision(tmp_path):
    """A real short write (RLIMIT_FSIZE; the write past it fails with EFBIG, as on a full disk):
    the line cut off is taken back, so the next decision's line, written once there is room, is
    whole and recovered after the process dies."""
    from bastion.audit.decisions import DecisionRecords
    from bastion.audit.journal import recover_journals

    database = str(tmp_path / "bastion.db")
    records = DecisionRecords(Database(database))
    code = textwrap.dedent(
        f"""
        import os, resource, signal
        from bastion.audit.journal import DecisionJournal
        from tests.security.test_full_disk import _record

        journal = DecisionJournal({str(tmp_path / "journal")!r}, {database!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        size = os.path.getsize(journal.path)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, resource.RLIM_INFINITY))
        journal.append(vars(_record("cut-short")))
        assert journal.failed == 1, journal.failed
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        journal.append(vars(_record("written-once-there-is-room")))
        os._exit(0)  # killed outright: the journal is left for recovery
        """
    )
    run_python(code)
    try:
        assert recover_journals(tmp_path / "journal", records, records_identity(database)) >= 1
        stored = {r.id for _, r in records.after()}
        assert "written-once-there-is-room" in stored, stored
    finally:
        records.db.close()


def records_identity(database: str) -> str:
    from bastion.audit.journal import database_identity

    return database_identity(database)


def test_a_journal_that_failed_says_so_again_at_its_next_failure_once_it_was_written_again(
    tmp_path, caplog
):
    """Logged once per outage, not once per process: a second full disk, after the journal was
    written again in between, is logged too."""
    from bastion.audit.journal import DecisionJournal

    with small_disk(tmp_path / "disk", "1m") as disk:
        journal = DecisionJournal(disk.path / "journal", "db")
        try:
            for outage in range(2):
                with disk.full():
                    caplog.clear()
                    failed = journal.failed
                    for i in range(1000):  # past the room left in the file's last page
                        journal.append(vars(_record(f"lost-{outage}-{i}")))
                        if journal.failed > failed:
                            break
                    assert "cannot be written" in caplog.text, caplog.text
                caplog.clear()
                journal.append(vars(_record(f"kept-{outage}")))
                assert "written again" in caplog.text, caplog.text
        finally:
            journal.close()


def test_a_write_past_the_file_size_limit_is_refused_as_storage_full(tmp_path):
    """A file size limit (RLIMIT_FSIZE, the write failing with EFBIG) on the SQLite files: SQLite
    answers only ``disk I/O error`` (SQLITE_IOERR_WRITE; its errno is not exposed to Python), and
    bastion finds the limit its file reached: a `StorageFull`, the write refused whole, going in
    once the limit is lifted. (The process ignores SIGXFSZ as Python sets it at start.)"""
    database = str(tmp_path / "bastion.db")
    code = textwrap.dedent(
        f"""
        import os, resource
        from bastion.db import Database, StorageFull
        from bastion.facts.store import FactStore
        from bastion.policy.parser import parse_fact

        store = FactStore(Database({database!r}))
        store.apply([parse_fact('has_role(User{{"seed"}}, "caller", Tool{{"crm/send"}})')])
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        facts = [parse_fact(f'has_role(User{{{{"u{{i}}"}}}}, "caller", Tool{{{{"crm/send"}}}})')
                 for i in range(200)]
        size = max(os.path.getsize(p) for p in ({database!r}, {database!r} + "-wal"))
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
        try:
            store.apply(facts)
        except StorageFull as e:
            assert "storage is full" in str(e) and "disk I/O error" in str(e), e
        else:
            raise SystemExit("went in past the limit")
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        assert store.count() == 1, store.count()
        store.apply(facts)
        assert store.count() == 201, store.count()
        """
    )
    run_python(code)


def migrated(tmp_path: Path) -> tuple[str, str]:
    """A database migrated by `bastion serve` (the test servers' policy, no facts), its WAL
    emptied; and the policy file."""
    policy = tmp_path / "policy.polar"
    policy.write_text(POLICY)
    database = str(tmp_path / "bastion.db")
    ServerProcess(database, tmp_path, str(policy)).start().stop()
    with sqlite3.connect(database) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return database, str(policy)


def members(count: int) -> list[dict]:
    """``count`` facts whose rows take about a kilobyte each (megabytes of WAL in all), fewer
    than the 500 a write sorts in SQLite's temporary files."""
    return [role(f"u{i}-" + "x" * 1000, "member", "Org", "acme") for i in range(count)]


def test_a_fact_written_past_the_file_size_limit_is_503_storage_full_and_goes_in_once_lifted(
    tmp_path,
):
    """`bastion serve` started under a file size limit (`ulimit -f`) that its database's file
    has reached: the facts write is answered `503 Storage full`, `/readyz` and
    `bastion_storage_full` say so, nothing of it is applied, and a server started without the
    limit on the same database takes it. SIGXFSZ is not set by the test: Python ignores it at
    start, so the write past the limit fails with EFBIG instead of killing the server."""
    database, policy = migrated(tmp_path)
    limit = os.path.getsize(database)
    limited = ServerProcess(database, tmp_path, policy)
    limited.preexec_fn = lambda: resource.setrlimit(
        resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY)
    )
    limited.start()
    try:
        with limited.client() as api:
            before = api.get("/readyz").json()["sequence"]
            assert_full(api.post("/v1/facts", json={"facts": members(300)}))
            ready = api.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert FULL in ready.json()["storage"], ready.json()
            assert ready.json()["sequence"] == before
            assert "\nbastion_storage_full 1.0\n" in api.get("/metrics").text
    finally:
        limited.stop()
    lifted = ServerProcess(database, tmp_path, policy).start()
    try:
        with lifted.client() as api:
            assert api.get("/readyz").json()["sequence"] == before
            assert api.get("/v1/facts").json()["facts"] == []
            r = api.post("/v1/facts", json={"facts": members(300)})
            assert r.status_code == 200, r.text
            assert r.json()["inserted"] == 300, r.json()
    finally:
        lifted.stop()


@contextmanager
def ext4_disk(where: Path, size: str = "32M") -> Iterator[Path]:
    """An ext4 filesystem on a loop device (so the tests need root), mounted at ``where``."""
    image = where.with_suffix(".img")
    where.mkdir()
    made = subprocess.run(["truncate", "-s", size, str(image)], capture_output=True, text=True)
    if made.returncode == 0:
        made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    if made.returncode == 0:
        made = subprocess.run(
            ["mount", "-o", "loop", str(image), str(where)], capture_output=True, text=True
        )
    if made.returncode != 0:
        unavailable(f"an ext4 loop device cannot be mounted here ({made.stderr.strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        image.unlink(missing_ok=True)


def shut_down(filesystem: Path) -> None:
    """ext4's EXT4_IOC_SHUTDOWN (logs not flushed): every later read or write on the
    filesystem fails with EIO, as on a disk that died."""
    fd = os.open(filesystem, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, 0x8004587D, struct.pack("I", 2))
    finally:
        os.close(fd)


def test_a_write_that_fails_for_a_real_io_error_stays_a_500_not_storage_full(tmp_path):
    """A disk that fails (EIO, not a limit) under a file size limit that was not reached: SQLite
    says ``disk I/O error`` there too; bastion's look at the cause finds no limit reached and its
    probe write fails with EIO, not for want of room, so it stays the 500 it is."""
    with ext4_disk(tmp_path / "ext4") as disk:
        database, policy = migrated(disk)
        server = ServerProcess(database, tmp_path, policy)
        server.preexec_fn = lambda: resource.setrlimit(
            resource.RLIMIT_FSIZE, (1 << 30, resource.RLIM_INFINITY)
        )
        server.start()
        try:
            with server.client() as api:
                # The pages the write reads are in the server's cache: only its write meets EIO.
                r = api.post("/v1/facts", json={"facts": members(10)[5:]})
                assert r.status_code == 200, r.text
                shut_down(disk)
                r = api.post("/v1/facts", json={"facts": members(10)})
                assert r.status_code == 500, r.text
                ready = api.get("/readyz").json()
                assert "storage" not in ready, ready
            assert "disk I/O error" in server.log.read_text()
        finally:
            server.kill()
