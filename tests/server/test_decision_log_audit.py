"""The decision service's stored decisions (``decision_log = "database"``) seen by the audit
commands, on a database written by a real ``bastion serve`` (SQLite and PostgreSQL):
``bastion audit show`` finds one by its id as it finds a gateway record, with the policy version
it was decided under and the API it was asked through; ``bastion audit replay`` asks each again
as that API decided it."""

from __future__ import annotations

import json

import httpx

from bastion.cli import main
from bastion.db import Database
from bastion.facts.store import FactStore

from .conftest import POLICY, entity, role
from .test_durable_decision_log import DURABLE, READ_ANVIL


def _key(admin: httpx.Client, name: str) -> tuple[str, dict]:
    """A new ``decide`` key, which reads facts too (it asks for explanations): its id, and the
    headers that ask with it."""
    created = admin.post("/v1/keys", json={"name": name, "scopes": ["decide", "facts:read"]})
    created.raise_for_status()
    return created.json()["id"], {"authorization": f"Bearer {created.json()['key']}"}


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``bastion ...`` -> (exit status, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _in_force(database: str):
    db = Database(database)
    try:
        return FactStore(db).policy()
    finally:
        db.close()


def test_audit_show_finds_a_decision_of_the_service_with_who_asked_and_its_policy(
    database_url, serve, capsys
):
    server = serve(database_url, **DURABLE)
    with server.client() as admin:
        key_id, app = _key(admin, "app")
        seq = admin.post("/v1/facts", json={"facts": [role("alice", "reader", "Repo", "anvil")]})
        body = {**READ_ANVIL, "at_least": seq.json()["sequence"]}
        allowed = admin.post("/v1/authorize", json=body, headers=app).json()
        explained = admin.post(
            "/v1/authorize",
            json={**READ_ANVIL, "action": "push", "explain": True},
            headers=app,
        ).json()
    server.stop()  # a clean stop writes what waits
    in_force = _in_force(database_url)

    code, out, err = _cli(
        capsys, "audit", "show", allowed["decision_id"], "--database", database_url
    )

    assert code == 0, err
    shown = json.loads(out)
    record = shown["record"]
    assert record["decision_id"] == allowed["decision_id"]
    assert record["kind"] == "authorize" and record["result"] is True
    assert record["request"]["actor"] == entity("User", "alice")
    assert record["request"]["context"] == {"ip": "10.0.0.7"}
    assert record["sequence"] == allowed["sequence"]
    assert record["asked_by"] == key_id and record["api"] == "v1"
    assert record["policy_version"] == in_force.version
    assert shown["policy"]["version"] == in_force.version
    assert shown["policy"]["text"] == in_force.text

    code, out, err = _cli(
        capsys, "audit", "show", explained["decision_id"], "--database", database_url
    )
    assert code == 0, err
    record = json.loads(out)["record"]
    assert record["result"] is False and record["request"]["action"] == "push"
    # The explanation asked for with the decision is kept, and shown.
    assert record["explanation"]["allowed"] is False and record["explanation"]["text"]


def test_audit_show_says_when_the_decision_log_was_never_kept_in_the_database(
    sqlite_url, serve, capsys
):
    server = serve(sqlite_url)  # decision_log = "memory", the default
    with server.client() as admin:
        decision_id = admin.post("/v1/authorize", json=READ_ANVIL).json()["decision_id"]
    server.stop()

    code, out, err = _cli(capsys, "audit", "show", decision_id, "--database", sqlite_url)

    assert code == 2 and out == ""
    assert "never kept" in err and 'decision_log = "database"' in err
    assert f"GET /v1/decisions/{decision_id}" in err


def test_audit_show_of_a_service_id_the_log_does_not_hold_says_why(sqlite_url, serve, capsys):
    server = serve(sqlite_url, **DURABLE)
    with server.client() as admin:
        decision_id = admin.post("/v1/authorize", json=READ_ANVIL).json()["decision_id"]
    server.stop()
    unknown = decision_id.rpartition("-")[0] + "-999999"

    code, out, err = _cli(capsys, "audit", "show", unknown, "--database", sqlite_url)

    assert code == 2 and out == ""
    assert "decision_log" in err and "audit_retention_days" in err


# The policy the servers run (tests/server/conftest.py's), but only a maintainer reads, not a
# reader: what a candidate like it would change among the decisions made.
CANDIDATE = POLICY.replace('"read" if "reader";', '"read" if "maintainer";')


def test_audit_replay_reports_a_stored_decision_the_candidate_changes_with_its_kind(
    database_url, serve, tmp_path, capsys
):
    server = serve(database_url, **DURABLE)
    with server.client() as admin:
        facts = [
            role("alice", "reader", "Repo", "anvil"),
            role("dan", "maintainer", "Repo", "anvil"),
        ]
        seq = admin.post("/v1/facts", json={"facts": facts}).json()["sequence"]
        changed = admin.post("/v1/authorize", json={**READ_ANVIL, "at_least": seq}).json()
        assert changed["allowed"] is True
        # A maintainer reads under both: unchanged, so not listed.
        dan = {**READ_ANVIL, "actor": entity("User", "dan")}
        unchanged = admin.post("/v1/authorize", json=dan).json()
        assert unchanged["allowed"] is True
        bob = {**READ_ANVIL, "actor": entity("User", "bob")}
        batch = admin.post("/v1/authorize/batch", json={"checks": [READ_ANVIL, bob]}).json()
        assert [r["allowed"] for r in batch["results"]] == [True, False]
        chain = {
            "principals": [entity("User", "alice")],
            "action": "read",
            "resource": entity("Repo", "anvil"),
        }
        in_chain = admin.post("/v1/authorize", json=chain).json()
        assert in_chain["allowed"] is True
        listed = admin.post(
            "/v1/list",
            json={"actor": entity("User", "alice"), "action": "read", "resource_type": "Repo"},
        ).json()
        # A context over 64 KiB is not kept with its decision: that one cannot be asked again.
        large = {**READ_ANVIL, "context": {"pad": "x" * (70 * 1024)}}
        too_large = admin.post("/v1/authorize", json=large).json()
        assert too_large["allowed"] is True
    server.stop()
    candidate = tmp_path / "candidate.polar"
    candidate.write_text(CANDIDATE)

    code, out, err = _cli(
        capsys,
        "audit",
        "replay",
        "--policy",
        str(candidate),
        "--database",
        database_url,
        "--json",
    )

    assert code == 1, err
    report = json.loads(out)
    listed_ids = {c["id"] for c in report["changed"]}
    alice_ids = {
        changed["decision_id"],
        batch["results"][0]["decision_id"],
        in_chain["decision_id"],
    }
    assert listed_ids == alice_ids
    for change in report["changed"]:
        assert change["source"] == "decision_log" and change["method"] == "authorize"
        assert change["api"] == "v1"
        assert change["old"]["result"] == "allow" and change["new"]["result"] == "deny"
        assert change["cause"] == "policy" and change["changed_by_push"] is True
        assert change["principals"] == ['User{"alice"}'] and change["target"] == 'Repo{"anvil"}'
    assert unchanged["decision_id"] not in listed_ids
    assert report["changed_by_push"] == 3
    # dan's and bob's decided alike; the list and the large context counted, with their reason.
    assert report["replayed"] == 5 and report["same"] == 2
    assert report["not_replayable"] == {"context_not_kept": 1, "not_a_check": 1}
    assert listed["decision_id"] not in listed_ids and too_large["decision_id"] not in listed_ids

    code, out, _ = _cli(
        capsys, "audit", "replay", "--policy", str(candidate), "--database", database_url
    )
    assert code == 1
    assert (
        f'decision_log v1 authorize read Repo{{"anvil"}} by User{{"alice"}} id={changed["decision_id"]}'
        in out
    )
    assert "not replayable: 2 (context_not_kept 1, not_a_check 1)" in out


# -- the API each decision was asked through ---------------------------------------------------

# The servers' policy, with an approval required before a push: AuthZEN refuses the push (it
# cannot hold a call for a person), where /v1's and Oso Cloud's authorize answer the policy's
# allow alone.
HELD_PUSH = POLICY + '\nrequires_approval(_actor: User, "push", _repo: Repo);\n'
DAN = entity("User", "dan")
ANVIL = entity("Repo", "anvil")


def _one_of_each_api(admin: httpx.Client, action: str) -> dict[str, str]:
    """dan asks to ``action`` anvil through /v1, AuthZEN and Oso Cloud's API, one after the
    other: each decision's id, by its API (Oso Cloud's answer names none: the ids of one
    process are its prefix and a count, so it is the next one)."""
    v1 = admin.post("/v1/authorize", json={"actor": DAN, "action": action, "resource": ANVIL})
    v1.raise_for_status()
    evaluation = {"subject": DAN, "action": {"name": action}, "resource": ANVIL}
    authzen = admin.post("/access/v1/evaluation", json=evaluation)
    authzen.raise_for_status()
    oso = admin.post(
        "/api/authorize",
        json={
            "actor_type": "User",
            "actor_id": "dan",
            "action": action,
            "resource_type": "Repo",
            "resource_id": "anvil",
        },
    )
    oso.raise_for_status()
    prefix, _, n = authzen.headers["X-Bastion-Decision-Id"].rpartition("-")
    return {
        "v1": v1.json()["decision_id"],
        "authzen": f"{prefix}-{n}",
        "oso_cloud": f"{prefix}-{int(n) + 1}",
        "answers": [v1.json()["allowed"], authzen.json()["decision"], oso.json()["allowed"]],
    }


def _decided_by_each_api(database: str, serve) -> dict:
    """A server with ``HELD_PUSH`` in force: dan, a maintainer of anvil, asks to push it
    through each API; the server stopped (a clean stop writes what waits)."""
    server = serve(database, **DURABLE)
    with server.client() as admin:
        admin.put("/v1/policy", json={"text": HELD_PUSH}).raise_for_status()
        seq = admin.post("/v1/facts", json={"facts": [role("dan", "maintainer", "Repo", "anvil")]})
        seq.raise_for_status()
        ids = _one_of_each_api(admin, "push")
    server.stop()
    return ids


def _replay(capsys, database: str, tmp_path, text: str) -> tuple[int, dict]:
    candidate = tmp_path / "candidate.polar"
    candidate.write_text(text)
    code, out, err = _cli(
        capsys, "audit", "replay", "--policy", str(candidate), "--database", database, "--json"
    )
    assert code in (0, 1), err
    return code, json.loads(out)


def test_audit_show_names_the_api_each_stored_decision_was_asked_through(
    database_url, serve, capsys
):
    ids = _decided_by_each_api(database_url, serve)

    for api in ("v1", "authzen", "oso_cloud"):
        code, out, err = _cli(capsys, "audit", "show", ids[api], "--database", database_url)
        assert code == 0, err
        record = json.loads(out)["record"]
        assert record["api"] == api, api
        assert record["request"]["action"] == "push" and record["kind"] == "authorize"


def test_audit_replay_asks_an_authzen_evaluation_as_authzen_decided_it(
    database_url, serve, tmp_path, capsys
):
    ids = _decided_by_each_api(database_url, serve)
    # AuthZEN refused the push it would have had to hold; /v1 and Oso Cloud allowed it.
    assert ids["answers"] == [True, False, True]

    # The policy in force itself: nothing is decided otherwise than recorded.
    code, report = _replay(capsys, database_url, tmp_path, HELD_PUSH)

    assert code == 0
    assert report["changed"] == []
    assert report["replayed"] == 3 and report["same"] == 3 and report["different"] == 0

    # Without the approval, AuthZEN's answer is the one the push changes: refused, then allowed.
    code, report = _replay(capsys, database_url, tmp_path, POLICY)

    assert code == 1
    assert [c["id"] for c in report["changed"]] == [ids["authzen"]]
    change = report["changed"][0]
    assert change["api"] == "authzen" and change["cause"] == "policy"
    assert change["old"]["result"] == "deny" and change["new"]["result"] == "allow"
    assert change["in_force"]["result"] == "deny"
    assert change["in_force"]["reason"] == "requires_approval"
    assert report["replayed"] == 3 and report["changed_by_push"] == 1


def test_rows_stored_before_rows_named_their_api_are_replayed_only_as_an_api_that_decides_alike(
    database_url, serve, tmp_path, capsys
):
    """A row an older bastion stored names no API: a /v1 context is /v1's, a row without one is
    /v1's or Oso Cloud's (which decide it alike), and one whose context is shaped as AuthZEN's
    is counted, not decided as /v1's."""
    server = serve(database_url, **DURABLE)
    with server.client() as admin:
        admin.put("/v1/policy", json={"text": HELD_PUSH}).raise_for_status()
        admin.post(
            "/v1/facts", json={"facts": [role("dan", "maintainer", "Repo", "anvil")]}
        ).raise_for_status()
        _one_of_each_api(admin, "push")
        kept = {"actor": DAN, "action": "push", "resource": ANVIL, "context": {"ip": "10.0.0.7"}}
        admin.post("/v1/authorize", json=kept).raise_for_status()
    server.stop()
    db = Database(database_url)
    try:
        db.execute("UPDATE decision_log SET api = NULL")
    finally:
        db.close()

    code, report = _replay(capsys, database_url, tmp_path, HELD_PUSH)

    assert code == 0 and report["changed"] == []
    assert report["replayed"] == 3 and report["same"] == 3
    assert report["not_replayable"] == {"api_not_recorded": 1}
