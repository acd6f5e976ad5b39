"""Stopping `bastion serve` ends the streams clients hold open (a 2025-11-25 GET stream, a
2026-07-28 listen stream), cleanly, instead of waiting for their clients to leave."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading

import httpx

from tests.processes import left
from tests.waits import PATIENCE, eventually

from .streams import legacy_session, modern_headers, modern_request
from .support import QUICKSTART, Running, serve_quickstart

QUICKSTART_PASSWORD = "quickstart-password"  # examples/quickstart/setup.py


def _hold(open_stream, seen: dict, opened: threading.Event) -> threading.Thread:
    """Read a stream in a thread until it ends; note how it ended."""

    def read():
        try:
            with open_stream() as response:
                seen["status"] = response.status_code
                frames = []
                for line in response.iter_lines():
                    opened.set()
                    frames.append(line)
                seen["lines"] = frames
                seen["end"] = "clean"
        except httpx.HTTPError as e:
            seen["end"] = f"broken: {e!r}"
        finally:
            opened.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_sigterm_ends_the_open_streams_cleanly_and_bastion_exits(tmp_path):
    server, url = serve_quickstart(tmp_path)
    try:
        with httpx.Client(timeout=httpx.Timeout(10, read=60)) as http:
            running = Running(url, None, None, None, http, None, password=QUICKSTART_PASSWORD)
            token = running.token("sam", "desk")
            session = legacy_session(running, token, "desk")
            get_seen, get_open = {}, threading.Event()
            get = _hold(
                lambda: http.stream(
                    "GET",
                    running.mcp_url("desk"),
                    headers={**session, "accept": "text/event-stream"},
                ),
                get_seen,
                get_open,
            )
            listen_seen, listen_open = {}, threading.Event()
            listen = _hold(
                lambda: http.stream(
                    "POST",
                    running.mcp_url("desk"),
                    json=modern_request(
                        "held",
                        "subscriptions/listen",
                        {"notifications": {"toolsListChanged": True}},
                    ),
                    headers=modern_headers(token, "subscriptions/listen"),
                ),
                listen_seen,
                listen_open,
            )
            assert get_open.wait(PATIENCE) and listen_open.wait(PATIENCE)
            assert get_seen.get("end") is None and listen_seen.get("end") is None  # both held

            server.send_signal(signal.SIGTERM)
            try:
                server.wait(PATIENCE)
            except subprocess.TimeoutExpired:
                raise AssertionError("bastion serve still waits on the open streams") from None
            get.join(PATIENCE)
            listen.join(PATIENCE)
        assert server.returncode in (0, -signal.SIGTERM)
        # Both streams ended as HTTP allows (their last chunk sent), not cut off.
        assert get_seen["status"] == 200 and get_seen["end"] == "clean"
        assert listen_seen["status"] == 200 and listen_seen["end"] == "clean"
        # The listen stream's last event is its request's result: a deliberate end.
        last = json.loads(
            [line for line in listen_seen["lines"] if line.startswith("data:")][-1][5:]
        )
        assert last["id"] == "held" and last["result"]["resultType"] == "complete"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# A stdio upstream's launcher (`npx`, `uvx`, `sh -c`): it starts a child of its own that ignores
# SIGINT, SIGTERM and its stdin (noting that child's pid), then runs the quickstart's server in
# itself, which ends at its stdin's end. It notes how it ended: "SIGINT", or "stdin closed".
CTRL_C_LAUNCHER = """
import os, runpy, signal, subprocess, sys
log, pids, server = sys.argv[1:4]
STRAY = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)")

def note(what):
    with open(log, "a") as out:
        out.write(what + "\\n")

def interrupted(number, frame):
    note("SIGINT")
    os._exit(130)

signal.signal(signal.SIGINT, interrupted)
child = subprocess.Popen([sys.executable, "-c", STRAY], stdin=subprocess.DEVNULL)
with open(pids, "a") as out:
    out.write(f"{child.pid}\\n")
sys.argv = [server]
try:
    runpy.run_path(server, run_name="__main__")
except SystemExit:  # its sys.exit(main())
    pass
note("stdin closed")
"""


def test_ctrl_c_closes_a_stdio_upstream_in_order_and_stops_what_it_started(tmp_path):
    """Ctrl-C in a terminal signals its foreground process group: `bastion serve`, and until
    2026-12-07 its stdio upstreams too, which died on it at once, before bastion's orderly close,
    leaving what they had started (here a child that ignores SIGINT) running. Each upstream now
    has a group of its own: it gets no SIGINT, bastion's shutdown closes its stdin (its server
    ends there), and what it started is stopped with it."""
    launcher, log, pids = tmp_path / "launcher.py", tmp_path / "ended", tmp_path / "pids"
    launcher.write_text(CTRL_C_LAUNCHER)
    args = [str(launcher), str(log), str(pids), str(QUICKSTART / "server.py")]
    server, url = serve_quickstart(
        tmp_path,
        replace={'args = ["examples/quickstart/server.py"]': f"args = {json.dumps(args)}"},
        process_group=0,  # a terminal's job: bastion leads its foreground group
    )
    started: list[int] = []
    try:
        with httpx.Client(timeout=httpx.Timeout(10, read=60)) as http:
            running = Running(url, None, None, None, http, None, password=QUICKSTART_PASSWORD)
            session = legacy_session(running, running.token("sam", "desk"), "desk")
            listed = http.post(
                running.mcp_url("desk"),
                json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                headers=session,
            )
            assert listed.status_code == 200 and "search_customers" in listed.text, listed.text
        assert eventually(pids.exists)
        started = [int(pid) for pid in pids.read_text().split()]
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C: the terminal signals its foreground group
        try:
            server.wait(PATIENCE)
        except subprocess.TimeoutExpired:
            raise AssertionError("bastion serve did not stop at SIGINT") from None
        assert log.read_text().split("\n")[:-1] == ["stdin closed"]
        assert eventually(lambda: not any(left(pid) == "running" for pid in started)), started
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
