"""PostgreSQL's answers reaching one test's client late.

A notice PostgreSQL sends after a commit can be on its way to another process when the committing
call returns: under load, tens of milliseconds. `DelayedRelay` makes that moment long and certain
for the connections made through it (`DelayedRelay.url`): every byte from the server reaches
the client ``delay`` seconds after it left, in order; what the client sends goes at once.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from urllib.parse import urlsplit, urlunsplit


class DelayedRelay:
    """A TCP relay on a free loopback port to ``target`` (the shared PostgreSQL)."""

    def __init__(self, delay: float, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.delay = delay
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._open: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name="delayed-relay", daemon=True).start()

    def url(self, postgres_url: str) -> str:
        """``postgres_url`` (same database, user and options) through the relay."""
        parts = urlsplit(postgres_url)
        user = f"{parts.username}@" if parts.username else ""
        where = f"{user}127.0.0.1:{self._listener.getsockname()[1]}"
        return urlunsplit(parts._replace(netloc=where))

    def close(self) -> None:
        self._closed = True
        for sock in [*self._open, self._listener]:
            _end(sock)

    def __enter__(self) -> DelayedRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                return
            server.settimeout(None)
            self._open += [client, server]
            threading.Thread(target=_pump, args=(client, server), daemon=True).start()
            late: queue.Queue = queue.Queue()
            threading.Thread(target=_late, args=(server, late, self.delay), daemon=True).start()
            threading.Thread(target=_deliver, args=(late, client), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    _end(source)
    _end(sink)


def _late(source: socket.socket, late: queue.Queue, delay: float) -> None:
    """Each chunk read, with the time it is due."""
    with contextlib.suppress(OSError):
        while chunk := source.recv(65536):
            late.put((time.monotonic() + delay, chunk))
    late.put((time.monotonic() + delay, b""))


def _deliver(late: queue.Queue, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while True:
            due, chunk = late.get()
            time.sleep(max(0.0, due - time.monotonic()))
            if not chunk:
                break
            sink.sendall(chunk)
    _end(sink)


def _end(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
