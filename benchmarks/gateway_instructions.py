"""Instructions bastion runs per proxied ``tools/call``, counted by valgrind's callgrind in a real
``bastion serve``: a figure that does not move with the machine's load, for comparing two trees
(or a tree with and without a capability) on a shared machine.

    .venv/bin/python benchmarks/gateway_instructions.py [--requests 200] [--records N] [--python PATH]
        [--proxy-headers]

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
    access_token,
    prepare,
    run_load,
    start_upstream,
    wait_until_ok,
    wait_until_up,
)
from server_instructions import counted  # noqa: E402


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
    args = parser.parse_args()
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
        wait_until_up(bench.upstream_url, upstream)
        wait_until_ok(f"{bench.base}/healthz", server, 1800, work / "serve.log")
        token, _ = access_token(bench.base, url)
        headers = {"authorization": f"Bearer {token}"}

        def send(n: int) -> None:
            uvloop.run(run_load(url, headers, 1, n))
            time.sleep(2)  # the record writer's flush of these calls, counted with them

        send(30)  # the token remembered, the connections open, the code warm
        one = counted(server.pid, out, lambda: send(args.requests))
        two = counted(server.pid, out, lambda: send(2 * args.requests))
        print(json.dumps({"n": args.requests, "counted": [one, two]}))
        print(
            f"tools/call through the gateway: {(two - one) / args.requests:,.0f} instructions per call"
        )
    finally:
        for process in (server, upstream):
            process.terminate()
            process.wait(60)
        log.close()


if __name__ == "__main__":
    main()
