"""How late the event loop runs while the record writer's thread flushes decision records: a
1 ms timer on an asyncio loop, measured for its lateness, while another thread flushes
``--batch`` records (`DecisionRecords.flush`, as the gateway's record writer runs it) every
``--every`` seconds, ``--flushes`` times; then the same with nothing flushed (the machine's own
lateness). A gateway call that arrives during a flush waits as long as this timer does.

    .venv/bin/python benchmarks/records_lag.py [--batch 140] [--flushes 40] [--every 0.05]

The records are `records_bench.py`'s (the gateway benchmark's search). Run it on two trees to
compare them. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_bench import p  # noqa: E402
from records_bench import add  # noqa: E402

from bastion.audit.decisions import DecisionRecords  # noqa: E402
from bastion.db import Database  # noqa: E402


def late_while(work: Callable[[], object]) -> list[float]:
    """The lateness (ms) of a 1 ms timer on an asyncio loop, each time it fires, while another
    thread runs ``work``."""
    done = threading.Event()

    def run() -> None:
        try:
            work()
        finally:
            done.set()

    async def timer() -> list[float]:
        late = []
        threading.Thread(target=run, daemon=True).start()
        while not done.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            late.append((time.perf_counter() - started - 0.001) * 1e3)
        return late

    return asyncio.run(timer())


def lateness(batch: int, flushes: int, every: float) -> tuple[list[float], list[float]]:
    """The timer's lateness (ms) while a thread flushes ``batch`` records ``flushes`` times, and
    each flush's wall time (ms)."""
    records = DecisionRecords(Database(str(Path(tempfile.mkdtemp()) / "bastion.db")))
    walls: list[float] = []

    def writer() -> None:
        for _ in range(flushes):
            add(records, batch)
            started = time.perf_counter()
            records.flush()
            walls.append((time.perf_counter() - started) * 1e3)
            time.sleep(every)

    return late_while(writer), walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=140, help="records per flush")
    parser.add_argument("--flushes", type=int, default=40)
    parser.add_argument("--every", type=float, default=0.05, help="seconds between flushes")
    args = parser.parse_args()
    for batch in (args.batch, 0):
        late, walls = lateness(batch, args.flushes, args.every)
        print(
            f"{batch:>5} records per flush: flush {statistics.median(walls):.2f} ms (median);"
            f" the loop's lateness: median {p(late, 0.5):.3f}, p99 {p(late, 0.99):.3f},"
            f" p99.9 {p(late, 0.999):.3f}, max {max(late):.3f} ms;"
            f" over 2 ms {sum(x > 2 for x in late)} of {len(late)}"
        )


if __name__ == "__main__":
    main()
