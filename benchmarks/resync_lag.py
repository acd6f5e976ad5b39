"""How late a replica's event loop runs while it loads every fact again as it serves (a replica
behind a pruned change log, `Replica._resync`): a 1 ms timer on the replica's loop, measured for
its lateness, from the reload's start to its end. A decision asked meanwhile waits about as long
as this timer. On SQLite, gitclub-style facts (benchmarks/server_bench.py). Run it on two trees
to compare them.

    .venv/bin/python benchmarks/resync_lag.py [--facts 300000] [--runs 2]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
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
        print(
            f"run {run + 1}: {n:,} facts loaded again in {time.perf_counter() - started:.2f} s;"
            f" the loop's lateness median {p(late, 0.5):.2f}, p99 {p(late, 0.99):.1f},"
            f" max {max(late):.0f} ms; over 10 ms {sum(x > 10 for x in late)} of {len(late)}",
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
