"""A request stuck on a database lock that another process holds stops no other request.

Each wait is bounded (SQLite's ``busy_timeout``, PostgreSQL's ``lock_timeout``), and so is the
wait for bastion's connection behind such a request: without that bound the requests queued on
the connection each waited their own timeout in turn, and a read that needs no lock was answered
only after all of them. A wait past its bound is a 503 (retry) that wrote nothing, never a 500.
Real ``bastion serve`` processes, a real SQLite file held by another connection, a real
PostgreSQL table locked by another session.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from tests.server.conftest import role
from tests.waits import eventually

STUCK_WRITES = 16  # requests queued on the connection behind the first stuck one
HELD = 6.0  # seconds the lock is held at most: each stuck write waits 1 s


def _sqlite(sqlite_url: str) -> tuple[str, Callable[[], contextmanager]]:
    """A database whose writes wait 1 s for a lock, and a way to hold its write lock (a
    transaction of another connection, as another process's would)."""

    @contextmanager
    def held() -> Iterator[None]:
        other = sqlite3.connect(sqlite_url, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.execute("ROLLBACK")
            other.close()

    return f"sqlite:///{sqlite_url}?busy_timeout=1", held


def _postgres(postgres_url: str) -> tuple[str, Callable[[], contextmanager]]:
    """The same on PostgreSQL: ``lock_timeout`` 1 s, and the facts table locked against
    writes (not reads) by another session's transaction."""

    @contextmanager
    def held() -> Iterator[None]:
        with psycopg.connect(postgres_url) as other:
            other.execute("LOCK TABLE facts IN EXCLUSIVE MODE")
            try:
                yield
            finally:
                other.rollback()

    return postgres_url + "%20-clock_timeout%3D1000", held


@pytest.fixture(params=["sqlite", "postgresql"])
def locked_database(request):
    if request.param == "sqlite":
        return _sqlite(request.getfixturevalue("sqlite_url"))
    return _postgres(request.getfixturevalue("postgres_url"))


def _accepted(server) -> int:
    """The client connections the server process has accepted and holds open (Linux: its
    sockets, matched in /proc/<pid>/net/tcp, that are established on its port)."""
    pid = server.proc.pid
    sockets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            target = os.readlink(fd)
            if target.startswith("socket:["):
                sockets.add(target[len("socket:[") : -1])
    port = f":{server.port:04X}"
    established = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(port) and fields[3] == "01" and fields[9] in sockets:
            established += 1
    return established


def _write(client, user: str):
    return client.post("/v1/facts", json={"facts": [role(user, "member", "Org", "acme")]})


def test_a_write_held_past_the_lock_wait_is_refused_as_busy_and_writes_nothing(
    serve, locked_database
):
    database, held = locked_database
    server = serve(database)
    with server.client() as client:
        assert _write(client, "before").status_code == 200
        with held():
            refused = _write(client, "mallory")
        assert refused.status_code == 503, refused.text
        assert "busy" in refused.json()["detail"]
        stored = client.get("/v1/facts").json()["facts"]
        assert [f["args"][0]["id"] for f in stored] == ["before"]
        assert _write(client, "mallory").status_code == 200  # the retry, lock let go of


def test_requests_queued_behind_a_stuck_write_are_answered_while_the_lock_is_still_held(
    serve, locked_database
):
    database, held = locked_database
    server = serve(database)
    writes: dict[str, int] = {}
    released, answered = threading.Event(), threading.Event()
    read: list[tuple[int, bool]] = []

    def write(user: str) -> None:
        writes[user] = _write(client, user).status_code

    def read_facts() -> None:
        status = client.get("/v1/facts").status_code
        read.append((status, released.is_set()))
        answered.set()

    with server.client() as client:
        with held():
            writers = [threading.Thread(target=write, args=(f"w{n}",)) for n in range(STUCK_WRITES)]
            for writer in writers:
                writer.start()
            # The writes queue on the connection first: the server has taken every one in (or
            # answered one, past its wait for the lock: those asked with it are in by then).
            assert eventually(lambda: writes or _accepted(server) >= STUCK_WRITES), "never sent"
            reader = threading.Thread(target=read_facts)
            reader.start()
            answered.wait(HELD)
            released.set()
        for thread in [reader, *writers]:
            thread.join()
        # The read needs no lock: it is answered (200, or 503 if the connection stayed busy)
        # before the lock it does not need is let go of.
        assert read and read[0][1] is False, read
        assert read[0][0] in (200, 503)
        assert set(writes.values()) <= {200, 503}, writes
        stored = {f["args"][0]["id"] for f in client.get("/v1/facts").json()["facts"]}
        assert stored == {user for user, status in writes.items() if status == 200}
