"""`bastion.db.Listener`: a notification that has reached the process is not taken for handled
before its thread has handled it (`behind`, `caught_up`), and none is lost to the heartbeat's
query. Real PostgreSQL; each test listens on a channel of its own."""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psycopg
import pytest

from bastion.db import Database, Listener, ensure_listener_marks
from bastion.retries import Backoff
from tests.conftest import POSTGRES_URL
from tests.relays import Relay
from tests.waits import PATIENCE, eventually


class Heard:
    """A listener's handler that records each payload, and can be held (as a thread waiting for
    the GIL would be) until released."""

    def __init__(self) -> None:
        self.payloads: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, payload: str) -> None:
        self.entered.set()
        self.release.wait(PATIENCE)
        self.payloads.append(payload)


@pytest.fixture
def channel(postgres_url) -> str:  # postgres_url: PostgreSQL is required
    return f"listener_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def notify(channel) -> Iterator[Callable[[str], None]]:
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        yield lambda payload: conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


def listening(channel: str, heard: Heard, url: str = POSTGRES_URL, **options) -> Listener:
    listener = Listener(
        url,
        channel,
        on_notify=heard,
        on_listening=lambda: None,
        name="test-listener",
        **options,
    )
    listener.start()
    assert eventually(lambda: listener.healthy and not listener.behind()), "never listened"
    return listener


def test_a_notification_being_handled_is_not_taken_for_handled(channel, notify):
    heard = Heard()
    listener = listening(channel, heard)
    try:
        heard.release.clear()
        notify("revoked")
        assert heard.entered.wait(PATIENCE)
        # Arrived, not handled yet: whoever must not act on the old state is told so.
        assert listener.behind()
        assert listener.caught_up(0.05) is False
        assert heard.payloads == []
        threading.Timer(0.05, heard.release.set).start()
        assert listener.caught_up(20) is True
        assert heard.payloads == ["revoked"]
        assert not listener.behind()
    finally:
        heard.release.set()
        listener.stop()


def test_bytes_waiting_on_a_parked_listener_count_as_behind():
    """The other half of `behind`: the thread parked (every notification it read handled), but
    bytes already on its socket. Its thread is not started, so it stays parked however long the
    look takes; the socket is a pair's end, standing for the connection's."""
    listener = Listener(
        POSTGRES_URL, "unused", on_notify=Heard(), on_listening=lambda: None, name="test-listener"
    )
    ours, theirs = socket.socketpair()
    with ours, theirs:
        listener._fd, listener._waiting = ours.fileno(), True
        assert not listener.behind()
        theirs.send(b"A")
        assert listener.behind()
        ours.recv(1)
        assert not listener.behind()
        listener._waiting = False  # reading, or handling, what it took
        assert listener.behind()


def test_no_notification_is_lost_to_the_heartbeat(channel, notify):
    heard = Heard()
    # A heartbeat every millisecond: many notifications arrive while its query runs.
    listener = listening(channel, heard, heartbeat=0.001)
    try:
        sent = [str(i) for i in range(300)]
        for payload in sent:
            notify(payload)
        assert eventually(lambda: len(heard.payloads) >= len(sent))
        assert listener.caught_up(20)
        assert heard.payloads == sent
    finally:
        listener.stop()


def test_a_connection_the_server_ends_is_never_caught_up_on(channel, notify):
    heard = Heard()
    listener = listening(channel, heard)
    try:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
        # Its last words are no notification: the thread asks, finds it gone, and says so.
        assert eventually(listener.behind)
        assert listener.caught_up(20) is False
        assert eventually(lambda: not listener.healthy)
        # It comes back, and what is sent then is heard.
        assert eventually(lambda: listener.healthy and listener.caught_up(0))
        notify("after")
        assert eventually(lambda: heard.payloads == ["after"])
    finally:
        listener.stop()


# Confirmed commits (`Database.confirm_heard`): each test on a schema of its own (its
# ``listener_marks`` and barrier numbers), on a channel of its own.


@pytest.fixture
def marks_db(postgres_url) -> Iterator[Database]:
    db = Database(postgres_url)
    ensure_listener_marks(db)
    yield db
    db.close()


def heard_of(db: Database, listener: Listener) -> int:
    return db.execute("SELECT heard FROM listener_marks WHERE listener = ?", (listener.mark,))[0][0]


def test_a_confirmed_commit_returns_once_the_listener_has_handled_it(
    channel, postgres_url, marks_db
):
    heard = Heard()
    listener = listening(channel, heard, postgres_url, confirms=True)
    try:
        heard.release.clear()
        threading.Timer(0.2, heard.release.set).start()
        with marks_db.transaction():
            marks_db.notify(channel, "revoked")
            marks_db.confirm_after_commit(channel)
            marks_db.confirm_after_commit(channel)  # once per transaction however often asked
        # The handler was held when the commit was made: the call returned after it finished.
        assert heard.payloads == ["revoked"]  # the barrier itself is never handed on
        assert heard_of(marks_db, listener) == 1
        # Nothing notified in a transaction rolled back is waited for.
        with pytest.raises(RuntimeError), marks_db.transaction():
            marks_db.confirm_after_commit(channel)
            raise RuntimeError("rolled back")
        assert heard_of(marks_db, listener) == 1
    finally:
        heard.release.set()
        listener.stop()
    # Stopped, it leaves no row behind to wait for.
    assert marks_db.execute("SELECT count(*) FROM listener_marks")[0][0] == 0


def test_a_listener_that_never_confirms_holds_a_commit_only_up_to_the_bound(
    channel, postgres_url, marks_db
):
    """A row whose connection is open but whose listener confirms nothing (stuck, say) is waited
    for up to the bound, then the commit returns, saying so; a row whose connection is gone (a
    process killed) is not waited for at all."""
    with psycopg.connect(postgres_url, autocommit=True) as stuck:
        stuck.execute(
            "INSERT INTO listener_marks (listener, channel, backend_pid, backend_start, heard)"
            " SELECT 'stuck', %s, pid, backend_start, 0 FROM pg_stat_activity"
            " WHERE pid = pg_backend_pid()",
            (channel,),
        )
        assert marks_db.confirm_heard(channel, timeout=0.2) is False
        pid = stuck.info.backend_pid
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        assert eventually(
            lambda: (
                not admin.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchall()
            )
        )
    assert marks_db.confirm_heard(channel, timeout=PATIENCE) is True


def test_a_barrier_of_another_schema_confirms_nothing(channel, postgres_url, marks_db):
    """Notices are the database's: a deployment in another schema of it, on the same channel,
    sends barriers numbered by its own sequence. Before they named their schema, a listener took
    another schema's barrier 1,001 for its own, and its writers' next thousand commits were
    taken for confirmed without it having heard them."""
    heard = Heard()
    listener = listening(channel, heard, postgres_url, confirms=True)
    other = f"t_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f"CREATE SCHEMA {other}")
        elsewhere = Database(f"{POSTGRES_URL}?options=-csearch_path%3D{other}")
        ensure_listener_marks(elsewhere)
        elsewhere.execute("SELECT setval('listener_barriers', 1000)")
        assert elsewhere.confirm_heard(channel) is True  # nobody listens there
        elsewhere.close()
        # Handled after the other schema's barrier (one channel: commit order).
        assert marks_db.confirm_heard(channel) is True
        assert heard_of(marks_db, listener) == 1
        assert heard.payloads == []
    finally:
        listener.stop()
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA IF EXISTS {other} CASCADE")


def test_a_stopped_listener_ends_at_once_not_at_its_next_heartbeat(channel):
    """`stop` wakes the thread parked on the socket: a process stopping (a replica shut down)
    does not wait out the heartbeat of each of its listeners. The heartbeat here is far beyond
    the stop's bound, so a thread left to wake by itself is still alive when the bound ends."""
    listener = listening(channel, Heard(), heartbeat=600)
    listener.stop(timeout=PATIENCE)
    assert not listener._thread.is_alive(), "the thread waited for its heartbeat"


# An outage of the listener's database, local to one test: it reaches PostgreSQL through a relay
# of its own, which the test cuts (its connection ends, every new one is closed at once) and
# restores. The shared server is never stopped.


@dataclass
class Waits(Backoff):
    """The listener's real `Backoff`, noting each wait it chose."""

    chosen: list[float] = field(default_factory=list)

    def after_failure(self) -> float:
        wait = super().after_failure()
        self.chosen.append(wait)
        return wait


def said(caplog, channel: str) -> list[str]:
    """The warnings of `bastion.db` about the listener on ``channel``."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "bastion.db" and r.levelno >= logging.WARNING and channel in r.getMessage()
    ]


def relayed(relay: Relay) -> str:
    return POSTGRES_URL.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")


def test_an_outage_is_said_once_not_at_every_attempt_and_its_end_once(channel, notify, caplog):
    """While the database cannot be reached the listener tries again and again; it says the
    connection is lost once, not at each attempt (every half second, per process, was a flood
    for as long as the outage lasted), and once that it listens again, having caught up."""
    caplog.set_level(logging.DEBUG, logger="bastion.db")
    heard = Heard()
    caught_up: list[bool] = []  # at each `on_listening`: whether the listener said it was healthy
    with Relay(("127.0.0.1", 5432)) as relay:
        listener = Listener(
            relayed(relay),
            channel,
            on_notify=heard,
            on_listening=lambda: caught_up.append(listener.healthy),
            name="test-listener",
            retries=Backoff(0.01, 0.05),  # many attempts soon
        )
        listener.start()
        try:
            assert eventually(lambda: listener.healthy and not listener.behind())
            relay.cut()
            before = relay.accepted
            # Several attempts refused: the outage lasts.
            assert eventually(lambda: relay.accepted >= before + 8)
            assert not listener.healthy
            notify("while down")  # not heard: what ``on_listening`` catches up on
            assert len(said(caplog, channel)) == 1, said(caplog, channel)
            relay.restore()
            assert eventually(lambda: listener.healthy and listener.caught_up(0))
            notify("after")
            assert eventually(lambda: heard.payloads == ["after"])
            # Caught up once at the start and once back, each time before it said it was healthy.
            assert caught_up == [False, False]
            lines = said(caplog, channel)
            assert len(lines) == 2 and "again" in lines[1], lines
        finally:
            listener.stop()


def test_the_attempts_of_an_outage_back_off_up_to_the_longest_wait_then_start_again(
    channel, caplog
):
    """Each failed attempt is followed by the wait its `Backoff` chose, doubling up to the
    longest (jittered: replicas do not all try a recovering database at one moment); nothing is
    tried without such a wait; once listening, the next outage starts from the first wait."""
    caplog.set_level(logging.DEBUG, logger="bastion.db")
    waits = Waits(0.02, 0.16)  # ceilings 0.02, 0.04, 0.08, then 0.16
    with Relay(("127.0.0.1", 5432)) as relay:
        listener = Listener(
            relayed(relay),
            channel,
            on_notify=Heard(),
            on_listening=lambda: None,
            name="test-listener",
            retries=waits,
        )
        listener.start()
        try:
            assert eventually(lambda: listener.healthy and not listener.behind())
            relay.cut()
            before = relay.accepted
            assert eventually(lambda: len(waits.chosen) >= 8)
            attempts = relay.accepted - before
            # Every attempt came after a wait the backoff chose (the loss, then each refusal).
            assert attempts <= len(waits.chosen), (attempts, waits.chosen)
            # Doubled up to the longest: from the fourth on, at least half the longest.
            assert all(0.08 <= w <= 0.16 for w in waits.chosen[3:8]), waits.chosen
            assert all(w <= 0.02 for w in waits.chosen[:1]), waits.chosen
            relay.restore()
            assert eventually(lambda: listener.healthy)
            assert waits.failures == 0
            # A second outage waits the first wait again, and is said once too.
            waits.chosen.clear()
            relay.cut()
            assert eventually(lambda: len(waits.chosen) >= 3)
            assert waits.chosen[0] <= 0.02, waits.chosen
            relay.restore()
            assert eventually(lambda: listener.healthy)
            lines = said(caplog, channel)
            assert len(lines) == 4, lines
            assert ["again" in line for line in lines] == [False, True, False, True], lines
        finally:
            listener.stop()
