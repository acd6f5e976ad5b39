"""A stdio upstream's pipes are each closed once, under uvloop too (what `bastion serve` runs).

uvloop's pipe transports have libuv close the descriptor, and close the file object they were
given as well, later: a second close of the same number. Another thread given that number in
between (a worker starting the next child, a database driver) then has its file closed under it:
a stdio upstream's start failed so, `cannot start ...: [Errno 9] Bad file descriptor`, with three
calls starting it at once. Here the child's stdout is a file object that notes, when it is
closed, whether its descriptor was closed already by someone else.
"""

from __future__ import annotations

import asyncio
import gc
import io
import os
import subprocess
import sys

import pytest
import uvloop

from bastion.gateway import upstream


class NotesItsClose(io.FileIO):
    """A pipe's file object that notes, when closed, whether its descriptor still was open."""

    closes: list[str] = []

    def close(self) -> None:
        if not self.closed:
            try:
                os.fstat(self.fileno())
                self.closes.append("open")
            except OSError as e:
                self.closes.append(f"closed already: {e}")
        super().close()


@pytest.mark.parametrize("loop_factory", [uvloop.new_event_loop, asyncio.new_event_loop])
def test_a_childs_pipes_are_closed_once_so_no_other_file_is_closed(monkeypatch, loop_factory):
    popen = subprocess.Popen

    def with_stdout_taking(*args, **kwargs):
        child = popen(*args, **kwargs)
        raw = child.stdout.detach()
        child.stdout = NotesItsClose(os.dup(raw.fileno()), "rb")
        raw.close()
        return child

    monkeypatch.setattr(upstream.subprocess, "Popen", with_stdout_taking)
    NotesItsClose.closes = []

    async def run() -> None:
        child = await upstream._Child.start(
            [sys.executable, "-c", "print('bye')"], dict(os.environ), None, 1 << 16, 2.0
        )
        assert await child.stdout.read() == b"bye\n"  # to its end: the transport closes
        await child.wait()
        child.stdin.close()
        await asyncio.sleep(0)  # the transports' closing callbacks
        del child

    loop = loop_factory()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
    gc.collect()  # what no transport closed, its file object does now
    # Whoever closes the child's stdout (the transport, the collector) finds it open.
    assert NotesItsClose.closes == ["open"]
