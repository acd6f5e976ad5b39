"""The /v1 API: decisions, facts, policy, keys; bad input is refused with a problem and changes nothing."""

from __future__ import annotations

import dataclasses
import json
import re
import time

import pytest
from starlette.testclient import TestClient

from bastion.facts.model import Entity
from bastion.server.app import create_app
from bastion.server.openapi import openapi_document
from tests.waits import PATIENCE, before_expiry, past

from .conftest import ADMIN_KEY, POLICY, entity, role


def write_roles(api, *facts) -> int:
    r = api.post("/v1/facts", json={"facts": list(facts)})
    assert r.status_code == 200, r.text
    return r.json()["sequence"]


def allowed(api, user: str, action: str, type_: str, id_: str, **extra) -> bool:
    body = {"actor": entity("User", user), "action": action, "resource": entity(type_, id_)}
    r = api.post("/v1/authorize", json={**body, **extra})
    assert r.status_code == 200, r.text
    return r.json()["allowed"]


def head(api) -> int:
    return api.get("/readyz").json()["sequence"]


def assert_problem(r, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    for w in words:
        assert w in body["detail"], body
    return body


# -- decisions ---------------------------------------------------------------------------------


GUARDED = (
    POLICY
    + """
resource Payment {}
allow(_: User, "pay", _: Payment) if context.amount matches Integer or context.amount matches String;
deny(_: User, "pay", _: Payment) if context.amount > 1000;
allow(_: User, "refund", _: Payment) if not over_limit(context.amount);
over_limit(amount) if amount > 1000;
"""
)


def test_a_guardrail_sent_an_amount_of_another_kind_refuses_on_every_question(api):
    """``deny ... if context.amount > 1000`` cannot order "5000" and 1000: the guardrail may
    hold, so it refuses, and so does a ``not`` over a rule that compares it; authorize, actions,
    query and the explanation all say the same."""
    assert api.put("/v1/policy", json={"text": GUARDED}).status_code == 200
    body = {"actor": entity("User", "mallory"), "resource": entity("Payment", "p1")}
    for amount, expected in ((50, {"pay", "refund"}), (5000, set()), ("5000", set())):
        context = {"amount": amount}
        for action in ("pay", "refund"):
            r = api.post("/v1/authorize", json={**body, "action": action, "context": context})
            assert r.json()["allowed"] is (action in expected), (amount, action)
        r = api.post("/v1/actions", json={**body, "context": context})
        assert set(r.json()["actions"]) == expected, amount
        args = [body["actor"], {"var": "a"}, body["resource"]]
        r = api.post("/v1/query", json={"predicate": "allow", "args": args, "context": context})
        assert {row[2] for row in r.json()["results"]} == expected, amount
    decided = api.post(
        "/v1/authorize", json={**body, "action": "pay", "context": {"amount": "5000"}}
    ).json()
    text = api.get(f"/v1/decisions/{decided['decision_id']}/explanation").json()["explanation"]
    assert "context.amount > 1000" in text["text"] and "cannot be decided" in text["text"]


OBLIGED = (
    POLICY
    + """
resource Payment {}
allow(_: User, "pay", _: Payment);
requires_approval(_: User, "pay", _: Payment) if context.amount > 1000;
requires_scope("pay", _: Payment, "pay:large") if context.amount > 1000;
mask(_: User, "pay", _: Payment, "card") if context.amount > 1000;
rate_limit(_: User, "pay", _: Payment, 1, 60) if context.amount > 1000;
rate_limit(_: User, "pay", _: Payment, n, 60) if n = 1000 / context.per;
"""
)


def test_obligations_sent_an_amount_of_another_kind_apply_as_to_a_large_amount(api):
    """``requires_approval(...) if context.amount > 1000`` cannot order "5000" and 1000: the
    obligation may hold, so it applies (with every other one), as a guardrail refuses; one whose
    values cannot be named (a limit of ``1000 / 0`` calls) refuses, and the record says which."""
    assert api.put("/v1/policy", json={"text": OBLIGED}).status_code == 200
    body = {"principals": [entity("User", "mallory")], "action": "pay"}
    body["resource"] = entity("Payment", "p1")
    large = {
        "masks": ["card"],
        "rate_limits": [{"principal": entity("User", "mallory"), "max": 1, "seconds": 60}],
        "required_scopes": ["pay:large"],
        "requires_approval": True,
    }
    for amount in (5000, "5000", True):
        r = api.post("/v1/authorize", json={**body, "context": {"amount": amount}})
        answer = r.json()
        assert answer["allowed"] is True, amount
        assert {k: answer["obligations"][k] for k in large} == large, amount
        scoped = {**body, "context": {"amount": amount}, "scopes": []}
        answer = api.post("/v1/authorize", json=scoped).json()
        assert answer["allowed"] is False and answer["missing_scopes"] == ["pay:large"], amount
    small = api.post("/v1/authorize", json={**body, "context": {"amount": 50}}).json()
    assert small["obligations"]["requires_approval"] is False
    assert small["obligations"]["masks"] == [] and small["obligations"]["rate_limits"] == []
    refused = api.post("/v1/authorize", json={**body, "context": {"per": 0}}).json()
    assert refused["allowed"] is False
    assert (refused["reason"], refused["undecided"]) == ("undecided", "rate_limit")
    record = api.get(f"/v1/decisions/{refused['decision_id']}").json()
    assert (record["reason"], record["undecided"]) == ("undecided", "rate_limit")


def test_a_role_on_the_parent_org_lets_a_member_read_the_repo(api):
    api.post(
        "/v1/facts/batch",
        json={
            "insert": [
                role("alice", "member", "Org", "acme"),
                {
                    "predicate": "has_relation",
                    "args": [entity("Repo", "anvil"), "parent", entity("Org", "acme")],
                },
            ]
        },
    ).raise_for_status()
    assert allowed(api, "alice", "read", "Repo", "anvil")
    assert not allowed(api, "alice", "push", "Repo", "anvil")
    assert not allowed(api, "bob", "read", "Repo", "anvil")


def test_the_short_entity_form_is_accepted(api):
    write_roles(api, role("alice", "reader", "Repo", "anvil"))
    r = api.post(
        "/v1/authorize", json={"actor": "User:alice", "action": "read", "resource": "Repo:anvil"}
    )
    assert r.json()["allowed"] is True


def test_a_refused_field_is_quoted_in_part_not_echoed_whole(api):
    """A 400 names what was wrong with a field and shows the start of what came, not the whole
    of it: a client sending a megabyte must not get it back in the answer (or the log)."""
    big = "x" * 200_000
    for body in (
        {"actor": big, "action": "read", "resource": "Repo:anvil"},  # no Type:id form
        {"actor": {"type": "User", "id": 7, "pad": big}, "action": "read", "resource": "Repo:a"},
        {"actor": "User:alice", "action": [big], "resource": "Repo:anvil"},  # not a string
    ):
        r = api.post("/v1/authorize", json=body)
        detail = assert_problem(r, 400, "the field")["detail"]
        assert "xxxxxxxx" in detail and len(detail) < 400, len(detail)
    fact = {"predicate": "has_role", "args": [{"type": "User", "id": big, "x": 1}, "r", "Repo:a"]}
    detail = api.post("/v1/facts", json={"facts": [fact]}).json()["detail"]
    assert "an entity is" in detail and len(detail) < 400, len(detail)


def test_a_batch_answers_each_check_in_order(api):
    write_roles(api, role("alice", "maintainer", "Repo", "anvil"))
    checks = [
        {"actor": entity("User", "alice"), "action": a, "resource": entity("Repo", "anvil")}
        for a in ("read", "push", "delete")
    ]
    r = api.post("/v1/authorize/batch", json={"checks": checks})
    results = r.json()["results"]
    assert [x["allowed"] for x in results] == [True, True, False]
    assert len({x["decision_id"] for x in results}) == 3


def test_list_pages_through_every_allowed_resource_once(api):
    write_roles(api, *[role("alice", "reader", "Repo", f"r{i:02}") for i in range(25)])
    write_roles(api, role("bob", "reader", "Repo", "other"))
    ids, cursor = [], None
    while True:
        body = {"actor": entity("User", "alice"), "action": "read", "resource_type": "Repo"}
        body["limit"] = 10
        if cursor:
            body["cursor"] = cursor
        page = api.post("/v1/list", json=body).json()
        ids += page["ids"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert ids == [f"r{i:02}" for i in range(25)]
    # A type the policy does not declare is refused, as a check of one is, not listed as none.
    body = {"actor": entity("User", "alice"), "action": "read", "resource_type": "Repository"}
    assert_problem(api.post("/v1/list", json=body), 422, "'Repository'", "does not declare")


def test_actions_and_query(api):
    write_roles(api, role("alice", "maintainer", "Repo", "anvil"))
    r = api.post(
        "/v1/actions", json={"actor": entity("User", "alice"), "resource": entity("Repo", "anvil")}
    )
    assert r.json()["actions"] == ["push", "read"]
    r = api.post(
        "/v1/query",
        json={"predicate": "has_role", "args": [{"var": "u"}, "maintainer", {"var": "r"}]},
    )
    assert r.json()["results"] == [
        ["has_role", entity("User", "alice"), "maintainer", entity("Repo", "anvil")]
    ]
    assert "decision_id" in r.json()


def test_a_decision_can_be_explained_afterwards(api):
    write_roles(api, role("alice", "reader", "Repo", "anvil"))
    body = {"actor": entity("User", "alice"), "action": "read", "resource": entity("Repo", "anvil")}
    decision_id = api.post("/v1/authorize", json=body).json()["decision_id"]
    r = api.get(f"/v1/decisions/{decision_id}/explanation")
    assert r.status_code == 200
    out = r.json()
    assert out["exact"] is True and out["explanation"]["allowed"] is True
    assert "has_role" in out["explanation"]["text"]
    assert_problem(api.get("/v1/decisions/nope-1/explanation"), 404, "not made by this server")


def test_an_explanation_asked_after_the_policy_changed_names_the_version_it_explains_against(api):
    write_roles(api, role("alice", "reader", "Repo", "anvil"))
    body = {"actor": entity("User", "alice"), "action": "read", "resource": entity("Repo", "anvil")}
    decided = api.post("/v1/authorize", json=body).json()
    assert decided["allowed"] is True
    deny_all = POLICY.replace('"read" if "reader";', "")
    assert api.put("/v1/policy", json={"text": deny_all}).json()["version"] == 2
    out = api.get(f"/v1/decisions/{decided['decision_id']}/explanation").json()
    # Decided under version 1, explained again now, against version 2: said so, never exact.
    assert out["policy_version"] == 1 and out["explained_policy_version"] == 2
    assert out["exact"] is False and out["explanation"]["allowed"] is False


def test_an_old_policy_versions_text_is_read_by_its_number(api):
    assert (
        api.put("/v1/policy", json={"text": POLICY + "\n# v2\n", "note": "v2"}).status_code == 200
    )
    old = api.get("/v1/policy/versions/1")
    assert old.status_code == 200
    assert old.json()["version"] == 1 and old.json()["text"] == POLICY
    assert api.get("/v1/policy/versions/2").json()["note"] == "v2"
    for unknown in ("9", "0", "99999999999999999999", "x", "1.0"):
        assert_problem(api.get(f"/v1/policy/versions/{unknown}"), 404, "no policy version")
    api.headers["authorization"] = "Bearer nope"
    assert api.get("/v1/policy/versions/1").status_code == 401


def test_at_least_waits_for_a_write_and_refuses_an_unknown_sequence(api):
    seq = write_roles(api, role("alice", "reader", "Repo", "anvil"))
    assert allowed(api, "alice", "read", "Repo", "anvil", at_least=seq)
    body = {"actor": "User:alice", "action": "read", "resource": "Repo:anvil", "at_least": seq + 50}
    assert_problem(api.post("/v1/authorize", json=body), 422, "latest is")


def test_a_decision_asked_while_a_large_change_is_added_waits_for_it_and_the_server_goes_on(
    api, monkeypatch
):
    """A change added on a worker thread under the fact lock (`Replica.in_force`): a decision
    asked meanwhile waits for it and sees it; the server answers other requests meanwhile."""
    import threading

    from bastion.facts.index import FactIndex
    from bastion.server import replica as replica_module

    monkeypatch.setattr(replica_module, "_CHECKED_ON_LOOP", 2)
    monkeypatch.setattr(replica_module, "_BUILT_ASIDE", 10**9)
    adding, resume = threading.Event(), threading.Event()
    add_all = FactIndex.add_all

    def held_add_all(self, inserts, shared=False):
        if shared and not adding.is_set():  # the change's facts, their lock held
            adding.set()
            assert resume.wait(PATIENCE)
        return add_all(self, inserts, shared)

    monkeypatch.setattr(FactIndex, "add_all", held_add_all)
    answers: dict[str, object] = {}

    def ask(name: str, method: str, path: str, **kwargs) -> threading.Thread:
        asking = threading.Thread(
            target=lambda: answers.__setitem__(name, api.request(method, path, **kwargs))
        )
        asking.start()
        return asking

    facts = [role(f"u{i}", "reader", "Repo", "anvil") for i in range(20)]
    writing = ask("write", "POST", "/v1/facts", json={"facts": facts})
    assert adding.wait(PATIENCE)
    check = {"actor": "User:u19", "action": "read", "resource": "Repo:anvil"}
    deciding = ask("decide", "POST", "/v1/authorize", json=check)
    assert api.get("/healthz").status_code == 200  # the event loop goes on
    deciding.join(0.2)
    assert deciding.is_alive() and "decide" not in answers  # waiting for the change
    resume.set()
    for asking in (writing, deciding):
        asking.join(PATIENCE)
    assert answers["write"].status_code == 200
    decided = answers["decide"]
    assert decided.status_code == 200 and decided.json()["allowed"] is True
    assert decided.json()["sequence"] >= answers["write"].json()["sequence"]


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 400, ["not valid JSON"]),
        (b"[1, 2]", 400, ["JSON object"]),
        (b'{"actor": "User:alice", "action": 3, "resource": "Repo:x"}', 400, ["action"]),
        (b'{"actor": "User:alice", "resource": "Repo:x"}', 400, ["'action' is required"]),
        # Well formed, but a type the policy does not declare: unprocessable.
        (b'{"actor": "Robot:r2", "action": "read", "resource": "Repo:x"}', 422, ["Robot"]),
        (b'{"actor": {"type": "User"}, "action": "read", "resource": "Repo:x"}', 400, ["actor"]),
        (b'{"actor": "User:a", "action": "read", "resource": "Repo:x", "at_least": "1"}', 400, []),
    ],
)
def test_bad_decision_requests_get_a_problem_that_says_what_to_fix(api, body, status, words):
    assert_problem(api.post("/v1/authorize", content=body), status, *words)


def test_a_fact_the_policy_cannot_use_is_refused_and_the_batch_changes_nothing(api):
    write_roles(api, role("alice", "reader", "Repo", "anvil"))
    before = head(api)
    r = api.post(
        "/v1/facts/batch",
        json={
            "delete": [{"predicate": "has_role", "args": [None, None, None]}],
            "insert": [
                role("bob", "reader", "Repo", "anvil"),
                {"predicate": "has_rol", "args": [entity("User", "bob")]},
            ],
        },
    )
    assert_problem(r, 422, "facts[1]", "has_rol")
    assert head(api) == before
    assert allowed(api, "alice", "read", "Repo", "anvil")
    assert not allowed(api, "bob", "read", "Repo", "anvil")


def test_an_oversized_body_is_refused(config):
    small = config.__class__(**{**config.__dict__, "max_body_bytes": 200})
    with TestClient(create_app(small)) as api:
        api.headers["authorization"] = f"Bearer {config.admin_key}"
        facts = [role(f"user{i}", "reader", "Repo", "anvil") for i in range(20)]
        assert_problem(api.post("/v1/facts", json={"facts": facts}), 413, "200 bytes")
        assert head(api) == 1  # only the policy


def test_an_import_with_one_bad_line_imports_nothing(api):
    lines = [json.dumps(role(f"u{i}", "reader", "Repo", "anvil")) for i in range(10)]
    lines[7] = '{"predicate": "has_role", "args": [1.5]}'
    before = head(api)
    r = api.post("/v1/facts/import", content="\n".join(lines).encode())
    assert_problem(r, 422, "line 8")
    assert head(api) == before
    assert api.get("/v1/facts").json()["facts"] == []


def test_a_fact_with_a_misspelt_expiry_is_refused_by_every_write_route(api):
    """``expires`` for ``expires_at``, ignored, would grant for ever: refused (422), naming
    the key, and nothing is stored."""
    fact = {**role("temp", "admin", "Org", "acme"), "expires": 1.0}
    before = head(api)
    assert_problem(api.post("/v1/facts", json={"facts": [fact]}), 422, "'expires'")
    assert_problem(api.post("/v1/facts/batch", json={"insert": [fact]}), 422, "'expires'")
    assert_problem(
        api.post("/v1/facts/import", content=json.dumps(fact)), 422, "line 1", "'expires'"
    )
    pattern = {"predicate": "has_role", "args": [None] * 3, "expires_at": 1.0}
    assert_problem(api.post("/v1/facts/delete", json={"patterns": [pattern]}), 422, "'expires_at'")
    assert head(api) == before
    assert api.get("/v1/facts").json()["facts"] == []


def test_unknown_routes_and_methods_are_problems_too(api):
    assert_problem(api.get("/v1/nothing"), 404, "openapi")
    assert_problem(api.delete("/v1/authorize"), 405, "DELETE")
    # A browser sent to a path that quotes markup takes the answer as the JSON it is, not a page.
    r = api.get("/approvals/x/%3Cscript%3Ealert(1)%3C%2Fscript%3E")
    assert_problem(r, 404, "<script>")
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["content-type"].startswith("application/problem+json")


# -- facts -------------------------------------------------------------------------------------


def test_wildcard_delete_revokes_access_at_once(api):
    write_roles(
        api, role("alice", "reader", "Repo", "anvil"), role("alice", "maintainer", "Repo", "forge")
    )
    r = api.post(
        "/v1/facts/delete",
        json={
            "patterns": [{"predicate": "has_role", "args": [entity("User", "alice"), None, None]}]
        },
    )
    assert r.json()["deleted"] == 2
    assert not allowed(api, "alice", "read", "Repo", "anvil")
    assert not allowed(api, "alice", "read", "Repo", "forge")


def test_facts_are_read_back_a_page_at_a_time(api):
    write_roles(api, *[role(f"u{i:02}", "reader", "Repo", "anvil") for i in range(15)])
    write_roles(api, role("x", "admin", "Org", "acme"))
    pattern = json.dumps({"predicate": "has_role", "args": [None, "reader", None]})
    seen, cursor = [], None
    while True:
        params = {"pattern": pattern, "limit": "4"}
        if cursor:
            params["cursor"] = cursor
        page = api.get("/v1/facts", params=params).json()
        seen += page["facts"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == 15 and len({json.dumps(f) for f in seen}) == 15


def test_export_then_import_round_trips_with_expiry(api):
    far = 4102444800.0  # 2100-01-01
    write_roles(api, {**role("alice", "reader", "Repo", "anvil"), "expires_at": far})
    write_roles(api, role("bob", "reader", "Repo", "anvil"))
    exported = api.get("/v1/facts/export").content
    api.post(
        "/v1/facts/delete", json={"patterns": [{"predicate": "has_role", "args": [None] * 3}]}
    ).raise_for_status()
    assert not allowed(api, "alice", "read", "Repo", "anvil")
    r = api.post("/v1/facts/import", content=exported)
    assert r.json()["inserted"] == 2
    facts = api.get("/v1/facts").json()["facts"]
    assert {f.get("expires_at") for f in facts} == {far, None}
    assert allowed(api, "alice", "read", "Repo", "anvil")


def test_a_large_import_is_put_in_force_as_written_not_read_back(api, monkeypatch):
    """The server's replica takes a large change its own writers committed as they wrote it,
    rather than decoding it from the change log again (`Replica.handed`)."""
    from bastion.facts import store as store_module

    decoded, loads = [], store_module.loads_in_turns
    monkeypatch.setattr(
        store_module,
        "loads_in_turns",
        lambda text, turns: decoded.append(text) or loads(text, turns),
    )
    far = 4102444800.0
    lines = [json.dumps(role(f"u{i}", "reader", "Repo", "anvil")) for i in range(1499)]
    lines.append(json.dumps({**role("alice", "reader", "Repo", "forge"), "expires_at": far}))
    r = api.post("/v1/facts/import", content="\n".join(lines).encode())
    assert r.status_code == 200, r.text
    assert r.json()["inserted"] == 1500
    assert decoded == []
    assert allowed(api, "u1498", "read", "Repo", "anvil")
    assert allowed(api, "alice", "read", "Repo", "forge")
    assert not allowed(api, "u1499", "read", "Repo", "anvil")
    assert (
        api.app.state.replica.authz.facts.expiry(
            ("has_role", Entity("User", "alice"), "reader", Entity("Repo", "forge"))
        )
        == far
    )


def test_an_import_refused_for_want_of_room_is_a_503_that_says_so(api):
    db = api.app.state.store.db
    db.execute("CREATE TEMP TABLE room (x)")  # the temporary schema, made now
    db.execute(f"PRAGMA temp.max_page_count = {db.execute('PRAGMA temp.page_count')[0][0] + 2}")
    before = head(api)
    lines = [json.dumps(role(f"u{i}", "reader", "Repo", "anvil")) for i in range(3000)]
    r = api.post("/v1/facts/import", content="\n".join(lines).encode())
    problem = assert_problem(r, 503, "storage is full", "rolled back")
    assert "cannot rollback" not in problem["detail"]
    assert head(api) == before and not allowed(api, "u1", "read", "Repo", "anvil")


def test_an_expired_grant_no_longer_allows(api):
    write_roles(api, {**role("alice", "reader", "Repo", "anvil"), "expires_at": 1.0})
    assert not allowed(api, "alice", "read", "Repo", "anvil")


# -- policy ------------------------------------------------------------------------------------


def test_a_policy_that_does_not_load_leaves_the_old_one_in_force(api):
    write_roles(api, role("alice", "reader", "Repo", "anvil"))
    r = api.put("/v1/policy", json={"text": "allow(actor, action, resource) if"})
    body = assert_problem(r, 422, "does not load")
    assert body["diagnostics"][0]["line"] == 1
    assert api.get("/v1/policy").json()["version"] == 1
    assert allowed(api, "alice", "read", "Repo", "anvil")


def test_validate_does_not_apply(api):
    r = api.post("/v1/policy/validate", json={"text": POLICY + "\n# v2\n"})
    assert r.json()["valid"] is True
    assert api.get("/v1/policy").json()["version"] == 1


def test_put_then_roll_back_the_policy(api):
    write_roles(api, role("alice", "reader", "Repo", "anvil"))
    deny_all = POLICY.replace('"read" if "reader";', "")
    r = api.put("/v1/policy", json={"text": deny_all, "note": "lockdown"})
    assert r.json()["version"] == 2
    assert not allowed(api, "alice", "read", "Repo", "anvil")
    r = api.post("/v1/policy/rollback", json={"version": 1})
    assert r.json()["version"] == 3
    assert allowed(api, "alice", "read", "Repo", "anvil")
    versions = api.get("/v1/policy/versions").json()["versions"]
    assert [v["note"] for v in versions][1:] == ["lockdown", "rollback to version 1"]
    assert versions[1]["created_by"].startswith("key:env")
    assert_problem(api.post("/v1/policy/rollback", json={"version": 9}), 404, "no policy version 9")


# A guardrail whose predicate is misspelt never fires: a warning, which strict makes an error.
MISSPELT_GUARDRAIL = (
    POLICY
    + """
declare is_blocked(User);
deny(user: User, _action, _resource) if is_blokced(user);
"""
)


def test_a_strict_put_refuses_a_policy_with_warnings_and_changes_nothing(api):
    r = api.post("/v1/policy/validate", json={"text": MISSPELT_GUARDRAIL, "strict": True})
    body = assert_problem(r, 422, "is_blokced", "did you mean is_blocked")
    assert body["diagnostics"][0]["severity"] == "error"
    r = api.put("/v1/policy", json={"text": MISSPELT_GUARDRAIL, "strict": True})
    assert_problem(r, 422, "is_blokced")
    assert api.get("/v1/policy").json()["version"] == 1
    # Not strict, as Oso Cloud loads it: in force, with the warning in the answer.
    r = api.put("/v1/policy", json={"text": MISSPELT_GUARDRAIL})
    assert r.status_code == 200 and "is_blokced" in r.json()["warnings"][0]
    assert_problem(api.put("/v1/policy", json={"text": POLICY, "strict": "yes"}), 400, "boolean")


def test_policy_strict_refuses_every_policy_with_warnings_by_every_way_in(config):
    strict = dataclasses.replace(config, policy_strict=True)
    with TestClient(create_app(strict)) as api:
        api.headers["authorization"] = f"Bearer {ADMIN_KEY}"
        for body in ({"text": MISSPELT_GUARDRAIL}, {"text": MISSPELT_GUARDRAIL, "strict": False}):
            assert_problem(api.put("/v1/policy", json=body), 422, "is_blokced")
            assert_problem(api.post("/v1/policy/validate", json=body), 422, "is_blokced")
        r = api.post("/api/policy", json={"filename": "p.polar", "src": MISSPELT_GUARDRAIL})
        assert r.status_code == 422 and "is_blokced" in r.json()["message"]
        assert api.get("/v1/policy").json()["version"] == 1
        assert api.put("/v1/policy", json={"text": POLICY + "# v2\n"}).status_code == 200
    # A version with warnings stored before the setting was turned on is not rolled back to.
    with TestClient(create_app(config)) as api:
        api.headers["authorization"] = f"Bearer {ADMIN_KEY}"
        assert api.put("/v1/policy", json={"text": MISSPELT_GUARDRAIL}).json()["version"] == 3
        assert api.put("/v1/policy", json={"text": POLICY}).json()["version"] == 4
    with TestClient(create_app(strict)) as api:
        api.headers["authorization"] = f"Bearer {ADMIN_KEY}"
        assert_problem(api.post("/v1/policy/rollback", json={"version": 3}), 422, "is_blokced")
        assert api.get("/v1/policy").json()["version"] == 4


# A mask and a review where the gateway has no result to apply them to, and a mask it applies.
UNENFORCED_OBLIGATIONS = (
    POLICY
    + """
resource McpServer {}
resource Tool {}
mask(_u: User, "connect", McpServer{"desk"}, "ssn");
requires_review(_u: User, "connect", _s: McpServer);
mask(_u: User, "call", Tool{"desk/report"}, "ssn");
"""
)


def test_validate_and_put_list_the_obligations_the_gateway_never_acts_on_as_warnings(api):
    """The contract's warnings come with the policy's own, by every way a policy is checked
    in; warnings only, under strict too: the policy is valid and is put in force."""
    lines = UNENFORCED_OBLIGATIONS.splitlines()
    mask_line = lines.index('mask(_u: User, "connect", McpServer{"desk"}, "ssn");') + 1
    r = api.post("/v1/policy/validate", json={"text": UNENFORCED_OBLIGATIONS, "strict": True})
    assert r.status_code == 200 and r.json()["valid"] is True
    found = r.json()["warnings"]
    assert len(found) == 2, found
    assert found[0].startswith(f"policy.polar:{mask_line}:1: warning: mask(")
    assert "a connect has no result to mask" in found[0]
    assert found[1].startswith(f"policy.polar:{mask_line + 1}:1: warning: requires_review(")
    r = api.put("/v1/policy", json={"text": UNENFORCED_OBLIGATIONS})
    assert r.status_code == 200 and r.json()["warnings"] == found
    assert api.get("/v1/policy").json()["version"] == 2


# -- keys and scopes ---------------------------------------------------------------------------


def test_requests_without_a_valid_key_are_refused(api):
    body = {"actor": "User:alice", "action": "read", "resource": "Repo:anvil"}
    r = api.post("/v1/authorize", json=body, headers={"authorization": ""})
    assert_problem(r, 401, "Bearer")
    r = api.post("/v1/authorize", json=body, headers={"authorization": "Bearer bst_x_y"})
    assert_problem(r, 401, "unknown")


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/facts"), ("GET", "/api/policy"), ("POST", "/access/v1/evaluation")],
)
def test_two_authorization_headers_are_refused_by_every_api(api, method, path):
    # Read as the first, an unknown key sent after the admin's was taken for the admin's; a
    # reader that takes the last (a proxy, bastion's own protocol path) sees another caller.
    for second in ("Bearer bst_x_y", f"Bearer {ADMIN_KEY}"):
        headers = [("authorization", f"Bearer {ADMIN_KEY}"), ("authorization", second)]
        r = api.request(method, path, headers=headers, json={})
        assert r.status_code == 400
        assert "one Authorization header" in r.text


def test_a_decide_key_cannot_write_facts_or_policy(api):
    created = api.post("/v1/keys", json={"name": "app", "scopes": ["decide"]}).json()
    h = {"authorization": f"Bearer {created['key']}"}
    body = {"actor": "User:alice", "action": "read", "resource": "Repo:anvil"}
    assert api.post("/v1/authorize", json=body, headers=h).status_code == 200
    r = api.post(
        "/v1/facts", json={"facts": [role("eve", "maintainer", "Repo", "anvil")]}, headers=h
    )
    assert_problem(r, 403, "facts:write")
    assert_problem(api.put("/v1/policy", json={"text": ""}, headers=h), 403, "policy:write")
    assert_problem(api.get("/v1/keys", headers=h), 403, "admin")
    assert api.get("/v1/facts").json()["facts"] == []


def test_a_revoked_key_is_refused(api):
    created = api.post("/v1/keys", json={"name": "tmp", "scopes": ["facts:read"]}).json()
    assert "key" in created
    listed = api.get("/v1/keys").json()["keys"]
    assert created["key"] not in json.dumps(listed)
    api.delete(f"/v1/keys/{created['id']}").raise_for_status()
    api.app.state.keys._cache.clear()
    r = api.get("/v1/facts", headers={"authorization": f"Bearer {created['key']}"})
    assert_problem(r, 401, "revoked")


def test_an_expired_key_is_refused_even_while_it_is_remembered(api):
    """A key verified just before its expiry was remembered, valid, for the whole of the key
    cache's lifetime: accepted after it expired. Its expiry is known when it is remembered, so
    it is remembered no longer than it lives."""
    api.app.state.keys._cache_seconds = 3600  # remembered far past the key's expiry

    def remembered_before_expiry(at: float) -> tuple[dict, dict]:
        # A key made to expire at ``at`` and used once before then (a machine too busy to use
        # it in time makes one that lives longer: `before_expiry`).
        body = {"name": "brief", "scopes": ["facts:read"], "expires_in": at - time.time()}
        made = api.post("/v1/keys", json=body)
        assert made.status_code == 201, made.text
        h = {"authorization": f"Bearer {made.json()['key']}"}
        assert api.get("/v1/facts", headers=h).status_code == 200  # verified, and remembered
        return made.json(), h

    (created, h), _ = before_expiry(remembered_before_expiry, 1)
    past(created["expires_at"])
    assert_problem(api.get("/v1/facts", headers=h), 401, "expired")


def _filled(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def test_every_route_refuses_every_key_without_the_scope_its_document_names(api):
    """Each operation of the OpenAPI document names one scope (``x-scope``), and any it needs
    besides (``x-also-scopes``: an explanation shows facts, so it needs ``facts:read`` too); a
    key holding any other single scope is refused with a 403 that names the scope, whatever the
    route would do with the request, as is a key of ``x-scope`` alone for the scopes it needs
    besides; a key of them all (or ``admin``) is let past the check."""
    from bastion.server.keys import SCOPES

    keys = {
        scope: api.post("/v1/keys", json={"name": f"k-{i}", "scopes": [scope]}).json()["key"]
        for i, scope in enumerate(SCOPES)
    }
    operations = [
        (method.upper(), path, op["x-scope"], op.get("x-also-scopes", []))
        for path, ops in openapi_document()["paths"].items()
        for method, op in ops.items()
        if "x-scope" in op
    ]
    guarded = ("/v1/", "/api/", "/access/")
    unscoped = [
        (method, path)
        for path, ops in openapi_document()["paths"].items()
        for method, op in ops.items()
        if path.startswith(guarded) and path != "/v1/openapi.json" and "x-scope" not in op
    ]
    assert unscoped == []
    assert len(operations) > 70
    assert ("GET", "/v1/decisions/{decision_id}/explanation", "decide", ["facts:read"]) in (
        operations
    )
    for method, path, needed, also in operations:
        every = [needed, *also]
        both = {"name": f"all-{method}-{path}"[:128], "scopes": every}
        held = {**keys, "+".join(every): api.post("/v1/keys", json=both).json()["key"]}
        for scope, key in held.items():
            h = {"authorization": f"Bearer {key}"}
            r = api.request(method, _filled(path), json={}, headers=h)
            if scope in ("+".join(every), "admin"):
                let_past = r.status_code != 401 and "lacks the scope" not in r.text
                assert let_past, (method, path, scope, r.text)
            else:
                lacked = needed if scope != needed else also[0]
                assert r.status_code == 403, (method, path, scope, r.status_code, r.text)
                assert repr(lacked) in r.text, (method, path, scope, r.text)
                if method == "GET":  # HEAD is answered by the GET route
                    assert api.head(_filled(path), headers=h).status_code == 403, (path, scope)
        r = api.request(method, _filled(path), json={}, headers={"authorization": ""})
        assert r.status_code == 401, (method, path, r.text)


def test_keys_with_unknown_scopes_are_refused(api):
    assert_problem(api.post("/v1/keys", json={"name": "x", "scopes": ["root"]}), 400, "root")


@pytest.mark.parametrize(
    "name", ["", "ops\nbst_forged\tactive\tadmin\tadmin", " ops", "x" * 129, "x" * 100_000]
)
def test_a_key_name_that_is_empty_long_or_not_printable_is_refused_and_stores_nothing(api, name):
    """A newline in a key's name forged a line of `bastion keys list`; a name is 1 to 128
    printable characters without surrounding spaces, as a username is."""
    r = api.post("/v1/keys", json={"name": name, "scopes": ["decide"]})
    assert_problem(r, 422, "a key's name is 1 to 128 printable characters")
    assert api.get("/v1/keys").json()["keys"] == []


def test_a_key_name_that_reads_as_another_is_refused_saying_why_and_stores_nothing(api):
    """``ci-ѕtaging`` with a Cyrillic ѕ would read as the key ``ci-staging`` in `keys list` and
    in the records of what the key changed."""
    r = api.post("/v1/keys", json={"name": "ci-\u0455taging", "scopes": ["decide"]})
    assert_problem(
        r, 422, "a key's name mixes scripts in one word (Latin and Cyrillic: \\u0455taging)"
    )
    assert api.get("/v1/keys").json()["keys"] == []


# -- service -----------------------------------------------------------------------------------


def test_metrics_count_decisions_by_result(api):
    write_roles(api, role("alice", "reader", "Repo", "anvil"))
    allowed(api, "alice", "read", "Repo", "anvil")
    allowed(api, "alice", "push", "Repo", "anvil")
    text = api.get("/metrics").text
    assert 'bastion_decisions_total{kind="authorize",result="allow"} 1.0' in text
    assert 'bastion_decisions_total{kind="authorize",result="deny"} 1.0' in text
    assert "bastion_facts 1.0" in text
    assert "bastion_changelog_lag 0.0" in text
    assert "bastion_decision_seconds_bucket" in text


def test_the_openapi_document_describes_every_route(api):
    doc = api.get("/v1/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    # A path converter ({id:path}: an id with slashes, as a URL client id) is not OpenAPI's.
    served = {
        (re.sub(r":path}", "}", route.path), method.lower())
        for route in api.app.routes
        for method in (route.methods or ())
        if method != "HEAD"
    }
    documented = {(path, m) for path, ops in openapi_document()["paths"].items() for m in ops}
    assert served == documented


def test_the_openapi_document_is_encoded_once_not_on_the_event_loop_at_each_request(
    api, monkeypatch
):
    """The document is some 250 KB of JSON, anyone may ask for it, and encoding it takes the
    event loop milliseconds: it is encoded once per process, each request answered with those
    bytes."""
    from starlette import responses

    encoded: list[int] = []
    dumps = responses.json.dumps

    def noting_size(*args, **kwargs):
        text = dumps(*args, **kwargs)
        encoded.append(len(text))
        return text

    monkeypatch.setattr(responses.json, "dumps", noting_size)
    first, second = (api.get("/v1/openapi.json") for _ in range(2))
    assert first.status_code == second.status_code == 200
    assert first.headers["content-type"] == "application/json"
    assert first.content == second.content and first.json()["openapi"].startswith("3.")
    assert len([size for size in encoded if size > 100_000]) <= 1


def test_an_oauth_table_mounts_the_authorization_server_beside_the_api(tmp_path, sqlite_url):
    from bastion.server.config import ServerConfig

    toml = tmp_path / "bastion.toml"
    toml.write_text(
        f'[server]\ndatabase = "{sqlite_url}"\n'
        f'[oauth]\nissuer = "http://127.0.0.1:8000"\nkey_dir = "{tmp_path / "keys"}"\n'
        '[[oauth.resources]]\nuri = "http://127.0.0.1:8000/mcp/files"\nscopes = ["tools:read"]\n'
    )
    config = ServerConfig.load(toml, env={"BASTION_ADMIN_KEY": "a" * 40})
    with TestClient(create_app(config)) as client:
        metadata = client.get("/.well-known/oauth-authorization-server")
        assert metadata.status_code == 200
        assert metadata.json()["issuer"] == "http://127.0.0.1:8000"
        assert client.get("/readyz").status_code == 200


def test_facts_a_later_policy_cannot_use_are_kept_and_count_again_after_a_rollback(config):
    member = role("alice", "member", "Org", "acme")
    parent = {
        "predicate": "has_relation",
        "args": [entity("Repo", "anvil"), "parent", entity("Org", "acme")],
    }
    without_parents = POLICY.replace("relations = { parent: Org };", "").replace(
        '"reader" if "member" on "parent";', ""
    )
    with TestClient(create_app(config)) as api:
        api.headers["authorization"] = f"Bearer {config.admin_key}"
        write_roles(api, member, parent)
        assert api.put("/v1/policy", json={"text": without_parents}).status_code == 200
    # A fresh process loads the store while the policy in force has no use for has_relation.
    with TestClient(create_app(config)) as api:
        api.headers["authorization"] = f"Bearer {config.admin_key}"
        assert not allowed(api, "alice", "read", "Repo", "anvil")
        assert len(api.get("/v1/facts").json()["facts"]) == 2
        assert api.get("/readyz").json()["facts"] == 1  # has_relation waits in the store
        api.post("/v1/policy/rollback", json={"version": 1}).raise_for_status()
        assert allowed(api, "alice", "read", "Repo", "anvil")


def test_a_replica_behind_a_pruned_change_log_reloads_a_snapshot(config):
    from bastion.facts.store import FactStore

    idle = config.__class__(**{**config.__dict__, "poll_interval": 3600.0})
    with TestClient(create_app(idle)) as api:
        api.headers["authorization"] = f"Bearer {config.admin_key}"
        # Written behind this replica's back (it polls once an hour), then pruned.
        other = FactStore.open(config.database)
        other.apply([("has_role", *_alice_reader_anvil())])
        seq = other.apply([("has_role", *_alice_reader_anvil("forge"))]).seq
        assert other.prune_changes(1) >= 1
        other.close()
        assert allowed(api, "alice", "read", "Repo", "anvil", at_least=seq)
        assert allowed(api, "alice", "read", "Repo", "forge")


def _alice_reader_anvil(repo: str = "anvil") -> tuple:
    from bastion.facts.model import Entity

    return (Entity("User", "alice"), "reader", Entity("Repo", repo))


def test_a_large_context_is_not_kept_for_a_later_explanation(api):
    write_roles(api, role("alice", "reader", "Repo", "anvil"))
    body = {"actor": "User:alice", "action": "read", "resource": "Repo:anvil"}
    small = api.post("/v1/authorize", json={**body, "context": {"ip": "127.0.0.1"}}).json()
    large = api.post("/v1/authorize", json={**body, "context": {"blob": "x" * 70_000}}).json()
    kept = api.get(f"/v1/decisions/{small['decision_id']}").json()
    assert kept["request"]["context"] == {"ip": "127.0.0.1"}
    assert "context" not in api.get(f"/v1/decisions/{large['decision_id']}").json()["request"]
    r = api.get(f"/v1/decisions/{large['decision_id']}/explanation")
    assert_problem(r, 409, '"explain": true')


def test_list_actions_and_query_records_keep_the_context_they_were_decided_with(api):
    """A list, an actions or a query decision read the request's context as an authorize does,
    and its record keeps it (64 KiB and less), so it can be explained later. Before, only
    authorize records did: a list whose answer turned on ``context`` left no trace of it."""
    write_roles(api, role("alice", "reader", "Repo", "anvil"))
    context = {"ip": "10.0.0.7"}
    bodies = {
        "/v1/list": {"actor": "User:alice", "action": "read", "resource_type": "Repo"},
        "/v1/actions": {"actor": "User:alice", "resource": "Repo:anvil"},
        "/v1/query": {"predicate": "allow", "args": ["User:alice", "read", {"var": "r"}]},
    }
    for path, body in bodies.items():
        answer = api.post(path, json={**body, "context": context})
        assert answer.status_code == 200, answer.text
        record = api.get(f"/v1/decisions/{answer.json()['decision_id']}").json()
        assert record["request"].get("context") == context, path
        large = api.post(path, json={**body, "context": {"blob": "x" * 70_000}}).json()
        record = api.get(f"/v1/decisions/{large['decision_id']}").json()
        assert record["request"].get("context_omitted") is True, path
        plain = api.post(path, json=body).json()
        assert "context" not in api.get(f"/v1/decisions/{plain['decision_id']}").json()["request"]


def test_a_time_past_the_calendar_is_answered_not_a_server_error(api):
    """A context's ``time`` that no calendar holds (epoch seconds of the year 10000, the last
    second of 9999 seen in a zone where it is already 10000) is a value that is not a time: the
    business-hours rule does not allow, the guardrail over it refuses (it cannot be decided), and
    the question is answered 200, never a 500 with a traceback in the log."""
    policy = POLICY + (
        'allow(_u: User, "read", _r: Repo) if'
        ' in_time_window(context.time, "*", "00:00", "24:00", "Pacific/Kiritimati");\n'
        'deny(_u: User, "push", _r: Repo) if time_after(context.time, "2027-01-01T00:00:00Z");\n'
    )
    assert api.put("/v1/policy", json={"text": policy}).status_code == 200
    write_roles(api, role("alice", "maintainer", "Repo", "anvil"))
    body = {"actor": "User:alice", "resource": "Repo:anvil"}
    for when in (253402300800, "9999-12-31T23:59:59+00:00"):
        r = api.post("/v1/authorize", json={**body, "action": "read", "context": {"time": when}})
        assert r.status_code == 200 and r.json()["allowed"] is True, r.text  # a maintainer reads
        r = api.post("/v1/authorize", json={**body, "action": "push", "context": {"time": when}})
        assert r.status_code == 200, r.text
    r = api.post(
        "/v1/authorize", json={**body, "action": "push", "context": {"time": 253402300800}}
    )
    # Not a time, so whether it is after 2027 cannot be decided: the guardrail refuses.
    assert r.json()["allowed"] is False
    r = api.post(
        "/v1/authorize",
        json={**body, "action": "push", "context": {"time": "9999-12-31T23:59:59+00:00"}},
    )
    assert r.json()["allowed"] is False  # a time after 2027: refused
