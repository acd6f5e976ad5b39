"""Where one proxied ``tools/call`` spends its time on bastion's event loop, between the system
calls that bound it: the client's request read, the request written upstream, the upstream's
answer read, the answer written.

    .venv/bin/python benchmarks/gateway_phases.py [--requests 3000]

The setup is gateway_bench.py's (the quickstart's policy and MCP server, one client, MCP
2026-07-28). While the calls run, ``perf record -e raw_syscalls:sys_enter,raw_syscalls:sys_exit``
follows the server's event loop thread (Linux, root, Debian's ``linux-perf``). Each call is cut
at its reads and writes, and the medians of each stretch are printed:

- before the upstream: from the client's request read to the request written upstream (the
  token, the decision, the record, the upstream request made);
- after the upstream: from the upstream's answer read to the answer's last write (masks, the
  answer made);
- after the answer: from the answer's last write to the loop's next wait;

with the system calls of a call, by name. Wall time, not CPU: a stretch includes the time the
thread waited for the CPU (two cores, three busy processes). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_bench import (  # noqa: E402
    access_token,
    prepare,
    run_load,
    start_bastion,
    start_upstream,
    stop,
    wait_until_up,
)

# x86-64 system call numbers of the calls a gateway call makes.
NAMES = {
    0: "read",
    1: "write",
    3: "close",
    7: "poll",
    9: "mmap",
    17: "pread64",
    18: "pwrite64",
    20: "writev",
    39: "getpid",
    44: "sendto",
    45: "recvfrom",
    72: "fcntl",
    202: "futex",
    228: "clock_gettime",
    232: "epoll_wait",
    233: "epoll_ctl",
    281: "epoll_pwait",
    318: "getrandom",
}
READ, WRITE = 0, 1
WAITS = {232, 281}
EVENT = re.compile(r"\s*([\d.]+):\s+raw_syscalls:sys_(enter|exit):\s+NR (\d+)(?: \(([^)]*)\))?")


def syscalls(trace: str) -> list[tuple[int, int | None, float, float]]:
    """Each system call of the trace: (number, its first argument for read and write, entered,
    left)."""
    calls, entered = [], None
    for line in trace.splitlines():
        m = EVENT.match(line)
        if m is None:
            continue
        at, kind, nr = float(m.group(1)), m.group(2), int(m.group(3))
        if kind == "enter":
            fd = int(m.group(4).split(",")[0], 16) if nr in (READ, WRITE) and m.group(4) else None
            entered = (nr, fd, at)
        elif entered is not None and entered[0] == nr:
            calls.append((nr, entered[1], entered[2], at))
            entered = None
    return calls


def sockets(pid: int, listening: int, upstream: int) -> tuple[set[int], set[int]]:
    """The server's file descriptors of its clients' connections (to port ``listening``) and
    of its connections to the upstream (to port ``upstream``), from /proc."""
    inodes: dict[str, tuple[int, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = (int(a.rsplit(":", 1)[1], 16) for a in fields[1:3])
            inodes[fields[9]] = (local, remote)
    clients, upstreams = set(), set()
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        ports = inodes.get(target.removeprefix("socket:[").removesuffix("]"))
        if ports is None:
            continue
        if ports[0] == listening and ports[1] != 0:
            clients.add(int(entry.name))
        elif ports[1] == upstream:
            upstreams.add(int(entry.name))
    return clients, upstreams


def phases(
    calls: list[tuple[int, int | None, float, float]], clients: set[int], upstreams: set[int]
) -> tuple[dict[str, list[float]], list[collections.Counter]]:
    """The stretches of each call (µs), and its system calls by name. An answer written in
    several writes ends at its last."""
    found: dict[str, list[float]] = {"before": [], "after": [], "tail": []}
    counted: list[collections.Counter] = []
    state, mark, seen, written = None, 0.0, collections.Counter(), None
    for nr, fd, entered, left in calls:
        if nr == READ and fd in clients and state in (None, "tail"):
            if state == "tail":
                counted.append(seen)
            state, mark, seen = "before", left, collections.Counter()
        elif state is None:
            continue
        seen[NAMES.get(nr, str(nr))] += 1
        if state == "before" and nr == WRITE and fd in upstreams:
            found["before"].append((entered - mark) * 1e6)
            state = "waiting"
        elif state in ("waiting", "after") and nr == READ and fd in upstreams:
            state, mark = "after", left
        elif state in ("after", "written") and nr == WRITE and fd in clients:
            state, written = "written", (entered, left)
        elif state == "written" and nr in WAITS:
            assert written is not None
            found["after"].append((written[0] - mark) * 1e6)
            found["tail"].append((entered - written[1]) * 1e6)
            state = "tail"
    return found, counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    if shutil.which("perf") is None:
        raise SystemExit("perf is not installed (Debian: apt-get install linux-perf)")
    work = Path(tempfile.mkdtemp(prefix="gateway-phases-"))
    bench = prepare(work)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    upstream = start_upstream(bench.upstream_port, env)
    server = start_bastion(bench.config, env)
    data = work / "perf.data"
    url = f"{bench.base}/mcp/desk"
    try:
        wait_until_up(bench.upstream_url, upstream)
        wait_until_up(f"{bench.base}/healthz", server)
        token, _ = access_token(bench.base, url)
        headers = {"authorization": f"Bearer {token}"}
        uvloop.run(run_load(url, headers, 1, 300))  # the token remembered, the code warm
        # The event loop runs on the server's main thread, whose id is the process's.
        perf = subprocess.Popen(
            ["perf", "record", "-q", "-e", "raw_syscalls:sys_enter,raw_syscalls:sys_exit"]
            + ["-t", str(server.pid), "-o", str(data)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1)
        # The load runs beside, so that its connection is there to be found while it runs.
        done: list = []
        load = threading.Thread(
            target=lambda: done.append(uvloop.run(run_load(url, headers, 1, args.requests)))
        )
        load.start()
        time.sleep(0.5)
        listening = int(bench.base.rsplit(":", 1)[1])
        clients, upstreams = sockets(server.pid, listening, bench.upstream_port)
        load.join()
        latencies = done[0][0]
        perf.send_signal(signal.SIGINT)
        perf.wait(60)
    finally:
        stop(server, upstream)
    trace = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "time,event,trace"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found, counted = phases(syscalls(trace), clients, upstreams)
    print(
        f"gateway phases: {args.requests} tools/call, one client; median latency"
        f" {statistics.median(latencies) * 1000:.3f} ms (traced)"
    )
    labels = {
        "before": "client's request read -> request written upstream",
        "after": "upstream's answer read -> answer's last write",
        "tail": "answer's last write -> the loop waits again",
    }
    for name, label in labels.items():
        values = found[name]
        if values:
            q = statistics.quantiles(values, n=4)
            print(
                f"{label:<52} median {statistics.median(values):7.1f} us"
                f"  (p25 {q[0]:.1f}, p75 {q[2]:.1f}; {len(values)} calls)"
            )
    if counted:
        names = sorted({name for seen in counted for name in seen})
        per_call = {name: sum(seen[name] for seen in counted) / len(counted) for name in names}
        shown = ", ".join(
            f"{name} {n:.1f}" for name, n in sorted(per_call.items(), key=lambda i: -i[1])
        )
        print(f"system calls per call on the loop's thread: {shown}")


if __name__ == "__main__":
    main()
