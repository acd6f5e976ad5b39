"""``python -m tests.skewed_clock SECONDS ARGS...``: bastion's command line (``bastion ARGS...``)
in a process whose wall clock reads SECONDS (negative: behind) off the machine's, as a replica on
a machine whose clock has drifted. Only `time.time` and `time.time_ns` are moved, before bastion
is imported (every ``clock=time.time`` default, and joserfc's, reads them); the monotonic clock,
PostgreSQL's and the policy's ``now`` (`datetime.now`) are the machine's."""

from __future__ import annotations

import sys
import time


def main() -> int:
    skew = float(sys.argv[1])
    machine, machine_ns = time.time, time.time_ns
    time.time = lambda: machine() + skew
    time.time_ns = lambda: machine_ns() + int(skew * 1e9)
    from bastion.cli import main as bastion

    return bastion(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
