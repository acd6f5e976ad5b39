"""How late a replica's event loop runs while it applies one large change of the log (an
import): a 1 ms timer on the replica's loop, measured for its lateness, from the moment the
change is committed (by another thread, as another replica or `bastion facts import` commits
it) until the replica has applied it; and beside it, a decision asked every millisecond as the
decision service asks it (after `Replica.in_force`, where the tree has it), measured for how
long after it was due it was answered. On SQLite, gitclub-style facts
(benchmarks/server_bench.py). Run it on two trees to compare them.

    .venv/bin/python benchmarks/apply_lag.py [--facts 200000] [--runs 3]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_bench import p  # noqa: E402
from server_bench import POLICY, gitclub_facts  # noqa: E402

from bastion.facts.model import Entity  # noqa: E402
from bastion.facts.store import FactStore, StoredFact  # noqa: E402
from bastion.server.replica import Replica  # noqa: E402


async def one_run(n: int, held: int) -> tuple[list[float], list[float], float, list[float]]:
    """The timer's lateness (ms) while a replica that holds ``held`` facts applies an import of
    ``n`` more, the decisions' (ms), the seconds from the commit to the replica having applied
    it, and the collector's longest passes (ms)."""
    url = f"sqlite:///{Path(tempfile.mkdtemp()) / 'bastion.db'}"
    store = FactStore.open(url)
    store.put_policy(POLICY)
    facts = [StoredFact(f) for f in gitclub_facts(n + held)]
    if held:
        store.apply(facts[n:])
        del facts[n:]
    replica = Replica(url)
    await replica.start()
    committed = threading.Event()
    target = store.head() + 1
    threading.Thread(target=lambda: (store.apply(facts), committed.set()), daemon=True).start()
    while not committed.is_set():
        await asyncio.sleep(0.01)
    started = time.perf_counter()
    late: list[float] = []
    decided: list[float] = []
    collections.clear()

    async def decide() -> None:
        user, repo = Entity("User", "u1"), Entity("Repo", "r1")
        in_force = getattr(replica, "in_force", lambda: None)  # not in older trees
        while replica.applied < target:
            due = time.perf_counter() + 0.001
            await asyncio.sleep(0.001)
            if (changing := in_force()) is not None:
                await changing
            replica.authz.authorize(user, "read", repo)
            decided.append((time.perf_counter() - due) * 1e3)

    deciding = asyncio.ensure_future(decide())
    while replica.applied < target:
        tick = time.perf_counter()
        await asyncio.sleep(0.001)
        late.append((time.perf_counter() - tick - 0.001) * 1e3)
    took = time.perf_counter() - started
    await deciding
    longest = sorted(collections, reverse=True)[:3]
    await replica.stop()
    store.close()
    return late, decided, took, longest


# The collector's passes (ms), to tell its pauses from the replica's; when the current one began.
collections: list[float] = []
_began = [0.0]


def _timed(phase: str, info: dict) -> None:
    if phase == "start":
        _began[0] = time.perf_counter()
    else:
        collections.append(round((time.perf_counter() - _began[0]) * 1e3, 1))


def main() -> None:
    gc.callbacks.append(_timed)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=200_000)
    parser.add_argument("--held", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for run in range(args.runs):
        late, decided, took, longest = asyncio.run(one_run(args.facts, args.held))
        print(
            f"run {run + 1}: {args.facts:,} facts (to {args.held:,}) applied {took:.2f} s after"
            " their commit;"
            f" the loop's lateness median {p(late, 0.5):.2f}, p99 {p(late, 0.99):.1f},"
            f" max {max(late):.0f} ms; ticks {len(late)}; decisions late by median"
            f" {p(decided, 0.5):.2f}, max {max(decided):.0f} ms, {len(decided)} answered;"
            f" the collector's longest passes {longest} ms"
        )


if __name__ == "__main__":
    main()
