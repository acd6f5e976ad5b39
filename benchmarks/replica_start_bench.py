"""Replica start: time to ready with and without a fact snapshot, memory per fact, authorize.

    .venv/bin/python benchmarks/replica_start_bench.py --facts 1000000 --runs 3
    .venv/bin/python benchmarks/replica_start_bench.py --facts 10000000 --in-process-only
    .venv/bin/python benchmarks/replica_start_bench.py --facts 1000000 --skip-database-start

Prints figures; asserts nothing. Serve section: gitclub-style facts (benchmarks/server_bench.py)
in a SQLite store, then a real ``bastion serve`` started again and again, without and with
``fact_snapshot_path`` in alternate runs, each timed until ``/readyz`` answers 200, with the
server's CPU time (user + system, from /proc) and resident memory at that moment. In-process
section (a child process per figure, so each starts clean): the replica's snapshot load (read,
policy check per fact shape, index) with its wall and CPU time and the resident memory it added
per fact, then `authorize` on those facts; and the same memory figure for the facts loaded as
the store path loads them (``Authorizer.facts.apply``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server_bench import (  # noqa: E402
    ADMIN_KEY,
    POLICY,
    checks,
    fmt_latency,
    free_port,
    gitclub_facts,
    stop,
)

# The in-process snapshot's HMAC key (a store's is 32 random bytes: `FactStore.snapshot_key`).
BENCH_KEY = bytes(32)


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve_until_ready(database: str, snapshot: str, log: Path) -> tuple[float, float, int]:
    """Start ``bastion serve``; (seconds to /readyz 200, its CPU seconds then, its RSS then)."""
    import httpx

    port = free_port()
    env = {**os.environ, "BASTION_ADMIN_KEY": ADMIN_KEY, "BASTION_CONFIG": "/nonexistent"}
    # Without a snapshot the setting is left out: set and empty, serve refuses it.
    env.pop("BASTION_FACT_SNAPSHOT_PATH", None)
    if snapshot:
        env["BASTION_FACT_SNAPSHOT_PATH"] = snapshot
    cmd = [sys.executable, "-m", "bastion.cli", "serve", "--database", database]
    cmd += ["--port", str(port)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)
    try:
        while True:
            if proc.poll() is not None:
                # Its log goes with the temporary folder: its end is shown here.
                tail = log.read_text(errors="replace").splitlines()[-20:]
                raise SystemExit("bastion serve exited; the end of its log:\n" + "\n".join(tail))
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    return time.perf_counter() - started, cpu_seconds(proc.pid), rss_bytes(proc.pid)
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    finally:
        stop(proc)


def bench_serve(n: int, runs: int, tmp: Path, *, from_database: bool = True) -> None:
    from bastion.facts import snapshot
    from bastion.facts.store import FactStore, StoredFact

    facts = gitclub_facts(n)
    db = str(tmp / "bench.db")
    store = FactStore.open(db)
    store.put_policy(POLICY, source="bench.polar")
    t = time.perf_counter()
    for i in range(0, len(facts), 100_000):
        store.apply([StoredFact(f) for f in facts[i : i + 100_000]])
    print(f"  SQLite store: {len(facts):,} facts written in {time.perf_counter() - t:.1f} s")
    del facts
    path = str(tmp / "facts.snapshot")
    t, c = time.perf_counter(), time.process_time()
    origin, count, size = snapshot.take(store, path)
    print(
        f"  bastion facts snapshot: {count:,} facts, {size / 1e6:.1f} MB"
        f" ({size / count:.1f} B/fact) in {time.perf_counter() - t:.1f} s"
        f" ({time.process_time() - c:.1f} s CPU)"
    )
    store.close()
    starts = [("database", ""), ("snapshot", path)] if from_database else [("snapshot", path)]
    results: dict[str, list[tuple[float, float, int]]] = {label: [] for label, _ in starts}
    for _ in range(runs):  # interleaved: a busy spell of the machine hits both alike
        # Started from the snapshot, a replica has nothing newer to write: the file stays.
        for label, snap in starts:
            results[label].append(serve_until_ready(db, snap, tmp / "serve.log"))
    for label, rows in results.items():
        wall = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        rss = statistics.median(r[2] for r in rows)
        print(
            f"  bastion serve ready from the {label:8}: median {wall:.2f} s"
            f" ({', '.join(f'{r[0]:.2f}' for r in rows)}), server CPU {cpu:.2f} s,"
            f" RSS {rss / 2**20:,.0f} MiB"
        )


def child_snapshot_write(n: int, tmp: str) -> None:
    """In a fresh process: write the facts as a snapshot (for the next child to load)."""
    from bastion.facts import snapshot
    from bastion.facts.store import StoredFact

    groups = snapshot.from_facts(StoredFact(f) for f in gitclub_facts(n))
    origin = snapshot.SnapshotOrigin("bench", 0, 0, None, None)
    t = time.perf_counter()
    size = snapshot.write(os.path.join(tmp, "inproc.snapshot"), origin, groups, BENCH_KEY)
    print(
        f"  snapshot of {n:,} facts: {size / 1e6:.0f} MB written in {time.perf_counter() - t:.1f} s"
    )


def child_snapshot_load(n: int, tmp: str) -> None:
    """In a fresh process (so that its resident memory grows only by the facts): load the
    snapshot as a replica does, then authorize."""
    import gc

    from bastion import Entity
    from bastion.decide import Authorizer
    from bastion.facts import snapshot
    from bastion.server.replica import _bulk_load

    gc.collect()
    base = rss_bytes()
    t, c = time.perf_counter(), time.process_time()
    with _bulk_load(first=True):
        snap = snapshot.read(os.path.join(tmp, "inproc.snapshot"), BENCH_KEY)
        read_at = time.perf_counter() - t
        authz = Authorizer(POLICY, source="bench.polar")
        for g in snap.groups:
            authz.facts.load_rows(g.name, g.arity, g.rows, g.expiries)
            g.rows = []  # as a replica does (`_from_snapshot`)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    count = len(authz.facts)
    del snap, g
    gc.collect()
    added = rss_bytes() - base
    print(
        f"  loaded {count:,} facts from it in {wall:.2f} s ({cpu:.2f} s CPU; read {read_at:.2f} s),"
        f" {added / count:.0f} B/fact resident ({added / 2**30:.2f} GiB),"
        f" process RSS {rss_bytes() / 2**30:.2f} GiB"
    )
    args = [
        (
            Entity(b["actor"]["type"], b["actor"]["id"]),
            b["action"],
            Entity(b["resource"]["type"], b["resource"]["id"]),
        )
        for b in checks(gitclub_facts(n), 20_000)
    ]
    for a in args[:200]:
        authz.authorize(*a)
    samples = []
    for _ in range(3):
        for a in args:
            t = time.perf_counter()
            authz.authorize(*a)
            samples.append(time.perf_counter() - t)
    print(f"  authorize at {count:,} facts: {fmt_latency(samples)}")


def child_apply_load(n: int) -> None:
    """In a fresh process: the facts loaded as the store path loads them, memory per fact."""
    import gc

    from bastion.decide import Authorizer

    facts = gitclub_facts(n)
    pairs = [(f, None) for f in facts]
    authz = Authorizer(POLICY, source="bench.polar")
    gc.collect()
    base = rss_bytes()
    t = time.perf_counter()
    authz.facts.load(pairs)
    wall = time.perf_counter() - t
    count = len(facts)
    gc.collect()
    added = rss_bytes() - base
    print(
        f"  store-path load of {count:,} facts (Authorizer.facts.load): {wall:.1f} s,"
        f" {added / count:.0f} B/fact resident"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--facts", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--in-process-only", action="store_true")
    parser.add_argument("--skip-store-path", action="store_true")
    parser.add_argument(
        "--skip-database-start",
        action="store_true",
        help="start bastion serve from the snapshot only (the start from the database is slow)",
    )
    args = parser.parse_args()
    print(
        f"replica start benchmark: {args.facts:,} facts, Python {sys.version.split()[0]},"
        f" {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory() as tmp:
        me = [sys.executable, __file__]
        subprocess.run([*me, "--child-write", str(args.facts), tmp], check=True)
        subprocess.run([*me, "--child-snapshot", str(args.facts), tmp], check=True)
        if not args.skip_store_path:
            subprocess.run([*me, "--child-apply", str(args.facts)], check=True)
        if not args.in_process_only:
            bench_serve(
                args.facts, args.runs, Path(tmp), from_database=not args.skip_database_start
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child-write":
        child_snapshot_write(int(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "--child-snapshot":
        child_snapshot_load(int(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "--child-apply":
        child_apply_load(int(sys.argv[2]))
    else:
        main()
