"""What keeping a decision of the decision service costs with ``decision_log = "database"``:
CPU per decision of `DecisionLog.record` (the row, its journal line, the buffer), a batch's
checks kept one by one (each journalled with a ``write`` of its own, as a single `/v1/authorize`
is) against kept together (`record(..., pending=...)` then `keep`: one ``write`` for the batch, as
`/v1/authorize/batch` and AuthZEN's evaluations do).

    .venv/bin/python benchmarks/decision_record_bench.py [--batch 100] [--batches 20] [--rounds 15]

The two ways alternate, round by round, in one process, on one SQLite file and one journal in
a temporary directory; the buffer is written (not timed) after each round. Per decision: the
process's CPU time of a round divided by its decisions; the minimum and the median of the
rounds of each way. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bastion.audit.decision_log import DecisionStore  # noqa: E402
from bastion.audit.journal import open_journal  # noqa: E402
from bastion.db import Database  # noqa: E402
from bastion.server.api.decisions import V1, DecisionLog  # noqa: E402

REQUEST = {
    "actor": {"type": "User", "id": "alice"},
    "action": "read",
    "resource": {"type": "Repo", "id": "anvil"},
    "context": {"ip": "10.0.0.7"},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    folder = tempfile.mkdtemp()
    store = DecisionStore(Database(f"sqlite:///{folder}/decisions.db"))
    open_journal(store, f"{folder}/journal", False)
    log = DecisionLog(0, store)
    decisions = args.batch * args.batches

    def one_by_one() -> None:
        for _ in range(decisions):
            log.record("authorize", REQUEST, True, 5, 1, None, None, "k1", api=V1)

    def together() -> None:
        for _ in range(args.batches):
            pending: list[tuple] = []
            for _ in range(args.batch):
                log.record(
                    "authorize", REQUEST, True, 5, 1, None, None, "k1", api=V1, pending=pending
                )
            log.keep(pending)

    figures: dict[str, list[float]] = {"one write per check": [], "one write per batch": []}
    for _ in range(args.rounds):
        for name, way in (("one write per check", one_by_one), ("one write per batch", together)):
            started = time.process_time()
            way()
            figures[name].append((time.process_time() - started) / decisions * 1e6)
            store.flush()
    print(f"{decisions} decisions a round, batches of {args.batch}, {args.rounds} rounds each way")
    for name, values in figures.items():
        print(
            f"{name}: min {min(values):.2f} µs, median {statistics.median(values):.2f} µs per decision"
        )


if __name__ == "__main__":
    main()
