"""The behaviour counters' keys (`bastion.signals.behavior.scope_keys`): one agent on one target
has a key no other (agent, target) pair has, whatever `|` and `\\` their names hold, and a key
holding neither is spelt as before, so the baselines learned before an upgrade are read after it;
in this process's memory and in Redis alike."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from bastion.signals.behavior import LocalBehavior, RedisBehavior, scope_keys
from tests.conftest import REDIS_URL, drop_redis_keys, require_service
from tests.waits import PATIENCE

# (agent, target) pairs whose names, joined by `|`, spell one key: "tool|a|b|c" for the first
# two; the others tell an escaped `|` from a `\` before a separator.
ALIKE = [("a|b", "c"), ("a", "b|c"), ("a\\", "b|c"), ("a\\|b", "c"), ("a", "b\\|c"), ("a|", "|c")]


@pytest.fixture(params=["memory", "redis"])
def counters(request) -> Iterator[LocalBehavior | RedisBehavior]:
    if request.param == "memory":
        yield LocalBehavior()
        return
    require_service("Redis", "127.0.0.1", 6379)
    prefix = f"bastion-test-{uuid.uuid4().hex[:12]}"
    try:
        yield RedisBehavior(REDIS_URL, prefix, timeout=PATIENCE)
    finally:
        drop_redis_keys(prefix)


def counted(counters, writes: list[tuple[tuple[str, ...], int]], reads: list[tuple[str, str]]):
    """Each key tuple of ``writes`` observed as many times as given; then the minute's calls of
    the agent on the target of each of ``reads``, as a decision reads them."""

    async def scenario() -> list[int]:
        try:
            for keys, times in writes:
                for _ in range(times):
                    counters.observe(keys, False, False, "T", "")
            if isinstance(counters, RedisBehavior):
                await asyncio.wait(set(counters._pending))
            out = []
            for agent, target in reads:
                view = counters.view("sam", agent, target)
                await counters.prepare(view)
                out.append(view["tool"]["calls"]["minute"]["count"])
            return out
        finally:
            if isinstance(counters, RedisBehavior):
                await counters.close()

    return asyncio.run(scenario())


def test_an_agent_on_a_target_is_counted_apart_from_every_pair_whose_names_join_alike(counters):
    keys = [scope_keys("sam", agent, target) for agent, target in ALIKE]
    # Each pair called a number of times of its own: each reads its own count, none merged.
    writes = [(k[2:], n) for n, k in enumerate(keys, start=1)]
    assert counted(counters, writes, ALIKE) == list(range(1, len(ALIKE) + 1))
    assert len({k[2] for k in keys}) == len(ALIKE), [k[2] for k in keys]


def test_a_key_without_a_bar_or_a_backslash_reads_what_an_earlier_release_counted(counters):
    """Counted under the keys an earlier release made (each name joined by `|` as it came), the
    figures are read under today's keys for the same names."""
    names = [("agent-1", 'Tool{"desk/search"}'), ("https://app.example/cimd.json", "lab://x")]
    for agent, target in names:
        assert scope_keys("ada", agent, target) == (
            "user|ada",
            f"agent|{agent}",
            f"tool|{agent}|{target}",
        )
    writes = [((f"tool|{agent}|{target}",), n) for n, (agent, target) in enumerate(names, 2)]
    assert counted(counters, writes, names) == [2, 3]
