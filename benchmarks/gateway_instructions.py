"""Instructions bastion runs per proxied ``tools/call``, counted by valgrind's callgrind in a real
``bastion serve``: a figure that, without the clock's share (below), does not move with the
machine's load, for comparing two trees (or a tree with and without a capability) on a shared
machine.

    .venv/bin/python benchmarks/gateway_instructions.py [--requests 200] [--records N] [--python PATH]
        [--proxy-headers] [--idle-seconds 60]

The setup is gateway_bench.py's (the quickstart's policy and MCP server, sam's support agent
searching customers, emails masked, MCP 2026-07-28), with bastion under ``valgrind
--tool=callgrind`` and its change-log poll slowed to 30 s, so that it adds nothing. After a
warm-up the counters are zeroed (``callgrind_control -z``), N calls go through one client and
are dumped (``callgrind_control -d``); the same with 2 N. Per call: the difference divided by N
(user-space instructions of the whole bastion process, its record writer's thread included;
system calls and the upstream's work are not counted). Starting Python under valgrind takes a
minute or more. ``--records`` and ``--python`` are gateway_bench.py's: decision records in the
log before the run, and the interpreter of another environment to run bastion on;
``--proxy-headers``, bastion configured as behind a reverse proxy. Prints figures; asserts
nothing.

That figure takes in what the server's timers run meanwhile (uvicorn's tick, the record writer's
and the refusal log's flushes, the change log's watch, sweeps): about 1.2 million instructions a
second under callgrind, so 15,000 to 33,000 a call as a call takes 12 to 28 ms, which the
machine's load decides. So the server is then left idle for ``--idle-seconds`` (counted the
same way), and the figure is also given without the clock's share: the idle rate times the
seconds the N more calls took, divided by N. Compare trees by that one; the first moves with
the load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_bench import (  # noqa: E402
    BEHIND_PROXY,
    prepare,
    run_load,
    signed_in,
    start_upstream,
)
from server_instructions import counted  # noqa: E402


def timed(pid: int, out: Path, work) -> tuple[int, float]:
    """`counted`, and the seconds it took."""
    started = time.monotonic()
    instructions = counted(pid, out, work)
    return instructions, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument(
        "--records", type=int, default=0, help="decision records in the log before the run"
    )
    parser.add_argument(
        "--python", help="the interpreter to run `bastion serve` on (another environment's)"
    )
    parser.add_argument(
        "--proxy-headers", action="store_true", help="as gateway_bench.py's: behind a proxy"
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=60.0,
        help="how long the idle server is counted, for the clock's share (two 30 s timers' rounds)",
    )
    args = parser.parse_args()
    if args.idle_seconds <= 0:
        parser.error("--idle-seconds must be more than 0")
    work = Path(tempfile.mkdtemp(prefix="gateway-instructions-"))
    bench = prepare(
        work,
        traced=True,
        records=args.records,
        server_settings=BEHIND_PROXY if args.proxy_headers else "",
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONMALLOC": "malloc"}
    upstream = start_upstream(bench.upstream_port, env)
    out = work / "callgrind.out"
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p"]
    cmd.append(args.python or sys.executable)
    cmd += ["-m", "bastion.cli", "serve", "--config", str(bench.config)]
    log = open(work / "serve.log", "wb")  # noqa: SIM115 - closed in the finally below
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"{bench.base}/mcp/desk"
    try:
        headers = signed_in(bench, upstream, server, 1800, work / "serve.log")

        def send(n: int) -> None:
            uvloop.run(run_load(url, headers, 1, n))
            time.sleep(2)  # the record writer's flush of these calls, counted with them

        send(30)  # the token remembered, the connections open, the code warm
        one, one_seconds = timed(server.pid, out, lambda: send(args.requests))
        two, two_seconds = timed(server.pid, out, lambda: send(2 * args.requests))
        idle, idle_seconds = timed(server.pid, out, lambda: time.sleep(args.idle_seconds))
        n = args.requests
        per_call = (two - one) / n
        per_second = idle / idle_seconds
        call_seconds = (two_seconds - one_seconds) / n
        clock = per_second * call_seconds
        print(
            json.dumps(
                {
                    "n": n,
                    "counted": [one, two],
                    "seconds": [round(one_seconds, 3), round(two_seconds, 3)],
                    "idle": [idle, round(idle_seconds, 3)],
                }
            )
        )
        print(f"tools/call through the gateway: {per_call:,.0f} instructions per call")
        print(
            f"  the clock's share: {per_second:,.0f} instructions a second while idle,"
            f" {call_seconds * 1000:.1f} ms a call: {clock:,.0f}"
        )
        print(f"  without it: {per_call - clock:,.0f} instructions per call")
    finally:
        for process in (server, upstream):
            process.terminate()
            process.wait(60)
        log.close()


if __name__ == "__main__":
    main()
