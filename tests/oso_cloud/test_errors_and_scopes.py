"""What the SDK sees when bastion refuses: its own `OsoException`, with the status and the
message that says what to fix; and each /api scope lets through only what it names."""

from __future__ import annotations

import logging
import uuid

import httpx
import pytest
from oso_cloud import Oso, OsoException, Value, typed_var

from tests.oso_cloud.conftest import admin, start

ALICE, ORG, REPO = Value("User", "alice"), Value("Org", "acme"), Value("Repo", "anvil")


def refused(call) -> OsoException:
    with pytest.raises(OsoException) as e:
        call()
    return e.value


def message(e: OsoException) -> str:
    """The message of Oso Cloud's error, ``{"message": ...}``, that ``e`` carries."""
    head, _, body = str(e).partition("\n")
    assert head == f"Oso Server error: {e.status_code}"
    said = httpx.Response(e.status_code, content=body.encode()).json()
    assert set(said) == {"message"}, said
    return said["message"]


def test_an_unknown_key_is_the_sdks_auth_error(bastion):
    oso = Oso(url=bastion.url, api_key="bst_nope_" + "x" * 40)
    e = refused(lambda: oso.authorize(ALICE, "read", REPO))
    assert e.status_code == 401
    assert "the API key is unknown, expired or revoked" in str(e)
    e = refused(lambda: oso.insert(("has_role", ALICE, "member", ORG)))
    assert e.status_code == 401


def test_a_revoked_key_is_refused(bastion):
    with admin(bastion) as client:
        made = client.post("/v1/keys", json={"name": "gone", "scopes": ["oso:read"]}).json()
        oso = Oso(url=bastion.url, api_key=made["key"])
        assert oso.authorize(ALICE, "read", REPO) is False
        assert client.delete(f"/v1/keys/{made['id']}").status_code == 200
    import time

    time.sleep(1.1)  # a key checked in the last second is answered from memory
    assert refused(lambda: oso.authorize(ALICE, "read", REPO)).status_code == 401


def test_a_read_key_cannot_write(bastion):
    oso = bastion.oso("oso:read")
    e = refused(lambda: oso.insert(("has_role", ALICE, "member", ORG)))
    assert e.status_code == 403
    assert "oso:write" in str(e)
    assert refused(lambda: oso.delete(("has_role", ALICE, None, None))).status_code == 403
    assert refused(lambda: oso.policy("actor User {}")).status_code == 403
    # What it may do.
    assert oso.authorize(ALICE, "read", REPO) is False
    assert oso.get(("has_role", Value("User", "no-one"), None, None)) == []
    assert oso.get_policy_metadata().resources["Repo"].relations == {"parent": "Org"}


def test_a_write_key_cannot_decide_or_read(bastion):
    oso = bastion.oso("oso:write")
    user = Value("User", f"w-{uuid.uuid4().hex[:8]}")
    oso.insert(("has_role", user, "reader", REPO))
    for call in (
        lambda: oso.authorize(user, "read", REPO),
        lambda: oso.list(user, "read", "Repo"),
        lambda: oso.actions(user, REPO),
        lambda: oso.get(("has_role", user, None, None)),
        lambda: oso.get_policy_metadata(),
        lambda: oso.build_query(("allow", user, "read", REPO)).evaluate(),
    ):
        e = refused(call)
        assert e.status_code == 403
        assert "oso:read" in str(e)


def test_v1_scopes_and_the_events_scope_do_not_open_api(bastion):
    for scopes in (["decide", "facts:read", "facts:write", "policy:write"], ["oso:events"]):
        oso = bastion.oso(*scopes)
        assert refused(lambda oso=oso: oso.authorize(ALICE, "read", REPO)).status_code == 403
        e = refused(lambda oso=oso: oso.insert(("has_role", ALICE, "member", ORG)))
        assert e.status_code == 403


def test_events_need_the_events_scope(bastion, caplog):
    oso = bastion.oso("oso:read", "oso:write")
    agents = oso.for_agents("scopeless-bot", uuid.uuid4(), [ALICE])
    with caplog.at_level(logging.ERROR, logger="oso_cloud.for_agents"):
        agents.tool_call_request("search", {"q": 1})
    # The SDK logs what it could not send, and goes on.
    assert any("403" in r.getMessage() for r in caplog.records)


def test_a_malformed_value_says_what_is_wrong(oso):
    e = refused(lambda: oso.insert(("has_label", REPO, "stars", Value("Integer", "many"))))
    assert e.status_code == 422
    assert "an Integer's id is its digits" in str(e)
    e = refused(lambda: oso.authorize(ALICE, "read", Value("Boolean", "maybe")))
    assert e.status_code == 422
    assert "a Boolean is" in str(e) and "'maybe'" in str(e)


def test_a_fact_the_policy_has_no_use_for(oso):
    e = refused(lambda: oso.insert(("has_role", ALICE, "member")))
    assert e.status_code == 422
    assert "has_role/2" in str(e)
    e = refused(lambda: oso.insert(("has_role", ALICE, 3, ORG)))
    assert e.status_code == 422
    assert "does not fit" in str(e)


def test_an_unknown_predicate(oso):
    e = refused(lambda: oso.insert(("no_such_fact", ALICE)))
    assert e.status_code == 422
    assert "no use for no_such_fact/1" in str(e)
    x = typed_var("User")
    e = refused(lambda: oso.build_query(("no_such_rule", x)).evaluate(x))
    assert e.status_code == 422
    assert "defines no no_such_rule/1" in str(e)


def test_an_undeclared_entity_type(oso):
    e = refused(lambda: oso.authorize(ALICE, "read", Value("Repository", "anvil")))
    assert e.status_code == 422
    assert "'Repository'" in str(e)
    # A list of them is refused as a check of one is, not answered with nothing.
    e = refused(lambda: oso.list(ALICE, "read", "Repository"))
    assert e.status_code == 422
    assert "'Repository'" in str(e)


def test_a_page_of_no_results_is_refused_not_read_as_the_largest(oso):
    e = refused(lambda: oso.list_paginated(ALICE, "read", "Repo", page_size=0))
    assert e.status_code == 400
    assert "page_size must be 1 or more, got 0" in str(e)


def test_too_many_context_facts(oso):
    facts = [("has_role", ALICE, "member", Value("Org", f"o{i}")) for i in range(101)]
    e = refused(lambda: oso.authorize(ALICE, "read", REPO, facts))
    assert e.status_code == 422
    assert "oso_api_max_context_facts" in str(e)


def test_malformed_bodies_are_refused_and_change_nothing(bastion):
    key = bastion.oso("oso:read", "oso:write").api.token
    headers = {"authorization": f"Bearer {key}"}
    with httpx.Client(base_url=bastion.url, headers=headers) as client:
        for path, body in (
            ("/api/authorize", {"actor_type": "User"}),
            ("/api/authorize", [1, 2]),
            ("/api/batch", {"inserts": []}),
            ("/api/batch", [{"inserts": [{"predicate": "is_public", "args": ["Repo:x"]}]}]),
            ("/api/batch", [{"upserts": []}]),
            ("/api/evaluate_query", {"predicate": "allow"}),
            ("/api/list", {"actor_type": "User", "actor_id": "a", "action": "read"}),
        ):
            r = client.post(path, json=body)
            assert r.status_code == 400, (path, body, r.text)
            assert isinstance(r.json()["message"], str) and r.json()["message"]
        # Well formed, but an id without its type.
        pattern = {"predicate": "is_public", "args": [{"id": "x"}]}
        r = client.post("/api/batch", json=[{"deletes": [pattern]}])
        assert r.status_code == 422
        assert r.json()["message"] == "[0].deletes[0].args[0]: an id needs its type"
        r = client.get("/api/facts", params={"predicate": "is_public", "args.0.idd": "x"})
        assert r.status_code == 400
        r = client.get("/api/facts", params={"predicate": "is_public"})
        assert r.status_code == 200


@pytest.mark.parametrize("written", ["\u0663", " 7", "7 ", "1_0", "+5", "٣٣", "0x1", ""])
def test_an_integer_is_written_in_plain_digits_or_refused(bastion, written):
    """Python's int() reads other scripts' digits, spaces, ``_`` and ``+``: two spellings of one
    value, which nothing else in bastion takes. Refused, and nothing stored."""
    key = bastion.oso("oso:read", "oso:write").api.token
    label = {"type": "Integer", "id": written}
    repo, name = {"type": "Repo", "id": "n"}, {"type": "String", "id": "x"}
    fact = {"predicate": "has_label", "args": [repo, name, label]}
    with httpx.Client(base_url=bastion.url, headers={"authorization": f"Bearer {key}"}) as client:
        r = client.post("/api/batch", json=[{"inserts": [fact]}])
        assert r.status_code == 422, r.text
        assert "an Integer's id is its digits" in r.json()["message"]
        params = {"predicate": "has_label", "args.0.type": "Repo", "args.0.id": "n"}
        assert client.get("/api/facts", params=params).json() == []


@pytest.mark.parametrize("offset", ["9" * 5000, "\u00b2", "-1", "1e3"])
def test_an_offset_header_that_names_no_sequence_is_400(bastion, offset):
    key = bastion.oso("oso:read").api.token
    headers = {"authorization": f"Bearer {key}", "OsoOffset": offset.encode("latin-1")}
    question = {"actor_type": "User", "actor_id": "a", "action": "read"}
    question |= {"resource_type": "Repo", "resource_id": "r"}
    with httpx.Client(base_url=bastion.url, headers=headers) as client:
        r = client.post("/api/authorize", json=question)
    assert r.status_code == 400, r.text
    assert "OsoOffset" in r.json()["message"]


def test_an_argument_position_in_plain_digits_or_refused(bastion):
    key = bastion.oso("oso:read").api.token
    with httpx.Client(base_url=bastion.url, headers={"authorization": f"Bearer {key}"}) as client:
        for position in ("\u00b2", "\u0663", "9" * 5000):
            params = {"predicate": "is_public", f"args.{position}.id": "x"}
            r = client.get("/api/facts", params=params)
            assert r.status_code == 400, r.text


def test_a_policy_with_an_error_is_refused_with_its_place(bastion):
    oso = bastion.oso("oso:read", "oso:write")
    # (A predicate nothing defines is a fact type with a warning, as in Oso Cloud; a call
    # missing a comma is an error.)
    e = refused(lambda: oso.policy('actor User {}\nallow(x, "read", r) if\n  frobnicate(x r);\n'))
    assert e.status_code == 422
    assert "policy.polar:3:" in str(e), str(e)
    # The policy in force is still the one before.
    assert oso.get_policy_metadata().resources["Repo"].roles == ["maintainer", "reader"]


def test_every_refusal_under_api_is_osos_shape(bastion):
    """Refusals made before a handler runs (no such route or method, a body over
    ``max_body_bytes``, a NUL in the query) were problem details, not Oso Cloud's ``{"message":
    ...}``: the SDK's ``OsoException`` carried a JSON document of another API."""
    oso = bastion.oso("oso:read", "oso:write")
    # Oso Cloud's operations that bastion does not serve.
    e = refused(oso.api.clear_data)
    assert e.status_code == 404
    assert "/api/clear_data" in message(e)
    # A batch larger than max_body_bytes (1 MiB): the SDK sends up to 10 MB.
    with pytest.raises(OsoException) as raised, oso.batch() as tx:
        for i in range(600):
            tx.insert(("is_public", Value("Repo", f"{i}-" + "x" * 2000)))
    e = raised.value
    assert e.status_code == 413
    assert "max_body_bytes" in message(e)
    headers = {"authorization": f"Bearer {oso.api.token}"}
    with httpx.Client(base_url=bastion.url, headers=headers) as client:
        r = client.get("/api/authorize")
        assert r.status_code == 405
        assert r.headers["content-type"] == "application/json"
        assert "GET" in r.json()["message"]
        r = client.get("/api/facts", params={"predicate": "is_public", "args.0.type": "R\0"})
        assert r.status_code == 400
        assert "NUL" in r.json()["message"]


def test_every_error_under_api_says_nosniff(bastion):
    # An error quotes what it was sent; a browser shown one never reads it as anything but the
    # JSON it is, whoever made it (a handler's refusal included), as under /v1.
    key = bastion.oso("oso:read", "oso:write").api.token
    markup = {"actor_type": "<script>", "actor_id": "x", "action": "read"}
    with httpx.Client(base_url=bastion.url, timeout=30) as client:
        answers = {
            401: client.post("/api/authorize", json=markup),
            400: client.post(
                "/api/authorize",
                json={**markup, "resource_type": "Repo", "resource_id": 7},
                headers={"authorization": f"Bearer {key}"},
            ),
            403: client.post(
                "/api/policy",
                json={"src": "x"},
                headers={"authorization": f"Bearer {bastion.oso('oso:read').api.token}"},
            ),
            404: client.get("/api/%3Cscript%3E"),
        }
    for status, r in answers.items():
        assert r.status_code == status, (status, r.text)
        assert "message" in r.json()
        assert r.headers.get("x-content-type-options") == "nosniff", (status, r.text)


def test_a_write_while_the_database_is_away_is_osos_503(outage, tmp_path):
    """The SDK retries a 503 and then raises it; it was the OAuth error shape
    (``temporarily_unavailable``) on /api."""
    role = outage.role()
    running = start(tmp_path, outage.url(role))
    try:
        oso = running.oso("oso:read", "oso:write")
        oso.insert(("is_public", REPO))
        outage.block(role)
        e = refused(lambda: oso.insert(("is_public", Value("Repo", "other"))))
        assert e.status_code == 503
        assert "the database is unavailable" in message(e)
    finally:
        outage.unblock(role)
        running.server.stop()
