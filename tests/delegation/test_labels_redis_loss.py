"""A Redis that loses the session labels without being unreachable must not lift what they
refuse (docs/delegation.md, "Where the sets live"; docs/operations.md, "What Redis must keep").

Each test runs its own ``redis-server`` (`tests.private_redis`: nothing kept on disk) and loses
its data as a deployment's Redis would: ``FLUSHALL``, a restart, a restart from an older
snapshot (as a failover to a replica behind on replication), an eviction, or all of it while no
bastion process was running. An agent that was shown ``pii`` must not mail outside afterwards:
what reads the labels is refused (``labels_lost``) for ``label_ttl_seconds``, audited once.
"""

from __future__ import annotations

import uuid

import anyio
import pytest

from bastion.audit import AuditLog
from bastion.db import Database
from bastion.delegation.labels import (
    LabelKey,
    LabelSettings,
    LabelsLost,
    LabelsUnavailable,
    RedisLabels,
)
from tests.delegation.test_labels import INSIDE, OUTSIDE, RULES, new_user, read_resource
from tests.gateway.support import start
from tests.gateway.test_shared_rate_limits import call_tool
from tests.private_redis import PrivateRedis
from tests.waits import PATIENCE

KEY = LabelKey("sam", "planner", "t-1")


@pytest.fixture
def private(tmp_path):
    folder = tmp_path / "redis"
    folder.mkdir()
    with PrivateRedis(folder) as server:
        yield server


def _store(private, audit=None, clock=None, ttl=86_400) -> RedisLabels:
    kwargs = {"clock": clock} if clock is not None else {}
    return RedisLabels(
        private.url, "bastion", LabelSettings(ttl_seconds=ttl), PATIENCE, audit=audit, **kwargs
    )


async def _lost(store: RedisLabels, key: LabelKey = KEY) -> str:
    with pytest.raises(LabelsLost) as refused:
        await store.labels(key)
    return str(refused.value)


async def _lost_after_restart(store: RedisLabels) -> str:
    """As `_lost`, for the first read after Redis restarted: the connection it was made on is
    gone, so that read is refused as Redis away (docs/operations.md), and the next finds out."""
    with pytest.raises(LabelsUnavailable):
        await store.labels(KEY)
    return await _lost(store)


def test_a_flushed_redis_does_not_let_an_agent_shown_pii_mail_outside(tmp_path, private):
    with start(tmp_path, gateway={"redis_url": private.url}, policy_extra=RULES) as gw:
        user = new_user(gw)
        token = gw.token(user, "deskhttp", "customers:read")
        shown = call_tool(gw.http, gw.url, token, "search_customers", {"query": "a"})
        assert "error" not in shown
        refused = call_tool(gw.http, gw.url, token, "send_email", OUTSIDE)
        assert refused["error"]["data"]["reason"] == "not_permitted"

        private.client().flushall()
        before = len(gw.recorder.messages())
        again = call_tool(gw.http, gw.url, token, "send_email", OUTSIDE)
        assert again["error"]["data"]["reason"] == "labels_lost", again
        assert call_tool(gw.http, gw.url, token, "send_email", INSIDE)["error"]["data"][
            "reason"
        ] == ("labels_lost")
        assert not [
            m for m in gw.recorder.messages()[before:] if m.get("method") == "tools/call"
        ], "nothing that reads the labels reaches the upstream once they may be lost"
        # What does not read the labels goes on.
        plans = read_resource(gw.http, gw.url, token, "customers://plans")
        assert "error" not in plans and plans["result"]["contents"]
        events = AuditLog(gw.app.state.store.db).events(kind="labels.lost")
        assert len(events) == 1 and events[0].detail["prefix"] == "bastion"
        assert events[0].detail["refused_until"] > events[0].at


def test_a_redis_restarted_without_persistence_is_noticed(private):
    async def main():
        store = _store(private)
        try:
            await store.record([KEY], ["pii"])
            assert await store.labels(KEY) == ["pii"]
            private.restart()
            assert "lost" in await _lost_after_restart(store)
            # A label set of another user and agent is refused too: any of them may be gone.
            assert await _lost(store, LabelKey("avery", "mailer"))
        finally:
            await store.close()

    anyio.run(main)


def test_a_redis_back_from_an_older_snapshot_is_noticed(private):
    """The marker survives a restart from a snapshot taken before the last labels were
    recorded (as it survives a failover to a replica that had not received them): the server
    answering is another run of Redis, which is enough."""

    async def main():
        store = _store(private)
        try:
            assert await store.labels(KEY) == []  # connected: the marker is written
            private.client().save()  # the snapshot has the marker, not the label
            await store.record([KEY], ["pii"])
            private.restart()
            assert private.client().exists("bastion:state") == 1, "the marker came back"
            assert "another run" in await _lost_after_restart(store)
        finally:
            await store.close()

    anyio.run(main)


def test_a_restart_of_a_redis_that_keeps_an_append_only_file_is_not_a_loss(tmp_path):
    """A routine restart of a persistent Redis (a patch, a new host) keeps the sets: refusing
    what reads them for label_ttl_seconds after each would stop the service for a day."""

    async def main(server: PrivateRedis):
        store = _store(server)
        try:
            await store.record([KEY], ["pii"])
            server.restart()
            with pytest.raises(LabelsUnavailable):  # the connection it was made on is gone
                await store.labels(KEY)
            assert await store.labels(KEY) == ["pii"]
            await store.record([KEY], ["secret"])
            assert await store.labels(KEY) == ["pii", "secret"]
        finally:
            await store.close()

    folder = tmp_path / "redis"
    folder.mkdir()
    with PrivateRedis(folder, appendonly=True) as server:
        anyio.run(main, server)


def test_a_redis_that_may_evict_is_refused_before_it_evicts_a_label_set(private):
    client = private.client()
    client.config_set("maxmemory", "2mb")
    client.config_set("maxmemory-policy", "allkeys-lru")

    async def main():
        store = _store(private)
        try:
            await store.record([KEY], ["pii"])
            # The label set goes as Redis makes room (allkeys-lru evicts keys with a TTL too).
            filler = "x" * 10_000
            for i in range(2_000):
                client.set(f"filler:{i}", filler)
            assert client.exists(store._keys(KEY)[0]) == 0, "the label set was evicted"
            assert "maxmemory-policy" in await _lost(store)
        finally:
            await store.close()

    anyio.run(main)


def test_a_redis_that_lost_everything_while_no_bastion_ran_is_noticed(private, sqlite_url):
    """A host's reboot: Redis (nothing on disk) and bastion start again together. The database
    remembers that this deployment marked its Redis; a Redis without the marker lost it."""
    audit = AuditLog(Database(sqlite_url))

    async def main():
        first = _store(private, audit)
        await first.record([KEY], ["pii"])
        await first.close()
        private.restart()
        second = _store(private, audit)
        try:
            assert await _lost(second)
        finally:
            await second.close()

    anyio.run(main)
    assert [e.kind for e in audit.events(kind_prefix="labels.")] == [
        "labels.lost",
        "labels.redis_marked",
    ]


def test_a_new_deployments_empty_redis_is_not_a_loss(private, sqlite_url):
    audit = AuditLog(Database(sqlite_url))

    async def main():
        store, other = _store(private, audit), _store(private, audit)
        try:
            assert await store.labels(KEY) == []
            await store.record([KEY], ["pii"])
            assert await other.labels(KEY) == ["pii"]
        finally:
            await store.close()
            await other.close()

    anyio.run(main)
    assert [e.kind for e in audit.events(kind_prefix="labels.")] == ["labels.redis_marked"]


def test_every_process_refuses_until_the_label_time_to_live_has_passed(private):
    now = [1_000_000.0]

    async def main():
        one = _store(private, clock=lambda: now[0], ttl=600)
        two = _store(private, clock=lambda: now[0], ttl=600)
        try:
            await one.record([KEY], ["pii"])
            assert await two.labels(KEY) == ["pii"]
            private.client().flushall()
            await _lost(one)  # noticed here: refused for 600 s from now
            now[0] += 599
            await _lost(two)  # the other process learns it from the marker
            await _lost(one)
            fresh = _store(private, clock=lambda: now[0], ttl=600)  # a process started since
            try:
                await _lost(fresh)
            finally:
                await fresh.close()
            now[0] += 2
            assert await one.labels(KEY) == [] and await two.labels(KEY) == []
            await one.record([KEY], ["pii"])
            assert await two.labels(KEY) == ["pii"]
        finally:
            await one.close()
            await two.close()

    anyio.run(main)


def test_prefixes_are_separate_deployments(private):
    """Another deployment's marker (another prefix) says nothing of this one's."""

    async def main():
        ours = _store(private)
        theirs = RedisLabels(private.url, f"other-{uuid.uuid4().hex[:6]}", None, PATIENCE)
        try:
            await ours.record([KEY], ["pii"])
            await theirs.record([KEY], ["secret"])
            assert await theirs.labels(KEY) == ["secret"]
            assert await ours.labels(KEY) == ["pii"]
        finally:
            await ours.close()
            await theirs.close()

    anyio.run(main)


def test_an_operator_lifts_the_refusal_by_writing_a_marker_that_refuses_nothing(private):
    async def main():
        one, two = _store(private), _store(private)
        try:
            await one.record([KEY], ["pii"])
            assert await two.labels(KEY) == ["pii"]
            private.client().flushall()
            await _lost(one)
            await _lost(two)
            private.client().set("bastion:state", "checked-by-ops 0")
            assert await one.labels(KEY) == [] and await two.labels(KEY) == []
        finally:
            await one.close()
            await two.close()

    anyio.run(main)


def test_fixing_the_eviction_policy_lifts_the_refusal_unless_keys_were_evicted(private):
    now = [1_000_000.0]
    client = private.client()
    client.config_set("maxmemory", "2mb")
    client.config_set("maxmemory-policy", "volatile-lru")  # bastion's keys all expire

    async def main():
        store = _store(private, clock=lambda: now[0], ttl=600)
        try:
            await store.record([KEY], ["pii"])
            assert "volatile-lru" in await _lost(store)
            client.config_set("maxmemory-policy", "noeviction")
            now[0] += 11  # the policy is read again (only while it refuses)
            assert await store.labels(KEY) == ["pii"], "nothing was evicted: no loss"
            client.config_set("maxmemory-policy", "allkeys-lru")
        finally:
            await store.close()
        store = _store(private, clock=lambda: now[0], ttl=600)
        try:
            assert "allkeys-lru" in await _lost(store)
            for i in range(2_000):
                client.set(f"filler:{i}", "x" * 10_000)
            client.config_set("maxmemory-policy", "noeviction")
            now[0] += 11
            assert "evicted" in await _lost(store), "keys were evicted: a loss"
        finally:
            await store.close()

    anyio.run(main)


def test_a_loss_that_cannot_be_marked_in_a_full_redis_is_audited_once(private, sqlite_url):
    """A full ``noeviction`` Redis refuses the loss's marker: each read refuses, tries the
    marker again, and does not record the loss again."""
    audit = AuditLog(Database(sqlite_url))
    client = private.client()

    async def main():
        store = _store(private, audit)
        try:
            await store.record([KEY], ["pii"])
            client.flushall()
            client.config_set("maxmemory", "1")  # below what it uses: every write refused
            for _ in range(3):
                await _lost(store)
            client.config_set("maxmemory", "0")
            await _lost(store)
            assert client.get("bastion:state") is not None, "marked once there was room"
        finally:
            await store.close()

    anyio.run(main)
    assert len(audit.events(kind="labels.lost")) == 1


def test_calls_that_find_the_loss_at_once_record_it_once(private, sqlite_url):
    audit = AuditLog(Database(sqlite_url))

    async def main():
        store = _store(private, audit)
        try:
            await store.record([KEY], ["pii"])
            read = []
            async with anyio.create_task_group() as tg:  # twenty connections, ready
                for _ in range(20):
                    tg.start_soon(lambda: _collect(store, read))
            assert read == [["pii"]] * 20
            private.client().flushall()
            refused = []
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(lambda: _collect(store, refused))
            assert refused == [LabelsLost] * 20
        finally:
            await store.close()

    anyio.run(main)
    assert len(audit.events(kind="labels.lost")) == 1


async def _collect(store: RedisLabels, into: list) -> None:
    try:
        into.append(await store.labels(KEY))
    except (LabelsLost, LabelsUnavailable) as e:
        into.append(type(e))
