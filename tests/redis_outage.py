"""Redis taken away from one test's bastion, and from nothing else.

Other tests use the same Redis server at the same time, so it is never paused, stopped or
flushed: the test's bastion reaches it through a relay of its own (`RedisRelay.url`), which
`cut` makes a Redis that is down (its connections end, new ones are closed at once) and
`restore` brings back.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class RedisRelay:
    """A TCP relay on a free loopback port to ``target`` (the shared Redis)."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 6379)) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._up = True
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="redis-relay", daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._listener.getsockname()[1]}/0"

    def cut(self) -> None:
        """From now on Redis is unreachable through the relay: its connections are ended."""
        with self._lock:
            self._up = False
            ended, self._open = self._open, []
        for sock in ended:
            _end(sock)

    def restore(self) -> None:
        with self._lock:
            self._up = True

    def close(self) -> None:
        self._closed = True
        self.cut()
        _end(self._listener)

    def __enter__(self) -> RedisRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                up = self._up
            if not up:
                _end(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=2)
            except OSError:
                _end(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    _end(source)
    _end(sink)


def _end(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
