"""Hostile JSON values in every field of the decision APIs of a served bastion, SQLite and
PostgreSQL: ``/v1`` (``authorize``, its chains, ``authorize/batch``, ``list``, ``actions``,
``query``, the facts' reads and writes, the policy's put, validate and rollback) and AuthZEN
(``/access/v1/evaluation``, ``/evaluations``, ``/search/subject``, ``/search/resource``,
``/search/action``). Each request is a well-formed body (one the API answers 200) with one
member or item, at any depth, replaced by a hostile JSON value (`tests.security.hostile_json`),
or a member of that name added, or an odd ``Content-Type`` or ``Authorization``. None may answer
5xx or log a traceback; a refusal is a problem details document on ``/v1`` and AuthZEN's error
string on ``/access/v1``, of a status that says the request was wrong (400, 413, 415, 422; 401
for a wrong key; 404 for a policy version that is not there); and a refused request changes no
row of any table (`tests.security.rows`). The values schemathesis draws (tests/server/
test_openapi.py) follow the document: these do not. Derandomized, so a run in CI draws what a
run here drew."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from bastion.db import Database
from tests.conftest import postgres_schema
from tests.draws import fuzzed
from tests.security.conftest import logged_since
from tests.security.hostile_headers import AUTHORIZATION, CONTENT_TYPE, HEADER_BYTES, JSON_TYPES
from tests.security.hostile_json import VALUES, placed, places
from tests.security.rows import snapshot, unexpected_changes
from tests.server.conftest import ADMIN_KEY, POLICY, ServerProcess

# Rules that read the context, so that hostile values in it reach the policy's evaluation.
RULES = """
allow(_actor: User, "read", _repo: Repo) if context.door = "open";
allow(_actor: User, "read", _repo: Repo) if context.n > 3 and context.n < 10;
allow(_actor: User, "read", _repo: Repo) if "t" in context.tags;
"""
SAM = {"type": "User", "id": "sam"}
R1 = {"type": "Repo", "id": "r1"}
ACME = {"type": "Org", "id": "acme"}
CONTEXT = {"door": "shut", "n": 5, "tags": ["a", "t"], "deep": {"x": [1, {"y": "z"}]}}
ROLE = {"predicate": "has_role", "args": [SAM, "member", ACME]}
ROLE_PATTERN = {"predicate": "has_role", "args": [SAM, None, None]}
CHECK = {"actor": SAM, "action": "read", "resource": R1, "context": CONTEXT}
CHAIN = {"principals": [SAM, {"type": "User", "id": "ann"}], "action": "read", "resource": R1,
         "context": CONTEXT, "scopes": ["repo:read"]}  # fmt: skip
PARTY = {"type": "User", "id": "sam", "properties": {"department": "sales", "level": 3}}
RESOURCE = {"type": "Repo", "id": "r1", "properties": {"public": False}}
ACTION = {"name": "read", "properties": {"method": "GET"}}
AUTHZEN_CONTEXT = {"time": "2026-12-06T10:00:00Z", "door": "open", "n": 4}


@dataclass(frozen=True)
class Target:
    """A well-formed request: its method, path, body (or query), and whether AuthZEN's."""

    method: str
    path: str
    body: Any
    authzen: bool = False
    query: bool = False  # the body's members are the query's parameters (JSON text each)


def targets() -> dict[str, Target]:
    later = time.time() + 3600
    return {
        "authorize": Target("POST", "/v1/authorize", {**CHECK, "at_least": 1, "explain": True}),
        "authorize, a chain": Target("POST", "/v1/authorize", {**CHAIN, "at_least": 1}),
        "authorize/batch": Target(
            "POST", "/v1/authorize/batch", {"checks": [CHECK, CHAIN], "context": CONTEXT, "at_least": 1}
        ),
        "list": Target("POST", "/v1/list", {"actor": SAM, "action": "read", "resource_type": "Repo",
                                            "context": CONTEXT, "limit": 10, "at_least": 1}),
        "actions": Target("POST", "/v1/actions", {"actor": SAM, "resource": R1, "context": CONTEXT}),
        "query": Target("POST", "/v1/query", {"predicate": "has_permission",
                                              "args": [SAM, {"var": "a"}, R1], "context": CONTEXT}),
        "facts, read": Target("GET", "/v1/facts", {"pattern": ROLE_PATTERN, "limit": 5}, query=True),
        "facts, insert": Target("POST", "/v1/facts", {"facts": [ROLE], "expires_at": later}),
        "facts, delete": Target("POST", "/v1/facts/delete", {"patterns": [{**ROLE_PATTERN,
                                                                            "args": [SAM, "x", None]}]}),
        "facts, batch": Target("POST", "/v1/facts/batch", {"insert": [ROLE], "delete": [ROLE]}),
        "policy, put": Target("PUT", "/v1/policy", {"text": POLICY + RULES, "source": "fuzz.polar",
                                                     "note": "n", "strict": False}),
        "policy, validate": Target("POST", "/v1/policy/validate", {"text": POLICY, "source": "p",
                                                                     "strict": True}),
        "policy, rollback": Target("POST", "/v1/policy/rollback", {"version": 1}),
        "evaluation": Target("POST", "/access/v1/evaluation", {
            "subject": PARTY, "action": ACTION, "resource": RESOURCE, "context": AUTHZEN_CONTEXT,
        }, authzen=True),
        "evaluations": Target("POST", "/access/v1/evaluations", {
            "subject": PARTY, "action": ACTION, "context": AUTHZEN_CONTEXT,
            "evaluations": [{"resource": RESOURCE}, {"resource": {"type": "Repo", "id": "r2"},
                                                     "context": {"n": 1}}],
            "options": {"evaluations_semantic": "deny_on_first_deny"},
        }, authzen=True),
        "search, subject": Target("POST", "/access/v1/search/subject", {
            "subject": {"type": "User"}, "action": ACTION, "resource": RESOURCE,
            "context": AUTHZEN_CONTEXT, "page": {"limit": 5, "properties": {"a": 1}},
        }, authzen=True),
        "search, resource": Target("POST", "/access/v1/search/resource", {
            "subject": PARTY, "action": ACTION, "resource": {"type": "Repo"},
            "page": {"limit": 5, "token": ""},
        }, authzen=True),
        "search, action": Target("POST", "/access/v1/search/action", {
            "subject": PARTY, "resource": RESOURCE, "context": AUTHZEN_CONTEXT,
        }, authzen=True),
    }  # fmt: skip


TARGETS = targets()
# What a refusal may answer: the request was wrong (a key for 401, a version for 404).
REFUSED = {400, 404, 413, 415, 422}
PROBLEM = "application/problem+json"


@dataclass
class Pdp:
    server: ServerProcess
    db: Database
    http: httpx.Client
    authzen_key: str

    def send(self, name: str, body: bytes, headers: dict[str, bytes]) -> httpx.Response:
        target = TARGETS[name]
        key = self.authzen_key if target.authzen else ADMIN_KEY
        sent = {"authorization": f"Bearer {key}".encode(), "content-type": b"application/json"}
        sent.update(headers)
        if target.query:
            sent.pop("content-type")
            members = json.loads(body, parse_constant=str)  # NaN and such are sent as text
            query = "&".join(f"{quote(k)}={quote(_query_value(k, v))}" for k, v in members.items())
            return self.http.request(target.method, f"{target.path}?{query}", headers=sent)
        return self.http.request(target.method, target.path, content=body, headers=sent)


def _query_value(name: str, value: Any) -> str:
    return value if isinstance(value, str) and name != "pattern" else json.dumps(value)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def pdp(request, tmp_path_factory) -> Iterator[Pdp]:
    tmp = tmp_path_factory.mktemp("hostile-decisions")
    database = postgres_schema() if request.param == "postgresql" else nullcontext(
        str(tmp / "bastion.db")
    )  # fmt: skip
    with database as url:
        policy = tmp / "policy.polar"
        policy.write_text(POLICY + RULES)
        # A future at_least is waited for this long, then refused (422).
        server = ServerProcess(url, tmp, str(policy), {"BASTION_CONSISTENCY_TIMEOUT": "0.2"})
        server.start()
        db = Database(url)
        try:
            with server.client() as http:
                facts = [ROLE, {"predicate": "has_relation", "args": [R1, "parent", ACME]}]
                assert http.post("/v1/facts", json={"facts": facts}).status_code == 200
                made = http.post("/v1/keys", json={"name": "pep", "scopes": ["authzen"]})
                assert made.status_code == 201, made.text
                yield Pdp(server, db, http, made.json()["key"])
        finally:
            db.close()
            server.stop()


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, Any, bytes]:
    """(target, where: "member", "content-type" or "authorization", the path, the value)."""
    name = draw(st.sampled_from(sorted(TARGETS)))
    where = draw(st.sampled_from(["member"] * 8 + ["content-type", "authorization"]))
    if where == "member":
        path = draw(st.sampled_from(places(TARGETS[name].body)))
        return name, where, path, draw(VALUES).encode()
    if where == "content-type":
        return name, where, None, draw(st.one_of(st.sampled_from(JSON_TYPES + CONTENT_TYPE),
                                                 HEADER_BYTES))  # fmt: skip
    value = draw(st.one_of(st.sampled_from(AUTHORIZATION), HEADER_BYTES.map(b"Bearer ".__add__)))
    return name, where, None, value


def test_no_hostile_value_in_a_decision_api_answers_5xx_or_changes_anything(pdp):
    log = pdp.server.log
    examples = 1000 if not pdp.db.is_postgres else 300

    @fuzzed(examples)
    @given(request=requests())
    def probe(request: tuple) -> None:
        name, where, path, value = request
        target = TARGETS[name]
        if where == "member":
            body, headers = placed(target.body, path, value.decode()), {}
        else:
            body, headers = json.dumps(target.body).encode(), {where: value}
        before = snapshot(pdp.db)
        seen = log.stat().st_size
        try:
            answer = pdp.send(name, body, headers)
        except (httpx.LocalProtocolError, httpx.InvalidURL, ValueError):
            # A header this client will not send, a URL past its length (64 KiB), or a query
            # of values JSON cannot hold.
            assume(False)
            raise
        status = answer.status_code
        assert status < 500, (request, status, answer.text[:500])
        written = logged_since(log, seen)
        assert "Traceback" not in written, (request, written[-3000:])
        if status < 400:
            return
        allowed = REFUSED | ({401} if where == "authorization" else set())
        assert status in allowed, (request, status, answer.text[:500])
        kind = answer.headers.get("content-type", "")
        if answer.text != "Invalid HTTP request received.":
            if target.authzen:
                assert kind.startswith("text/plain") and answer.text, (request, kind, answer.text)
            else:
                assert kind.startswith(PROBLEM), (request, kind, answer.text[:300])
                assert answer.json()["status"] == status, answer.text
        changed = unexpected_changes(before, snapshot(pdp.db))
        assert not changed, (request, status, answer.text[:300], changed)

    probe()
    assert "Traceback" not in log.read_text()
