"""A ``/api/batch`` is one write: a typed-wildcard delete (``ValueOfType``, matched by type,
which the fact store cannot do by value) deletes every matching fact committed before the
batch, also one another replica commits while the batch is being worked out. On a real SQLite
file and a real PostgreSQL, with the app in this process so that the point where the wildcard is
expanded (`bastion.server.api.oso_cloud._matching`) can be given a write of another connection
right after it."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from starlette.testclient import TestClient

from bastion.db import Database
from bastion.facts.model import Entity
from bastion.facts.store import FactStore
from bastion.server.api import oso_cloud
from bastion.server.app import create_app
from bastion.server.config import ServerConfig
from tests.oso_cloud.conftest import POLICY
from tests.server.conftest import ADMIN_KEY
from tests.waits import PATIENCE, eventually

ANVIL = Entity("Repo", "anvil")


def reader(user: str) -> tuple:
    return ("has_role", Entity("User", user), "reader", ANVIL)


# Every `User` reader of anvil: the user's id left open, its type given.
EVERY_READER = {
    "predicate": "has_role",
    "args": [
        {"type": "User", "id": None},
        {"type": "String", "id": "reader"},
        {"type": "Repo", "id": "anvil"},
    ],
}


@pytest.fixture
def app(database_url, tmp_path) -> Iterator[TestClient]:
    policy = tmp_path / "policy.polar"
    policy.write_text(POLICY)
    config = ServerConfig(database=database_url, admin_key=ADMIN_KEY, policy_file=str(policy))
    with TestClient(create_app(config)) as client:
        client.headers["authorization"] = f"Bearer {ADMIN_KEY}"
        yield client


@contextmanager
def written_elsewhere_right_after_the_wildcard_is_expanded(monkeypatch, app, fact: tuple):
    """Right after the batch first expands a typed wildcard, another replica (a thread with its
    own connection) writes ``fact``; the batch goes on once that write has committed, or waits
    for the batch's own write to end (PostgreSQL: it waits on a lock; SQLite: the batch's
    connection holds the write transaction, which lets no other writer in). Yields the
    sequences the other write was given (one, once it ran)."""
    server = app.app.state.store.db
    role = f"other-replica-{uuid.uuid4().hex[:8]}"
    real = oso_cloud._matching
    threads: list[threading.Thread] = []
    sequences: list[int] = []
    failures: list[BaseException] = []

    def other_replica() -> None:
        store = FactStore(Database(server.url, role=role))
        try:
            sequences.append(store.apply([fact], actor="other-replica").seq)
        except BaseException as e:  # noqa: BLE001 (reported by the test's thread)
            failures.append(e)
        finally:
            store.close()

    def waits_for_the_batch() -> bool:
        if not server.is_postgres:
            return server._conn is not None and server._conn.in_transaction
        with psycopg.connect(server.url, autocommit=True) as conn:
            return bool(
                conn.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = %s"
                    " AND wait_event_type = 'Lock'",
                    (role,),
                ).fetchall()
            )

    def wrapped(*args, **kwargs):
        found = real(*args, **kwargs)
        if not threads:
            thread = threading.Thread(target=other_replica)
            threads.append(thread)
            thread.start()
            assert eventually(lambda: not thread.is_alive() or waits_for_the_batch())
        return found

    monkeypatch.setattr(oso_cloud, "_matching", wrapped)
    yield sequences
    monkeypatch.setattr(oso_cloud, "_matching", real)
    for thread in threads:
        thread.join(PATIENCE)
        assert not thread.is_alive(), "the other replica's write never committed"
    if failures:
        raise failures[0]


def test_a_typed_wildcard_delete_takes_a_fact_committed_before_the_batch_commits(app, monkeypatch):
    store: FactStore = app.app.state.store
    store.apply([reader("alice")], actor="test")
    with written_elsewhere_right_after_the_wildcard_is_expanded(
        monkeypatch, app, reader("bob")
    ) as elsewhere:
        answer = app.post("/api/batch", json=[{"deletes": [EVERY_READER]}])
    assert answer.status_code == 200, answer.text
    batch = int(answer.headers[oso_cloud.OFFSET_HEADER])
    assert len(elsewhere) == 1, "the other replica never wrote"
    stored = {f.fact for f in store.get(("has_role", None, "reader", ANVIL))}
    assert reader("alice") not in stored
    # The outcome of the two writes one after the other, in the order they committed: bob's
    # reader role stays only if it was written after the delete.
    if elsewhere[0] < batch:
        assert reader("bob") not in stored, (
            f"bob's role, committed at {elsewhere[0]}, survived the delete committed at {batch}"
        )
    else:
        assert reader("bob") in stored


def test_a_typed_wildcard_past_the_limit_is_refused_and_the_batch_changes_nothing(
    database_url, tmp_path
):
    """Expanded in the batch's write, a typed wildcard matching more facts than
    ``oso_api_max_results`` is still a 422 that says so, and the write is rolled back whole:
    nothing deleted, the batch's inserts not written, no change logged."""
    policy = tmp_path / "policy.polar"
    policy.write_text(POLICY)
    config = ServerConfig(
        database=database_url,
        admin_key=ADMIN_KEY,
        policy_file=str(policy),
        oso_api_max_results=2,
    )
    with TestClient(create_app(config)) as app:
        app.headers["authorization"] = f"Bearer {ADMIN_KEY}"
        store: FactStore = app.app.state.store
        before = store.apply([reader(u) for u in ("ada", "bob", "cy")], actor="test").seq
        dan = {
            "predicate": "has_role",
            "args": [
                {"type": "User", "id": "dan"},
                {"type": "String", "id": "reader"},
                {"type": "Repo", "id": "anvil"},
            ],
        }
        answer = app.post("/api/batch", json=[{"deletes": [EVERY_READER]}, {"inserts": [dan]}])
        assert answer.status_code == 422, answer.text
        assert "oso_api_max_results" in answer.json()["message"], answer.text
        stored = {f.fact for f in store.get(("has_role", None, "reader", ANVIL))}
        assert stored == {reader(u) for u in ("ada", "bob", "cy")}
        assert store.apply([reader("eve")], actor="test").seq == before + 1
