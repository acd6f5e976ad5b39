"""Loopback ports for the tests' servers.

Under pytest-xdist (``make test`` runs two processes) each process takes ports from a range of
its own, below the kernel's ephemeral range, which ``bind(0)`` and outgoing connections draw
from: two processes never pick the same port. With ``bind(0)`` in both, one could find a port
free, release it to the server it starts, and see the other process's server take it first (and
then talk to that server: seen once in CI). Run alone, the kernel chooses.
"""

from __future__ import annotations

import itertools
import os
import socket

_SPAN = 5000
_FIRST = 20000  # below 32768, where Linux's ephemeral range starts


def _worker_range() -> range | None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not worker[2:].isdigit():
        return None
    start = _FIRST + int(worker[2:]) * _SPAN
    return range(start, start + _SPAN)


_RANGE = _worker_range()
_NEXT = itertools.count()


def free_socket() -> socket.socket:
    """A loopback TCP socket bound to a port no other test process will pick."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if _RANGE is None:
        sock.bind(("127.0.0.1", 0))
        return sock
    for _ in range(_SPAN):
        port = _RANGE[next(_NEXT) % _SPAN]
        try:
            sock.bind(("127.0.0.1", port))
            return sock
        except OSError:  # in use (a server of this process, or another program)
            continue
    sock.close()
    raise OSError(f"no free port left in {_RANGE}")


def free_port() -> int:
    """A port no other test process will pick, free now (the caller's server binds it)."""
    with free_socket() as sock:
        return sock.getsockname()[1]
