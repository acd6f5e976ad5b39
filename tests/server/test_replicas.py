"""Several real `bastion serve` processes on one database agree, and survive being killed."""

from __future__ import annotations

import json
import threading
import time

import httpx
import psycopg
import pytest

from .conftest import entity, role

READ_ANVIL = {
    "actor": entity("User", "alice"),
    "action": "read",
    "resource": entity("Repo", "anvil"),
}


def decide(server_client: httpx.Client, body: dict = READ_ANVIL) -> bool:
    r = server_client.post("/v1/authorize", json=body)
    assert r.status_code == 200, r.text
    return r.json()["allowed"]


def eventually(predicate, within: float = 1.0) -> bool:
    """Poll ``predicate`` until it holds or the deadline passes (a deadline, not a timing)."""
    deadline = time.monotonic() + within
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def test_a_role_deleted_through_one_replica_is_enforced_by_the_other_within_a_second(
    postgres_url, serve
):
    a, b = serve(postgres_url), serve(postgres_url)
    with a.client() as ca, b.client() as cb:
        seq = ca.post("/v1/facts", json={"facts": [role("alice", "reader", "Repo", "anvil")]})
        seq = seq.json()["sequence"]
        assert decide(cb, {**READ_ANVIL, "at_least": seq})
        r = ca.post(
            "/v1/facts/delete",
            json={
                "patterns": [
                    {"predicate": "has_role", "args": [entity("User", "alice"), None, None]}
                ]
            },
        )
        assert r.json()["deleted"] == 1
        assert eventually(lambda: not decide(cb), within=1.0)

        # An API key revoked through one replica is refused by the other too.
        created = ca.post("/v1/keys", json={"name": "app", "scopes": ["decide"]}).json()
        app_key = {"authorization": f"Bearer {created['key']}"}
        assert cb.post("/v1/authorize", json=READ_ANVIL, headers=app_key).status_code == 200
        ca.delete(f"/v1/keys/{created['id']}").raise_for_status()

        def refused() -> bool:
            return cb.post("/v1/authorize", json=READ_ANVIL, headers=app_key).status_code == 401

        assert eventually(refused, within=2.0)  # each process remembers a key for one second


def test_a_consistency_token_from_one_replica_is_honoured_by_the_other(postgres_url, serve):
    a, b = serve(postgres_url), serve(postgres_url)
    with a.client() as ca, b.client() as cb:
        for i in range(20):
            r = ca.post("/v1/facts", json={"facts": [role("alice", "reader", "Repo", f"r{i}")]})
            body = {
                **READ_ANVIL,
                "resource": entity("Repo", f"r{i}"),
                "at_least": r.json()["sequence"],
            }
            assert decide(cb, body)


def test_sqlite_replicas_follow_each_other(sqlite_url, serve):
    a, b = serve(sqlite_url), serve(sqlite_url)
    with a.client() as ca, b.client() as cb:
        ca.post("/v1/facts", json={"facts": [role("alice", "reader", "Repo", "anvil")]})
        assert eventually(lambda: decide(cb), within=1.0)
        cb.post(
            "/v1/facts/delete", json={"patterns": [{"predicate": "has_role", "args": [None] * 3}]}
        )
        assert eventually(lambda: not decide(ca), within=1.0)


def _writers_lock_held(postgres_url: str) -> bool:
    """Is some transaction holding the change-log writers' lock (a write in progress)?"""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND objid::bigint = (hashtext('bastion:changes')::bigint & 4294967295)"
        ).fetchall()
    return bool(rows)


def test_a_replica_killed_during_a_large_import_leaves_all_or_nothing_and_catches_up(
    postgres_url, serve, tmp_path
):
    a, b = serve(postgres_url), serve(postgres_url)
    n = 60_000
    lines = "\n".join(
        json.dumps(role(f"u{i}", "reader", "Repo", f"bulk{i % 100}")) for i in range(n)
    ).encode()

    def import_all():
        try:
            with a.client() as ca:
                ca.post("/v1/facts/import", content=lines)
        except httpx.HTTPError:
            pass  # the server is killed under it

    importer = threading.Thread(target=import_all)
    importer.start()
    assert eventually(lambda: _writers_lock_held(postgres_url), within=30.0), "import never began"
    a.kill()
    importer.join()

    def bulk_count() -> int:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            return conn.execute(
                "SELECT COUNT(*) FROM facts WHERE predicate = 'has_role' AND a3 LIKE '%bulk%'"
            ).fetchone()[0]

    assert eventually(lambda: bulk_count() in (0, n), within=5.0)
    partial = bulk_count()
    assert partial in (0, n)

    with b.client() as cb:
        seq = cb.post("/v1/facts", json={"facts": [role("alice", "reader", "Repo", "anvil")]})
        seq = seq.json()["sequence"]
        b_state = cb.get("/readyz").json()

    a.start()
    with a.client() as ca:
        ready = ca.get("/readyz").json()
        assert ready["sequence"] >= seq
        assert ready["facts"] == b_state["facts"]
        assert decide(ca)
        bulk_body = {
            **READ_ANVIL,
            "actor": entity("User", "u7"),
            "resource": entity("Repo", "bulk7"),
        }
        assert decide(ca, bulk_body) == (partial == n)


def test_a_replica_catches_up_with_writes_made_while_it_was_down(postgres_url, serve):
    a, b = serve(postgres_url), serve(postgres_url)
    a.stop()
    with b.client() as cb:
        for i in range(5):
            cb.post("/v1/facts", json={"facts": [role("alice", "reader", "Repo", f"r{i}")]})
        cb.post("/v1/facts/delete", json={"patterns": [role("alice", "reader", "Repo", "r0")]})
    a.start()
    with a.client() as ca:
        assert not decide(ca, {**READ_ANVIL, "resource": entity("Repo", "r0")})
        assert decide(ca, {**READ_ANVIL, "resource": entity("Repo", "r4")})


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_policy_pushed_through_one_replica_reaches_the_other(kind, request, serve):
    url = request.getfixturevalue("sqlite_url" if kind == "sqlite" else "postgres_url")
    a, b = serve(url), serve(url)
    with a.client() as ca, b.client() as cb:
        ca.post("/v1/facts", json={"facts": [role("alice", "reader", "Repo", "anvil")]})
        assert eventually(lambda: decide(cb))
        text = ca.get("/v1/policy").json()["text"].replace('"read" if "reader";', "")
        seq = ca.put("/v1/policy", json={"text": text}).json()["sequence"]
        assert not decide(cb, {**READ_ANVIL, "at_least": seq})
        assert cb.get("/readyz").json()["policy_version"] == 2
