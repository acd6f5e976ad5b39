"""Several real `bastion serve` processes on one database agree, and survive being killed."""

from __future__ import annotations

import json
import threading
import time

import httpx
import psycopg
import pytest

from tests.waits import PATIENCE, eventually, past

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
        assert eventually(lambda: not decide(cb))

        # An API key revoked through one replica is refused by the other too.
        created = ca.post("/v1/keys", json={"name": "app", "scopes": ["decide"]}).json()
        app_key = {"authorization": f"Bearer {created['key']}"}
        assert cb.post("/v1/authorize", json=READ_ANVIL, headers=app_key).status_code == 200
        # B verified the key for that decision, and remembers it for a second at most (the key
        # cache's): a decision asked after that is checked against the database. Measured from
        # when B could last have verified it, not from a later moment a busy machine reaches.
        forgotten = time.monotonic() + 1.0
        ca.delete(f"/v1/keys/{created['id']}").raise_for_status()
        past(forgotten, time.monotonic)
        r = cb.post("/v1/authorize", json=READ_ANVIL, headers=app_key)
        assert r.status_code == 401 and "revoked" in r.text, r.text


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
        assert eventually(lambda: decide(cb))
        cb.post(
            "/v1/facts/delete", json={"patterns": [{"predicate": "has_role", "args": [None] * 3}]}
        )
        assert eventually(lambda: not decide(ca))


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
    assert eventually(lambda: _writers_lock_held(postgres_url)), "import never began"
    a.kill()
    importer.join()

    def bulk_count() -> int:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            return conn.execute(
                "SELECT COUNT(*) FROM facts WHERE predicate = 'has_role' AND a3 LIKE '%bulk%'"
            ).fetchone()[0]

    assert eventually(lambda: bulk_count() in (0, n))
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


def test_a_replica_that_cannot_load_the_policy_in_force_stops_deciding_until_one_loads(
    sqlite_url, serve
):
    # b allows smaller policies than a (a different setting, or an older engine): a policy a
    # accepts and stores may not load on b.
    a, b = serve(sqlite_url), serve(sqlite_url, BASTION_POLICY_MAX_BYTES="4096")
    with a.client() as ca, b.client() as cb:
        ca.post("/v1/facts", json={"facts": [role("alice", "reader", "Repo", "anvil")]})
        assert eventually(lambda: decide(cb))
        old = ca.get("/v1/policy").json()["text"]
        # The new policy takes alice's read away; it is larger than b may load.
        revoked = old.replace('"read" if "reader";', "") + "\n# " + "x" * 8192 + "\n"
        seq = ca.put("/v1/policy", json={"text": revoked}).json()["sequence"]
        assert not decide(ca, {**READ_ANVIL, "at_least": seq})
        # b must not go on deciding under the policy that is no longer in force.
        r = cb.post("/v1/authorize", json={**READ_ANVIL, "at_least": seq})
        assert r.status_code == 503, r.text
        assert r.json()["title"] == "Policy not loaded"
        assert "policy_max_bytes" in r.json()["detail"]
        ready = cb.get("/readyz")
        assert ready.status_code == 503 and "policy" in ready.json()["reason"]
        # A policy b can load puts it back to work.
        ca.put("/v1/policy", json={"text": old.replace('"read" if "reader";', "")})
        assert eventually(lambda: cb.get("/readyz").status_code == 200)
        assert not decide(cb)


# -- the database goes away ---------------------------------------------------------------------

# The staleness bound the servers below run with (max_staleness_seconds).
BOUND = 2.0
DELETE_ALICE = {
    "patterns": [{"predicate": "has_role", "args": [entity("User", "alice"), None, None]}]
}


class Traffic:
    """Requests sent over and over from threads of their own while a test does something else;
    each answer is kept with the moment its request was sent."""

    def __init__(self) -> None:
        self.answers: dict[str, list[tuple[float, int, dict]]] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def run(self, name: str, send) -> None:
        answers = self.answers.setdefault(name, [])

        def loop() -> None:
            i = 0
            while not self._stop.is_set():
                sent = time.monotonic()
                r = send(i)
                body = r.json() if r.headers.get("content-type", "").endswith("json") else {}
                answers.append((sent, r.status_code, body))
                i += 1
                time.sleep(0.01)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(PATIENCE)

    def statuses(self, name: str) -> set[int]:
        return {status for _, status, _ in self.answers[name]}


def test_replicas_recover_when_every_database_connection_of_theirs_is_terminated_mid_traffic(
    outage, serve
):
    url = outage.url()
    a = serve(url, BASTION_MAX_STALENESS_SECONDS=str(BOUND))
    b = serve(url, BASTION_MAX_STALENESS_SECONDS=str(BOUND))
    # Every connection each process holds is named after the URL's application_name.
    roles = ["bastion", "bastion-listen", "bastion-replica"]
    assert sorted(name for _, name, _ in outage.backends()) == sorted(
        f"{outage.tag}/{role}" for role in roles * 2
    )
    traffic = Traffic()
    with a.client() as ca, b.client() as cb, b.client() as cb_ready, a.client() as ca_ready:
        seq = ca.post("/v1/facts", json={"facts": [role("alice", "reader", "Repo", "anvil")]})
        assert decide(cb, {**READ_ANVIL, "at_least": seq.json()["sequence"]})
        writer = a.client()
        traffic.run(
            "writes",
            lambda i: writer.post(
                "/v1/facts", json={"facts": [role(f"u{i}", "reader", "Repo", f"w{i}")]}
            ),
        )
        decider = b.client()
        traffic.run("decisions", lambda i: decider.post("/v1/authorize", json=READ_ANVIL))
        traffic.run("ready b", lambda i: cb_ready.get("/readyz"))
        traffic.run("ready a", lambda i: ca_ready.get("/readyz"))
        assert eventually(lambda: 200 in traffic.statuses("writes"))

        terminated = outage.terminate()
        assert terminated == sorted(f"{outage.tag}/{role}" for role in roles * 2)

        # Writes recover: the grant is deleted through A...
        deleted: list[int] = []

        def delete_alice() -> bool:
            r = ca.post("/v1/facts/delete", json=DELETE_ALICE)
            assert r.status_code in (200, 503), r.text
            if r.status_code == 200:
                deleted.append(r.json()["sequence"])
            return bool(deleted)

        assert eventually(delete_alice)
        deleted_at = time.monotonic()

        # ...and B refuses it within the staleness bound: a decision asked once the bound has
        # passed since the deletion committed is made on facts that have it, or refused as
        # stale (503), however slowly B's answers came meanwhile.
        past(deleted_at + BOUND, time.monotonic)
        r = cb.post("/v1/authorize", json=READ_ANVIL)
        assert r.status_code == 503 or not r.json()["allowed"], r.text

        # Traffic goes on after the recovery: a write and a decision sent since are answered
        # (not 0.5 s more of it, in which a busy machine may have sent none).
        def answered_since(name: str) -> bool:
            return any(s == 200 and sent > deleted_at for sent, s, _ in traffic.answers[name])

        assert eventually(lambda: answered_since("writes") and answered_since("decisions"))
        traffic.stop()
        writer.close()
        decider.close()

        # The follower caught up: B has applied every write A made.
        writes = [body["sequence"] for _, s, body in traffic.answers["writes"] if s == 200]
        last_write = max(*writes, *deleted)

        # Ready again too: its notification connection is back (it reconnects on its own time,
        # which a busy machine makes longer; 503 `not_listening` until then).
        def caught_up() -> bool:
            ready = cb.get("/readyz")
            return ready.status_code == 200 and ready.json()["sequence"] >= last_write

        assert eventually(caught_up), cb.get("/readyz").text
        assert cb.get("/readyz").json()["facts"] == ca.get("/readyz").json()["facts"]

    # Nothing failed with a 500: a request that needed the lost connection got 503, and
    # writes went on after it.
    assert traffic.statuses("writes") <= {200, 503}
    assert any(s == 200 and t > deleted_at for t, s, _ in traffic.answers["writes"])
    assert traffic.statuses("decisions") <= {200, 503}
    # No decision on facts older than the bound: asked more than BOUND after the delete had
    # committed, B never allowed it.
    for sent, status, body in traffic.answers["decisions"]:
        if status == 200 and body["allowed"]:
            assert sent < deleted_at + BOUND, body
    # /readyz told the truth: it noticed the lost connections, said why, and came back.
    for name in ("ready a", "ready b"):
        answers = traffic.answers[name]
        assert {s for _, s, _ in answers} == {200, 503}, name
        for _, status, body in answers:
            assert body["ready"] == (status == 200)
            assert (status == 503) == ("reason" in body)


def test_a_replica_cut_off_from_the_database_stops_deciding_within_the_bound_then_recovers(
    outage, serve
):
    role_a, role_b = outage.role(), outage.role()
    a = serve(outage.url(role_a), BASTION_MAX_STALENESS_SECONDS=str(BOUND))
    b = serve(outage.url(role_b), BASTION_MAX_STALENESS_SECONDS=str(BOUND))
    with a.client() as ca, b.client() as cb:
        seq = ca.post("/v1/facts", json={"facts": [role("alice", "reader", "Repo", "anvil")]})
        assert decide(cb, {**READ_ANVIL, "at_least": seq.json()["sequence"]})
        created = ca.post("/v1/keys", json={"name": "app", "scopes": ["decide"]}).json()
        app_key = {"authorization": f"Bearer {created['key']}"}
        assert cb.post("/v1/authorize", json=READ_ANVIL, headers=app_key).status_code == 200

        outage.block(role_b)  # B loses the database; A keeps it
        deleted = ca.post("/v1/facts/delete", json=DELETE_ALICE)
        assert deleted.status_code == 200, deleted.text
        deleted_at = time.monotonic()
        delete_seq = deleted.json()["sequence"]

        # B goes on deciding until its facts are older than the bound, never after: no decision
        # asked past the bound allowed (what is asserted; how soon a busy machine's B answers
        # the 503 is not).
        answers = []

        def refused_as_stale() -> bool:
            sent = time.monotonic()
            r = cb.post("/v1/authorize", json=READ_ANVIL)
            answers.append((sent, r))
            return r.status_code == 503

        assert eventually(refused_as_stale)
        for sent, r in answers[:-1]:
            assert r.status_code == 200, r.text
            assert not r.json()["allowed"] or sent < deleted_at + BOUND
        stale = answers[-1][1]
        assert stale.headers["content-type"] == "application/problem+json"
        assert stale.json()["title"] == "Facts are stale"

        # While the database stays away, every answer says so, with 503.
        for _ in range(3):
            for path in ("/v1/authorize", "/v1/list"):
                body = {**READ_ANVIL, "resource_type": "Repo"}
                r = cb.post(path, json=body)
                assert r.status_code == 503, r.text
            r = cb.post("/v1/authorize", json={**READ_ANVIL, "at_least": delete_seq})
            assert r.status_code == 503
            assert r.headers["content-type"] == "application/problem+json"
            ready = cb.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["reason"].startswith("facts_stale")
            write = cb.post("/v1/facts", json={"facts": [role("bo", "reader", "Repo", "x")]})
            assert write.status_code == 503
            assert write.headers["content-type"] == "application/problem+json"
            assert write.json()["title"] == "Database unavailable"
            # A stored key that needs the database to be checked: 503, not a 401.
            keyed = cb.get("/v1/decisions/none", headers=app_key)
            assert keyed.status_code == 503, keyed.text
            time.sleep(0.5)
        # A, which still has the database, decides on current facts.
        assert not decide(ca)

        outage.unblock(role_b)
        assert eventually(lambda: cb.get("/readyz").status_code == 200)
        r = cb.post("/v1/authorize", json=READ_ANVIL)
        assert r.status_code == 200 and not r.json()["allowed"]
        assert r.json()["sequence"] >= delete_seq
        assert cb.post("/v1/authorize", json=READ_ANVIL, headers=app_key).status_code == 200
        write = cb.post("/v1/facts", json={"facts": [role("bo", "reader", "Repo", "x")]})
        assert write.status_code == 200


def test_a_replica_restarted_from_its_fact_snapshot_replays_what_was_written_while_it_was_down(
    sqlite_url, serve, tmp_path
):
    snapshot = str(tmp_path / "facts.snapshot")
    a = serve(sqlite_url, BASTION_FACT_SNAPSHOT_PATH=snapshot)
    with a.client() as ca:
        ca.post("/v1/facts", json={"facts": [role("alice", "reader", "Repo", "anvil")]})
        assert decide(ca)
    a.stop()  # writes the snapshot as it stops
    b = serve(sqlite_url)  # a write while the first replica is down
    with b.client() as cb:
        cb.post(
            "/v1/facts/delete",
            json={
                "patterns": [
                    {"predicate": "has_role", "args": [entity("User", "alice"), None, None]}
                ]
            },
        )
        cb.post("/v1/facts", json={"facts": [role("bob", "reader", "Repo", "anvil")]})
        head = cb.get("/readyz").json()["sequence"]
    a.start()
    with a.client() as ca:
        # Ready means current: the snapshot's facts and every change after it.
        assert ca.get("/readyz").json()["sequence"] == head
        assert not decide(ca)
        assert decide(ca, {**READ_ANVIL, "actor": entity("User", "bob")})
    assert "from the snapshot at sequence" in a.log.read_text()
