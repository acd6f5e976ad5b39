"""What a SQLite commit costs written through to the disk (``synchronous=FULL``, bastion's
default) and not (``NORMAL``), in WAL mode, one row per commit, alternating the two.

    .venv/bin/python benchmarks/sqlite_commit_bench.py [--folder DIR] [--commits 500] [--runs 2]

Prints, for each run, the wall time (mostly waiting for the disk) and the CPU time per commit.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path


def run(folder: Path, level: str, commits: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        return _commits(Path(scratch) / "commits.db", level, commits)


def _commits(path: Path, level: str, commits: int) -> tuple[float, float]:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={level}")
        db.execute("CREATE TABLE t (n INTEGER, text TEXT)")
        wall, cpu = time.perf_counter(), time.process_time()
        for n in range(commits):
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t VALUES (?, ?)", (n, "x" * 100))
            db.execute("COMMIT")
        return (time.perf_counter() - wall) / commits, (time.process_time() - cpu) / commits
    finally:
        db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--commits", type=int, default=500)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    for n in range(args.runs):
        for level in ("FULL", "NORMAL"):
            wall, cpu = run(args.folder, level, args.commits)
            print(
                f"run {n + 1} {level:6}  {wall * 1e6:7.0f} us wall  {cpu * 1e6:5.0f} us CPU per commit"
            )


if __name__ == "__main__":
    main()
