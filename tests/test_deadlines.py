"""No ``asyncio.wait_for`` in bastion: on Python 3.11 (what bastion runs on) it returns the
result of an operation that completes just as the caller's own deadline or cancellation arrives,
and drops that cancellation (CPython gh-86296, fixed in 3.12). The caller then goes on with its
deadline spent and nothing left to bound it: a gateway call waiting on a silent upstream for
ever, a task that cannot be stopped. ``asyncio.timeout`` delivers the cancellation to the
awaiting task itself, and loses none (tests/gateway/test_http1.py shows the case)."""

from __future__ import annotations

import re
from pathlib import Path

import bastion

SOURCE = Path(bastion.__file__).parent
WAIT_FOR = re.compile(r"asyncio\.wait_for\b|from asyncio import .*\bwait_for\b")


def test_bastion_bounds_its_waits_with_asyncio_timeout_never_wait_for():
    used = [
        f"{path.relative_to(SOURCE.parent)}:{n}"
        for path in sorted(SOURCE.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if WAIT_FOR.search(line.split("#")[0])
    ]
    assert used == []
