"""What bastion's AuthZEN endpoints refuse, and the decision contract behind them: API keys and
their scope, the batch semantics, the properties' names in the context, page tokens, limits,
and the obligations in the response context. Each against a real `bastion serve` over HTTPS."""

from __future__ import annotations

import base64
import json
import sqlite3

import pytest

from tests.authzen.conftest import EXAMPLE, HttpsServer
from tests.server.conftest import ADMIN_KEY

ALICE = {"type": "user", "id": "alice"}
BOB = {"type": "user", "id": "bob"}
RECORD_1 = {"type": "record", "id": "record-1"}
RECORD_2 = {"type": "record", "id": "record-2"}
READ, WRITE = {"name": "read"}, {"name": "write"}
DOC = {"type": "doc", "id": "d1"}
ALLOWED = {"subject": ALICE, "action": READ, "resource": RECORD_1}
EVALUATION = "/access/v1/evaluation"
EVALUATIONS = "/access/v1/evaluations"
PATHS = [
    EVALUATION,
    EVALUATIONS,
    "/access/v1/search/subject",
    "/access/v1/search/resource",
    "/access/v1/search/action",
]


# -- keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_no_key_or_an_unknown_key_is_401_and_decides_nothing(fixture_pdp, path):
    for key in (None, "bst_nope_" + "x" * 40):
        with fixture_pdp.client(key) as client:
            response = client.post(path, json=ALLOWED)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "decision" not in response.text and "results" not in response.text


@pytest.mark.parametrize("path", PATHS)
def test_a_key_without_the_authzen_scope_is_403(fixture_pdp, path):
    key = fixture_pdp.create_key("decide", "facts:read")
    with fixture_pdp.client(key) as client:
        response = client.post(path, json=ALLOWED)
    assert response.status_code == 403
    assert "authzen" in response.text


def test_a_revoked_authzen_key_is_401(fixture_pdp):
    key = fixture_pdp.create_key("authzen")
    with fixture_pdp.client(key) as client:
        assert client.post(EVALUATION, json=ALLOWED).status_code == 200
    key_id = key.split("_")[1]
    with fixture_pdp.client(ADMIN_KEY) as admin:
        assert admin.delete(f"/v1/keys/{key_id}").status_code in (200, 204)
    with fixture_pdp.client(key) as client:
        assert client.post(EVALUATION, json=ALLOWED).status_code == 401


def test_the_metadata_is_public_and_the_v1_api_does_not_take_an_authzen_key(fixture_pdp, pep):
    with fixture_pdp.client() as anonymous:
        assert anonymous.get("/.well-known/authzen-configuration").status_code == 200
    check = {"actor": ALICE, "action": "read", "resource": RECORD_1}
    assert pep.post("/v1/authorize", json=check).status_code == 403


# -- bodies --------------------------------------------------------------------------------------


def test_a_body_past_max_body_bytes_is_413_and_one_nested_too_deep_is_400(pep):
    big = {**ALLOWED, "context": {"pad": "x" * 1_100_000}}
    response = pep.post(EVALUATION, json=big)
    assert response.status_code == 413 and "max_body_bytes" in response.text
    assert response.headers["content-type"].startswith("text/plain")
    deep: dict = {}
    for _ in range(100):
        deep = {"a": deep}
    response = pep.post(EVALUATION, json={**ALLOWED, "context": deep})
    assert response.status_code == 400 and "deep" in response.text.lower()


def test_a_member_named_twice_in_one_object_is_400_never_read_as_one_of_them(pep):
    # Authorization API 1.0, §11.5 "JSON Payload Considerations": member names within a JSON
    # object SHOULD be unique (I-JSON, RFC 7493 §2.3). A parser that keeps the first and one
    # that keeps the last read two questions from one body: a proxy or a PEP's log checks bob,
    # and the decision is alice's. Refused whole, wherever the name repeats.
    twice = (
        '{"subject": {"type": "user", "id": "bob"}, "subject": {"type": "user", "id": "alice"},'
        ' "action": {"name": "write"}, "resource": {"type": "record", "id": "record-1"}}'
    )
    nested = (
        '{"subject": {"type": "user", "id": "bob", "id": "alice"},'
        ' "action": {"name": "write"}, "resource": {"type": "record", "id": "record-1"}}'
    )
    item = (
        '{"evaluations": [{"subject": {"type": "user", "id": "alice"}, "action": {"name":'
        ' "read", "name": "write"}, "resource": {"type": "record", "id": "record-1"}}]}'
    )
    headers = {"content-type": "application/json", "X-Request-ID": "rid-twice"}
    for path, body, name in (
        (EVALUATION, twice, "subject"),
        (EVALUATION, nested, "id"),
        (EVALUATIONS, item, "name"),
    ):
        response = pep.post(path, content=body, headers=headers)
        assert response.status_code == 400, response.text
        assert f"'{name}'" in response.text and "twice" in response.text
        assert response.headers["content-type"].startswith("text/plain")
        assert response.headers["x-request-id"] == "rid-twice"


def test_json_with_a_charset_is_json(pep):
    body = json.dumps(ALLOWED).encode()
    headers = {"content-type": "application/json; charset=utf-8"}
    assert pep.post(EVALUATION, content=body, headers=headers).json() == {"decision": True}


# -- answers made before the route: request identifier and error form -------------------------


def test_an_answer_made_before_the_route_echoes_x_request_id_as_an_error_string(pep):
    # The spec: the PDP MUST echo the PEP's X-Request-ID on its answer to that request, and an
    # error is its status with an error message string. The body limit (413), a NUL in the path
    # (400), a multipart body (415) and a method the endpoint does not take (405) are answered
    # before the AuthZEN route runs; a PEP matches their answers to its requests all the same.
    rid = {"X-Request-ID": "rid-early"}
    big = {**ALLOWED, "context": {"pad": "x" * 1_100_000}}
    multipart = {**rid, "content-type": "multipart/form-data; boundary=x"}
    answers = {
        413: pep.post(EVALUATION, json=big, headers=rid),
        400: pep.post(EVALUATION + "%00", json=ALLOWED, headers=rid),
        415: pep.post(EVALUATION, content=b"--x--", headers=multipart),
        405: pep.get(EVALUATION, headers=rid),
    }
    for status, response in answers.items():
        assert response.status_code == status, response.text
        assert response.headers.get("x-request-id") == "rid-early", status
        assert response.headers["content-type"].startswith("text/plain"), status
        assert response.text


def test_every_error_string_is_text_a_browser_never_reads_as_a_page(pep, fixture_pdp):
    # An error string quotes what it was sent: the path of a link a browser was sent to
    # included. It is text/plain, and says so with nosniff, as every other route family's
    # error answer does (`bastion.server.problems.NOT_A_PAGE`).
    markup = "%3Cscript%3Ealert(1)%3C%2Fscript%3E"
    bad_action = {**ALLOWED, "action": {"name": "read", "properties": "<b>x</b>"}}
    multipart = {"content-type": "multipart/form-data; boundary=x"}
    with fixture_pdp.client(None) as anonymous:
        answers = {
            400: pep.post(EVALUATION, json=bad_action),
            401: anonymous.post(EVALUATION, json=ALLOWED),
            404: pep.get(f"/access/v1/{markup}"),
            405: pep.get(EVALUATION),
            413: pep.post(EVALUATION, json={**ALLOWED, "context": {"pad": "x" * 1_100_000}}),
            415: pep.post(EVALUATION, content=b"--x--", headers=multipart),
        }
    assert "<script>" in answers[404].text
    for status, response in answers.items():
        assert response.status_code == status, (status, response.text)
        assert response.headers["content-type"].startswith("text/plain"), status
        assert response.headers.get("x-content-type-options") == "nosniff", (status, response.text)


@pytest.mark.parametrize("path", PATHS)
def test_an_endpoint_with_a_trailing_slash_is_404_never_a_redirect(pep, path):
    # §10.1: the request URL MUST be the endpoint's. A redirect to it would have the PEP send
    # its key and its question again, to a URL built from the request (http, behind a proxy
    # that terminates TLS); a 404 says the PEP's URL is wrong.
    response = pep.post(path + "/", json=ALLOWED, headers={"X-Request-ID": "rid-slash"})
    assert response.status_code == 404, (response.status_code, response.headers)
    assert "location" not in response.headers
    assert response.headers["content-type"].startswith("text/plain")
    assert response.headers["x-request-id"] == "rid-slash"


def test_an_unexpected_failure_is_a_500_string_that_echoes_x_request_id(tmp_path, certificate):
    server = HttpsServer(tmp_path, EXAMPLE / "policy.polar", certificate).start()
    try:
        key = server.create_key("authzen")
        # Pull the key table from under the running server: its next key check fails.
        with sqlite3.connect(server.database) as db:
            db.execute("ALTER TABLE api_keys RENAME TO api_keys_gone")
        with server.client(key) as pep:
            response = pep.post(EVALUATION, json=ALLOWED, headers={"X-Request-ID": "rid-500"})
    finally:
        server.stop()
    assert response.status_code == 500
    assert response.headers.get("x-request-id") == "rid-500"
    assert response.headers["content-type"].startswith("text/plain")
    assert "decision" not in response.text and "api_keys" not in response.text


# -- batch semantics -----------------------------------------------------------------------------


def semantic(name: str | None, *resources: dict) -> dict:
    return {
        "subject": BOB,
        "action": READ,
        "options": {"evaluations_semantic": name},
        "evaluations": [{"resource": r} for r in resources],
    }


def test_execute_all_answers_every_evaluation_in_order(pep):
    answers = pep.post(EVALUATIONS, json=semantic("execute_all", RECORD_1, RECORD_2, RECORD_1))
    assert [a["decision"] for a in answers.json()["evaluations"]] == [True, False, True]


def test_a_null_semantic_is_the_default_execute_all_as_any_null_field_is_absent(pep):
    # The spec asks senders to leave out null fields rather than send them; a PEP that sends
    # "evaluations_semantic": null anyway means no semantic, as a null context or properties do.
    answers = pep.post(EVALUATIONS, json=semantic(None, RECORD_1, RECORD_2, RECORD_1))
    assert answers.status_code == 200, answers.text
    assert [a["decision"] for a in answers.json()["evaluations"]] == [True, False, True]


def test_deny_on_first_deny_stops_at_the_first_denial(pep):
    answers = pep.post(
        EVALUATIONS, json=semantic("deny_on_first_deny", RECORD_1, RECORD_2, RECORD_1)
    )
    assert [a["decision"] for a in answers.json()["evaluations"]] == [True, False]
    # An evaluation that cannot be read is a denial too.
    body = semantic("deny_on_first_deny", RECORD_1)
    body["evaluations"] += [{"resource": {"type": "record"}}, {"resource": RECORD_1}]
    answers = pep.post(EVALUATIONS, json=body).json()["evaluations"]
    assert [a["decision"] for a in answers] == [True, False]
    assert "resource.id" in answers[1]["context"]["error"]["message"]


def test_permit_on_first_permit_stops_at_the_first_permit(pep):
    body = semantic("permit_on_first_permit", RECORD_2, RECORD_1, RECORD_2)
    answers = pep.post(EVALUATIONS, json=body).json()["evaluations"]
    assert [a["decision"] for a in answers] == [False, True]


def test_an_unknown_semantic_or_a_malformed_default_refuses_the_whole_batch(pep):
    for unknown in ("all_or_nothing", "", "EXECUTE_ALL"):
        assert pep.post(EVALUATIONS, json=semantic(unknown, RECORD_1)).status_code == 400
    body = {"subject": "alice", "action": READ, "evaluations": [{"resource": RECORD_1}]}
    assert pep.post(EVALUATIONS, json=body).status_code == 400
    body = {"subject": ALICE, "action": READ, "evaluations": {"resource": RECORD_1}}
    assert pep.post(EVALUATIONS, json=body).status_code == 400


def test_a_batch_over_authzen_max_evaluations_is_refused(pep):
    body = {"subject": ALICE, "action": READ, "evaluations": [{"resource": RECORD_1}] * 1001}
    response = pep.post(EVALUATIONS, json=body)
    assert response.status_code == 400 and "authzen_max_evaluations" in response.text
    body["evaluations"] = body["evaluations"][:1000]
    assert len(pep.post(EVALUATIONS, json=body).json()["evaluations"]) == 1000


def test_the_ids_of_a_batch_are_a_range_that_leads_to_each_decision(pep, fixture_pdp):
    """A batch's ids as a range, not a list: 1,000 of them made a header of some 15 KB, which
    a reverse proxy with the usual 4-8 KB for an answer's head turns into a 502."""
    bob = {"type": "user", "id": "bob"}
    evaluations = [{}, {"resource": {"type": "record"}}, {"subject": bob}]
    body = {"subject": ALICE, "action": READ, "resource": RECORD_1}
    response = pep.post(EVALUATIONS, json={**body, "evaluations": evaluations * 333 + [{}]})
    assert response.status_code == 200, response.text
    head = sum(len(name) + len(value) + 4 for name, value in response.headers.items())
    assert head < 4096, head
    answers = response.json()["evaluations"]
    decided = [n for n, a in enumerate(answers) if "error" not in a.get("context", {})]
    assert len(answers) == 1000 and len(decided) == 667
    first, last = response.headers["X-Bastion-Decision-Ids"].split("..")
    prefix, start = first.rsplit("-", 1)
    assert last == f"{prefix}-{int(start) + 666}"
    with fixture_pdp.client(ADMIN_KEY) as admin:
        for k in (0, 1, 666):
            kept = admin.get(f"/v1/decisions/{prefix}-{int(start) + k}").json()
            assert kept["result"] is answers[decided[k]]["decision"]
            assert kept["request"]["actor"]["id"] == ("bob" if k % 2 else "alice")
    one_error = {"subject": ALICE, "action": READ, "evaluations": [{"resource": {"type": "x"}}]}
    response = pep.post(EVALUATIONS, json=one_error)
    assert response.status_code == 200 and "X-Bastion-Decision-Ids" not in response.headers


# -- properties and context ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["subject", "resource", "action"])
def test_the_request_context_may_not_use_the_names_of_the_properties(pep, name):
    """``context.subject`` is the subject's properties: a request context that says otherwise
    would let the PEP's context and its properties disagree about the same name."""
    body = {**ALLOWED, "context": {name: {"role": "admin"}}}
    response = pep.post(EVALUATION, json=body)
    assert response.status_code == 400 and f"context.{name}" in response.text
    # Not even to raise a subject to administrator through the back door.
    archived = {**RECORD_2, "properties": {"status": "archived"}}
    body = {"subject": BOB | {"id": "carol"}, "action": WRITE, "resource": archived}
    assert pep.post(EVALUATION, json=body).json() == {"decision": False}
    body["context"] = {"subject": {"role": "admin"}}
    assert pep.post(EVALUATION, json=body).status_code == 400


@pytest.mark.parametrize("properties", ["admin", ["role", "admin"], 7])
def test_properties_that_are_not_an_object_are_400(pep, properties):
    body = {**ALLOWED, "subject": {**ALICE, "properties": properties}}
    assert pep.post(EVALUATION, json=body).status_code == 400


# -- search pages --------------------------------------------------------------------------------


def test_a_page_token_is_bound_to_its_search(pep):
    body = {"subject": {"type": "user"}, "action": READ, "resource": RECORD_1, "page": {"limit": 1}}
    token = pep.post("/access/v1/search/subject", json=body).json()["page"]["next_token"]
    assert token
    # Another action with the same token: refused, not answered from the other search's place.
    other = {**body, "action": WRITE, "page": {"limit": 1, "token": token}}
    response = pep.post("/access/v1/search/subject", json=other)
    assert response.status_code == 422 and "another search" in response.text
    # Another limit: refused too.
    other = {**body, "page": {"limit": 2, "token": token}}
    assert pep.post("/access/v1/search/subject", json=other).status_code == 422
    # Other page.properties: refused too. §8.2.1 "Paginated Requests": apart from the token,
    # all values of the initial request MUST remain identical, and the PDP SHOULD return an
    # error when one is changed.
    first = {**body, "page": {"limit": 1, "properties": {"sort": "id"}}}
    token = pep.post("/access/v1/search/subject", json=first).json()["page"]["next_token"]
    for properties in ({"sort": "-id"}, None):
        other = {**body, "page": {"limit": 1, "token": token, "properties": properties}}
        response = pep.post("/access/v1/search/subject", json=other)
        assert response.status_code == 422, (properties, response.text)
    same = {**body, "page": {"limit": 1, "token": token, "properties": {"sort": "id"}}}
    assert pep.post("/access/v1/search/subject", json=same).status_code == 200
    # A token made up by the client: refused.
    forged = base64.urlsafe_b64encode(json.dumps({"a": "a", "q": "0" * 32}).encode()).decode()
    for bad in (forged, "not a token", "eyJ"):
        other = {**body, "page": {"limit": 1, "token": bad}}
        assert pep.post("/access/v1/search/subject", json=other).status_code == 422


@pytest.mark.parametrize("kind", ["subject", "resource", "action"])
def test_a_page_token_of_hostile_json_is_refused_not_a_server_error(pep, kind):
    # The token is the client's to send: what it decodes to is anyone's JSON, read as the body
    # is (bounded nesting, each name once), so a token of JSON nested thousands deep is the 422
    # of a token not issued here, not a RecursionError's 500.
    body = {
        "subject": {"type": "user"} if kind == "subject" else ALICE,
        "action": READ,
        "resource": {"type": "record"} if kind == "resource" else RECORD_1,
    }
    if kind == "action":
        del body["action"]
    for decoded in ("[" * 100_000, '{"a": null, "q": "x", "n": 1, "n": 2}', '{"a": "\\ud800"}'):
        token = base64.urlsafe_b64encode(decoded.encode()).decode().rstrip("=")
        response = pep.post(f"/access/v1/search/{kind}", json={**body, "page": {"token": token}})
        assert response.status_code == 422, (decoded[:40], response.status_code, response.text)
        assert "not a token this server issued" in response.text


def test_a_page_limit_of_0_answers_the_count_and_ends_the_search(pep):
    # A PEP follows next_token until it is "": a page of 0 results that handed back a token
    # would be asked for again, forever, with nothing to show for it.
    body = {"subject": {"type": "user"}, "action": READ, "resource": RECORD_1}
    everyone = pep.post("/access/v1/search/subject", json=body).json()["page"]["total"]
    assert everyone >= 2
    answer = pep.post("/access/v1/search/subject", json={**body, "page": {"limit": 0}}).json()
    assert answer["results"] == []
    assert answer["page"] == {"next_token": "", "count": 0, "total": everyone}


@pytest.mark.parametrize(
    "page",
    # §8.2.1 "Paginated Requests": limit a non-negative integer, token a string, properties
    # an object.
    [{"limit": -1}, {"limit": "2"}, {"limit": 1.5}, {"token": 3}, {"properties": 5}, "x"],
)
def test_a_malformed_page_is_400(pep, page):
    body = {"subject": {"type": "user"}, "action": READ, "resource": RECORD_1, "page": page}
    assert pep.post("/access/v1/search/subject", json=body).status_code == 400


# -- obligations (the decision contract) ------------------------------------------------------

OBLIGATIONS = """
actor user {}
resource doc {
  roles = ["reader"];
  permissions = ["read", "export", "delete", "share", "review"];
  "read" if "reader"; "export" if "reader"; "delete" if "reader";
  "share" if "reader"; "review" if "reader";
}
mask(_u: user, "read", _d: doc, "ssn");
mask(_u: user, "read", _d: doc, "salary");
rate_limit(_u: user, "export", _d: doc, 10, 60);
requires_scope("delete", _d: doc, "docs:delete");
requires_approval(_u: user, "share", _d: doc);
requires_review(_u: user, "review", _d: doc);
resource Tool {
  roles = ["caller"];
  permissions = ["call"];
  "call" if "caller";
}
resource McpServer {}
read_only(_u: user, McpServer{"prod"});
"""


@pytest.fixture(scope="module")
def obligations_pdp(tmp_path_factory, certificate):
    tmp = tmp_path_factory.mktemp("authzen-obligations")
    policy = tmp / "policy.polar"
    policy.write_text(OBLIGATIONS)
    server = HttpsServer(tmp, policy, certificate).start()
    try:
        with server.client(ADMIN_KEY) as admin:
            facts = [
                {"predicate": "has_role", "args": [ALICE, "reader", {"type": "doc", "id": "d1"}]},
                *(
                    {"predicate": "has_role", "args": [ALICE, "caller", tool]}
                    for tool in (PROD_TOOL, DEV_TOOL)
                ),
            ]
            assert admin.post("/v1/facts", json={"facts": facts}).status_code == 200
        server.key = server.create_key("authzen")
        yield server
    finally:
        server.stop()


PROD_TOOL = {"type": "Tool", "id": "prod/delete"}
DEV_TOOL = {"type": "Tool", "id": "dev/delete"}


def ask(pdp: HttpsServer, action: str, subject: dict = ALICE, on: dict = DOC, **context) -> dict:
    body = {"subject": subject, "action": {"name": action}, "resource": on}
    if context:
        body["context"] = context
    with pdp.client(pdp.key) as pep:
        response = pep.post(EVALUATION, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def obligation(answer: dict) -> dict:
    """The one obligation of an answer, checked against the profile's shape."""
    (found,) = answer["context"]["obligations"]
    assert set(found) == {"id", "type", "properties"} and found["id"] == "obl-1"
    assert found["type"] == "custom" and found["properties"]["vendor"] == "bastion"
    return found["properties"]


def test_masks_are_an_obligation_of_a_permit(obligations_pdp):
    answer = ask(obligations_pdp, "read")
    assert answer["decision"] is True
    assert obligation(answer) == {"vendor": "bastion", "name": "mask", "paths": ["salary", "ssn"]}


def test_a_rate_limit_is_an_obligation_of_a_permit(obligations_pdp):
    answer = ask(obligations_pdp, "export")
    assert answer["decision"] is True
    assert obligation(answer) == {
        "vendor": "bastion",
        "name": "rate_limit",
        "max": 10,
        "seconds": 60,
    }


def test_a_required_scope_the_caller_does_not_show_is_a_denial_asking_for_it(obligations_pdp):
    for context in ({}, {"scopes": ["docs:read"]}, {"scopes": "docs:read docs:write"}):
        answer = ask(obligations_pdp, "delete", **context)
        assert answer["decision"] is False
        assert obligation(answer) == {
            "vendor": "bastion",
            "name": "requires_scope",
            "scopes": ["docs:delete"],
            "missing": ["docs:delete"],
        }
    for context in ({"scopes": ["docs:delete"]}, {"scopes": "docs:read docs:delete"}):
        assert ask(obligations_pdp, "delete", **context) == {"decision": True}


def test_malformed_scopes_are_400(obligations_pdp):
    body = {
        "subject": ALICE,
        "action": {"name": "delete"},
        "resource": {"type": "doc", "id": "d1"},
        "context": {"scopes": [1, 2]},
    }
    with obligations_pdp.client(obligations_pdp.key) as pep:
        assert pep.post(EVALUATION, json=body).status_code == 400


def test_a_call_that_needs_approval_is_denied_until_approved(obligations_pdp):
    answer = ask(obligations_pdp, "share")
    assert answer["decision"] is False
    assert obligation(answer) == {"vendor": "bastion", "name": "requires_approval"}


def test_a_review_is_an_obligation_of_a_permit(obligations_pdp):
    answer = ask(obligations_pdp, "review")
    assert answer["decision"] is True
    assert obligation(answer) == {"vendor": "bastion", "name": "requires_review"}


def test_obligations_never_turn_a_denial_into_a_permit(obligations_pdp):
    """Someone with no role is denied, with nothing to carry out."""
    stranger = {"type": "user", "id": "mallory"}
    for action in ("read", "export", "share", "review"):
        assert ask(obligations_pdp, action, subject=stranger) == {"decision": False}
    assert ask(obligations_pdp, "delete", subject=stranger, scopes=["docs:delete"]) == {
        "decision": False
    }


def test_a_tool_call_under_read_only_is_a_denial_whatever_server_the_context_names(
    obligations_pdp,
):
    """`read_only(actor, McpServer{...})` is the gateway's downgrade: only tools annotated
    readOnlyHint may be called on that server. An AuthZEN answer had no word for it, so a PEP
    was told a plain permit for a write; and it was asked only of the server the context named,
    so a PEP that named none (or another) lost it. Now a write under it is refused, asked of the
    server the tool is on, as the gateway refuses it."""
    refused = {"decision": False, "context": {"reason": "read_only"}}
    contexts = (
        {"server": "prod"},
        {},
        {"server": "dev"},
        {"server": "prod", "annotations": {"readOnlyHint": False}},
        {"server": "prod", "annotations": {"readOnlyHint": True}, "passed_through": True},
    )
    for context in contexts:
        assert ask(obligations_pdp, "call", on=PROD_TOOL, **context) == refused, context
    assert ask(obligations_pdp, "call", on=DEV_TOOL, server="dev") == {"decision": True}
    batch = {
        "subject": ALICE,
        "action": {"name": "call"},
        "evaluations": [{"resource": PROD_TOOL}, {"resource": DEV_TOOL}],
    }
    with obligations_pdp.client(obligations_pdp.key) as pep:
        answers = pep.post(EVALUATIONS, json=batch).json()["evaluations"]
    assert answers == [refused, {"decision": True}]


def test_a_read_only_tool_under_read_only_is_a_permit_that_carries_the_downgrade(
    obligations_pdp,
):
    """A tool the PEP says is annotated read-only may be called, and the answer says the caller
    is downgraded, as `/v1/authorize` says `read_only`: the PEP offers it no other tool."""
    answer = ask(obligations_pdp, "call", on=PROD_TOOL, annotations={"readOnlyHint": True})
    assert answer["decision"] is True
    assert obligation(answer) == {"vendor": "bastion", "name": "read_only"}


def test_each_evaluation_of_a_batch_carries_its_own_obligations(obligations_pdp):
    body = {
        "subject": ALICE,
        "resource": {"type": "doc", "id": "d1"},
        "evaluations": [{"action": {"name": a}} for a in ("read", "export", "share")],
    }
    with obligations_pdp.client(obligations_pdp.key) as pep:
        answers = pep.post(EVALUATIONS, json=body).json()["evaluations"]
    assert [a["decision"] for a in answers] == [True, True, False]
    assert [obligation(a)["name"] for a in answers] == ["mask", "rate_limit", "requires_approval"]


def test_metadata_advertises_the_obligation_type_it_issues(obligations_pdp):
    with obligations_pdp.client() as client:
        document = client.get("/.well-known/authzen-configuration").json()
    assert document["supported_obligations"] == ["custom"]


# -- one evaluation budget per batch -------------------------------------------------------------


SCANS = """
actor user {}
resource doc {}
declare flag(String);
# Reads every flag fact: each evaluation spends a step per flag.
allow(_u: user, "read", _d: doc) if flag(f) and f != "x";
"""


def test_a_batch_spends_one_evaluation_budget_and_is_refused_once_it_is_spent(
    tmp_path_factory, certificate
):
    """Fifty evaluations do not get fifty budgets: once the batch's one budget is spent, every
    evaluation left is false with the reason, and the next request has a budget of its own."""
    tmp = tmp_path_factory.mktemp("authzen-budget")
    policy = tmp / "policy.polar"
    policy.write_text(SCANS)
    server = HttpsServer(tmp, policy, certificate, BASTION_EVALUATION_MAX_STEPS="1000").start()
    try:
        flags = [{"predicate": "flag", "args": [f"f{i}"]} for i in range(100)]
        with server.client(ADMIN_KEY) as admin:
            assert admin.post("/v1/facts", json={"facts": flags}).status_code == 200
        question = {"subject": ALICE, "action": READ, "resource": {"type": "doc", "id": "d"}}
        with server.client(server.create_key("authzen")) as pep:
            body = {"subject": ALICE, "action": READ, "evaluations": [question] * 50}
            answers = pep.post(EVALUATIONS, json=body).json()["evaluations"]
            assert len(answers) == 50
            allowed = [a for a in answers if a["decision"]]
            assert 0 < len(allowed) < 50 and answers[: len(allowed)] == allowed
            refused = answers[len(allowed) :]
            assert all(
                a["context"] == {"reason": "evaluation_limit", "limit": "evaluation_max_steps"}
                for a in refused
            )
            assert pep.post(EVALUATION, json=question).json() == {"decision": True}
    finally:
        server.stop()


UNSEARCHABLE = """
actor user {}
resource doc {}
# Nothing binds the subject: a decision can answer, a search for subjects cannot.
allow(u, "read", _d: doc) if ends_with(u, "@acme.example");
"""


def test_a_search_the_policy_cannot_answer_is_422_as_the_same_query_on_v1_is(
    tmp_path_factory, certificate
):
    """The request is well formed and asking again cannot help: not a 500 (which a PEP retries
    and a monitor counts as a crash), but 422 with the diagnostic, as `/v1/query` answers."""
    tmp = tmp_path_factory.mktemp("authzen-unsearchable")
    policy = tmp / "policy.polar"
    policy.write_text(UNSEARCHABLE)
    server = HttpsServer(tmp, policy, certificate).start()
    try:
        doc = {"type": "doc", "id": "d1"}
        search = {"subject": {"type": "user"}, "action": READ, "resource": doc}
        with server.client(server.create_key("authzen")) as pep:
            r = pep.post("/access/v1/search/subject", json=search)
        assert r.status_code == 422, r.text
        assert "cannot answer" in r.text and "never bound" in r.text
        query = {"predicate": "allow", "args": [{"var": "u"}, "read", doc]}
        with server.client(ADMIN_KEY) as admin:
            assert admin.post("/v1/query", json=query).status_code == 422
    finally:
        server.stop()
