"""Behaviour counters shared through Redis (``gateway.redis_url``): two bastion apps on one
database count one agent's deletes together, and a gateway whose Redis is unreachable refuses
the decisions whose rules read ``context.behavior`` (reason ``behavior_unavailable``), and only
those. A message's counts reach Redis in one round trip of scripts run by their digest, and
still do once the server has lost its scripts (on a Redis Cluster: tests/gateway/test_redis_cluster.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import anyio
import pytest

from bastion.signals.behavior import RedisBehavior, scope_keys
from tests.conftest import REDIS_URL, drop_redis_keys, require_service
from tests.gateway.support import start
from tests.gateway.test_shared_rate_limits import call_tool
from tests.oauth.support import free_socket
from tests.private_redis import PrivateRedis
from tests.waits import PATIENCE, eventually

from .test_behavior import BULK, _reference_figures

WRITE = "customers:read customers:write"


def destructive_seen(prefix: str, agent: str) -> int:
    """The agent's destructive count for the minute, as any replica reads it from Redis."""

    async def read() -> int:
        counters = RedisBehavior(REDIS_URL, prefix, timeout=PATIENCE)
        try:
            view = counters.view("avery", agent, "T")
            await counters.prepare(view)
            return view.get("agent")["destructive"]["minute"]["count"]
        finally:
            await counters.close()

    return anyio.run(read)


def test_two_gateways_count_one_agents_deletes_together(tmp_path):
    require_service("Redis", "127.0.0.1", 6379)

    prefix = f"bastion-test-{uuid.uuid4().hex[:12]}"
    settings = {"redis_url": REDIS_URL, "redis_prefix": prefix}
    try:
        with start(tmp_path, gateway=settings, replicas=1, policy_extra=BULK) as bastion:
            token = bastion.token("avery", "deskhttp", WRITE)
            first, second = bastion.url, bastion.replicas[0]
            outcomes: list[dict] = []
            agent = ""
            for n, base in enumerate((first, second, first, second, first)):
                outcomes.append(
                    call_tool(
                        bastion.http, base, token, "delete_customer", {"customer_id": f"r{n}"}
                    )
                )
                # The count is written after the answer, off the call path: wait until Redis
                # has it (any replica reads the same figure), so the next call sees it.
                agent = agent or _agent(bastion)  # the first call went through the first app
                allowed = sum("error" not in o for o in outcomes)
                reached = eventually(
                    lambda a=agent, n=allowed: destructive_seen(prefix, a) >= n, every=0.02
                )
                assert reached, "the count never reached Redis"
            # Each app alone saw at most 2 deletes; together 3: the next ones are held.
            assert ["error" not in o for o in outcomes] == [True, True, True, False, False]
            for held in outcomes[3:]:
                assert held["error"]["data"]["reason"] == "approval_pending"
    finally:
        drop_redis_keys(prefix)


def _agent(bastion) -> str:
    """The agent (OAuth client) of the last decision recorded by the first app."""
    bastion.flush()
    rows = bastion.records.after(0, 100000)
    principals = [r.principals for _, r in rows if len(r.principals) > 1]
    return principals[-1][1].removeprefix('Agent{"').removesuffix('"}')


def test_unreachable_redis_refuses_what_reads_behaviour_and_only_that(tmp_path, caplog):
    with free_socket() as closed:  # bound, never listening: connections are refused
        port = closed.getsockname()[1]
        settings = {"redis_url": f"redis://127.0.0.1:{port}/0"}
        with start(tmp_path, gateway=settings, policy_extra=BULK) as bastion:
            token = bastion.token("avery", "deskhttp", WRITE)
            before = len(bastion.recorder.messages())
            refused = call_tool(
                bastion.http, bastion.url, token, "delete_customer", {"customer_id": "z"}
            )
            assert refused["error"]["data"]["reason"] == "behavior_unavailable"
            assert "decision_id" in refused["error"]["data"]
            assert not any(
                m.get("method") == "tools/call" for m in bastion.recorder.messages()[before:]
            ), "a refused delete never reaches the upstream"
            # A resource read: no rule about it reads behaviour, so Redis is not needed.
            response = bastion.http.post(
                f"{bastion.url}/mcp/deskhttp",
                json={
                    "jsonrpc": "2.0",
                    "id": 2,
                    "method": "resources/read",
                    "params": {
                        "uri": "customers://plans",
                        "_meta": {
                            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                            "io.modelcontextprotocol/clientCapabilities": {},
                        },
                    },
                },
                headers={
                    "authorization": f"Bearer {token}",
                    "content-type": "application/json",
                    "accept": "application/json",  # JSON however long it takes
                    "mcp-protocol-version": "2026-07-28",
                    "mcp-method": "resources/read",
                    "mcp-name": "customers://plans",
                },
            )
            assert response.status_code == 200, response.text
            assert "error" not in response.json()
            bastion.flush()
            rows = [
                r for _, r in bastion.records.after(0, 100000) if r.reason == "behavior_unavailable"
            ]
            assert rows and rows[-1].result == "deny"
    assert any("behaviour counters cannot be read" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory) -> Iterator[str]:
    """A Redis server of this module's own, whose command counts no other test adds to."""
    with PrivateRedis(tmp_path_factory.mktemp("own-redis")) as node:
        yield node.url


@pytest.mark.parametrize("seed", range(4))
def test_shared_counts_and_baselines_agree_with_their_definition(seed):
    """The count script's windows and baselines (Lua, in Redis) against the definition, as
    `test_behavior.py` checks the counters kept in process: random messages and results on a
    clock the test moves (a key's first window seeded by its share of it, or not), read back as
    another process reads them."""
    import math
    import random

    from bastion.signals.behavior import BehaviorSettings

    require_service("Redis", "127.0.0.1", 6379)
    rng = random.Random(seed)
    now = [rng.uniform(0, 1e6)]
    weight = rng.choice([0.2, 0.5, 1.0])
    settings = BehaviorSettings(baseline_weight=weight)
    prefix = f"bastion-test-{uuid.uuid4().hex[:12]}"
    keys = scope_keys("sam", "agent-1", 'Tool{"desk/search"}')

    async def scenario() -> None:
        counters = RedisBehavior(
            REDIS_URL, prefix, settings, clock=lambda: now[0], timeout=PATIENCE
        )
        events = []
        try:
            for _ in range(60):
                now[0] += rng.choice([0.5, 3, 20, 59, 61, 200, 599, 601, 1800, 3601])
                if rng.random() < 0.7:
                    refused, destructive = rng.random() < 0.3, rng.random() < 0.3
                    target = rng.choice("abcde")
                    counters.observe(keys[:2], refused, destructive, target, "")
                    events.append((now[0], 1, int(refused), int(destructive), 0, target))
                else:
                    size = rng.randrange(5000)
                    counters.returned(keys[:2], size)
                    events.append((now[0], 0, 0, 0, size, None))
                await asyncio.wait(set(counters._pending))
                written = now[0]
                now[0] += rng.choice([0, 10, 70, 700, 4000])  # read later, as then
                view = counters.view("sam", "agent-1", "t")
                await counters.prepare(view)
                for c, name in enumerate(("calls", "refusals", "destructive", "bytes", "targets")):
                    for window, seconds in (("minute", 60), ("ten_minutes", 600), ("hour", 3600)):
                        count, baseline = _reference_figures(events, now[0], weight, c, seconds)
                        figure = view["agent"][name][window]
                        assert figure["count"] == math.ceil(count - 1e-9), (name, window)
                        assert figure["baseline"] == pytest.approx(baseline, rel=1e-6, abs=2e-3)
                now[0] = written
        finally:
            await counters.close()

    asyncio.run(scenario())


def _calls(url: str) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return {k: v["calls"] for k, v in client.info("commandstats").items()}
    finally:
        client.close()


def _counted(url: str, flush_between: bool) -> tuple[int, int, dict[str, int]]:
    """Three messages' counts written, the first to warm up (the script loaded, connections
    open), the scripts flushed before the third if asked; the agent's calls and bytes for the
    minute as a reader sees them, and the commands Redis ran for the last two messages' writes
    (by `INFO commandstats`; the flush and the connections' own handshakes left out)."""
    import redis

    prefix = f"bastion-test-{uuid.uuid4().hex[:12]}"
    target = 'Tool{"desk/search"}'
    keys = scope_keys("sam", "client-1", target)

    async def write(counters: RedisBehavior) -> None:
        counters.observe(keys, False, False, target, "digest")
        counters.returned(keys, 100)
        await asyncio.wait(set(counters._pending))

    async def scenario() -> tuple[int, int, dict[str, int]]:
        counters = RedisBehavior(url, prefix, timeout=PATIENCE)
        try:
            await write(counters)
            before = _calls(url)
            await write(counters)
            middle = _calls(url)
            if flush_between:
                flusher = redis.Redis.from_url(url)
                flusher.script_flush()
                flusher.close()
            flushed = _calls(url)
            await write(counters)
            after = _calls(url)
            ran = {
                name: (middle.get(name, 0) - before.get(name, 0))
                + (after.get(name, 0) - flushed.get(name, 0))
                for name in after
            }
            view = counters.view("sam", "client-1", target)
            await counters.prepare(view)
            figures = view["agent"]
            return figures["calls"]["minute"]["count"], figures["bytes"]["minute"]["count"], ran
        finally:
            await counters.close()

    calls, size, ran = asyncio.run(scenario())
    # INFO is this test's own (one per reading); HELLO and CLIENT SETINFO open a connection.
    ignored = {"cmdstat_info", "cmdstat_hello", "cmdstat_client|setinfo", "cmdstat_ping"}
    return calls, size, {k: n for k, n in ran.items() if n and k not in ignored}


def test_a_messages_counts_are_script_runs_by_digest_and_nothing_more(own_redis):
    calls, size, ran = _counted(own_redis, flush_between=False)
    assert (calls, size) == (3, 300)
    # Two messages, each written twice (decided, then its result returned), three keys each:
    # twelve script runs by digest, and no other command sent by the client (a pipeline given
    # the script itself asks the server whether it has it: one more round trip each time).
    sent = {name: n for name, n in ran.items() if not _inside_script(name)}
    assert sent == {"cmdstat_evalsha": 12}


def test_counts_reach_a_server_that_lost_its_scripts(own_redis):
    calls, size, ran = _counted(own_redis, flush_between=True)
    # Nothing lost: refused for want of the script, it was loaded and the calls sent again.
    assert (calls, size) == (3, 300)
    assert ran.get("cmdstat_script|load", 0) >= 1
    assert ran["cmdstat_evalsha"] > 12


def _inside_script(name: str) -> bool:
    """Commands the count script runs on the server (which Redis counts as well)."""
    return name in {
        "cmdstat_hget",
        "cmdstat_hincrby",
        "cmdstat_hsetnx",
        "cmdstat_expire",
        "cmdstat_sadd",
        "cmdstat_scard",
    }
