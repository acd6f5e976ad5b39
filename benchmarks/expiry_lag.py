"""How late a replica's event loop runs when many facts expire at once: a replica on SQLite
holds ``--facts`` gitclub-style facts (benchmarks/server_bench.py) that share one
``expires_at``, and ``--held`` more that do not expire; a 1 ms timer on its loop is measured for
its lateness from half a second before that expiry until the replica holds the expired facts no
more, and beside it a decision asked every millisecond as the decision service asks it (after
`Replica.in_force`, where the tree has it), measured for how long after it was due it was
answered. That decision names a grant among the expiring facts: one asked at or after the
expiry and answered allowed is counted as a violation (there must be none). Run it on two trees
to compare them.

    .venv/bin/python benchmarks/expiry_lag.py [--facts 200000] [--held 0] [--runs 2]

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

from apply_lag import _timed, collections  # noqa: E402
from gateway_bench import p  # noqa: E402
from server_bench import POLICY, gitclub_facts  # noqa: E402

from bastion.facts.store import FactStore, StoredFact  # noqa: E402
from bastion.server.replica import Replica  # noqa: E402


class Run:
    """One run's figures."""

    def __init__(self) -> None:
        self.late: list[float] = []  # the timer's lateness, ms
        self.decided: list[float] = []  # the decisions' lateness, ms
        self.after = 0  # decisions asked at or after the expiry
        self.violations = 0  # of those, answered allowed
        self.purged = 0.0  # seconds from the expiry until the facts were gone
        self.longest: list[float] = []  # the collector's longest passes, ms


async def one_run(n: int, held: int, lead: float) -> Run | None:
    """The figures of one run, or None if the replica was not ready half a second before the
    expiry (the caller tries again with a longer ``lead``)."""
    url = f"sqlite:///{Path(tempfile.mkdtemp()) / 'bastion.db'}"
    store = FactStore.open(url)
    store.put_policy(POLICY)
    facts = gitclub_facts(n + held)
    # The grant decided on: a direct role on a repo, among the expiring facts.
    grant = next(f for f in facts[:n] if f[0] == "has_role" and f[3].type == "Repo")
    user, repo = grant[1], grant[3]
    if held:
        # Kept facts must not grant it too: no other fact names that user.
        store.apply(StoredFact(f) for f in facts[n:] if user not in f)
    expires_at = time.time() + lead
    store.apply(StoredFact(f, expires_at) for f in facts[:n])
    del facts
    replica = Replica(url)
    await replica.start()
    run = Run()
    wait = expires_at - 0.5 - time.time()
    if wait < 0:
        print(
            f"the replica was ready {-wait:.1f} s too late; again, with more time", file=sys.stderr
        )
        await replica.stop()
        store.close()
        return None
    await asyncio.sleep(wait)
    assert replica.authz.authorize(user, "read", repo), "the grant does not allow before it expires"
    expiring = replica.authz.facts.held
    gone = done = False
    collections.clear()

    async def decide() -> None:
        in_force = getattr(replica, "in_force", lambda: None)  # not in older trees
        while not done:
            due = time.perf_counter() + 0.001
            await asyncio.sleep(0.001)
            asked = time.time()
            if (changing := in_force()) is not None:
                await changing
            allowed = replica.authz.authorize(user, "read", repo)
            run.decided.append((time.perf_counter() - due) * 1e3)
            if asked >= expires_at:
                run.after += 1
                run.violations += allowed

    deciding = asyncio.ensure_future(decide())
    while not gone:
        tick = time.perf_counter()
        await asyncio.sleep(0.001)
        run.late.append((time.perf_counter() - tick - 0.001) * 1e3)
        if replica.authz.facts.held < expiring:
            if not run.purged:
                run.purged = time.time() - expires_at
            gone = replica.authz.facts.held <= held
    for _ in range(200):  # 0.2 s more, for what follows the purge
        tick = time.perf_counter()
        await asyncio.sleep(0.001)
        run.late.append((time.perf_counter() - tick - 0.001) * 1e3)
    done = True
    await deciding
    run.longest = sorted(collections, reverse=True)[:3]
    await replica.stop()
    store.close()
    return run


def main() -> None:
    gc.callbacks.append(_timed)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=200_000)
    parser.add_argument("--held", type=int, default=0)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument(
        "--lead",
        type=float,
        default=0.0,
        help="seconds from writing the facts to their expiry (default: enough to load them)",
    )
    args = parser.parse_args()
    lead = args.lead or 8 + (args.facts + args.held) * 50e-6
    for run in range(args.runs):
        while (r := asyncio.run(one_run(args.facts, args.held, lead))) is None:
            lead *= 1.5
        print(
            f"run {run + 1}: {args.facts:,} facts expiring together (and {args.held:,} kept);"
            f" gone {r.purged:.2f} s after their expiry;"
            f" the loop's lateness median {p(r.late, 0.5):.2f}, p99 {p(r.late, 0.99):.1f},"
            f" max {max(r.late):.0f} ms; ticks {len(r.late)}; decisions late by median"
            f" {p(r.decided, 0.5):.2f}, max {max(r.decided):.0f} ms, {len(r.decided)} answered,"
            f" {r.after} after the expiry, {r.violations} of them allowed;"
            f" the collector's longest passes {r.longest} ms"
        )


if __name__ == "__main__":
    main()
