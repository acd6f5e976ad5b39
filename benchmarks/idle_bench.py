"""CPU an idle ``bastion serve`` spends: what a replica costs a machine while no request comes.

    .venv/bin/python benchmarks/idle_bench.py [--seconds 10] [--runs 3]

The setup is gateway_bench.py's (the quickstart's policy, its MCP server behind a ``[gateway]``,
SQLite): bastion and the upstream are started, left alone for 3 s, then bastion's user and
system CPU (``/proc``) is read over ``--seconds``, ``--runs`` times. Prints milliseconds of CPU
per second for each run; asserts nothing. Its background work is the change-log follower's
polls (``poll_interval``), the decision-record flusher's rounds and uvicorn's own tick.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_bench import (  # noqa: E402
    cpu_seconds,
    prepare,
    start_bastion,
    start_upstream,
    stop,
    wait_until_up,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    bench = prepare(
        Path(tempfile.mkdtemp(prefix="bastion-idle-bench-")), chain=False, session="shared"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    upstream = start_upstream(bench.upstream_port, env)
    server = start_bastion(bench.config, env)
    try:
        wait_until_up(bench.upstream_url, upstream)
        wait_until_up(f"{bench.base}/healthz", server)
        time.sleep(3)  # its start done
        figures = []
        for _ in range(args.runs):
            before = cpu_seconds(server.pid)
            time.sleep(args.seconds)
            figures.append((cpu_seconds(server.pid) - before) / args.seconds * 1000)
    finally:
        stop(server, upstream)
    print(
        f"idle bastion serve: {', '.join(f'{f:.1f}' for f in figures)} ms of CPU a second"
        f" ({args.runs} runs of {args.seconds:g} s; /proc counts in 10 ms ticks)"
    )


if __name__ == "__main__":
    main()
