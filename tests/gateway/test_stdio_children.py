"""A stdio upstream's child process always has an owner: a start given up after the process was
made (its call cancelled, its client gone, its deadline or the upstream's start timeout passed,
the server stopping), a start whose pipes cannot be handed to the event loop, and an upstream
closed while it starts each leave no process running and none unreaped (a zombie), under
uvloop (what `bastion serve` runs) and asyncio's own loop. Nor does any of these, a close, or a
process ending by itself leave running what that process started (a launcher's server).

The moment is made certain: `subprocess.Popen`, in its worker thread, holds on to the process it
started until the test says go. The child sleeps and never reads its stdin, so one nobody stops
runs on. Each test checks after its loop has closed, and so after its worker threads ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import uvloop

from bastion.gateway import upstream
from bastion.gateway.config import GatewayConfig, UpstreamConfig
from bastion.gateway.jsonrpc import RpcError
from bastion.gateway.upstream import StdioUpstream
from bastion.server.config import ConfigError
from tests.processes import left
from tests.waits import PATIENCE, eventually, eventually_async, time_enough

LOOPS = pytest.mark.parametrize(
    "loop_factory", [uvloop.new_event_loop, asyncio.new_event_loop], ids=["uvloop", "asyncio"]
)
# A child that outlives whoever forgets it: it never reads its stdin, so no pipe closing ends it.
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
# What a process leaves of its group has this long between SIGTERM and SIGKILL (the upstreams'
# stop_grace_seconds here): long enough for a loaded machine to run a SIGTERM handler that
# writes a file.
GRACE = 5.0
# The grace a test first gives when it waits the grace out to its end (a heedless server is
# killed only then): made twice as long each time a machine too busy for the SIGTERM handlers
# had not run them within it (`tests.waits.time_enough`).
SHORT_GRACE = 0.5


def open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class HeldStart:
    """`subprocess.Popen` that holds its worker thread, the process made, until `go`."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self.made = threading.Event()
        self.go = threading.Event()
        self._popen = subprocess.Popen

    def __call__(self, *args, **kwargs) -> subprocess.Popen:
        child = self._popen(*args, **kwargs)
        self.pids.append(child.pid)
        self.made.set()
        self.go.wait(PATIENCE)
        return child

    async def until_made(self) -> None:
        assert await asyncio.to_thread(self.made.wait, PATIENCE)


@pytest.fixture
def held(monkeypatch):
    """Popen held (`HeldStart`); whatever a failing test left running is ended after it."""
    hold = HeldStart()
    monkeypatch.setattr(upstream.subprocess, "Popen", hold)
    yield hold
    hold.go.set()
    for pid in hold.pids:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def run(loop_factory, scenario):
    """Run ``scenario()`` to its end, then close the loop: its worker threads are waited for."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(scenario())


def sleeper_upstream(timeout: float = 10) -> StdioUpstream:
    command, *args = SLEEPER
    return StdioUpstream(
        UpstreamConfig(name="sleeper", command=command, args=tuple(args), timeout=timeout)
    )


@LOOPS
def test_a_start_cancelled_while_its_process_is_made_leaves_no_child(held, loop_factory):
    """The call that started the process was cancelled (its client went away, the server is
    stopping) while `Popen` ran in the worker thread: the process it made is ended and waited
    for, not left to run with nobody to stop it."""

    async def scenario() -> None:
        start = asyncio.ensure_future(
            upstream._Child.start(SLEEPER, dict(os.environ), None, 1 << 16, GRACE)
        )
        await held.until_made()
        start.cancel()
        held.go.set()
        with pytest.raises(asyncio.CancelledError):
            await start

    run(loop_factory, scenario)
    assert [left(pid) for pid in held.pids] == [None]


@LOOPS
def test_a_start_out_of_time_while_its_process_is_made_leaves_no_child(held, loop_factory):
    """The upstream's start timeout passed while `Popen` ran: the call fails as it did (`did
    not start within`), and the process made meanwhile is ended and waited for."""

    async def scenario() -> str:
        connection = sleeper_upstream(timeout=0.01)
        try:
            with pytest.raises(RpcError) as failed:
                await connection.ensure_started()
            held.go.set()
            return failed.value.message
        finally:
            await connection.close()

    assert run(loop_factory, scenario) == "upstream sleeper did not start within 0.01s"
    assert [left(pid) for pid in held.pids] == [None]


@LOOPS
def test_a_start_whose_pipes_cannot_be_handed_over_leaves_no_child_nor_pipe(
    monkeypatch, loop_factory
):
    """The process was made but its pipes could not be handed to the event loop (here its
    stderr's): the start fails, the process is ended and waited for, and every pipe of it is
    closed, those already handed to the loop included."""
    made: list[int] = []
    popen = subprocess.Popen

    def noting(*args, **kwargs):
        child = popen(*args, **kwargs)
        made.append(child.pid)
        return child

    reading = upstream._reading
    handed: list[str] = []

    async def stderr_refused(*args):
        reader = await reading(*args)
        handed.append("pipe")
        if len(handed) == 2:  # stdout's and stderr's transports made, then a failure
            raise OSError("no more pipes")
        return reader

    monkeypatch.setattr(upstream.subprocess, "Popen", noting)
    monkeypatch.setattr(upstream, "_reading", stderr_refused)

    async def scenario() -> None:
        with pytest.raises(OSError, match="no more pipes"):
            await upstream._Child.start(SLEEPER, dict(os.environ), None, 1 << 16, GRACE)

    before = open_descriptors()
    try:
        run(loop_factory, scenario)
        assert [left(pid) for pid in made] == [None]
        assert open_descriptors() - before == set()
    finally:
        for pid in made:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


@LOOPS
def test_an_upstream_closed_while_it_starts_leaves_no_child_and_starts_none_again(
    held, loop_factory
):
    """The upstream was closed (the server stopping, its upstream session closed) while a call
    started its process: the call fails, the process made meanwhile is ended and waited for, and
    a later call starts none."""

    async def scenario() -> tuple[str, str]:
        connection = sleeper_upstream()
        call = asyncio.ensure_future(connection.ensure_started())
        await held.until_made()
        await connection.close()
        held.go.set()
        with pytest.raises(RpcError) as failed:
            await call
        with pytest.raises(RpcError) as again:
            await connection.ensure_started()
        # Killed at once, waited for as the loop runs on.
        assert await eventually_async(lambda: left(held.pids[0]) is None), left(held.pids[0])
        return failed.value.message, again.value.message

    assert run(loop_factory, scenario) == ("upstream sleeper is closed",) * 2
    assert [left(pid) for pid in held.pids] == [None]


@LOOPS
def test_a_start_out_of_time_in_its_handshake_leaves_no_child(monkeypatch, loop_factory):
    """A process that never answers its handshake: the call fails within the timeout, and the
    process is killed and waited for while bastion runs on (no zombie left)."""

    async def scenario() -> int:
        connection = sleeper_upstream(timeout=0.2)
        pids: list[int] = []
        real = upstream._Child.start

        async def noting(*args, **kwargs):
            child = await real(*args, **kwargs)
            pids.append(child.pid)
            return child

        monkeypatch.setattr(upstream._Child, "start", noting)
        with pytest.raises(RpcError, match="did not start within"):
            await connection.ensure_started()
        assert await eventually_async(lambda: left(pids[0]) is None), left(pids[0])
        await connection.close()
        return pids[0]

    assert left(run(loop_factory, scenario)) is None


# A server that answers its handshake and then neither ends at its stdin's end nor at SIGTERM.
STUBBORN = textwrap.dedent(
    """
    import json, signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for line in sys.stdin:
        message = json.loads(line)
        if message.get("method") == "initialize":
            result = {"protocolVersion": "2025-11-25", "capabilities": {},
                      "serverInfo": {"name": "stubborn", "version": "1"}}
            print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}),
                  flush=True)
    time.sleep(600)
    """
)


@LOOPS
def test_a_close_cancelled_while_it_waits_for_the_process_stops_it_at_once(tmp_path, loop_factory):
    """Closing asks the process to end (stdin closed, then SIGTERM, then SIGKILL, 2 s apart);
    a close cancelled meanwhile (a server stopping, cut short) kills it at once rather than
    leave it running."""
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)

    pids: list[int] = []

    async def scenario() -> None:
        connection = StdioUpstream(
            UpstreamConfig(name="stubborn", command=sys.executable, args=(str(script),))
        )
        await connection.ensure_started()
        process = connection._process
        pids.append(process.pid)
        closing = asyncio.ensure_future(connection.close())
        assert await eventually_async(process.stdin.is_closing)  # waiting for it to end
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert await eventually_async(lambda: left(process.pid) is None), left(process.pid)

    try:
        run(loop_factory, scenario)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


# What a launcher (`npx -y server`, `uvx`, `sh -c`, `docker run -i`) starts: the real work, which
# here neither reads its stdin nor ends at SIGTERM or SIGINT, on the launcher's stdio.
STRAY = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"
)
# A launcher: it starts `STRAY` as a child of its own and notes that child's pid in the file its
# first argument names, then answers MCP (its handshake, `{}` to any other request; `quit` ends
# it), or hangs before its handshake when its second argument says so. It ends at its stdin's
# end and at SIGTERM without stopping its child, as many do.
# What a launcher does once it has started what it starts: answer MCP (its handshake, `{}` to
# any other request; `quit` ends it) until its stdin ends.
ANSWERING = textwrap.dedent(
    """
    import json, sys
    for line in sys.stdin:
        message = json.loads(line)
        if message.get("method") == "quit":
            sys.exit(0)
        if "id" not in message:
            continue
        result = {}
        if message["method"] == "initialize":
            result = {"protocolVersion": "2025-11-25", "capabilities": {},
                      "serverInfo": {"name": "launcher", "version": "1"}}
        print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
    """
)
LAUNCHER = (
    textwrap.dedent(
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {STRAY!r}])
        with open(sys.argv[1], "a") as pids:
            pids.write(f"{{child.pid}}\\n")
        if sys.argv[2:] == ["hang"]:
            time.sleep(600)
        """
    )
    + ANSWERING
)


class Launched:
    """The launcher's script and the pids of the children it started (`LAUNCHER`). Those are not
    bastion's children: once their launcher is gone the system reaps them (or, where its first
    process reaps nothing, as in some containers, they stay zombies): what counts is that none
    runs on. Whatever a failing test left running is killed after it."""

    def __init__(self, directory) -> None:
        self.script = directory / "launcher.py"
        self.script.write_text(LAUNCHER)
        self.pid_file = directory / "pids"

    def argv(self, *more: str) -> list[str]:
        return [sys.executable, str(self.script), str(self.pid_file), *more]

    def upstream(self, timeout: float = 10, *more: str) -> StdioUpstream:
        command, *args = self.argv(*more)
        return StdioUpstream(
            UpstreamConfig(name="launcher", command=command, args=tuple(args), timeout=timeout)
        )

    def pids(self) -> list[int]:
        if not self.pid_file.exists():
            return []
        return [int(line) for line in self.pid_file.read_text().split()]

    def running(self) -> list[int]:
        """The launchers' children still running (not ended, nor zombies)."""
        return [pid for pid in self.pids() if left(pid) == "running"]

    def gone(self) -> bool:
        """Both servers ended (asked, or killed at the grace's end)."""
        return self.ready() and not self.running("polite") and not self.running("heedless")

    def kill_left(self) -> None:
        for pid in self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def launched(tmp_path):
    launcher = Launched(tmp_path)
    yield launcher
    launcher.kill_left()


@LOOPS
def test_a_closed_upstream_leaves_nothing_its_process_started_running(launched, loop_factory):
    """Closing an upstream (bastion stopping, its upstream session closed) stops what its
    process started too: the launcher ends at its stdin's end, and the server it started, which
    does not, is stopped with it."""

    async def scenario() -> None:
        connection = launched.upstream()
        await connection.ensure_started()
        await connection.close()
        assert await eventually_async(lambda: not launched.running()), launched.running()

    run(loop_factory, scenario)
    assert len(launched.pids()) == 1 and launched.running() == []


@LOOPS
def test_a_start_out_of_time_in_its_handshake_leaves_nothing_it_started_running(
    launched, loop_factory
):
    """A launcher that never answers its handshake is killed, and what it started with it."""

    async def scenario() -> None:
        connection = launched.upstream(0.5, "hang")
        with pytest.raises(RpcError, match="did not start within"):
            await connection.ensure_started()
        assert await eventually_async(lambda: launched.pids() and not launched.running()), (
            launched.pids(),
            launched.running(),
        )
        await connection.close()

    run(loop_factory, scenario)
    assert len(launched.pids()) == 1 and launched.running() == []


@LOOPS
def test_a_process_that_ended_by_itself_takes_what_it_started_and_is_started_again(
    launched, loop_factory
):
    """A launcher that ends by itself leaves its server orphaned, holding the launcher's stdout
    open, so that bastion never read its end: the call in flight failed only at its timeout, and
    every later one "is not running", the upstream never started again. What it started is
    stopped when it ends (asked, then killed after the grace): the call fails then, not at its
    timeout, and the next starts the upstream again."""

    async def scenario() -> tuple[str, dict]:
        connection = launched.upstream()
        await connection.ensure_started()
        with pytest.raises(RpcError) as failed:
            await connection.request("quit", None)
        again = await connection.request("ping", None)
        await connection.close()
        return failed.value.message, again

    lost, again = run(loop_factory, scenario)
    assert lost == "upstream launcher exited"
    assert again["result"] == {}
    assert len(launched.pids()) == 2
    assert eventually(lambda: not launched.running()), launched.running()


@LOOPS
def test_a_start_cancelled_while_its_process_is_made_leaves_nothing_it_started_running(
    held, launched, loop_factory
):
    """A start given up while `Popen` ran in its worker thread: the thread kills what the
    launcher started as well as the launcher."""

    async def scenario() -> None:
        start = asyncio.ensure_future(
            upstream._Child.start(launched.argv(), dict(os.environ), None, 1 << 16, GRACE)
        )
        await held.until_made()
        assert await eventually_async(launched.pids)  # the launcher started its child
        start.cancel()
        held.go.set()
        with pytest.raises(asyncio.CancelledError):
            await start

    run(loop_factory, scenario)
    assert [left(pid) for pid in held.pids] == [None]
    assert eventually(lambda: not launched.running()), launched.running()


# What a launcher leaves of its group when it ends, each noting its pid and that it is ready (its
# SIGTERM handler set) in the directory its argument names: a server that, asked to end
# (SIGTERM), writes down that it was and ends; and one that writes it down and runs on.
POLITE = textwrap.dedent(
    """
    import os, signal, sys, time
    folder = sys.argv[1]
    def bye(*_):
        with open(os.path.join(folder, "polite-bye"), "w") as note:
            note.write("asked, and ended")
        sys.exit(0)
    signal.signal(signal.SIGTERM, bye)
    with open(os.path.join(folder, "polite"), "w") as note:
        note.write(str(os.getpid()))
    time.sleep(600)
    """
)
HEEDLESS = textwrap.dedent(
    """
    import os, signal, sys, time
    folder = sys.argv[1]
    def asked(*_):
        with open(os.path.join(folder, "heedless-asked"), "w") as note:
            note.write("asked, and ran on")
    signal.signal(signal.SIGTERM, asked)
    with open(os.path.join(folder, "heedless"), "w") as note:
        note.write(str(os.getpid()))
    time.sleep(600)
    """
)
# A launcher of both, on its stdio (they hold its stdout open), answering MCP as `LAUNCHER`.
LEAVING = (
    textwrap.dedent(
        f"""
        import subprocess, sys
        for server in ({POLITE!r}, {HEEDLESS!r}):
            subprocess.Popen([sys.executable, "-c", server, sys.argv[1]])
        """
    )
    + ANSWERING
)


class Left:
    """The servers `LEAVING` started, by what they wrote in ``folder``, under an upstream whose
    stop_grace_seconds is ``grace``."""

    def __init__(self, folder, grace: float) -> None:
        self.folder = folder
        self.folder.mkdir()
        self.grace = grace
        self.script = folder / "leaving.py"
        self.script.write_text(LEAVING)

    def upstream(self) -> StdioUpstream:
        return StdioUpstream(
            UpstreamConfig(
                name="leaving",
                command=sys.executable,
                args=(str(self.script), str(self.folder)),
                stop_grace_seconds=self.grace,
            )
        )

    def pid(self, name: str) -> int | None:
        path = self.folder / name
        written = path.read_text() if path.exists() else ""
        return int(written) if written else None

    def ready(self) -> bool:
        return self.pid("polite") is not None and self.pid("heedless") is not None

    def running(self, name: str) -> bool:
        pid = self.pid(name)
        return pid is not None and left(pid) == "running"

    def noted(self, name: str) -> bool:
        return (self.folder / name).exists()

    def heedless_in_its_grace(self) -> bool:
        """The polite server ended as asked, and the heedless one, asked too, runs on."""
        return (
            self.noted("polite-bye")
            and not self.running("polite")
            and self.noted("heedless-asked")
            and self.running("heedless")
        )

    def gone(self) -> bool:
        """Both servers ended (asked, or killed at the grace's end)."""
        return self.ready() and not self.running("polite") and not self.running("heedless")

    def kill_left(self) -> None:
        for name in ("polite", "heedless"):
            if self.running(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid(name), signal.SIGKILL)


@pytest.fixture
def leaving(tmp_path):
    """``leaving(grace)``: a `Left` in a folder of its own; what each left is killed after."""
    made: list[Left] = []

    def make(grace: float) -> Left:
        made.append(Left(tmp_path / f"grace-{grace:g}s", grace))
        return made[-1]

    yield make
    for servers in made:
        servers.kill_left()


def no_pidfd(pid: int) -> int:
    raise OSError("no pidfd here")


@LOOPS
@pytest.mark.parametrize("watch", ["pidfd", "thread"])
def test_what_a_process_that_ends_by_itself_leaves_is_asked_to_end_before_it_is_killed(
    leaving, loop_factory, watch, monkeypatch
):
    """A launcher ends by itself: what it leaves of its group is sent SIGTERM first, and
    SIGKILL only ``stop_grace_seconds`` later. The server that ends when asked writes its
    note and ends; the one that runs on is killed at the grace's end. Meanwhile the event loop
    runs on (it sees the heedless server, asked, still running); the call in flight fails
    once nothing holds the process's stdout, and the next starts the upstream again. Its end
    is seen through a pidfd, or (a kernel before 5.3) by a thread."""
    if watch == "thread":
        monkeypatch.setattr(upstream.os, "pidfd_open", no_pidfd)

    async def scenario(servers: Left) -> tuple[str, dict] | None:
        connection = servers.upstream()
        await connection.ensure_started()
        assert await eventually_async(servers.ready)
        asked = time.monotonic()
        quitting = asyncio.ensure_future(connection.request("quit", None))
        # Seen in its grace; or both gone before it was seen, which only a grace run out may
        # explain (a machine too busy to look in time: a longer one), not one cut short.
        assert await eventually_async(lambda: servers.heedless_in_its_grace() or servers.gone())
        in_its_grace = servers.heedless_in_its_grace()
        assert in_its_grace or time.monotonic() - asked >= servers.grace, "killed in its grace"
        with pytest.raises(RpcError) as failed:
            await quitting
        assert await eventually_async(lambda: not servers.running("heedless"))
        again = await connection.request("ping", None)
        await connection.close()
        return (failed.value.message, again) if in_its_grace else None

    (lost, again), _ = time_enough(
        lambda grace: run(loop_factory, lambda: scenario(leaving(grace))), SHORT_GRACE
    )
    assert lost == "upstream leaving exited"
    assert again["result"] == {}


@LOOPS
def test_what_a_closed_upstream_leaves_is_asked_to_end_before_it_is_killed(leaving, loop_factory):
    """Closing an upstream whose launcher ends at its stdin's end: what it leaves of its group
    is asked to end (SIGTERM) and killed only ``stop_grace_seconds`` later, as above."""

    async def scenario(servers: Left) -> Left:
        connection = servers.upstream()
        await connection.ensure_started()
        assert await eventually_async(servers.ready)
        await connection.close()
        return servers

    def attempt(grace: float) -> Left | None:
        closing = time.monotonic()
        servers = run(loop_factory, lambda: scenario(leaving(grace)))
        assert eventually(servers.gone)
        if servers.noted("polite-bye") and servers.noted("heedless-asked"):
            return servers
        # Killed before their handlers ran: only a grace run out may explain it (a machine too
        # busy to run them in time: a longer one), not one cut short.
        assert time.monotonic() - closing >= grace, "killed in its grace"
        return None

    servers, _ = time_enough(attempt, SHORT_GRACE)
    assert eventually(lambda: servers.noted("polite-bye") and servers.noted("heedless-asked")), (
        sorted(p.name for p in servers.folder.iterdir())
    )
    assert eventually(lambda: not servers.running("polite") and not servers.running("heedless"))


def test_stop_grace_seconds_is_a_stdio_upstreams_positive_number_of_seconds():
    """Read for a stdio upstream (2 s unless set), refused unless a positive number, and
    refused for a url, where bastion starts no process."""

    def read(**settings):
        table = {"name": "x", "command": sys.executable, **settings}
        return GatewayConfig.from_mapping({"upstreams": [table]}).upstreams[0]

    assert read().stop_grace_seconds == 2
    assert read(stop_grace_seconds=0.5).stop_grace_seconds == 0.5
    for wrong in (0, -1, "5", True, float("inf")):
        with pytest.raises(ConfigError, match="stop_grace_seconds must be a positive number"):
            read(stop_grace_seconds=wrong)
    with pytest.raises(ConfigError, match="stop_grace_seconds is read only for a stdio"):
        read(command="", url="http://127.0.0.1:1/mcp", stop_grace_seconds=1)


@LOOPS
def test_a_process_that_leaves_nothing_of_its_group_is_waited_for_without_its_grace(loop_factory):
    """Nothing but the process itself was in its group: it is waited for (no zombie) as soon
    as that is seen, however long the grace (here longer than the test waits)."""

    async def scenario() -> None:
        child = await upstream._Child.start(
            [sys.executable, "-c", "pass"], dict(os.environ), None, 1 << 16, 10 * PATIENCE
        )
        try:
            assert await child.wait() == 0
            assert await eventually_async(lambda: left(child.pid) is None), left(child.pid)
        finally:
            child.kill()  # a grace that did not end early ends here

    run(loop_factory, scenario)
