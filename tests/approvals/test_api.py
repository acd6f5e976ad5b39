"""/v1/approvals on a real `bastion serve` (uvicorn, a SQLite file, a gateway configured): a key of
scope ``approvals`` lists, reads, approves and denies held calls and results for a person it
vouches for; the policy still decides who may answer, and every refusal changes nothing."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from bastion.agents.identity import owner_fact
from bastion.audit.log import AuditLog
from bastion.client import Client, RemoteError
from bastion.db import Database
from bastion.facts.store import FactStore
from bastion.oauth.store import OAuthStore
from bastion.oauth.users import create_user
from tests import clients
from tests.approvals.support import DELETE, REPORT, SEND, Holder, config, store_policy_and_facts
from tests.server.conftest import ADMIN_KEY, ServerProcess
from tests.waits import eventually


class Bastion:
    def __init__(self, server: ServerProcess, database: str, holder: Holder, keys: dict) -> None:
        self.server, self.database, self.holder, self.keys = server, database, holder, keys

    def client(self, scope: str | None = "approvals") -> httpx.Client:
        headers = {"authorization": f"Bearer {self.keys[scope]}"} if scope else {}
        return clients.client(base_url=self.server.url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("approvals-api")
    database = str(tmp / "bastion.db")
    store_policy_and_facts(database)
    server = ServerProcess(database, tmp)
    path = tmp / "bastion.toml"
    path.write_text(config(server.url, database, tmp / "keys"))
    server.env["BASTION_CONFIG"] = str(path)
    server.start()
    keys = {"admin": ADMIN_KEY}
    try:
        with server.client() as admin:
            for scope in ("approvals", "decide"):
                r = admin.post("/v1/keys", json={"name": f"{scope} bot", "scopes": [scope]})
                assert r.status_code == 201, r.text
                keys[scope] = r.json()["key"]
                keys[f"{scope}:id"] = r.json()["id"]
        holder = Holder(database, tmp / "keys", server.url)
        yield Bastion(server, database, holder, keys)
        holder.close()
    finally:
        server.stop()


def assert_problem(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    for word in words:
        assert word in body["detail"], body
    return body


def unchanged(bastion: Bastion, request_id: str) -> None:
    """The request is still pending and nobody's answer was recorded."""
    with bastion.client() as api:
        found = api.get(f"/v1/approvals/{request_id}").json()
    assert found["status"] == "pending" and found["answers"] == [], found


# -- reading -------------------------------------------------------------------------------------


def test_a_held_call_is_listed_and_read_with_its_arguments_in_full(bastion):
    held = bastion.holder.hold(SEND, {"to": "ceo@example.com", "body": "the numbers"})
    with bastion.client() as api:
        listed = api.get("/v1/approvals", params={"status": "pending"}).json()["approvals"]
        one = api.get(f"/v1/approvals/{held.id}").json()
    assert held.id in [r["id"] for r in listed]
    assert one["arguments"] == {"to": "ceo@example.com", "body": "the numbers"}
    assert (one["kind"], one["status"], one["user"], one["agent"]) == (
        "approval",
        "pending",
        "sam",
        "bot",
    )
    assert one["target"] == 'Tool{"crm/send"}' and one["approvers"] == ["avery"]
    assert one["rules"] == ["requires_approval(...)"] and one["window_minutes"] == 30


def test_the_list_narrows_to_an_approver_and_a_status_and_is_bounded(bastion):
    for_avery = bastion.holder.hold(SEND)
    sams_own = bastion.holder.hold(DELETE)  # no approver rule: sam confirms his agent's call
    with bastion.client() as api:
        avery = [r["id"] for r in api.get("/v1/approvals?approver=avery").json()["approvals"]]
        sam = [r["id"] for r in api.get("/v1/approvals?approver=sam").json()["approvals"]]
        denied = api.get("/v1/approvals?status=denied").json()["approvals"]
        one = api.get("/v1/approvals?limit=1").json()["approvals"]
        assert_problem(api.get("/v1/approvals?limit=0"), 400, "limit")
        assert_problem(api.get("/v1/approvals?limit=201"), 400, "limit")
        assert_problem(api.get("/v1/approvals?status=maybe"), 400, "status")
        assert_problem(api.get("/v1/approvals", params={"approver": "x" * 129}), 400, "approver")
    assert for_avery.id in avery and sams_own.id not in avery
    assert sams_own.id in sam and for_avery.id not in sam
    assert all(r["status"] == "denied" for r in denied)
    assert len(one) == 1


def test_an_unknown_request_is_a_404_for_every_route(bastion):
    with bastion.client() as api:
        for request_id in ("nope", "x" * 300):
            assert_problem(api.get(f"/v1/approvals/{request_id}"), 404, "no approval request")
            for verb in ("approve", "deny"):
                r = api.post(f"/v1/approvals/{request_id}/{verb}", json={"approver": "avery"})
                assert_problem(r, 404, "no approval request")


# -- who may call --------------------------------------------------------------------------------


def test_a_key_without_the_approvals_scope_is_refused_and_changes_nothing(bastion):
    held = bastion.holder.hold(SEND)
    with bastion.client("decide") as api:
        assert_problem(api.get("/v1/approvals"), 403, "approvals")
        assert_problem(api.get(f"/v1/approvals/{held.id}"), 403, "approvals")
        for verb in ("approve", "deny"):
            r = api.post(f"/v1/approvals/{held.id}/{verb}", json={"approver": "avery"})
            assert_problem(r, 403, "approvals")
    with bastion.client(None) as anonymous:
        r = anonymous.post(f"/v1/approvals/{held.id}/approve", json={"approver": "avery"})
        assert_problem(r, 401)
    unchanged(bastion, held.id)


def test_an_admin_key_has_the_approvals_scope(bastion):
    held = bastion.holder.hold(SEND)
    with bastion.client("admin") as api:
        r = api.post(f"/v1/approvals/{held.id}/deny", json={"approver": "avery"})
    assert r.status_code == 200 and r.json()["status"] == "denied"


# -- who may answer ------------------------------------------------------------------------------


def test_the_approver_the_policy_names_approves_and_the_key_that_vouched_is_recorded(bastion):
    held = bastion.holder.hold(SEND)
    with bastion.client() as api:
        r = api.post(
            f"/v1/approvals/{held.id}/approve", json={"approver": "avery", "reason": "expected"}
        )
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["status"] == "approved"
    [answer] = done["answers"]
    assert (answer["approver"], answer["answer"], answer["channel"], answer["reason"]) == (
        "avery",
        "approve",
        "api",
        "expected",
    )
    db = Database(bastion.database)
    try:
        events = [
            e
            for e in AuditLog(db).events(kind="approval.answer")
            if e.detail["request_id"] == held.id
        ]
    finally:
        db.close()
    [event] = events
    assert event.detail["approver"] == "avery" and event.detail["channel"] == "api"
    assert event.detail["via"].startswith(f"key:{bastion.keys['approvals:id']}:")


def test_a_person_the_policy_does_not_name_may_not_approve(bastion):
    held = bastion.holder.hold(SEND)
    with bastion.client() as api:
        for person, why in (("mallory", "not an approver"), ("bot", "is an agent of this call")):
            r = api.post(f"/v1/approvals/{held.id}/approve", json={"approver": person})
            assert_problem(r, 403, why)
    unchanged(bastion, held.id)


def test_a_disabled_or_suspended_approver_may_not_answer(bastion):
    # dana and erin are sam's managers too: approvers of his emails under the policy; dana is
    # disabled, erin suspended (the kill switch).
    db = Database(bastion.database)
    try:
        users = OAuthStore(db)
        for name in ("dana", "erin"):
            create_user(users, name, "approvers-test-password", time.time(), actor="test")
        assert users.disable_user("dana", time.time(), actor="test")
    finally:
        db.close()
    managers = [
        {"predicate": "manager", "args": [{"type": "User", "id": "sam"}, {"type": "User", "id": n}]}
        for n in ("dana", "erin")
    ]
    held = bastion.holder.hold(SEND)
    with bastion.client("admin") as admin, bastion.client() as api:
        assert admin.post("/v1/facts", json={"facts": managers}).status_code == 200
        suspended = admin.post("/v1/suspensions", json={"kind": "user", "id": "erin"})
        assert suspended.status_code == 201, suspended.text
        try:
            for person, state in (("dana", "disabled"), ("erin", "suspended")):
                for answer in ("approve", "deny"):
                    r = api.post(f"/v1/approvals/{held.id}/{answer}", json={"approver": person})
                    assert_problem(r, 403, f"{person} is {state}")
            unchanged(bastion, held.id)
        finally:
            assert admin.delete("/v1/suspensions/user/erin").status_code == 200
        # Resumed, erin is an approver again.
        r = api.post(f"/v1/approvals/{held.id}/approve", json={"approver": "erin"})
    assert r.status_code == 200 and r.json()["status"] == "approved", r.text


def test_the_user_may_not_approve_their_own_call_when_the_policy_names_approvers(bastion):
    held = bastion.holder.hold(SEND)
    with bastion.client() as api:
        r = api.post(f"/v1/approvals/{held.id}/approve", json={"approver": "sam"})
    assert_problem(r, 403, "may not approve their own call")
    unchanged(bastion, held.id)


def test_without_approver_rules_the_user_confirms_and_nobody_else_may(bastion):
    held = bastion.holder.hold(DELETE)
    with bastion.client() as api:
        r = api.post(f"/v1/approvals/{held.id}/approve", json={"approver": "avery"})
        assert_problem(r, 403, "not an approver")
        r = api.post(f"/v1/approvals/{held.id}/approve", json={"approver": "sam"})
    assert r.status_code == 200 and r.json()["status"] == "approved"


def test_a_key_vouching_for_an_agents_client_id_does_not_confirm_its_call(bastion):
    """``nightly`` acts as itself (client credentials): its token's subject is its client id.
    No approver rule names anyone for a delete, so its owner pat confirms it; a key vouching
    for a person named ``nightly`` is refused, and the request lists pat as its confirmer."""
    db = Database(bastion.database)
    try:
        create_user(OAuthStore(db), "pat", "owners-test-password", time.time(), actor="test")
        FactStore(db).apply([owner_fact("nightly", "pat")], actor="test")
    finally:
        db.close()
    held = bastion.holder.hold(DELETE, subject="nightly", client_id="nightly")
    with bastion.client() as api:
        r = api.post(f"/v1/approvals/{held.id}/approve", json={"approver": "nightly"})
        assert_problem(r, 403, "is an agent of this call")
        unchanged(bastion, held.id)
        listed = api.get("/v1/approvals", params={"approver": "pat"}).json()["approvals"]
        assert held.id in [found["id"] for found in listed]
        as_agent = api.get("/v1/approvals", params={"approver": "nightly"}).json()["approvals"]
        assert held.id not in [found["id"] for found in as_agent]
        r = api.post(f"/v1/approvals/{held.id}/approve", json={"approver": "pat"})
    assert r.status_code == 200 and r.json()["status"] == "approved", r.text
    assert (r.json()["person"], r.json()["confirmer"]) == (False, "pat")


def test_a_second_answer_is_refused(bastion):
    held = bastion.holder.hold(SEND)
    with bastion.client() as api:
        first = api.post(f"/v1/approvals/{held.id}/approve", json={"approver": "avery"})
        assert first.status_code == 200, first.text
        again = api.post(f"/v1/approvals/{held.id}/approve", json={"approver": "avery"})
        assert_problem(again, 403, "approved, not pending")
        reversed_ = api.post(f"/v1/approvals/{held.id}/deny", json={"approver": "avery"})
        assert_problem(reversed_, 403, "not pending")
        after = api.get(f"/v1/approvals/{held.id}").json()
    assert after["status"] == "approved" and len(after["answers"]) == 1


def test_an_expired_request_cannot_be_answered(bastion):
    an_hour_ago = time.time() - 3600
    old = Holder(bastion.database, bastion.server.log.parent / "keys", bastion.server.url)
    old.approvals.clock = old.approvals.store.clock = lambda: an_hour_ago
    try:
        held = old.hold(SEND)
    finally:
        old.close()
    with bastion.client() as api:
        r = api.post(f"/v1/approvals/{held.id}/approve", json={"approver": "avery"})
    assert_problem(r, 403, "expired")
    unchanged(bastion, held.id)


def test_a_denial_keeps_its_reason(bastion):
    held = bastion.holder.hold(SEND)
    with bastion.client() as api:
        r = api.post(
            f"/v1/approvals/{held.id}/deny", json={"approver": "avery", "reason": "not today"}
        )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "denied"
    assert r.json()["answers"][0]["reason"] == "not today"


# -- approvals for a time, reviews ----------------------------------------------------------------


def test_an_approval_for_minutes_is_bounded_by_the_policy_and_stored_as_an_expiring_fact(bastion):
    held = bastion.holder.hold(SEND)
    with bastion.client() as api:
        r = api.post(f"/v1/approvals/{held.id}/approve", json={"approver": "avery", "minutes": 31})
        assert_problem(r, 403, "30 minutes at most")
        before = time.time()
        r = api.post(f"/v1/approvals/{held.id}/approve", json={"approver": "avery", "minutes": 15})
        assert r.status_code == 200 and r.json()["status"] == "approved", r.text
    with bastion.client("admin") as admin:
        pattern = '{"predicate": "approval_grant", "args": [null, null, null, null]}'
        grants = admin.get("/v1/facts", params={"pattern": pattern}).json()["facts"]
    [grant] = grants
    assert grant["args"][0] == {"type": "User", "id": "sam"}
    assert before + 15 * 60 - 5 <= grant["expires_at"] <= time.time() + 15 * 60


def test_a_shorter_window_whose_condition_cannot_be_decided_bounds_an_approval_for_minutes(
    bastion,
):
    """An amount of "5000" cannot be compared with 1000: the 5-minute window for large amounts
    may hold, and bounds the approval the server takes (before, it gave 30 minutes). The holder
    here read the window without the call's arguments (30 minutes); the server reads it again,
    with them, when the answer comes."""
    held = bastion.holder.hold(SEND, {"to": "ceo@example.com", "amount": "5000"})
    assert held.window_minutes == 30
    with bastion.client() as api:
        r = api.post(f"/v1/approvals/{held.id}/approve", json={"approver": "avery", "minutes": 30})
        assert_problem(r, 403, "5 minutes at most")
        unchanged(bastion, held.id)
        r = api.post(f"/v1/approvals/{held.id}/approve", json={"approver": "avery", "minutes": 5})
        assert r.status_code == 200 and r.json()["status"] == "approved", r.text


def test_a_held_result_is_released_with_fields_withheld_and_takes_no_minutes(bastion):
    result = {"structuredContent": {"customers": [{"email": "a@b"}]}}
    held = bastion.holder.hold(REPORT, kind="review", result=result)
    with bastion.client() as api:
        r = api.post(f"/v1/approvals/{held.id}/approve", json={"approver": "avery", "minutes": 5})
        assert_problem(r, 403, "takes no minutes")
        r = api.post(
            f"/v1/approvals/{held.id}/approve",
            json={"approver": "avery", "withheld_fields": ["customers.*.email"]},
        )
    assert r.status_code == 200, r.text
    released = r.json()
    assert (released["kind"], released["status"]) == ("review", "released")
    assert released["withheld_fields"] == ["customers.*.email"]
    assert "result" not in released  # a held result is never shown by the API


def test_a_withheld_field_that_matches_nothing_is_refused_naming_it_and_changes_nothing(bastion):
    """A mistyped field to withhold: before, the result was released (200) with the mistyped
    path withholding nothing; now a 422 names the path, and the review stays pending."""
    result = {"structuredContent": {"customers": [{"email": "ada@example.com"}]}}
    held = bastion.holder.hold(REPORT, kind="review", result=result)
    with bastion.client() as api:
        r = api.post(
            f"/v1/approvals/{held.id}/approve",
            json={
                "approver": "avery",
                "withheld_fields": ["customers.*.email", "customers.*.emial"],
            },
        )
    body = assert_problem(r, 422, "'customers.*.emial' matches nothing", "nothing was released")
    assert "'customers.*.email'" not in body["detail"]
    unchanged(bastion, held.id)


def test_a_reviewer_sees_the_held_result_masked_for_them_and_nobody_else_sees_it(bastion):
    customers = {"customers": [{"name": "Ada", "email": "ada@example.com"}]}
    result = {
        "content": [{"type": "text", "text": json.dumps(customers)}],
        "structuredContent": customers,
    }
    held = bastion.holder.hold(REPORT, kind="review", result=result)
    url = f"/v1/approvals/{held.id}"
    with bastion.client() as api:
        assert "result" not in api.get(url).json()
        full = api.get(url, params={"reviewer": "avery"}).json()["result"]
        masked = api.get(url, params={"reviewer": "cfo"}).json()["result"]
        assert_problem(api.get(url, params={"reviewer": "mallory"}), 403, "not an approver")
        assert_problem(api.get(url, params={"reviewer": "sam"}), 403, "may not review")
        call = bastion.holder.hold(SEND)
        r = api.get(f"/v1/approvals/{call.id}", params={"reviewer": "avery"})
        assert_problem(r, 422, "nothing to review")
    assert full["structuredContent"] == customers
    with Client(bastion.server.url, bastion.keys["approvals"]) as client:
        assert client.approval(held.id, reviewer="avery")["result"] == full
    [customer] = masked["structuredContent"]["customers"]
    assert customer["name"] == "Ada" and customer["email"] != "ada@example.com"
    assert "ada@example.com" not in json.dumps(masked)


def test_fields_are_withheld_from_results_not_from_calls(bastion):
    held = bastion.holder.hold(SEND)
    with bastion.client() as api:
        r = api.post(
            f"/v1/approvals/{held.id}/approve",
            json={"approver": "avery", "withheld_fields": ["to"]},
        )
    assert_problem(r, 403, "results under review")
    unchanged(bastion, held.id)


def test_the_python_client_lists_reads_and_answers_with_the_reason_of_a_refusal(bastion):
    held = bastion.holder.hold(SEND)
    other = bastion.holder.hold(SEND)
    with Client(bastion.server.url, bastion.keys["approvals"]) as client:
        assert held.id in [r["id"] for r in client.list_approvals(status="pending", limit=200)]
        assert client.approval(held.id)["arguments"] == held.arguments
        with pytest.raises(RemoteError) as refused:
            client.approve(held.id, "mallory")
        assert refused.value.status == 403 and "not an approver" in refused.value.detail
        with pytest.raises(RemoteError) as unknown:
            client.approval("a/../../keys")
        assert unknown.value.status == 404
        assert client.approve(held.id, "avery", reason="ok")["status"] == "approved"
        assert client.deny(other.id, "avery", reason="no")["status"] == "denied"


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"not json", ("JSON",)),
        (b"[]", ("JSON object",)),
        (b"{}", ("approver", "required")),
        (b'{"approver": 7}', ("approver", "string")),
        (b'{"approver": ""}', ("approver",)),
        (('{"approver": "' + "a" * 129 + '"}').encode(), ("128",)),
        (b'{"approver": "avery", "minutes": -1}', ("minutes",)),
        (b'{"approver": "avery", "minutes": 1.5}', ("minutes", "integer")),
        (b'{"approver": "avery", "minutes": true}', ("minutes",)),
        (('{"approver": "avery", "reason": "' + "r" * 2001 + '"}').encode(), ("2000",)),
        (b'{"approver": "avery", "withheld_fields": "to"}', ("withheld_fields", "array")),
        (b'{"approver": "avery", "withheld_fields": [""]}', ("withheld_fields",)),
        (b'{"approver": "avery", "withheld_fields": [7]}', ("withheld_fields",)),
        (
            (
                '{"approver": "avery", "withheld_fields": [' + ",".join(['"a"'] * 101) + "]}"
            ).encode(),
            ("at most 100",),
        ),
    ],
)
def test_a_bad_body_is_refused_with_what_to_fix_and_changes_nothing(bastion, body, words):
    held = bastion.holder.hold(SEND)
    with bastion.client() as api:
        r = api.post(
            f"/v1/approvals/{held.id}/approve",
            content=body,
            headers={"content-type": "application/json"},
        )
    assert_problem(r, 400, *words)
    unchanged(bastion, held.id)


@pytest.mark.parametrize("name", [" avery", "avery\n", "av\u202eery", "avery\u3164", "a  very"])
def test_a_name_no_user_can_have_is_refused_before_the_policy_is_asked(bastion, name):
    held = bastion.holder.hold(SEND)
    with bastion.client() as api:
        r = api.post(f"/v1/approvals/{held.id}/approve", json={"approver": name})
    assert_problem(r, 422, "cannot be a user's name")
    unchanged(bastion, held.id)


# -- without a gateway ---------------------------------------------------------------------------


def test_a_server_without_a_gateway_says_it_has_no_approvals(tmp_path):
    server = ServerProcess(str(tmp_path / "plain.db"), tmp_path).start()
    try:
        with server.client() as api:
            answers = [
                api.get("/v1/approvals"),
                api.get("/v1/approvals/x"),
                api.post("/v1/approvals/x/approve", json={"approver": "avery"}),
            ]
    finally:
        server.stop()
    for r in answers:
        assert_problem(r, 503, "[gateway]")


def test_a_held_result_holding_text_no_utf8_answer_holds_is_shown_as_its_escape(bastion):
    """An upstream's result may hold half of a surrogate pair (bastion relays what it sent):
    held for review, the reviewer reads it through the API (a 500 before: the answer, UTF-8,
    could not hold it) and on the page, each time as its escape."""
    from bastion.approvals.pages import _json

    result = {"content": [{"type": "text", "text": "odd \ud800 text"}], "isError": False}
    held = bastion.holder.hold(REPORT, kind="review", result=result)
    with bastion.client() as api:
        r = api.get(f"/v1/approvals/{held.id}", params={"reviewer": "avery"})
    assert r.status_code == 200, r.text
    assert b"odd \\ud800 text" in r.content and r.content.isascii()
    assert r.json()["result"] == result
    page = _json(result)
    page.encode("utf-8")  # the page's text is Unicode: the surrogate is written as its escape
    assert "odd \\ud800 text" in page


# -- a replica that must not decide ------------------------------------------------------------


def test_a_replica_that_cannot_load_the_policy_in_force_answers_no_approval(bastion, tmp_path):
    """Who may answer is the policy's: a replica on the same database that cannot load the
    policy in force (a smaller policy_max_bytes) refuses every answer with 503, as /v1 and the
    gateway refuse then, and records none; it answered under the policy no longer in force."""
    held = bastion.holder.hold(SEND)
    other = ServerProcess(
        bastion.database, tmp_path, env={**bastion.server.env, "BASTION_POLICY_MAX_BYTES": "4096"}
    )
    other.start()
    with bastion.server.client() as admin:
        old = admin.get("/v1/policy").json()["text"]
    try:
        with bastion.server.client() as admin:
            r = admin.put("/v1/policy", json={"text": old + "\n# " + "x" * 8192 + "\n"})
            assert r.status_code == 200, r.text
        with httpx.Client(base_url=other.url, timeout=30) as probe:
            eventually(lambda: probe.get("/readyz").status_code != 200, every=0.05)
        headers = {"authorization": f"Bearer {bastion.keys['approvals']}"}
        with httpx.Client(base_url=other.url, headers=headers, timeout=30) as api:
            r = api.post(f"/v1/approvals/{held.id}/approve", json={"approver": "avery"})
            assert_problem(r, 503, "policy_max_bytes")
            # Reading it is not deciding: still shown.
            assert api.get(f"/v1/approvals/{held.id}").json()["status"] == "pending"
        unchanged(bastion, held.id)
    finally:
        with bastion.server.client() as admin:
            admin.put("/v1/policy", json={"text": old})
        other.stop()
