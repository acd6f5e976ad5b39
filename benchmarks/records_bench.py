"""What writing the gateway's decision records costs as the log grows: CPU per record of a flush
(`DecisionRecords.flush`, as the record writer's thread runs it) on a SQLite log that already
holds ``--rows`` records.

    .venv/bin/python benchmarks/records_bench.py [--rows 200000] [--batches 200] [--batch 140]
        [--database postgresql://...]

Each record is one of the gateway benchmark's (the support agent's search: two principals, a
digest, a context, one rule, a mask), with an id from ``new_decision_id``, as the gateway makes
them. The log is filled first in batches of 1,000, then ``--batches`` flushes of ``--batch``
records each (140: the records of one 0.2 s flush at 700 calls a second) are timed with the
thread's CPU clock, and the bytes they pass to write calls (``wchar`` of /proc/self/io: the
write-ahead log's frames and its checkpoints) are counted in 4 KiB pages. Run it on two trees
to compare them. ``--database``: an empty PostgreSQL database (or schema, by its search_path)
instead of a new SQLite file; its pages are the server's, not counted. Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bastion.audit.decisions import DecisionRecord, DecisionRecords, new_decision_id  # noqa: E402
from bastion.db import Database  # noqa: E402

CONTEXT = {
    "annotations": {"readOnlyHint": True},
    "protocol_version": "2026-07-28",
    "address": "127.0.0.1",
    "server": "desk",
}


def add(records: DecisionRecords, n: int) -> None:
    for _ in range(n):
        records.add(
            DecisionRecord.of(
                {
                    "id": new_decision_id(),
                    "at": time.time(),
                    "server": "desk",
                    "method": "tools/call",
                    "target": 'Tool{"desk/search_customers"}',
                    "principals": ('User{"sam"}', 'Agent{"support-agent"}'),
                    "result": "allow",
                    "arguments_digest": "hmac-sha256:" + "ab" * 32,
                    "context": CONTEXT,
                    "rules": ('allow(user: User, "call", tool: Tool) if ...',),
                    "obligations": {"masks": ["customers.*.email"], "masked_fields": 3},
                    "reason": "",
                    "latency_us": 40,
                }
            )
        )


def fill(records: DecisionRecords, n: int) -> None:
    """Write ``n`` records to the log, in batches of 1,000."""
    for done in range(0, n, 1000):
        add(records, min(1000, n - done))
        records.flush()


def written_bytes() -> int:
    """Bytes this process has passed to write system calls (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise SystemExit("/proc/self/io has no wchar")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch", type=int, default=140)
    parser.add_argument("--database", help="a PostgreSQL URL (default: a new SQLite file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bastion-records-bench-") as tmp:
        path = Path(tmp) / "bastion.db"
        db = Database(args.database or f"sqlite:///{path}")
        records = DecisionRecords(db)
        started = time.monotonic()
        fill(records, args.rows)
        filled = time.monotonic() - started
        cpu, written = [], 0
        for _ in range(args.batches):
            add(records, args.batch)
            before = written_bytes()
            begun = time.thread_time()
            records.flush()
            cpu.append((time.thread_time() - begun) / args.batch * 1e6)
            written += written_bytes() - before
        size = path.stat().st_size if path.exists() else 0
        db.close()
    print(
        f"decision records: {args.rows:,} in the log (filled in {filled:.1f} s, {size / 2**20:.0f}"
        f" MiB), {args.batches} flushes of {args.batch}"
    )
    print(
        f"CPU per record written: median {statistics.median(cpu):.1f} us"
        f" (p10 {statistics.quantiles(cpu, n=10)[0]:.1f}, p90 {statistics.quantiles(cpu, n=10)[-1]:.1f})"
    )
    print(f"pages written per record: {written / 4096 / (args.batches * args.batch):.2f}")
    print(f"a decision id: {new_decision_id()}")


if __name__ == "__main__":
    main()
