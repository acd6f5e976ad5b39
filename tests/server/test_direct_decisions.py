"""Decisions answered inside the HTTP protocol (`bastion.server.direct`), on a real
``bastion serve``: the same answer, the same record and the same counts as through the
application, and every refusal of the application kept: keys, scopes, body limits and deadlines,
validation, freshness; and answers in the order they were asked on a connection.

Whether a request took the direct path is read from ``bastion_direct_answers_total``.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from bastion.server.direct import DirectDecisions
from tests.security.test_edge import answers_on, head_and_body, status_of
from tests.server.conftest import ADMIN_KEY, POLICY, ServerProcess, role
from tests.waits import before_expiry, past

MAX_BODY = 8192
ALLOWED = {"actor": "User:alice", "action": "read", "resource": "Repo:anvil"}
DENIED = {"actor": "User:bob", "action": "push", "resource": "Repo:anvil"}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("direct")
    policy = tmp / "policy.polar"
    policy.write_text(POLICY)
    env = {"BASTION_MAX_BODY_BYTES": str(MAX_BODY), "BASTION_BODY_TIMEOUT": "1"}
    env["BASTION_CONSISTENCY_TIMEOUT"] = "0.2"
    served = ServerProcess(str(tmp / "bastion.db"), tmp, str(policy), env).start()
    with served.client() as http:
        http.post("/v1/facts", json={"facts": [role("alice", "reader", "Repo", "anvil")]})
    yield served
    served.stop()


@pytest.fixture
def http(server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def direct_answers(http: httpx.Client) -> int:
    text = http.get("/metrics").text
    found = re.search(r"^bastion_direct_answers_total (\S+)$", text, re.M)
    assert found, "no bastion_direct_answers_total in /metrics"
    return int(float(found[1]))


def allowed_count(http: httpx.Client) -> int:
    text = http.get("/metrics").text
    found = re.search(
        r'^bastion_decisions_total\{kind="authorize",result="allow"\} (\S+)$', text, re.M
    )
    return int(float(found[1])) if found else 0


def chunked(body: bytes) -> Iterator[bytes]:
    """A body sent chunked: framed so that only the application reads it."""
    yield body


def warm(http: httpx.Client, key: str = ADMIN_KEY) -> None:
    """One request through the application, so that the key is then known to this process."""
    http.post("/v1/authorize", json=ALLOWED, headers={"authorization": f"Bearer {key}"})


def test_a_decision_is_answered_in_the_protocol_as_the_application_answers_it(http):
    warm(http)
    before = direct_answers(http)
    direct = http.post("/v1/authorize", json=ALLOWED)
    assert direct_answers(http) == before + 1
    through_app = http.post(
        "/v1/authorize",
        content=chunked(httpx.Request("POST", "/", json=ALLOWED).read()),
        headers={"content-type": "application/json"},
    )
    assert direct_answers(http) == before + 1
    assert direct.status_code == through_app.status_code == 200
    assert direct.headers["content-type"] == through_app.headers["content-type"]
    a, b = direct.json(), through_app.json()
    assert a.pop("decision_id") != b.pop("decision_id")
    assert a == b == {"allowed": True, "sequence": a["sequence"]}
    denied = http.post("/v1/authorize", json=DENIED).json()
    assert denied["allowed"] is False


def test_a_direct_decision_is_recorded_explained_and_counted(http):
    warm(http)
    allowed_before = allowed_count(http)
    before = direct_answers(http)
    answer = http.post("/v1/authorize", json={**ALLOWED, "context": {"ip": "10.0.0.1"}}).json()
    assert direct_answers(http) == before + 1
    record = http.get(f"/v1/decisions/{answer['decision_id']}").json()
    assert record["request"]["actor"] == {"type": "User", "id": "alice"}
    assert record["request"]["context"] == {"ip": "10.0.0.1"}
    assert record["result"] is True and record["sequence"] == answer["sequence"]
    explained = http.get(f"/v1/decisions/{answer['decision_id']}/explanation").json()
    assert explained["explanation"]["allowed"] is True
    assert allowed_count(http) == allowed_before + 1


def test_a_batch_is_answered_in_the_protocol_and_each_check_recorded(http):
    warm(http)
    before = direct_answers(http)
    answer = http.post("/v1/authorize/batch", json={"checks": [ALLOWED, DENIED]}).json()
    assert direct_answers(http) == before + 1
    assert [r["allowed"] for r in answer["results"]] == [True, False]
    for result in answer["results"]:
        assert http.get(f"/v1/decisions/{result['decision_id']}").status_code == 200


def test_an_unknown_key_is_refused_as_by_the_application(http):
    warm(http)
    for _ in range(2):  # the second time, its refusal is what this process remembers
        r = http.post("/v1/authorize", json=ALLOWED, headers={"authorization": "Bearer bst_x_y"})
        assert r.status_code == 401 and "unknown" in r.json()["detail"]
        assert r.headers["www-authenticate"] == "Bearer"


def test_a_key_without_the_decide_scope_is_refused(http):
    key = http.post("/v1/keys", json={"name": "reader", "scopes": ["facts:read"]}).json()["key"]
    for _ in range(2):  # known to the process after the first
        r = http.post("/v1/authorize", json=ALLOWED, headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 403 and "decide" in r.json()["detail"]


def test_a_key_revoked_while_remembered_is_refused_on_its_next_decision(http):
    created = http.post("/v1/keys", json={"name": "app", "scopes": ["decide"]}).json()
    h = {"authorization": f"Bearer {created['key']}"}
    warm(http, created["key"])
    before = direct_answers(http)
    assert http.post("/v1/authorize", json=ALLOWED, headers=h).status_code == 200
    assert direct_answers(http) == before + 1
    http.delete(f"/v1/keys/{created['id']}").raise_for_status()
    r = http.post("/v1/authorize", json=ALLOWED, headers=h)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_a_key_is_refused_from_its_expiry_on_though_it_was_remembered(http):
    """Decided on until its expiry, the key was remembered (and answered in the protocol) for
    up to the key cache's second after it; the first decision after the expiry is refused."""

    def decided_before_expiry(at: float) -> tuple[dict, dict]:
        # A key made to expire at ``at`` and decided with before then (a machine too busy to
        # use it in time makes one that lives longer: `before_expiry`).
        body = {"name": "brief", "scopes": ["decide"], "expires_in": at - time.time()}
        made = http.post("/v1/keys", json=body)
        assert made.status_code == 201, made.text
        h = {"authorization": f"Bearer {made.json()['key']}"}
        assert http.post("/v1/authorize", json=ALLOWED, headers=h).status_code == 200
        return made.json(), h

    (created, h), _ = before_expiry(decided_before_expiry, 2)
    # Every decision answered before the expiry was decided with the key: allowed. One asked
    # before it and answered after may have been checked on either side (a busy machine takes
    # its time between the two), so it may be either.
    while time.time() < created["expires_at"]:
        status = http.post("/v1/authorize", json=ALLOWED, headers=h).status_code
        assert status == 200 or time.time() >= created["expires_at"], status
    past(created["expires_at"])
    r = http.post("/v1/authorize", json=ALLOWED, headers=h)
    assert r.status_code == 401 and "expired" in r.json()["detail"]


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"actor": "User:alice", "resource": "Repo:anvil"}', 400, "'action' is required"),
        (b'{"actor": "Robot:r", "action": "read", "resource": "Repo:anvil"}', 422, "Robot"),
        (b'{"actor": ' * 70 + b"1" + b"}" * 70, 400, "max_json_depth"),
        (b'{"actor": "User:alice", "action": "read", "resource": "Repo:a", "at_least": -1}', 400, "at_least"),
        (b'{"actor": "User:alice", "action": "read", "resource": "Repo:a", "at_least": 10000000}', 422, "not the sequence of any write"),
    ],
)  # fmt: skip
def test_a_body_that_does_not_check_out_is_refused_and_decides_nothing(http, body, status, says):
    warm(http)
    before = direct_answers(http)
    decided = http.get("/metrics").text
    r = http.post("/v1/authorize", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert says in r.json()["detail"]
    assert direct_answers(http) == before
    totals = re.findall(r"^bastion_decisions_total\{.*$", http.get("/metrics").text, re.M)
    assert totals == re.findall(r"^bastion_decisions_total\{.*$", decided, re.M)


def test_a_body_over_the_limit_is_refused_before_it_is_read(http):
    warm(http)
    body = {**ALLOWED, "context": {"padding": "x" * MAX_BODY}}
    r = http.post("/v1/authorize", json=body)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]


def test_at_least_a_sequence_already_applied_is_answered_at_once(http):
    warm(http)
    head = http.get("/readyz").json()["sequence"]
    before = direct_answers(http)
    answer = http.post("/v1/authorize", json={**ALLOWED, "at_least": head}).json()
    assert answer["allowed"] is True and answer["sequence"] >= head
    assert direct_answers(http) == before + 1


def test_a_write_then_a_decision_at_least_as_fresh_sees_it(http):
    warm(http)
    written = http.post("/v1/facts", json={"facts": [role("carol", "reader", "Repo", "fresh")]})
    seq = written.json()["sequence"]
    check = {"actor": "User:carol", "action": "read", "resource": "Repo:fresh", "at_least": seq}
    assert http.post("/v1/authorize", json=check).json()["allowed"] is True


def raw_request(body: bytes, key: str = ADMIN_KEY, path: str = "/v1/authorize") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def test_pipelined_requests_are_answered_in_the_order_asked(server, http):
    warm(http)
    allowed, denied = (
        httpx.Request("POST", "/", json=ALLOWED),
        httpx.Request("POST", "/", json=DENIED),
    )
    healthz = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    asked = raw_request(allowed.read()) + healthz + raw_request(denied.read()) + healthz
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(asked)
        answers = answers_on(s, 4)
    assert [status_of(a) for a in answers] == [200, 200, 200, 200]
    bodies = [head_and_body(a)[1] for a in answers]
    assert bodies[0]["allowed"] is True and bodies[1] == {"status": "ok"}
    assert bodies[2]["allowed"] is False and bodies[3] == {"status": "ok"}


def test_a_body_sent_in_pieces_is_answered(server, http):
    warm(http)
    whole = raw_request(httpx.Request("POST", "/", json=ALLOWED).read())
    head, body = whole.split(b"\r\n\r\n", 1)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(head + b"\r\n\r\n")
        for part in (body[:5], body[5:]):
            time.sleep(0.05)
            s.sendall(part)
        (answer,) = answers_on(s, 1)
    assert status_of(answer) == 200 and head_and_body(answer)[1]["allowed"] is True


def test_a_body_that_stops_coming_is_refused_at_its_deadline(server, http):
    warm(http)
    whole = raw_request(httpx.Request("POST", "/", json=ALLOWED).read())
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(whole[:-3])  # the last bytes never come
        (answer,) = answers_on(s, 1)
        assert s.recv(1) == b"", "the connection stays open after the refusal"
    assert status_of(answer) == 408
    headers, body = head_and_body(answer)
    assert "content-type: application/problem+json" in headers
    assert "connection: close" in headers and "body_timeout" in body["detail"]
    assert http.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("headers", "framed"),
    [
        ([(b"host", b"x"), (b"content-length", b"10")], True),
        ([(b"content-length", b"100")], True),  # at the limit
        ([(b"content-length", b"101")], False),  # past it
        ([], False),  # no length
        ([(b"content-length", b"10"), (b"content-length", b"10")], False),  # repeated
        ([(b"content-length", b"+10")], False),
        ([(b"content-length", b" 10")], False),
        ([(b"content-length", b"1e1")], False),
        ([(b"content-length", b"10"), (b"transfer-encoding", b"chunked")], False),
        ([(b"expect", b"100-continue"), (b"content-length", b"10")], False),
        ([(b"content-length", b"10"), (b"upgrade", b"h2c")], False),
    ],
)
def test_only_one_plain_content_length_within_the_limit_is_held_in_the_protocol(headers, framed):
    assert DirectDecisions.framed(headers, [name for name, _ in headers], 100) is framed


def test_a_multipart_body_is_refused_in_the_protocol_as_by_the_application(http):
    warm(http)
    before = direct_answers(http)
    body = httpx.Request("POST", "/", json=ALLOWED).read()
    answer = http.post(
        "/v1/authorize", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert answer.status_code == 415 and "multipart" in answer.json()["detail"]
    assert direct_answers(http) == before


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/jsonp", "text/json"],
)
def test_a_body_declared_as_anything_but_json_is_refused_in_the_protocol_and_the_application(
    http, content_type
):
    """A form or text post is what a browser sends another site without asking first: the
    JSON in it is never read as a question, here or by the application behind."""
    warm(http)
    before, allowed = direct_answers(http), allowed_count(http)
    body = httpx.Request("POST", "/", json=ALLOWED).read()
    for framing in ({"content": body}, {"content": chunked(body)}):  # the protocol, the app
        answer = http.post("/v1/authorize", headers={"content-type": content_type}, **framing)
        assert answer.status_code == 415, answer.text
        assert "Content-Type: application/json" in answer.json()["detail"]
    assert (direct_answers(http), allowed_count(http)) == (before, allowed)


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "application/vnd.example+json", None]
)
def test_a_body_declared_as_json_or_not_declared_is_answered(http, content_type):
    headers = {"content-type": content_type} if content_type else {}
    body = httpx.Request("POST", "/", json=ALLOWED).read()
    for framing in ({"content": body}, {"content": chunked(body)}):  # the protocol, the app
        asked = http.build_request("POST", "/v1/authorize", headers=headers, **framing)
        assert asked.headers.get("content-type") == content_type
        answer = http.send(asked)
        assert answer.status_code == 200 and answer.json()["allowed"] is True


@pytest.mark.parametrize("unknown_first", [True, False])
def test_two_authorization_headers_are_refused_in_the_protocol_as_by_the_application(
    server, http, unknown_first
):
    # The protocol read the last header and the application the first: a known key after an
    # unknown one was answered 200 here and 401 through the application.
    warm(http)
    before = direct_answers(http)
    keys = ["bst_x_y", ADMIN_KEY] if unknown_first else [ADMIN_KEY, "bst_x_y"]
    body = httpx.Request("POST", "/", json=ALLOWED).read()
    asked = raw_request(body, keys[0]).replace(
        b"\r\nContent-Type", f"\r\nAuthorization: Bearer {keys[1]}\r\nContent-Type".encode()
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(asked)
        (answer,) = answers_on(s, 1)
    assert status_of(answer) == 400
    assert "one Authorization header" in head_and_body(answer)[1]["detail"]
    assert direct_answers(http) == before
