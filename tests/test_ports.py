"""The tests' loopback ports (tests/ports.py) are not shared between test runs on one machine:
several runs go at once (people, helpers, a run in each work tree), and each has an xdist
process named gw0. A port one run picked and handed to a server it has not started yet is never
picked by another."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A test run's process: takes ports both ways the tests do (a number for a server to bind
# later, a bound socket kept), says which, and keeps them until told to end.
PICKER = """
import json, sys
from tests.ports import free_port, free_socket
kept = [free_socket() for _ in range(10)]
ports = [free_port() for _ in range(10)] + [s.getsockname()[1] for s in kept]
print(json.dumps(ports), flush=True)
sys.stdin.read()
"""


def _picker(worker: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTEST_XDIST_WORKER": worker}
    return subprocess.Popen(
        [sys.executable, "-c", PICKER],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_two_runs_at_once_never_pick_the_same_port():
    # Two runs' first processes (both gw0), and another run's second, each alive meanwhile.
    pickers = [_picker("gw0"), _picker("gw0"), _picker("gw1")]
    try:
        picked = [json.loads(p.stdout.readline()) for p in pickers]
    finally:
        for p in pickers:
            p.communicate("", timeout=60)
    everything = [port for ports in picked for port in ports]
    assert all(len(ports) == 20 for ports in picked)
    assert len(set(everything)) == len(everything), picked


def test_a_port_browsers_refuse_is_never_picked():
    # Chromium refuses to open 10080 (net::ERR_UNSAFE_PORT): a page served there cannot be
    # tested in the browser. A process whose range holds that port alone finds none to pick
    # (whatever other test runs hold meanwhile: none of their ports is in that range).
    picker = """
import tests.ports
tests.ports._RANGE = range(10080, 10081)
try:
    print(tests.ports.free_port())
except OSError as e:
    print(e)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", picker],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "no free port left in range(10080, 10081)"
