"""Instructions per `authorize`, counted by valgrind's callgrind: a figure that does not move with
the machine's load, for comparing two commits of the engine on a shared machine.

    valgrind --tool=callgrind .venv-bench/bin/python benchmarks/authorize_instructions.py 5000
    valgrind --tool=callgrind .venv-bench/bin/python benchmarks/authorize_instructions.py 0

It loads `policy_bench.py`'s gitclub workload at 10,000 facts and asks its three authorize probes
(a role on the repository, a role inherited from the organization, a deny) N times each. The
instructions of one call are the difference of the two runs' totals ("Collected") divided by
3 N. Name probes after N (``direct``, ``inherit``, ``deny``) to ask only those, N times each:
the difference over N per probe named. Run it from the tree to measure (it imports that tree's
bastion).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import policy_bench  # noqa: E402

# The probes of policy_bench.py's authorize rows; the deny is asked as the earlier figures asked
# it (push on r5, where the row asks delete on r9: the same full search, no role on either).
PROBES = {
    "direct": ("direct", "push", "r5"),
    "inherit": ("inherit", "read", "r7"),
    "deny": ("nobody", "push", "r5"),
}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    names = sys.argv[2:] or list(PROBES)
    engine = policy_bench.Bastion(policy_bench.Workload(10_000))
    probes = [engine.authorize(*PROBES[name]) for name in names]
    for probe in probes:  # compiled and warm before counting starts to matter
        probe()
    for _ in range(rounds):
        for probe in probes:
            probe()


if __name__ == "__main__":
    main()
