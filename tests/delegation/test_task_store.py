"""Tasks on a real SQLite file and a real PostgreSQL schema, without a server: opening writes the
facts with the task's expiry; binding refuses every grant that is not the task's user's and
agent's, or comes after the end; ending (once, or by expiry through the sweep) deletes the facts,
revokes the bound grants and their tokens, records one audit event and tells the subscribers
once, however often it is asked."""

from __future__ import annotations

import logging
import time

import anyio
import pytest

from bastion.audit import AuditLog
from bastion.db import Database
from bastion.delegation.tasks import (
    TaskClosed,
    TaskError,
    TaskForbidden,
    Tasks,
    TaskSettings,
    TaskUnprocessable,
    UnknownTask,
)
from bastion.facts.model import Entity
from bastion.facts.store import FactStore
from bastion.oauth.store import Grant, OAuthStore
from tests.relays import Relay
from tests.waits import PATIENCE, eventually_async

AGENT, USER = "coder-agent", "sam"
TASKS_LOG = "bastion.delegation.tasks"
READ_DOCS = {
    "predicate": "has_role",
    "args": [{"type": "Agent", "id": AGENT}, "reader", {"type": "Folder", "id": "docs"}],
}
FACT = ("has_role", Entity("Agent", AGENT), "reader", Entity("Folder", "docs"))


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def parts(database_url):
    db = Database(database_url)
    facts, grants, audit, clock = FactStore(db), OAuthStore(db), AuditLog(db), Clock()
    tasks = Tasks(facts, grants, audit, TaskSettings(max_seconds=3600), clock=clock)
    ended: list[str] = []
    tasks.on_end(ended.append)
    yield tasks, facts, grants, audit, clock, ended
    db.close()


def grant(grants: OAuthStore, grant_id: str, client_id: str = AGENT, user: str = USER) -> str:
    """A grant of ``user`` (one of the server's users, as every grant's user must be)."""
    now = time.time()
    if user not in {name for name, *_ in grants.users()}:
        grants.create_user(user, "not a password hash", now, actor="test")
    grants.create_grant(
        Grant(grant_id, client_id, user, "https://mcp", "read", now, now + 9e4, None)
    )
    if "a kid" not in {kid for kid, *_ in grants.signing_keys()}:  # a token needs its key
        grants.add_signing_key("a kid", "{}", now, actor="test")
    assert grants.save_access_token(f"jti-{grant_id}", grant_id, now + 600, "a token", "a kid")
    return grant_id


def revoked(grants: OAuthStore, grant_id: str) -> bool:
    state = grants.access_token_state(f"jti-{grant_id}")
    assert state is not None
    return state.revoked


def test_ending_deletes_the_facts_revokes_the_grants_and_is_recorded_once(parts):
    tasks, facts, grants, audit, clock, ended = parts
    task = tasks.open(USER, AGENT, "render the docs", clock.now + 600, [READ_DOCS], "test")
    [stored] = facts.get(FACT)
    assert stored.expires_at == task.expires_at  # the facts expire with the task
    tasks.bind(task.id, USER, AGENT, grant(grants, "g1"))
    tasks.bind(task.id, USER, AGENT, grant(grants, "g2"))
    other = grant(grants, "g-other")  # the same agent's grant, not bound: untouched
    assert not revoked(grants, "g1")

    with pytest.raises(TaskUnprocessable):  # an ended task never passes for an expired one
        tasks.end(task.id, "test", "expired")
    shown, first = tasks.end(task.id, "test", "done")
    again, second = tasks.end(task.id, "test", "done")

    assert (first, second) == (True, False)
    assert shown.status(clock.now) == again.status(clock.now) == "ended"
    assert facts.get(FACT, include_expired=True) == []
    assert revoked(grants, "g1") and revoked(grants, "g2") and not revoked(grants, other)
    assert ended == [task.id]
    [event] = audit.events("task.ended")
    assert event.detail["task_id"] == task.id
    assert (event.detail["facts_deleted"], event.detail["grants_revoked"]) == (1, 2)
    # Each grant's revocation is recorded, naming the task and who ended it.
    assert sorted(
        (e.detail["grant_id"], e.detail["reason"], e.detail["actor"])
        for e in audit.events("grant.revoked")
    ) == [("g1", f"task {task.id} ended", "test"), ("g2", f"task {task.id} ended", "test")]
    with pytest.raises(TaskClosed):
        tasks.bind(task.id, USER, AGENT, grant(grants, "g3"))
    assert not revoked(grants, "g3")  # refused before it was bound: not the task's to revoke


def test_an_expired_task_grants_nothing_before_the_sweep_and_is_cleaned_by_it(parts):
    tasks, facts, grants, audit, clock, ended = parts
    task = tasks.open(USER, AGENT, "a short job", clock.now + 60, [READ_DOCS], "test")
    tasks.bind(task.id, USER, AGENT, grant(grants, "g1"))
    clock.now += 61
    # At read time: the task is expired, its fact no longer counts, nothing binds.
    assert tasks.get(task.id).status(clock.now) == "expired"
    assert facts.get(FACT, include_expired=True)[0].expires_at < clock.now
    with pytest.raises(TaskClosed, match="expired"):
        tasks.bind(task.id, USER, AGENT, grant(grants, "g2"))

    assert tasks.sweep() == 1
    assert tasks.sweep() == 0
    swept = tasks.get(task.id)
    assert (swept.status(clock.now), swept.end_reason, swept.ended_at) == (
        "expired",
        "expired",
        task.expires_at,
    )
    assert facts.get(FACT, include_expired=True) == []
    assert revoked(grants, "g1")
    assert ended == [task.id]
    assert tasks.end(task.id, "test")[1] is False  # ending it now changes nothing
    assert len(audit.events("task.ended")) == 1


def test_the_sweeper_wakes_at_the_expiry_it_knows_of(database_url):
    """A replica's sweeper that looks for expired tasks once an hour (``sweep_seconds``) ends a
    task opened while it runs at the task's expiry: the opening wakes it, and it sleeps only
    until that expiry, not the hour (which would outlast PATIENCE many times over)."""
    db = Database(database_url)
    tasks = Tasks(
        FactStore(db), OAuthStore(db), AuditLog(db), TaskSettings(3600, sweep_seconds=3600)
    )
    ended: list[str] = []
    tasks.on_end(ended.append)

    async def run() -> str:
        async with anyio.create_task_group() as group:
            group.start_soon(tasks.sweep_forever)
            assert await eventually_async(lambda: tasks._wake is not None)  # it has started
            task = await anyio.to_thread.run_sync(
                lambda: tasks.open(USER, AGENT, "a short job", time.time() + 1, [READ_DOCS], "t")
            )
            assert await eventually_async(lambda: ended == [task.id])
            group.cancel_scope.cancel()
        return task.id

    try:
        task_id = anyio.run(run)
        swept = tasks.get(task_id)
        assert (swept.end_reason, swept.ended_by) == ("expired", "expiry")
    finally:
        db.close()


def test_binding_refuses_what_is_not_the_tasks(parts):
    tasks, facts, grants, audit, clock, ended = parts
    task = tasks.open(USER, AGENT, "render the docs", clock.now + 600, [READ_DOCS], "test")
    with pytest.raises(UnknownTask):
        tasks.bind("task_" + "x" * 24, USER, AGENT, grant(grants, "g1"))
    with pytest.raises(TaskError, match="not on behalf of user"):
        tasks.bind(task.id, "avery", AGENT, grant(grants, "g2", user="avery"))
    with pytest.raises(TaskError, match="neither"):
        tasks.bind(task.id, USER, "intruder", grant(grants, "g3", client_id="intruder"))
    # A grant that is not what the caller says it is: another agent's, or revoked.
    with pytest.raises(TaskError, match="is not"):
        tasks.bind(task.id, USER, AGENT, grant(grants, "g4", client_id="intruder"))
    grants.revoke_grant(grant(grants, "g5"), time.time(), "test", actor="test")
    with pytest.raises(TaskError, match="revoked"):
        tasks.bind(task.id, USER, AGENT, "g5")
    # A sub-agent whose chain passes through the task's agent binds.
    tasks.bind(task.id, USER, "svg-sub", grant(grants, "g6", "svg-sub"), chain=[AGENT, "svg-sub"])
    assert tasks.get(task.id).grants == ("g6",)
    tasks.end(task.id, "test")
    assert revoked(grants, "g6") and not revoked(grants, "g1")


def test_opening_refuses_facts_for_anyone_else_and_expiries_past_the_cap(parts):
    tasks, facts, grants, audit, clock, ended = parts
    before = facts.head()

    def refused(kind, facts_, expires_in=600.0, match=None):
        with pytest.raises(kind, match=match):
            tasks.open(USER, AGENT, "a job", clock.now + expires_in, facts_, "test")

    someone_else = {**READ_DOCS, "args": [{"type": "User", "id": "sam"}, *READ_DOCS["args"][1:]]}
    other_agent = {**READ_DOCS, "args": [{"type": "Agent", "id": "x"}, *READ_DOCS["args"][1:]]}
    agent_later = {
        "predicate": "has_relation",
        "args": [{"type": "Folder", "id": "docs"}, "viewer", {"type": "Agent", "id": AGENT}],
    }
    kill_switch = {"predicate": "suspended", "args": [{"type": "Agent", "id": AGENT}]}
    refused(TaskForbidden, [someone_else], match="first argument")
    refused(TaskForbidden, [READ_DOCS, other_agent], match="first argument")
    refused(TaskForbidden, [agent_later], match="grants only")
    refused(TaskForbidden, [kill_switch], match="grants only")
    refused(TaskUnprocessable, [READ_DOCS], expires_in=3600 + 60, match="at most 3600")
    refused(TaskUnprocessable, [READ_DOCS], expires_in=-1, match="future")
    refused(TaskError, [], match="non-empty")
    # A fact too large to store (its key past MAX_FACT_KEY: PostgreSQL indexes no more).
    too_large = {
        **READ_DOCS,
        "args": [*READ_DOCS["args"][:2], {"type": "Folder", "id": "d" * 2600}],
    }
    refused(TaskUnprocessable, [READ_DOCS, too_large], match=r"facts\[1\]: .*too large to store")
    refused(TaskError, [{**READ_DOCS, "expires_at": clock.now + 9e5}], match="expire with")
    with pytest.raises(TaskError, match="purpose"):
        tasks.open(USER, AGENT, "line\nbreak", clock.now + 60, [READ_DOCS], "test")
    # A grant the agent holds already would be deleted when the task ends: refused.
    facts.apply([FACT])
    refused(TaskUnprocessable, [READ_DOCS], match="already")
    assert facts.head() == before + 1 and tasks.list() == []


def test_settings_have_defaults_and_refuse_what_cannot_work():
    assert TaskSettings.from_mapping({}) == TaskSettings()
    assert TaskSettings().max_seconds == 24 * 3600
    assert TaskSettings.from_mapping({"max_seconds": 60, "predicates": ["grant"]}).predicates == (
        "grant",
    )
    for bad in (
        {"max_seconds": 0},
        {"sweep_seconds": "soon"},
        {"max_facts": 0},
        {"predicates": []},
        {"predicates": ["suspended"]},
        {"unknown": 1},
    ):
        with pytest.raises(TaskError):
            TaskSettings.from_mapping(bad)


def test_the_tasks_table_of_bastion_toml_is_read_and_checked_at_start(tmp_path):
    from bastion.server.config import ConfigError, ServerConfig

    toml = tmp_path / "bastion.toml"
    toml.write_text('[tasks]\nmax_seconds = 600\npredicates = ["has_role"]\n')
    settings = ServerConfig.load(toml).task_settings()
    assert (settings.max_seconds, settings.predicates) == (600, ("has_role",))
    toml.write_text("[tasks]\nmax_seconds = -1\n")
    with pytest.raises(ConfigError, match="max_seconds"):
        ServerConfig.load(toml)


def test_two_tasks_opened_at_once_never_both_take_the_same_fact(database_url):
    import threading

    opened, refused = [], []
    barrier = threading.Barrier(8)
    parts = []
    for _ in range(8):
        db = Database(database_url)
        parts.append((db, Tasks(FactStore(db), OAuthStore(db), AuditLog(db))))

    def open_one(tasks: Tasks) -> None:
        barrier.wait()
        try:
            opened.append(tasks.open(USER, AGENT, "a job", time.time() + 60, [READ_DOCS], "t"))
        except TaskUnprocessable:
            refused.append(1)

    threads = [threading.Thread(target=open_one, args=(t,)) for _, t in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for db, _ in parts:
        db.close()
    assert (len(opened), len(refused)) == (1, 7)


def test_an_ending_that_races_a_binding_waits_for_it_and_revokes_its_grant(database_url):
    import threading

    binding_db, ending_db = Database(database_url), Database(database_url)
    binding = Tasks(FactStore(binding_db), OAuthStore(binding_db), AuditLog(binding_db))
    ending = Tasks(FactStore(ending_db), OAuthStore(ending_db), AuditLog(ending_db))
    task = binding.open(USER, AGENT, "a job", time.time() + 60, [READ_DOCS], "test")
    grant(binding.grants, "g1")
    ended = threading.Event()

    def end() -> None:
        ending.end(task.id, "test")
        ended.set()

    racer = threading.Thread(target=end)
    try:
        # As the token endpoint does: the binding, then the token, in one transaction.
        with binding_db.transaction():
            binding.bind(task.id, USER, AGENT, "g1")
            racer.start()
            assert not ended.wait(0.5)  # the ending waits for the binding to commit
        racer.join(PATIENCE)
        assert ended.is_set()
        assert revoked(ending.grants, "g1")
    finally:
        racer.join(PATIENCE)
        binding_db.close()
        ending_db.close()


def test_a_database_outage_is_logged_once_by_the_sweeper_not_at_every_round(postgres_url, caplog):
    """A replica's sweeper goes on while the database is away, and says so once (a traceback
    every ``sweep_seconds``, 5 s, before), then once that it sweeps again; the task that expired
    meanwhile is ended once the database is back. The outage is the test's own: it reaches
    PostgreSQL through a relay it cuts."""
    caplog.set_level(logging.DEBUG, logger=TASKS_LOG)
    with Relay(("127.0.0.1", 5432)) as relay:
        db = Database(postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}"))
        clock = Clock()
        settings = TaskSettings(3600, sweep_seconds=0.01)
        tasks = Tasks(FactStore(db), OAuthStore(db), AuditLog(db), settings, clock=clock)
        ended: list[str] = []
        tasks.on_end(ended.append)

        def said(level: int = logging.DEBUG) -> list[str]:
            return [
                r.getMessage() for r in caplog.records if r.name == TASKS_LOG and r.levelno >= level
            ]

        async def run() -> str:
            task = await anyio.to_thread.run_sync(
                lambda: tasks.open(USER, AGENT, "a short job", clock.now + 600, [READ_DOCS], "t")
            )
            async with anyio.create_task_group() as group:
                group.start_soon(tasks.sweep_forever)
                relay.cut()
                clock.now += 601  # it expires while the database is away
                assert await eventually_async(lambda: len(said()) >= 6)  # rounds that failed
                assert len(said(logging.WARNING)) == 1, said(logging.WARNING)
                relay.restore()
                assert await eventually_async(lambda: ended == [task.id])
                assert await eventually_async(
                    lambda: said(logging.WARNING)[-1].endswith("swept again")
                )
                group.cancel_scope.cancel()
            return task.id

        try:
            anyio.run(run)
        finally:
            db.close()
    loud = said(logging.WARNING)
    assert len(loud) == 2 and "failed" in loud[0] and loud[1].endswith("swept again"), loud
