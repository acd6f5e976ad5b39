"""Rate limits and behaviour counters shared through a real Redis Cluster (``redis+cluster://``).

The fixture starts three ``redis-server`` nodes in cluster mode on free ports and joins them with
``redis-cli --cluster create``. Each node's cluster bus gets a free port of its own too: left to
itself, a node takes its port + 10000, which falls in the kernel's range for outgoing connections,
where any connection of the suite may hold it (the node then exits at start). The limits of one
call (the user's and the agent's) must be counted atomically in one script, which a cluster only
allows within one hash slot: these tests count across two limiters (two bastion processes) and
across principals, and check that targets spread. Behaviour counts are written by a script too,
which no node has until it is loaded there: two gateways' counts must reach the cluster. So are
the resources a user follows (``max_subscriptions_per_user``), one key per user and server.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from bastion.decide.contract import RateLimit
from bastion.facts.model import Entity
from bastion.gateway.follows import FollowLeases
from bastion.gateway.ratelimit import LimitsUnavailable, RedisRateLimiter
from bastion.signals.behavior import RedisBehavior, scope_keys
from tests.conftest import require_program
from tests.ports import free_port, free_socket
from tests.waits import PATIENCE, eventually

USER, AGENT = Entity("User", "sam"), Entity("Agent", "client-1")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[list[int]]:
    require_program("redis-server", shutil.which("redis-server") or "/usr/bin/redis-server")
    require_program("redis-cli", shutil.which("redis-cli") or "/usr/bin/redis-cli")
    work = tmp_path_factory.mktemp("redis-cluster")
    ports = [free_port() for _ in range(3)]
    nodes = [
        subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work)]
            + ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
            + ["--cluster-port", str(free_port())]
            + ["--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        for port, node in zip(ports, nodes, strict=True):
            _wait(["redis-cli", "-p", str(port), "ping"], "PONG", node)
        subprocess.run(
            ["redis-cli", "--cluster", "create"]
            + [f"127.0.0.1:{port}" for port in ports]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for port in ports:
            _wait(["redis-cli", "-p", str(port), "cluster", "info"], "cluster_state:ok")
        yield ports
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            node.wait(PATIENCE)


def _wait(command: list[str], expected: str, node: subprocess.Popen | None = None) -> None:
    def printed() -> bool:
        if node is not None and node.poll() is not None:
            raise RuntimeError(f"{' '.join(node.args)} exited with {node.returncode}")
        return expected in subprocess.run(command, capture_output=True, text=True).stdout

    if not eventually(printed, every=0.1):
        raise RuntimeError(f"{' '.join(command)} never printed {expected!r}")


def limits(max_calls: int) -> list[RateLimit]:
    return [RateLimit(USER, max_calls, 60), RateLimit(AGENT, max_calls, 60)]


def test_two_limiters_count_one_window_across_principals(cluster):
    url = f"redis+cluster://127.0.0.1:{cluster[0]}"
    prefix = f"bastion-test-{uuid.uuid4().hex[:12]}"
    tool = Entity("Tool", "desk/send_email")

    async def scenario() -> list[float | None]:
        # Two bastion processes: each its own client, one entering by another node.
        first = RedisRateLimiter(url, prefix, PATIENCE)
        second = RedisRateLimiter(f"redis+cluster://127.0.0.1:{cluster[2]}", prefix, PATIENCE)
        try:
            return [
                await limiter.admit(limits(3), "call", tool)
                for limiter in (first, second, first, second, first)
            ]
        finally:
            await first.close()
            await second.close()

    outcomes = asyncio.run(scenario())
    assert outcomes[:3] == [None, None, None]  # user and agent limits counted in one script
    assert all(wait is not None and 0 < wait <= 60 for wait in outcomes[3:])


def test_targets_spread_over_the_cluster_but_each_call_stays_in_one_slot(cluster):
    from redis.crc import key_slot

    limiter = RedisRateLimiter(f"redis+cluster://127.0.0.1:{cluster[0]}")
    slots = set()
    for i in range(50):
        tool = Entity("Tool", f"desk/tool-{i}")
        keys = [limiter.key(limit, "call", tool) for limit in limits(1)]
        call_slots = {key_slot(key.encode()) for key in keys}
        assert len(call_slots) == 1, keys
        slots |= call_slots
    assert len(slots) > 10  # fifty targets do not all land on one node
    asyncio.run(limiter.close())


def test_two_gateways_behaviour_counts_reach_the_cluster(cluster):
    prefix = f"bastion-test-{uuid.uuid4().hex[:12]}"
    keys = scope_keys("sam", "client-1", 'Tool{"desk/delete_customer"}')

    # Every process's clock at the middle of this minute: a minute that ended between two calls
    # would count the one target once in each window (the sliding estimate adds them).
    middle = time.time() // 60 * 60 + 30

    def clock() -> float:
        return middle

    async def scenario() -> tuple[int, int, int]:
        # Two bastion processes entering by different nodes; the count script is on no node yet.
        first = RedisBehavior(
            f"redis+cluster://127.0.0.1:{cluster[0]}", prefix, clock=clock, timeout=PATIENCE
        )
        second = RedisBehavior(
            f"redis+cluster://127.0.0.1:{cluster[1]}", prefix, clock=clock, timeout=PATIENCE
        )
        try:
            for counters in (first, second, first):
                counters.observe(keys, False, True, 'Tool{"desk/delete_customer"}', "digest")
                await asyncio.wait(set(counters._pending))
            reader = RedisBehavior(
                f"redis+cluster://127.0.0.1:{cluster[2]}", prefix, clock=clock, timeout=PATIENCE
            )
            try:
                view = reader.view("sam", "client-1", 'Tool{"desk/delete_customer"}')
                await reader.prepare(view)
                return (
                    view["user"]["calls"]["minute"]["count"],
                    view["agent"]["destructive"]["minute"]["count"],
                    view["tool"]["targets"]["minute"]["count"],
                )
            finally:
                await reader.close()
        finally:
            await first.close()
            await second.close()

    # Three calls, all destructive, one argument digest for the agent on its target.
    assert asyncio.run(scenario()) == (3, 3, 1)


def test_labels_shared_through_the_cluster_and_their_loss_noticed(cluster):
    """A label set and the marker that says Redis kept it live in different slots (nodes):
    both are read at once, and a cluster flushed on every node refuses what reads labels. A
    chain's set in a task and its agents' own sets (no task) are in different slots too: one
    release records them all."""
    import redis

    from bastion.delegation.labels import LabelKey, LabelsLost, RedisLabels

    prefix = f"bastion-test-{uuid.uuid4().hex[:12]}"
    key = LabelKey("sam", "planner", "t-1")

    async def scenario() -> None:
        first = RedisLabels(f"redis+cluster://127.0.0.1:{cluster[0]}", prefix, timeout=PATIENCE)
        second = RedisLabels(f"redis+cluster://127.0.0.1:{cluster[1]}", prefix, timeout=PATIENCE)
        try:
            owns = [LabelKey.own("planner"), LabelKey.own("mailer")]
            await first.record([key, *owns], ["pii"])
            for recorded in (key, *owns):
                assert await second.labels(recorded) == ["pii"]
            for port in cluster:
                redis.Redis(port=port).flushall()
            for store in (first, second):
                with pytest.raises(LabelsLost):
                    await store.labels(key)
        finally:
            await first.close()
            await second.close()

    asyncio.run(scenario())


def test_two_gateways_count_a_users_follows_through_the_cluster(cluster):
    # Two processes' subscription counts (bastion.gateway.follows): checked and added in one
    # script on the user's one key, renewed (several users' keys, on several nodes) and dropped.
    prefix = f"bastion-test-{uuid.uuid4().hex[:12]}"

    async def scenario() -> list:
        first = FollowLeases(f"redis+cluster://127.0.0.1:{cluster[0]}", prefix, PATIENCE)
        second = FollowLeases(f"redis+cluster://127.0.0.1:{cluster[2]}", prefix, PATIENCE)
        held = {("lab", f"user{n}", "s1", "lab://open") for n in range(6)}
        held.add(("lab", "user5", "s1", "lab://lost"))  # held here, missing in Redis
        try:
            seen = [await first.take("lab", "user0", "s1", ["lab://open", "lab://b"], 2)]
            seen.append(await second.take("lab", "user0", "s2", ["lab://open"], 2))
            for n in range(1, 6):  # users whose keys fall on other nodes
                seen.append(await first.take("lab", f"user{n}", "s1", ["lab://open"], 2))
            # lab://b of user0 is no longer held; user5's lab://lost is written again.
            seen.append(await first.renew(lambda: held))
            await first.drop("lab", "user0", "s1", ["lab://b"])
            seen.append(await second.take("lab", "user0", "s2", ["lab://open"], 2))
            return seen
        finally:
            await first.close()
            await second.close()

    seen = asyncio.run(scenario())
    assert seen == [None, 2, None, None, None, None, None, 1, None]


def test_an_unreachable_cluster_refuses(cluster):
    with free_socket() as closed:  # bound, never listening
        url = f"redis+cluster://127.0.0.1:{closed.getsockname()[1]}"

        async def scenario() -> None:
            limiter = RedisRateLimiter(url, timeout=0.5)
            try:
                await limiter.admit(limits(3), "call", Entity("Tool", "desk/send_email"))
            finally:
                await limiter.close()

        with pytest.raises(LimitsUnavailable):
            asyncio.run(scenario())


def test_cluster_urls_are_accepted_and_others_refused():
    from bastion.gateway.config import GatewayConfig
    from bastion.server.config import ConfigError

    url = "redis+cluster://10.0.0.1:7000"
    assert GatewayConfig.from_mapping({"redis_url": url}).redis_url == url
    with pytest.raises(ConfigError, match="redis\\+cluster"):
        GatewayConfig.from_mapping({"redis_url": "cluster://10.0.0.1:7000"})
