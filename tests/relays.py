"""A TCP relay to a shared service, for taking that service away from one test's processes only.

Other tests use the same Redis and PostgreSQL at the same time, so those are never paused, stopped
or slowed: the processes under test reach them through a `Relay` of their own (its `port`). The
relay can be `cut` (the service is down: its connections end, new ones are closed at once), made
to `drop` (each request is read whole, then its connection closed unanswered: a peer that took
the request and failed), `restore`d, and can deliver what the service sends ``delay`` seconds
late, in order (what the client sends goes at once). The delay can be set when the relay is
made or changed at any time (`delay`): a test can set its processes up at full speed, then slow
what they hear from the moment that matters on.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time


class Relay:
    """A TCP relay on a free loopback port to ``target``. With ``delay`` (seconds, None for a
    relay that never delays), each chunk the service sends is due ``delay`` seconds after it
    reached the relay, ``delay`` read as it arrives: set `delay` later to slow what follows."""

    def __init__(self, target: tuple[str, int], delay: float | None = None) -> None:
        self.target = target
        self.delay = delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._mode = "up"  # "up", "cut" or "drop"
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self.accepted = 0  # connections made to the relay, whatever became of them
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    def cut(self) -> None:
        """From now on the service is unreachable through the relay: its connections are ended,
        and new ones closed at once."""
        self._down("cut")

    def drop(self) -> None:
        """From now on each request is read (its head, whole), then its connection closed with
        no answer; the connections open are ended."""
        self._down("drop")

    def restore(self) -> None:
        with self._lock:
            self._mode = "up"

    def close(self) -> None:
        self._closed = True
        self.cut()
        _end(self._listener)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _down(self, mode: str) -> None:
        with self._lock:
            self._mode = mode
            ended, self._open = self._open, []
        for sock in ended:
            _end(sock)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                mode = self._mode
                self.accepted += 1
            if mode == "drop":
                threading.Thread(target=_read_then_end, args=(client,), daemon=True).start()
                continue
            if mode == "cut":
                _end(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                _end(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._open += [client, server]
            threading.Thread(target=_pump, args=(client, server), daemon=True).start()
            if self.delay is not None:
                late: queue.Queue = queue.Queue()
                threading.Thread(target=_late, args=(server, late, self), daemon=True).start()
                threading.Thread(target=_deliver, args=(late, client), daemon=True).start()
            else:
                threading.Thread(target=_pump, args=(server, client), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    _end(source)
    _end(sink)


def _late(source: socket.socket, late: queue.Queue, relay: Relay) -> None:
    """Each chunk read, with the time it is due (the relay's delay as it arrived)."""
    with contextlib.suppress(OSError):
        while chunk := source.recv(65536):
            late.put((time.monotonic() + relay.delay, chunk))
    late.put((time.monotonic() + relay.delay, b""))


def _deliver(late: queue.Queue, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while True:
            due, chunk = late.get()
            time.sleep(max(0.0, due - time.monotonic()))
            if not chunk:
                break
            sink.sendall(chunk)
    _end(sink)


def _read_then_end(sock: socket.socket) -> None:
    sock.settimeout(5)
    taken = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in taken and (chunk := sock.recv(65536)):
            taken += chunk
    _end(sock)


def _end(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
