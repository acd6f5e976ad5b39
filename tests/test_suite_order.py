"""How `make test` hands out the suite: the files `tests/conftest.py` names as the longest
(`LONG_FILES`) are in the tree and are collected first, so that `--dist loadfile` starts them
first and no long file is left for one core at the end."""

from __future__ import annotations

import subprocess
import sys
from itertools import groupby
from pathlib import Path

from tests.conftest import LONG_FILES

ROOT = Path(__file__).resolve().parent.parent


def test_every_long_file_named_is_a_test_file_of_the_tree():
    assert len(set(LONG_FILES)) == len(LONG_FILES), "a file named twice"
    assert [name for name in LONG_FILES if not (ROOT / name).is_file()] == []


def test_long_files_are_collected_before_the_others_in_their_order_and_whole():
    # Given on the command line short file first, then long ones in reverse order.
    short = "tests/test_ids.py"
    long = [LONG_FILES[2], LONG_FILES[0]]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
        + [short, *long],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    files = [line.partition("::")[0] for line in done.stdout.splitlines() if "::" in line]
    # Each file once, in one run of its tests: whole files moved, none spread among others.
    assert [name for name, _ in groupby(files)] == [LONG_FILES[0], LONG_FILES[2], short]
