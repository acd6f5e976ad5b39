"""Entity ids and types no fact can hold. The fact store keeps no fact whose key is longer than
`MAX_FACT_KEY`, so no fact names an entity whose id is longer than `MAX_ENTITY_ID` (or whose type
is longer than `MAX_ENTITY_TYPE`), and no decision about one can find a fact. The decision APIs
(/v1, Oso Cloud's /api, AuthZEN's /access/v1) took them whole up to the body limit and kept them
in the decision log (10,000 records by default): a key allowed to decide could make the process
hold 10,000 ids of a MiB each. Each API now refuses them, in its own error form, before anything
is decided or kept; an id at the bound is still decided."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from bastion.facts.model import Entity
from bastion.facts.store import (
    MAX_ENTITY_ID,
    MAX_ENTITY_TYPE,
    MAX_FACT_KEY,
    MAX_STRING,
    fact_key,
)
from bastion.server.app import create_app
from bastion.server.config import ServerConfig
from tests.server.conftest import ADMIN_KEY, POLICY

LONG_ID = "x" * (MAX_ENTITY_ID + 1)
LONG_TYPE = "T" * (MAX_ENTITY_TYPE + 1)
LONG_ACTION = "a" * (MAX_STRING + 1)


@pytest.fixture
def api(tmp_path):
    """The whole app on a SQLite file, its policy declaring User, Org and Repo; as admin."""
    policy = tmp_path / "policy.polar"
    policy.write_text(POLICY)
    config = ServerConfig(
        database=str(tmp_path / "bastion.db"), admin_key=ADMIN_KEY, policy_file=str(policy)
    )
    with TestClient(create_app(config)) as client:
        client.headers["authorization"] = f"Bearer {ADMIN_KEY}"
        yield client


def last_count(api) -> int:
    """The count of the decision log's last record: one more decision, and read its id."""
    answer = api.post(
        "/v1/authorize",
        json={"actor": "User:probe", "action": "read", "resource": "Repo:probe"},
    )
    assert answer.status_code == 200, answer.text
    return int(answer.json()["decision_id"].rpartition("-")[2])


def refused_and_not_kept(api, path: str, body: dict) -> str:
    """Send ``body``; assert a 400 and that the decision log kept nothing of it; the answer."""
    before = last_count(api)
    answer = api.post(path, json=body)
    assert answer.status_code == 400, (path, answer.status_code, answer.text[:300])
    assert len(answer.content) < 2000  # the answer does not echo the id back
    assert last_count(api) == before + 1  # only the probe's own decision since
    return answer.text


def test_the_bounds_are_the_longest_an_entity_of_a_stored_fact_has():
    # The shortest fact naming an entity: one argument, a one-letter predicate.
    assert len(fact_key(("p", Entity("T", "x" * MAX_ENTITY_ID)))) == MAX_FACT_KEY
    assert len(fact_key(("p", Entity("T" * MAX_ENTITY_TYPE, "")))) == MAX_FACT_KEY


V1 = [
    ("/v1/authorize", {"actor": f"User:{LONG_ID}", "action": "read", "resource": "Repo:r"}),
    (
        "/v1/authorize",
        {"actor": {"type": "User", "id": "a"}, "action": "read", "resource": f"Repo:{LONG_ID}"},
    ),
    (
        "/v1/authorize",
        {"actor": {"type": LONG_TYPE, "id": "a"}, "action": "read", "resource": "Repo:r"},
    ),
    (
        "/v1/authorize",
        {"principals": ["User:a", f"User:{LONG_ID}"], "action": "read", "resource": "Repo:r"},
    ),
    (
        "/v1/authorize/batch",
        {"checks": [{"actor": f"User:{LONG_ID}", "action": "read", "resource": "Repo:r"}]},
    ),
    ("/v1/list", {"actor": f"User:{LONG_ID}", "action": "read", "resource_type": "Repo"}),
    ("/v1/list", {"actor": "User:a", "action": "read", "resource_type": LONG_TYPE}),
    ("/v1/actions", {"actor": "User:a", "resource": f"Repo:{LONG_ID}"}),
    (
        "/v1/query",
        {"predicate": "allow", "args": [{"type": "User", "id": LONG_ID}, "read", {"var": "r"}]},
    ),
]


@pytest.mark.parametrize(("path", "body"), V1, ids=[f"{p}-{i}" for i, (p, _) in enumerate(V1)])
def test_v1_refuses_an_entity_no_fact_can_hold_before_deciding(api, path, body):
    text = refused_and_not_kept(api, path, body)
    assert f"at most {MAX_ENTITY_ID}" in text or f"at most {MAX_ENTITY_TYPE}" in text
    assert api.post(path, json=body).headers["content-type"] == "application/problem+json"


OSO = [
    ("/api/authorize", {"actor_type": "User", "actor_id": LONG_ID, "action": "read"}),
    ("/api/authorize", {"actor_type": LONG_TYPE, "actor_id": "a", "action": "read"}),
    ("/api/list", {"actor_type": "User", "actor_id": LONG_ID, "action": "read"}),
    ("/api/list", {"actor_type": "User", "actor_id": "a", "action": "read"}),
    ("/api/actions", {"actor_type": "User", "actor_id": "a"}),
]


@pytest.mark.parametrize(("path", "body"), OSO, ids=[f"{p}-{i}" for i, (p, _) in enumerate(OSO)])
def test_the_oso_api_refuses_an_entity_no_fact_can_hold(api, path, body):
    resource = {"resource_type": "Repo", "resource_id": "r"}
    if path == "/api/list":
        resource = {"resource_type": LONG_TYPE if body["actor_id"] == "a" else "Repo"}
    elif path == "/api/actions":
        resource = {"resource_type": "Repo", "resource_id": LONG_ID}
    text = refused_and_not_kept(api, path, {**body, **resource})
    assert "at most" in text and text.startswith('{"message":')


AUTHZEN = [
    {
        "subject": {"type": "User", "id": LONG_ID},
        "action": {"name": "read"},
        "resource": {"type": "Repo", "id": "d"},
    },
    {
        "subject": {"type": "User", "id": "u"},
        "action": {"name": "read"},
        "resource": {"type": LONG_TYPE, "id": "d"},
    },
]


@pytest.mark.parametrize("body", AUTHZEN, ids=["id", "type"])
def test_authzen_refuses_an_entity_no_fact_can_hold(api, body):
    text = refused_and_not_kept(api, "/access/v1/evaluation", body)
    assert "at most" in text and not text.startswith("{")  # AuthZEN's error: a message string


def test_an_authzen_batch_refuses_the_item_and_decides_the_rest(api):
    before = last_count(api)
    answer = api.post(
        "/access/v1/evaluations",
        json={
            "action": {"name": "read"},
            "resource": {"type": "Repo", "id": "d"},
            "evaluations": [
                {"subject": {"type": "User", "id": LONG_ID}},
                {"subject": {"type": "User", "id": "u"}},
            ],
        },
    )
    assert answer.status_code == 200, answer.text[:300]
    first, second = answer.json()["evaluations"]
    assert first["decision"] is False and "at most" in str(first["context"])
    assert second["decision"] is False
    assert last_count(api) == before + 2  # the second item and the probe; not the first


def test_authzen_refuses_a_too_long_entity_in_a_search(api):
    refused_and_not_kept(
        api,
        "/access/v1/search/resource",
        {
            "subject": {"type": "User", "id": LONG_ID},
            "action": {"name": "read"},
            "resource": {"type": "Repo"},
        },
    )


# An action (or a query's string) no fact can hold either: the decision log kept it whole.
ACTIONS = [
    ("/v1/authorize", {"actor": "User:a", "action": LONG_ACTION, "resource": "Repo:r"}),
    ("/v1/authorize", {"principals": ["User:a"], "action": LONG_ACTION, "resource": "Repo:r"}),
    (
        "/v1/authorize/batch",
        {"checks": [{"actor": "User:a", "action": LONG_ACTION, "resource": "Repo:r"}]},
    ),
    ("/v1/list", {"actor": "User:a", "action": LONG_ACTION, "resource_type": "Repo"}),
    ("/v1/query", {"predicate": "allow", "args": ["User:a", LONG_ACTION, {"var": "r"}]}),
    (
        "/api/authorize",
        {
            "actor_type": "User",
            "actor_id": "a",
            "action": LONG_ACTION,
            "resource_type": "Repo",
            "resource_id": "r",
        },
    ),
    (
        "/api/list",
        {"actor_type": "User", "actor_id": "a", "action": LONG_ACTION, "resource_type": "Repo"},
    ),
    (
        "/access/v1/evaluation",
        {
            "subject": {"type": "User", "id": "u"},
            "action": {"name": LONG_ACTION},
            "resource": {"type": "Repo", "id": "d"},
        },
    ),
    (
        "/access/v1/search/resource",
        {
            "subject": {"type": "User", "id": "u"},
            "action": {"name": LONG_ACTION},
            "resource": {"type": "Repo"},
        },
    ),
]


@pytest.mark.parametrize(
    ("path", "body"), ACTIONS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(ACTIONS)]
)
def test_every_decision_api_refuses_an_action_no_fact_can_hold_before_deciding(api, path, body):
    text = refused_and_not_kept(api, path, body)
    assert f"at most {MAX_STRING} characters" in text


def test_an_entity_at_the_bound_is_still_decided(api):
    at_bound = "y" * MAX_ENTITY_ID
    answer = api.post(
        "/v1/authorize", json={"actor": f"User:{at_bound}", "action": "read", "resource": "Repo:r"}
    )
    assert answer.status_code == 200 and answer.json()["allowed"] is False
    kept = api.get(f"/v1/decisions/{answer.json()['decision_id']}").json()
    assert kept["request"]["actor"] == {"type": "User", "id": at_bound}
    # So is an action at its bound.
    action = "z" * MAX_STRING
    answer = api.post(
        "/v1/authorize", json={"actor": "User:a", "action": action, "resource": "Repo:r"}
    )
    assert answer.status_code == 200 and answer.json()["allowed"] is False
    answer = api.post(
        "/api/authorize",
        json={
            "actor_type": "User",
            "actor_id": at_bound,
            "action": "read",
            "resource_type": "Repo",
            "resource_id": "r",
        },
    )
    assert answer.status_code == 200 and answer.json() == {"allowed": False}
    answer = api.post(
        "/access/v1/evaluation",
        json={
            "subject": {"type": "User", "id": at_bound},
            "action": {"name": "read"},
            "resource": {"type": "Repo", "id": "d"},
        },
    )
    assert answer.status_code == 200 and answer.json()["decision"] is False
