"""Decisions while facts are imported: one client asks `POST /v1/authorize` one request at a
time, as fast as it can, from a `bastion serve` on SQLite (gitclub-style facts and policy,
benchmarks/server_bench.py), while another imports ``--facts`` facts in one
`POST /v1/facts/import`. Prints the decisions' latency before the import and while it runs (until
the server has applied it), and the import's own time. Run it on two trees to compare them.

    .venv/bin/python benchmarks/import_lag.py [--facts 200000] [--runs 2]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from gateway_bench import p  # noqa: E402
from server_bench import ADMIN_KEY, POLICY, checks, gitclub_facts, start_server, stop  # noqa: E402

from bastion.facts.model import fact_to_json  # noqa: E402
from bastion.facts.store import FactStore, StoredFact  # noqa: E402

HEADERS = {"authorization": f"Bearer {ADMIN_KEY}"}


def one_run(n: int, tmp: Path) -> None:
    facts = gitclub_facts(n)
    database = str(tmp / f"bastion-{time.time_ns()}.db")
    store = FactStore.open(database)
    store.put_policy(POLICY, source="bench.polar")
    held = facts[:: max(1, n // 2000)]  # something to decide on already
    store.apply([StoredFact(f) for f in held])
    store.close()
    bodies = checks(held, 500)
    body = "".join(json.dumps(fact_to_json(f), separators=(",", ":")) + "\n" for f in facts)
    proc, url, _ = start_server(database, tmp / "serve.log")
    samples: list[tuple[float, float]] = []  # (when it was asked, latency in ms)
    done = threading.Event()

    def decide() -> None:
        with httpx.Client(base_url=url, headers=HEADERS, timeout=60) as http:
            i = 0
            while not done.is_set():
                asked = time.perf_counter()
                http.post("/v1/authorize", json=bodies[i % len(bodies)]).raise_for_status()
                samples.append((asked, (time.perf_counter() - asked) * 1e3))
                i += 1

    try:
        client = threading.Thread(target=decide)
        client.start()
        time.sleep(2)
        began = time.perf_counter()
        with httpx.Client(base_url=url, headers=HEADERS, timeout=600) as http:
            answer = http.post("/v1/facts/import", content=body.encode())
            answer.raise_for_status()
        ended = time.perf_counter()
        time.sleep(1)
        done.set()
        client.join()
    finally:
        stop(proc)
    before = [ms for asked, ms in samples if asked < began]
    during = [ms for asked, ms in samples if began <= asked < ended]
    print(
        f"  {n:,} facts imported in {ended - began:.2f} s ({len(body) / 1e6:.0f} MB);"
        f" decisions before: p50 {p(before, 0.5):.2f}, p99 {p(before, 0.99):.2f} ms;"
        f" during: {len(during)} decisions, p50 {p(during, 0.5):.2f}, p99 {p(during, 0.99):.1f},"
        f" max {max(during):.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    for _ in range(args.runs):
        one_run(args.facts, tmp)


if __name__ == "__main__":
    main()
