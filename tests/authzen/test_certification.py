"""The AuthZEN Authorization API 1.0 certification scenario (openid/authzen,
certification/authorization-api-1_0-scenario.md), every level and sub-level, against a real
`bastion serve` over HTTPS holding the fixture of examples/authzen: each request of the
scenario, and each answer it expects. Section numbers are the scenario's anchors (c-2-2-1 ...).
"""

from __future__ import annotations

import pytest

ALICE = {"type": "user", "id": "alice"}
BOB = {"type": "user", "id": "bob"}
BOB_ADMIN = {**BOB, "properties": {"role": "admin"}}
RECORD_1 = {"type": "record", "id": "record-1"}
RECORD_2 = {"type": "record", "id": "record-2"}
ARCHIVED_2 = {**RECORD_2, "properties": {"status": "archived"}}
READ, WRITE = {"name": "read"}, {"name": "write"}
CONTEXT = {"time": "2025-06-27T18:03-07:00", "ip": "192.168.1.1"}

EVALUATION = "/access/v1/evaluation"
EVALUATIONS = "/access/v1/evaluations"


def decision(pep, body: dict, path: str = EVALUATION) -> bool:
    response = pep.post(path, json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    assert isinstance(answer["decision"], bool)
    assert isinstance(answer.get("context", {}), dict)
    return answer["decision"]


def batch(pep, body: dict) -> list[bool]:
    response = pep.post(EVALUATIONS, json=body)
    assert response.status_code == 200, response.text
    answers = response.json()["evaluations"]
    assert all(isinstance(a["decision"], bool) for a in answers)
    assert all(isinstance(a.get("context", {}), dict) for a in answers)
    return [a["decision"] for a in answers]


def results(pep, kind: str, body: dict) -> list[dict]:
    response = pep.post(f"/access/v1/search/{kind}", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    found = response.json()
    assert isinstance(found["results"], list)
    page = found.get("page")
    if page is not None:
        assert isinstance(page, dict) and isinstance(page["next_token"], str)
    return found["results"]


def ids(found: list[dict], type_: str) -> set[str]:
    assert all(r["type"] == type_ and isinstance(r["id"], str) for r in found)
    return {r["id"] for r in found}


# -- Basic ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "action", "resource", "expected"),
    [
        (ALICE, READ, RECORD_1, True),  # rule 1, c-2-2-1
        (ALICE, WRITE, RECORD_1, True),  # rule 2
        (BOB, READ, RECORD_1, True),  # rule 3
        (BOB, WRITE, RECORD_1, False),  # rule 4, c-2-2-2
    ],
)
def test_basic_core_fixture_decisions(pep, subject, action, resource, expected):
    body = {"subject": subject, "action": action, "resource": resource}
    assert decision(pep, body) is expected
    # c-1-6: the fixture decisions hold with a context too (c-2-2-3).
    assert decision(pep, {**body, "context": CONTEXT}) is expected


def test_basic_core_additional_properties_and_unknown_fields_are_accepted(pep):
    # c-2-2-8
    body = {
        "subject": {**ALICE, "properties": {"department": "Sales", "role": "manager"}},
        "action": {**READ, "properties": {"method": "GET"}},
        "resource": {**RECORD_1, "properties": {"status": "active", "owner": "bob"}},
    }
    assert decision(pep, body) is True
    # c-2-2-9
    body = {"subject": ALICE, "action": READ, "resource": RECORD_1}
    assert decision(pep, {**body, "foo": "bar", "futureField": {"nested": True}}) is True


@pytest.mark.parametrize(
    ("subject", "action", "resource", "expected"),
    [
        (ALICE, WRITE, ARCHIVED_2, False),  # rule 5, c-2-2-4
        (BOB_ADMIN, WRITE, ARCHIVED_2, True),  # rule 6, c-2-2-5
        (ALICE, {"name": "delete", "properties": {"soft": True}}, RECORD_1, True),  # 7, c-2-2-6
        (ALICE, {"name": "delete", "properties": {"soft": False}}, RECORD_1, False),  # 8, c-2-2-7
    ],
)
def test_basic_properties_fixture_decisions(pep, subject, action, resource, expected):
    assert decision(pep, {"subject": subject, "action": action, "resource": resource}) is expected


def test_a_subjects_properties_are_what_makes_it_an_administrator(pep):
    """Rule 6 is decided on properties: a subject the data does not make an administrator is
    one by its properties, and is not without them."""
    carol = {"type": "user", "id": "carol"}
    body = {"action": WRITE, "resource": ARCHIVED_2}
    assert decision(pep, {**body, "subject": carol}) is False
    assert decision(pep, {**body, "subject": {**carol, "properties": {"role": "admin"}}}) is True


@pytest.mark.parametrize(
    "body",
    [
        {"action": READ, "resource": RECORD_1},  # c-2-4-1: no subject
        {"subject": ALICE, "resource": RECORD_1},  # no action
        {"subject": ALICE, "action": READ},  # no resource
        {"subject": {"id": "alice"}, "action": READ, "resource": RECORD_1},  # c-2-4-2
        {"subject": {"type": "user"}, "action": READ, "resource": RECORD_1},
        {"subject": ALICE, "action": {}, "resource": RECORD_1},
        {"subject": ALICE, "action": READ, "resource": {"id": "record-1"}},
        {"subject": ALICE, "action": READ, "resource": {"type": "record"}},
        {"subject": "alice", "action": READ, "resource": RECORD_1},  # c-2-4-6
        {"subject": ALICE, "action": {"name": 123}, "resource": RECORD_1},
    ],
)
def test_basic_core_a_missing_or_mistyped_field_is_400(pep, body):
    response = pep.post(EVALUATION, json=body)
    assert response.status_code == 400
    assert response.text  # an error message string


def test_basic_core_wrong_content_type_malformed_or_empty_body_is_400(pep):
    # A body that would be allowed, sent as something else than JSON.
    body = b'{"subject": {"type": "user", "id": "alice"}, "action": {"name": "read"},'
    body += b' "resource": {"type": "record", "id": "record-1"}}'
    assert pep.post(EVALUATION, content=body, headers={"content-type": "application/json"}).json()
    # c-2-4-3
    assert (
        pep.post(EVALUATION, content=body, headers={"content-type": "text/plain"}).status_code
        == 400
    )
    # c-2-4-4
    malformed = {"content-type": "application/json"}
    assert pep.post(EVALUATION, content=b'{"subject": ', headers=malformed).status_code == 400
    # c-2-4-5
    assert pep.post(EVALUATION, content=b"", headers=malformed).status_code == 400


def test_basic_core_x_request_id_is_echoed(pep):
    body = {"subject": ALICE, "action": READ, "resource": RECORD_1}
    # c-2-5-1
    response = pep.post(EVALUATION, json=body, headers={"X-Request-ID": "bfe9eb29-ab87"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "bfe9eb29-ab87"
    # ... on an error too
    response = pep.post(EVALUATION, json={}, headers={"X-Request-ID": "r-2"})
    assert response.status_code == 400 and response.headers["x-request-id"] == "r-2"
    # c-2-5-2
    assert pep.post(EVALUATION, json=body).status_code == 200


def test_basic_core_the_same_request_gets_the_same_decision(pep):
    # c-2-6
    for body, expected in (
        ({"subject": ALICE, "action": READ, "resource": RECORD_1}, True),
        ({"subject": BOB, "action": WRITE, "resource": RECORD_1}, False),
    ):
        assert {decision(pep, body) for _ in range(5)} == {expected}


# -- Batch ---------------------------------------------------------------------------------------


def test_batch_core_requests(pep):
    # c-3-2-1: structure
    answers = batch(
        pep,
        {
            "subject": ALICE,
            "action": READ,
            "evaluations": [{"resource": RECORD_1}, {"resource": RECORD_2}],
        },
    )
    assert len(answers) == 2 and answers[0] is True
    # c-3-2-2: decisions and their order
    answers = batch(
        pep,
        {
            "subject": BOB,
            "resource": RECORD_1,
            "evaluations": [{"action": READ}, {"action": WRITE}],
        },
    )
    assert answers == [True, False]
    # c-3-2-5: no defaults
    answers = batch(
        pep,
        {
            "evaluations": [
                {"subject": ALICE, "action": READ, "resource": RECORD_1},
                {"subject": BOB, "action": WRITE, "resource": RECORD_1},
            ]
        },
    )
    assert answers == [True, False]
    # c-3-2-6: context inherited, and overridden per evaluation
    answers = batch(
        pep,
        {
            "subject": ALICE,
            "action": READ,
            "context": {"time": "2025-06-27T18:03-07:00"},
            "evaluations": [
                {"resource": RECORD_1},
                {
                    "resource": RECORD_2,
                    "context": {"time": "2025-06-27T19:00-07:00", "source": "batch-override"},
                },
            ],
        },
    )
    assert len(answers) == 2 and answers[0] is True


def test_batch_properties_requests(pep):
    # c-3-2-3
    answers = batch(
        pep,
        {
            "subject": ALICE,
            "action": WRITE,
            "evaluations": [
                {"resource": {**RECORD_1, "properties": {"status": "active"}}},
                {"resource": ARCHIVED_2},
            ],
        },
    )
    assert answers == [True, False]
    # c-3-2-4
    answers = batch(
        pep,
        {
            "action": WRITE,
            "resource": ARCHIVED_2,
            "evaluations": [{"subject": ALICE}, {"subject": BOB_ADMIN}],
        },
    )
    assert answers == [False, True]
    # c-3-2-7: defaults inherited whole, and replaced whole
    answers = batch(
        pep,
        {
            "subject": ALICE,
            "action": WRITE,
            "resource": {**RECORD_1, "properties": {"status": "active"}},
            "evaluations": [{}, {"resource": ARCHIVED_2}],
        },
    )
    assert answers == [True, False]


def test_batch_core_a_failed_evaluation_is_false_with_its_error_and_the_rest_decided(pep):
    # c-3-4-1
    response = pep.post(
        EVALUATIONS,
        json={
            "subject": ALICE,
            "action": READ,
            "options": {"evaluations_semantic": "execute_all"},
            "evaluations": [{"resource": RECORD_1}, {}],
        },
    )
    assert response.status_code == 200
    first, second = response.json()["evaluations"]
    assert first == {"decision": True}
    assert second["decision"] is False
    assert second["context"]["error"]["status"] == 400
    assert "resource" in second["context"]["error"]["message"]


def test_batch_core_without_evaluations_is_a_single_evaluation(pep):
    body = {"subject": ALICE, "action": READ, "resource": RECORD_1}
    for extra in ({}, {"evaluations": []}):  # c-3-4-2, c-3-4-3
        response = pep.post(EVALUATIONS, json={**body, **extra})
        assert response.status_code == 200
        assert response.json() == {"decision": True}


# -- Search --------------------------------------------------------------------------------------


def test_search_core_subject_search(pep):
    body = {"subject": {"type": "user"}, "action": READ, "resource": RECORD_1}
    expected = ids(results(pep, "subject", body), "user")
    assert {"alice", "bob"} <= expected  # c-4-2-1, S1
    assert ids(results(pep, "subject", {**body, "context": CONTEXT}), "user") == expected  # c-4-2-2
    # c-4-2-3: the searched-for subject's id is ignored
    assert ids(results(pep, "subject", {**body, "subject": ALICE}), "user") == expected


def test_search_core_resource_search(pep):
    body = {"subject": ALICE, "action": READ, "resource": {"type": "record"}}
    expected = ids(results(pep, "resource", body), "record")
    assert "record-1" in expected  # c-4-3-1, S2
    assert ids(results(pep, "resource", {**body, "context": CONTEXT}), "record") == expected
    assert ids(results(pep, "resource", {**body, "resource": RECORD_1}), "record") == expected


def test_search_core_action_search(pep):
    body = {"subject": ALICE, "resource": RECORD_1}
    found = results(pep, "action", body)
    assert all(set(r) == {"name"} for r in found)
    names = {r["name"] for r in found}
    assert {"read", "write"} <= names  # c-4-4-1, S3
    assert {r["name"] for r in results(pep, "action", {**body, "context": CONTEXT})} == names


def test_search_properties(pep):
    # c-4-2-4, S4
    found = results(
        pep, "subject", {"subject": {"type": "user"}, "action": WRITE, "resource": ARCHIVED_2}
    )
    assert "bob" in ids(found, "user")
    # c-4-3-4, S5
    found = results(
        pep, "resource", {"subject": BOB_ADMIN, "action": WRITE, "resource": {"type": "record"}}
    )
    assert "record-2" in ids(found, "record")
    # c-4-4-3, S6
    found = results(pep, "action", {"subject": BOB_ADMIN, "resource": ARCHIVED_2})
    assert "write" in {r["name"] for r in found}


def test_search_core_pagination(pep):
    body = {"subject": {"type": "user"}, "action": READ, "resource": RECORD_1}
    everyone = ids(results(pep, "subject", body), "user")
    # c-4-5-1
    response = pep.post("/access/v1/search/subject", json={**body, "page": {"limit": 1}})
    assert response.status_code == 200
    first = response.json()
    assert len(first["results"]) == 1 and first["page"]["count"] == 1
    assert first["page"]["total"] == len(everyone)
    token = first["page"]["next_token"]
    assert token  # more to come
    # c-4-5-2: the rest, page by page, until next_token is ""
    seen = [r["id"] for r in first["results"]]
    while token:
        response = pep.post(
            "/access/v1/search/subject", json={**body, "page": {"limit": 1, "token": token}}
        )
        assert response.status_code == 200
        page = response.json()
        assert isinstance(page["page"], dict) and isinstance(page["page"]["next_token"], str)
        seen += [r["id"] for r in page["results"]]
        token = page["page"]["next_token"]
    assert seen == sorted(everyone)


def test_search_core_pagination_the_next_page_is_asked_with_the_token_alone(pep):
    # c-4-5-2, as the scenario and the spec's own example send it: the follow-up's page holds
    # the token and nothing else (no limit); it continues the search page by page.
    body = {"subject": {"type": "user"}, "action": READ, "resource": RECORD_1}
    everyone = ids(results(pep, "subject", body), "user")
    first = pep.post("/access/v1/search/subject", json={**body, "page": {"limit": 1}}).json()
    seen, token = [r["id"] for r in first["results"]], first["page"]["next_token"]
    assert token
    while token:
        response = pep.post("/access/v1/search/subject", json={**body, "page": {"token": token}})
        assert response.status_code == 200, response.text
        page = response.json()
        # The page size of the first request holds for the whole search.
        assert page["page"]["count"] == len(page["results"]) == 1
        seen += [r["id"] for r in page["results"]]
        token = page["page"]["next_token"]
    assert seen == sorted(everyone)


def test_search_core_no_match_is_an_empty_result_on_every_search(pep):
    unknown_user = {"type": "user", "id": "nonexistent-user"}
    # c-4-6-1
    assert results(pep, "action", {"subject": unknown_user, "resource": RECORD_1}) == []
    assert (
        results(
            pep,
            "resource",
            {"subject": unknown_user, "action": READ, "resource": {"type": "record"}},
        )
        == []
    )
    assert (
        results(
            pep,
            "subject",
            {
                "subject": {"type": "user"},
                "action": READ,
                "resource": {"type": "record", "id": "nope"},
            },
        )
        == []
    )
    # c-4-6-2
    spaceship = {"subject": {"type": "spaceship"}, "action": READ, "resource": RECORD_1}
    assert results(pep, "subject", spaceship) == []
    assert (
        results(
            pep, "resource", {"subject": ALICE, "action": READ, "resource": {"type": "spaceship"}}
        )
        == []
    )
    assert (
        results(pep, "action", {"subject": ALICE, "resource": {"type": "spaceship", "id": "x"}})
        == []
    )


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        # c-4-7-1: a required field missing
        ("subject", {"subject": {"type": "user"}, "resource": RECORD_1}),
        ("resource", {"action": READ, "resource": {"type": "record"}}),
        ("action", {"subject": ALICE}),
        # c-4-7-2: an input entity without its id
        ("subject", {"subject": {"type": "user"}, "action": READ, "resource": {"type": "record"}}),
        ("resource", {"subject": {"type": "user"}, "action": READ, "resource": {"type": "record"}}),
        ("action", {"subject": {"type": "user"}, "resource": RECORD_1}),
    ],
)
def test_search_core_missing_fields_are_400(pep, kind, body):
    response = pep.post(f"/access/v1/search/{kind}", json=body)
    assert response.status_code == 400 and response.text


# -- Discovery -----------------------------------------------------------------------------------


def test_discovery_metadata(fixture_pdp):
    # c-6: public, over HTTPS, every URL https and under the base URL used for discovery
    with fixture_pdp.client() as client:
        response = client.get("/.well-known/authzen-configuration")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    base = fixture_pdp.url
    assert document["policy_decision_point"] == base
    endpoints = {
        "access_evaluation_endpoint": "/access/v1/evaluation",
        "access_evaluations_endpoint": "/access/v1/evaluations",
        "search_subject_endpoint": "/access/v1/search/subject",
        "search_resource_endpoint": "/access/v1/search/resource",
        "search_action_endpoint": "/access/v1/search/action",
    }
    for name, path in endpoints.items():
        assert document[name] == base + path and document[name].startswith("https://")
    assert "signed_metadata" not in document
    # The endpoints it names answer.
    with fixture_pdp.client(fixture_pdp.key) as pep:
        url = document["access_evaluation_endpoint"]
        body = {"subject": ALICE, "action": READ, "resource": RECORD_1}
        assert pep.post(url, json=body).json() == {"decision": True}


def test_the_fixture_policy_loads_without_warnings_and_its_tests_pass():
    from bastion.policy import load
    from bastion.policy.testing import run_tests
    from tests.authzen.conftest import EXAMPLE

    path = EXAMPLE / "policy.polar"
    loaded = load([(str(path), path.read_text())])
    assert not loaded.warnings, loaded.warnings
    results = run_tests(loaded)
    assert len(results) == 3 and all(r.passed for r in results), [r.name for r in results]
