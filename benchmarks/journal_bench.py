"""What the decision journal costs a gateway call (`bastion.audit.journal`): CPU per decision of
`DecisionJournal.append` on the event loop (encoding the line, one ``os.write``), and of
`DecisionJournal.settled` on the record writer's thread, per record (emptying the file, or
rewriting it with the decisions not stored yet).

    .venv/bin/python benchmarks/journal_bench.py [--calls 200000] [--batch 140] [--dir DIR]

Each decision has the fields the gateway gives its record (`Enforcer._fields`: the support
agent's search, two principals, a digest, a context), with an id from ``new_decision_id``. Calls
are taken in rounds of ``--batch`` (140: one 0.2 s flush at 700 calls a second): each round
appends its decisions, then settles all but the last 10 (still at their upstream), as the record
writer does. Timed with the thread's CPU clock (``--dir``: where the journal is written; a
temporary directory by default). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bastion.audit.decisions import new_decision_id  # noqa: E402
from bastion.audit.journal import DecisionJournal  # noqa: E402

CONTEXT = {
    "annotations": {"readOnlyHint": True},
    "protocol_version": "2026-07-28",
    "address": "127.0.0.1",
    "server": "desk",
}


def fields() -> dict:
    return {
        "id": new_decision_id(),
        "at": time.time(),
        "server": "desk",
        "method": "tools/call",
        "target": 'Tool{"desk/search_customers"}',
        "principals": ('User{"sam"}', 'Agent{"2574717aed364358a3c1fb3e7315b7a5"}'),
        "result": "allow",
        "arguments_digest": "hmac-sha256:" + "ab" * 32,
        "context": CONTEXT,
        "deciding_principal": 'Agent{"2574717aed364358a3c1fb3e7315b7a5"}',
        "rules": (),
        "obligations": {},
        "reason": "",
        "latency_us": 0,
        "policy_version": 3,
        "sequence": 1204,
        "grant_id": "937849ab8d4346a4aca918778c91cf09",
        "task": "",
        "session": "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=140)
    parser.add_argument("--dir", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir or None) as folder:
        journal = DecisionJournal(folder, "/bench/bastion.db")
        decisions = [fields() for _ in range(args.calls)]
        appends: list[float] = []
        settles: list[float] = []
        clock = time.thread_time_ns
        in_flight: list[str] = []
        for start in range(0, args.calls, args.batch):
            batch = decisions[start : start + args.batch]
            began = clock()
            for decision in batch:
                journal.append(decision)
            appends.append((clock() - began) / len(batch))
            in_flight += [d["id"] for d in batch]
            done, in_flight = in_flight[:-10], in_flight[-10:]
            began = clock()
            journal.settled(done)
            settles.append((clock() - began) / len(batch))
        size = os.path.getsize(journal.path)
        journal.close()
    print(f"{args.calls} decisions in rounds of {args.batch} (CPU per decision, ns)")
    for name, figures in (("append (event loop)", appends), ("settled (writer)", settles)):
        figures.sort()
        print(
            f"  {name:<20} median {statistics.median(figures):8.0f}"
            f"  p90 {figures[int(len(figures) * 0.9)]:8.0f}  mean {statistics.fmean(figures):8.0f}"
        )
    print(f"  journal at the end: {size} bytes")


if __name__ == "__main__":
    main()
