"""A Redis server of one test's own, that the test may flush, restart and fill.

The shared Redis (127.0.0.1:6379) is never flushed or restarted: other tests use it at the same
time. `PrivateRedis` runs ``redis-server`` on a free loopback port with nothing kept on disk
(``--save '' --appendonly no``; or, if asked, an append-only file), in a folder of its own, and
stops it at the end.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import redis

from tests.conftest import require_program
from tests.ports import free_port
from tests.waits import PATIENCE, eventually


class PrivateRedis:
    def __init__(self, folder: Path, appendonly: bool = False) -> None:
        require_program("redis-server", shutil.which("redis-server") or "/usr/bin/redis-server")
        self.folder = folder
        self.appendonly = appendonly
        self.port = free_port()
        self._process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> None:
        """Start it (again): a restarted server loads ``dump.rdb`` from its folder if a
        ``SAVE`` left one there, or its append-only file, and nothing otherwise."""
        self._process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
            + ["--dir", str(self.folder), "--save", ""]
            + ["--appendonly", "yes" if self.appendonly else "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def answering_or_ended() -> bool:
            try:
                return bool(self.client().ping())
            except redis.RedisError:
                return self._process.poll() is not None

        if not eventually(answering_or_ended, every=0.05):
            raise RuntimeError("redis-server did not answer")
        if self._process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self._process.returncode}")

    def stop(self) -> None:
        """Stop it without saving (what it holds in memory is gone, but for what its
        append-only file has)."""
        if self._process is None:
            return
        self._process.terminate()  # SIGTERM: no save, with --save ''
        self._process.wait(PATIENCE)
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> PrivateRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
