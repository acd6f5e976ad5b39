"""Loopback ports for the tests' servers.

A port is picked, then bound later by the server it is for (often another process): until then
nothing in the kernel keeps it, and several test runs go at once on one machine (each work
tree's, with xdist processes named gw0, gw1... in each). So every test process on the machine
takes its ports from one range, below the kernel's ephemeral range (which ``bind(0)`` and
outgoing connections draw from), and holds each port it picked in a lock of that port's byte of
one lock file (`_LOCK_FILE`): another process skips a port held, and the kernel lets go of a
process's holds when it ends. Without that, two runs' gw0 picked the same ports in the same
order, and one's server found its port taken (``address already in use``) or, worse, its
readiness check was answered by the other run's server.

A process holds its last `_KEPT` ports (long after its servers bound them) and lets go of older
ones, so the range is not used up by many processes picking many ports each.
"""

from __future__ import annotations

import collections
import fcntl
import os
import socket
import tempfile

_FIRST = 10000
_LAST = 32767  # Linux's ephemeral range starts at 32768
_RANGE = range(_FIRST, _LAST + 1)
_KEPT = 1000
# Ports in the range that browsers refuse to open (Chromium's and Firefox's "unsafe ports": 10080
# is Amanda's); a server on one is unreachable from the browser tests (net::ERR_UNSAFE_PORT).
_BROWSERS_REFUSE = frozenset({10080})
_LOCK_FILE = os.path.join(tempfile.gettempdir(), "bastion-test-ports.lock")


def _first_offset() -> int:
    """Where this process starts looking: apart for each xdist process of a run, so that they
    do not all try the same ports first."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    number = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    return number * 2500 % len(_RANGE)


_next = _first_offset()
_held: collections.deque[int] = collections.deque()
# Opened once and never closed: closing any descriptor of the file would drop every lock this
# process holds in it (POSIX record locks belong to the process, not the descriptor).
_lock_fd: int | None = None


def _hold(port: int) -> bool:
    """Take ``port``'s lock for this process; False if another process holds it."""
    global _lock_fd
    if _lock_fd is None:
        _lock_fd = os.open(_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.lockf(_lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, port, os.SEEK_SET)
    except OSError:  # held by another process
        return False
    _held.append(port)
    if len(_held) > _KEPT:
        fcntl.lockf(_lock_fd, fcntl.LOCK_UN, 1, _held.popleft(), os.SEEK_SET)
    return True


def free_socket() -> socket.socket:
    """A loopback TCP socket bound to a port no other test process will pick."""
    global _next
    for _ in range(len(_RANGE)):
        port = _RANGE[_next % len(_RANGE)]
        _next += 1
        if port in _BROWSERS_REFUSE:
            continue
        if port in _held:  # this process's own, perhaps a server of its still starting
            continue
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:  # in use (a server listening, or another program)
            sock.close()
            continue
        if _hold(port):
            return sock
        sock.close()
    raise OSError(f"no free port left in {_RANGE}")


def free_port() -> int:
    """A port no other test process will pick, free now (the caller's server binds it)."""
    with free_socket() as sock:
        return sock.getsockname()[1]
