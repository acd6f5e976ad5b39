"""How late the event loop runs while a replica writes its fact snapshot: a 1 ms timer on an
asyncio loop, measured for its lateness, while another thread writes a snapshot of ``--facts``
gitclub-style facts (`bastion.facts.snapshot.write`, as a replica's snapshot writer runs it,
the facts kept out of the collector's sight as a replica keeps them), ``--runs`` times; then
the same time with nothing written (the machine's own lateness). A decision asked meanwhile
waits about as long as this timer. Run it on two trees to compare them.

    .venv/bin/python benchmarks/snapshot_lag.py [--facts 1000000] [--runs 3]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_bench import p  # noqa: E402
from records_lag import late_while  # noqa: E402
from server_bench import gitclub_facts  # noqa: E402

from bastion.facts import snapshot  # noqa: E402
from bastion.facts.store import StoredFact  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    groups = snapshot.from_facts(StoredFact(f) for f in gitclub_facts(args.facts))
    # A replica's facts are out of the collector's sight (docs/benchmarks.md).
    gc.freeze()
    origin = snapshot.SnapshotOrigin("bench", 0, 0, None, None)
    path = str(Path(tempfile.mkdtemp()) / "facts.snapshot")
    walls: list[float] = []

    def write() -> None:
        started = time.perf_counter()
        snapshot.write(path, origin, groups, bytes(32))  # a key as a store's (32 bytes)
        walls.append(time.perf_counter() - started)

    def report(what: str, late: list[float]) -> None:
        print(
            f"{what}: the loop's lateness median {p(late, 0.5):.2f}, p99 {p(late, 0.99):.2f},"
            f" max {max(late):.1f} ms; over 10 ms {sum(x > 10 for x in late)} of {len(late)}"
        )

    for run in range(args.runs):
        late = late_while(write)
        report(f"run {run + 1}, {args.facts:,} facts written in {walls[-1]:.2f} s", late)
        report("  the same time, nothing written", late_while(lambda: time.sleep(walls[-1])))
    print(f"write median {statistics.median(walls):.2f} s")


if __name__ == "__main__":
    main()
