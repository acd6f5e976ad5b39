"""The gateway's benchmark still runs against the code as it is.

`benchmarks/gateway_bench.py` sets up bastion through its own APIs (the quickstart's users, a
sub-agent, a token exchange): a change to one of them broke its setup once with every test
passing. Its figures are never read here (benchmarks are not tests); only that a few calls go
through each path and it prints its summary.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gateway_benchmark_runs_every_path_it_measures():
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gateway_bench.py"),
            *("--clients", "1", "--requests", "10", "--rounds", "1", "--chain", "--floor"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 0, run.stderr[-4000:]
    for path in ("direct", "gateway", "chain", "floor"):
        assert any(line.split()[:1] == [path] for line in run.stdout.splitlines()), run.stdout
    assert "throughput through bastion" in run.stdout
