"""A running `bastion serve` keeps the fact store bounded by itself: it deletes the rows of facts
expired past `fact_expired_grace_seconds`, and prunes the change log with the audit trail
(`audit_retention_days`); a replica that was behind the pruned log notices and reloads. Real
server processes on a real SQLite file and a real PostgreSQL."""

from __future__ import annotations

import signal
import time

import httpx

from bastion.facts.model import Entity
from bastion.facts.store import FactStore, StoredFact
from tests.waits import eventually

from .conftest import entity

HOUR = 3600.0
DAY = 86_400.0


def reader(user: str, repo: str) -> tuple:
    return ("has_role", Entity("User", user), "reader", Entity("Repo", repo))


def answer(
    client: httpx.Client, user: str, repo: str, at_least: int | None = None
) -> httpx.Response:
    body: dict = {
        "actor": entity("User", user),
        "action": "read",
        "resource": entity("Repo", repo),
    }
    if at_least is not None:
        body["at_least"] = at_least
    return client.post("/v1/authorize", json=body)


def allowed(client: httpx.Client, user: str, repo: str, at_least: int | None = None) -> bool:
    r = answer(client, user, repo, at_least)
    assert r.status_code == 200, r.text
    return r.json()["allowed"]


def test_a_running_server_deletes_the_rows_of_facts_expired_past_the_grace(database_url, serve):
    store = FactStore.open(database_url)
    try:
        now = time.time()
        store.apply(
            [
                StoredFact(reader("alice", "anvil"), now - 2 * HOUR),
                StoredFact(reader("alice", "forge"), now - 60),  # within the hour's grace
                StoredFact(reader("alice", "kiln")),
            ]
        )
        server = serve(database_url)
        with server.client() as client:
            assert not allowed(client, "alice", "anvil")
            assert not allowed(client, "alice", "forge")
            assert allowed(client, "alice", "kiln")

        def stored() -> set[tuple]:
            return {f.fact for f in store.get(include_expired=True)}

        assert eventually(lambda: reader("alice", "anvil") not in stored())
        assert stored() == {reader("alice", "forge"), reader("alice", "kiln")}
        # Logged once the purge's transactions are committed: a moment after they are seen.
        said = "deleted 1 facts that expired more than 3600 seconds ago"
        assert eventually(lambda: said in server.log.read_text()), server.log.read_text()
    finally:
        store.close()


def test_a_replica_behind_the_change_log_another_server_pruned_reloads(database_url, serve):
    a = serve(database_url)
    with a.client() as ca:
        anvil = [entity("User", "alice"), "reader", entity("Repo", "anvil")]
        written = ca.post("/v1/facts", json={"facts": [{"predicate": "has_role", "args": anvil}]})
        seq = written.json()["sequence"]
        assert allowed(ca, "alice", "anvil", at_least=seq)
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)  # behind from here on: it reads nothing
    try:
        store = FactStore.open(database_url)
        try:
            store.apply([reader("alice", "forge")])
            store.apply(deletes=[reader("alice", "anvil")])
            # Everything up to here was written long ago, as far as the log says.
            store.db.execute("UPDATE changes SET at = at - ?", (100 * DAY,))
            head = store.apply([reader("alice", "kiln")]).seq
            # Another server's audit retention (90 days by default) prunes the log at start.
            b = serve(database_url)

            def first() -> int:
                return store.db.execute("SELECT MIN(seq) FROM changes")[0][0]

            assert eventually(lambda: first() == head)
            # Logged once the prune's transactions are committed: a moment after they are seen.
            said = "audit retention (90 days): deleted"
            assert eventually(lambda: said in b.log.read_text()), b.log.read_text()
        finally:
            store.close()
    finally:
        a.proc.send_signal(signal.SIGCONT)
    with a.client() as ca:
        # Stale while it was stopped (503) until it has caught up; then current.
        assert eventually(lambda: answer(ca, "alice", "kiln", at_least=head).status_code == 200)
        assert allowed(ca, "alice", "kiln", at_least=head)
        assert not allowed(ca, "alice", "anvil")
        assert allowed(ca, "alice", "forge")
    assert f"change log pruned past sequence {seq} (next is {head})" in a.log.read_text()
