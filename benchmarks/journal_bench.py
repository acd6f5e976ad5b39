"""What the decision journal costs a gateway call (`bastion.audit.journal`): CPU per decision of
`DecisionJournal.append` on the event loop (encoding the line, one ``os.write``), and of
`DecisionJournal.settled` on the record writer's thread, per record (emptying the file, or
rewriting it with the decisions not stored yet); with ``--fsync`` (`[server]
decision_journal_fsync`), what `DecisionJournal.sync` waits for the disk at each flush.

    .venv/bin/python benchmarks/journal_bench.py [--calls 200000] [--batch 140] [--dir DIR]
        [--fsync] [--each]

Each decision has the fields the gateway gives its record (`Enforcer._fields`: the support
agent's search, two principals, a digest, a context), with an id from ``new_decision_id``. Calls
are taken in rounds of ``--batch`` (140: one 0.2 s flush at 700 calls a second): each round
appends its decisions, then settles all but the last 10 (still at their upstream), as the record
writer does. Timed with the thread's CPU clock (``--dir``: where the journal is written; a
temporary directory by default: give one on the disk the journal will live on, not a tmpfs, whose
fsync waits for nothing). Appends are timed with the wall clock too, per round: a call that waits
for the disk (a ``write`` stalled behind an fsync of the same file) shows there, not in CPU time;
``--each`` times every append with the wall clock (its slowest, and how many took 1 ms or more),
which adds the clock's own cost to the CPU figures.
With ``--fsync``, after each round a thread of its own forces the journal to the disk
(`DecisionJournal.sync`) while the next rounds are appended, as the record writer's thread does
while the event loop takes calls; one still under way when a round ends is not waited for (the
next flush starts later, as in the gateway). Rounds follow each other without pause: more fsyncs
overlap the appends than at 700 calls a second. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
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
    parser.add_argument("--fsync", action="store_true", help="force the journal to the disk")
    parser.add_argument("--each", action="store_true", help="time every append's wall clock")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir or None) as folder:
        journal = DecisionJournal(folder, "/bench/bastion.db", fsync=args.fsync)
        decisions = [fields() for _ in range(args.calls)]
        appends: list[float] = []
        walls: list[float] = []
        settles: list[float] = []
        syncs: list[float] = []
        each: list[int] = []
        clock, wall = time.thread_time_ns, time.perf_counter_ns
        in_flight: list[str] = []
        syncer: threading.Thread | None = None

        def sync() -> None:
            began = wall()
            journal.sync()
            syncs.append(wall() - began)

        for start in range(0, args.calls, args.batch):
            batch = decisions[start : start + args.batch]
            began, began_wall = clock(), wall()
            if args.each:
                for decision in batch:
                    one = wall()
                    journal.append(decision)
                    each.append(wall() - one)
            else:
                for decision in batch:
                    journal.append(decision)
            appends.append((clock() - began) / len(batch))
            walls.append((wall() - began_wall) / len(batch))
            in_flight += [d["id"] for d in batch]
            done, in_flight = in_flight[:-10], in_flight[-10:]
            began = clock()
            journal.settled(done)
            settles.append((clock() - began) / len(batch))
            if args.fsync and (syncer is None or not syncer.is_alive()):
                syncer = threading.Thread(target=sync)
                syncer.start()
        if syncer is not None:
            syncer.join()
        size = os.path.getsize(journal.path)
        journal.close()
    fsync = "on" if args.fsync else "off"
    print(f"{args.calls} decisions in rounds of {args.batch}, fsync {fsync} (per decision, ns)")
    for name, figures in (
        ("append (event loop)", appends),
        ("append, wall clock", walls),
        ("settled (writer)", settles),
    ):
        figures.sort()
        print(
            f"  {name:<20} median {statistics.median(figures):8.0f}"
            f"  p90 {figures[int(len(figures) * 0.9)]:8.0f}  p99 {figures[int(len(figures) * 0.99)]:8.0f}"
            f"  max {figures[-1]:8.0f}  mean {statistics.fmean(figures):8.0f}"
        )
    if each:
        each.sort()
        print(
            f"  each append, wall clock (us): p99.9 {each[int(len(each) * 0.999)] / 1000:.1f}"
            f"  max {each[-1] / 1000:.1f}; {sum(1 for t in each if t >= 1_000_000)} took 1 ms or more"
        )
    if syncs:
        syncs.sort()
        print(
            f"  sync (writer, wall clock per flush, us): {len(syncs)} flushes, median"
            f" {statistics.median(syncs) / 1000:.0f}  p90 {syncs[int(len(syncs) * 0.9)] / 1000:.0f}"
            f"  max {syncs[-1] / 1000:.0f}"
        )
    print(f"  journal at the end: {size} bytes")


if __name__ == "__main__":
    main()
