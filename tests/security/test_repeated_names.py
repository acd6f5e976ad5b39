"""A JSON object that names a member twice (``{"actor": ..., "actor": ...}``), in any body the
server's APIs read (`/v1`, Oso Cloud's `/api`, AuthZEN, `/register`; the gateway's, in
tests/gateway/test_bad_input.py) and in the JSON its commands read (`facts import`, `policy
explain --context`): refused whole with a 400 (exit 2 for a command) that names the member,
never read as its last value, and nothing is written. A body built by pasting text (``'{"actor":
"' + name + '", ...}'``) could otherwise have a second ``actor`` slipped in that overrides the
first, and a proxy or a log reading the first value sees another request than bastion decides
(I-JSON, RFC 7493 §2.3)."""

from __future__ import annotations

import json
import subprocess
import sys

from bastion.facts.store import FactStore
from tests.security.conftest import OAUTH
from tests.server.conftest import ADMIN_KEY

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"}
SAM = '{"type": "User", "id": "sam"}'
ALICE = '{"type": "User", "id": "alice"}'
TEAM = '{"type": "Repo", "id": "anvil"}'

# (method, path, body, the member named twice): each a body any reader that keeps the last
# value would take.
BODIES = {
    "a decision's actor": (
        "POST",
        "/v1/authorize",
        f'{{"actor": {SAM}, "actor": {ALICE}, "action": "read", "resource": {TEAM}}}',
        "actor",
    ),
    "an entity's id within a decision": (
        "POST",
        "/v1/authorize",
        '{"actor": {"type": "User", "id": "sam", "id": "alice"}, "action": "read",'
        f' "resource": {TEAM}}}',
        "id",
    ),
    "a batch check's action": (
        "POST",
        "/v1/authorize/batch",
        f'{{"checks": [{{"actor": {SAM}, "action": "read", "action": "write",'
        f' "resource": {TEAM}}}]}}',
        "action",
    ),
    "a fact's predicate": (
        "POST",
        "/v1/facts",
        f'{{"facts": [{{"predicate": "member", "predicate": "has_role", "args": [{SAM}]}}]}}',
        "predicate",
    ),
    "a policy's text": (
        "PUT",
        "/v1/policy",
        '{"text": "allow(_, _, _);", "text": "# nothing\\n"}',
        "text",
    ),
    "an Oso Cloud authorize": (
        "POST",
        "/api/authorize",
        '{"actor_type": "User", "actor_id": "sam", "actor_id": "alice", "action": "read",'
        ' "resource_type": "Team", "resource_id": "support"}',
        "actor_id",
    ),
    "an AuthZEN evaluation": (
        "POST",
        "/access/v1/evaluation",
        '{"subject": {"type": "User", "id": "sam"}, "subject": {"type": "User", "id": "alice"},'
        ' "action": {"name": "read"}, "resource": {"type": "Team", "id": "support"}}',
        "subject",
    ),
    "a client registered": (
        "POST",
        "/register",
        '{"redirect_uris": ["http://127.0.0.1:9/a"], "redirect_uris": ["http://127.0.0.1:9/b"]}',
        "redirect_uris",
    ),
}


def test_a_member_named_twice_is_refused_by_every_json_route_and_changes_nothing(
    database_url, served, tmp_path
):
    server = served(database_url, OAUTH % (tmp_path / "keys"))
    store = FactStore.open(database_url)
    try:
        head = store.head()
        with server.client() as http:
            wrong = {}
            for name, (method, path, body, member) in BODIES.items():
                answer = http.request(method, path, content=body.encode(), headers=ADMIN)
                said = answer.text
                if answer.status_code != 400 or f"'{member}'" not in said or "twice" not in said:
                    wrong[name] = f"{answer.status_code}: {said[:300]}"
            assert not wrong, json.dumps(wrong, indent=1)
            assert store.head() == head  # no write, no entry in the change log
            # The same bodies with each name once are read as before.
            once = f'{{"actor": {SAM}, "action": "read", "resource": {TEAM}}}'
            answer = http.post("/v1/authorize", content=once.encode(), headers=ADMIN)
            assert answer.status_code == 200, answer.text
    finally:
        store.close()


def test_facts_import_refuses_a_line_that_names_a_member_twice(sqlite_url, tmp_path):
    FactStore.open(sqlite_url).close()  # the database, as a server made it
    path = tmp_path / "facts.jsonl"
    path.write_text('{"predicate": "member", "predicate": "has_role", "args": ["a"]}\n')
    done = _bastion("facts", "import", str(path), "--database", sqlite_url)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "'predicate'" in done.stderr and "twice" in done.stderr, done.stderr
    store = FactStore.open(sqlite_url)
    try:
        assert store.count() == 0
    finally:
        store.close()


def test_policy_explain_refuses_a_context_that_names_a_member_twice(tmp_path):
    policy = tmp_path / "policy.polar"
    policy.write_text('allow(_: User, "read", _: Team) if context.ip = "10.0.0.1";\n')
    context = '{"ip": "10.0.0.1", "ip": "192.0.2.1"}'
    args = ("policy", "explain", str(policy), "User:sam", "read", "Team:support")
    done = _bastion(*args, "--context", context)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "'ip'" in done.stderr and "twice" in done.stderr, done.stderr
    once = _bastion(*args, "--context", '{"ip": "10.0.0.1"}')
    assert once.returncode == 0, (once.stdout, once.stderr)


def _bastion(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bastion.cli", *args], capture_output=True, text=True, timeout=60
    )
