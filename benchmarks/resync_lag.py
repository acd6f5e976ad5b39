"""How late a replica's event loop runs while it loads every fact again as it serves (a replica
behind a pruned change log, `Replica._resync`): a 1 ms timer on the replica's loop, measured for
its lateness, from the reload's start to its end, then for a second after it (while the replaced
facts are let go of). A decision asked meanwhile waits about as long as this timer. Then one full
pass of the garbage collector, timed (it frees what a cycle still holds of the replaced facts),
and another: what every full pass costs from then on. On SQLite, gitclub-style
facts (benchmarks/server_bench.py). Run it on two trees to compare them.

    .venv/bin/python benchmarks/resync_lag.py [--facts 300000] [--runs 2]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_bench import p  # noqa: E402
from server_bench import POLICY, gitclub_facts  # noqa: E402

from bastion.facts.store import FactStore, StoredFact  # noqa: E402
from bastion.server.replica import Replica  # noqa: E402


async def main(n: int, runs: int) -> None:
    url = f"sqlite:///{Path(tempfile.mkdtemp()) / 'bastion.db'}"
    store = FactStore.open(url)
    store.put_policy(POLICY)
    store.apply([StoredFact(f) for f in gitclub_facts(n)])
    replica = Replica(url)
    await replica.start()
    for run in range(runs):
        reload = asyncio.create_task(replica._resync())
        started, late = time.perf_counter(), []
        while not reload.done():
            tick = time.perf_counter()
            await asyncio.sleep(0.001)
            late.append((time.perf_counter() - tick - 0.001) * 1e3)
        await reload
        took = time.perf_counter() - started
        after: list[float] = []
        while time.perf_counter() - started - took < 1.0:
            tick = time.perf_counter()
            await asyncio.sleep(0.001)
            after.append((time.perf_counter() - tick - 0.001) * 1e3)
        passes = []
        for _ in range(2):
            tick = time.perf_counter()
            found = gc.collect()
            passes.append(((time.perf_counter() - tick) * 1e3, found))
        print(
            f"run {run + 1}: {n:,} facts loaded again in {took:.2f} s;"
            f" the loop's lateness median {p(late, 0.5):.2f}, p99 {p(late, 0.99):.1f},"
            f" max {max(late):.0f} ms; over 10 ms {sum(x > 10 for x in late)} of {len(late)};"
            f" the second after: max {max(after):.0f} ms; then two full collector passes"
            f" {passes[0][0]:.0f} and {passes[1][0]:.0f} ms ({passes[0][1]:,} and"
            f" {passes[1][1]:,} objects freed)",
            flush=True,
        )
    await replica.stop()
    store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.facts, args.runs))
