"""`bastion.db.Listener`: a notification that has reached the process is not taken for handled
before its thread has handled it (`behind`, `caught_up`), and none is lost to the heartbeat's
query. Real PostgreSQL; each test listens on a channel of its own."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest

from bastion.db import Listener
from tests.conftest import POSTGRES_URL
from tests.waits import eventually


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
        self.release.wait(20)
        self.payloads.append(payload)


@pytest.fixture
def channel(postgres_url) -> str:  # postgres_url: PostgreSQL is required
    return f"listener_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def notify(channel) -> Iterator[Callable[[str], None]]:
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        yield lambda payload: conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


def listening(channel: str, heard: Heard, **timing: float) -> Listener:
    listener = Listener(
        POSTGRES_URL,
        channel,
        on_notify=heard,
        on_listening=lambda: None,
        name="test-listener",
        **timing,
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
        assert heard.entered.wait(20)
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
