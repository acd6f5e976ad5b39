"""Hostile values in every field of the admin API, Oso Cloud's API and the connection pages of a
served bastion, SQLite and PostgreSQL: ``/v1`` keys, agents, approvals, suspensions, signals and
tasks; ``/api`` (authorize, list, actions, evaluate_query, facts, batch, policy, policy_metadata,
the agent events); the forms a signed-in person posts at ``/connections/<upstream>/...``; ``/v1/alerts`` and the
alert's page and form, on a server whose alerts are raised and escalated (`alerting`). Each
request is a well-formed one (which the route answers 2xx or 3xx) with one member or item of its
JSON body, at any depth, replaced by a hostile JSON value (`tests.security.hostile_json`), or a
member of that name added; or one path parameter, query parameter or form field replaced by a
hostile percent-encoded value (or given twice, or added); or an odd ``Content-Type``,
``Authorization`` or session cookie. None may answer 5xx or log a traceback; a refusal is in the
route family's documented form (problem details on ``/v1``, ``{"message"}`` on ``/api``, a page
on ``/connections``), of a status that says the request was wrong; and a refused request
changes no row of any table (`tests.security.rows`). Derandomized, so a run in CI draws what a
run here drew."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from bastion.db import Database
from bastion.oauth.store import OAuthStore
from bastion.oauth.users import create_user
from tests.approvals.support import REPORT, SEND, Holder
from tests.conftest import postgres_schema
from tests.connections.fakes import AuthorizationServer
from tests.draws import fuzzed
from tests.oauth.support import free_socket, hidden_fields, serve
from tests.security.conftest import OAUTH, logged_since
from tests.security.hostile_headers import AUTHORIZATION, CONTENT_TYPE, HEADER_BYTES, JSON_TYPES
from tests.security.hostile_json import (
    NEW_MEMBER,
    NUMBERS,
    URL_VALUES,
    VALUES,
    members,
    percent_encoded,
    placed,
    places,
    twice,
)
from tests.security.rows import snapshot, unexpected_changes
from tests.server.conftest import ADMIN_KEY, POLICY, ServerProcess
from tests.waits import PATIENCE

RULES = """
actor Agent {}
declare signal(User, String, Boolean, String, Integer);
declare signal(User, String, String, String, Integer);
declare signal(User, String, Integer, String, Integer);
allow(actor: Agent, action: String, resource: Repo) if has_role(actor, action, resource);
resource Tool {}
approver(_boss: User, _user: User, "call", _tool: Tool);
approval_window(_user: User, "call", _tool: Tool, 30);
declare approval_grant(User, Agent, String, Tool);
"""
UPSTREAM = """
[gateway]

[[gateway.upstreams]]
name = "desk"
url = "%(upstream)s/mcp"
auth = "per_user"
pin_tools = "review"
oauth = { issuer = "%(upstream)s" }
"""
PERSON = "sam"
SAM = {"type": "User", "id": "sam"}
ROLE = {"predicate": "has_role", "args": [SAM, {"type": "String", "id": "member"},
                                         {"type": "Org", "id": "acme"}]}  # fmt: skip
QUERY = {
    "predicate": ["allow", ["a", "b", "c"]],
    "calls": [["has_role", ["a", "r", "o"]]],
    "constraints": {"a": {"type": "User", "ids": ["sam"]}, "b": {"type": "String", "ids": ["read"]},
                    "c": {"type": "Repo", "ids": None}, "r": {"type": "String", "ids": None},
                    "o": {"type": "Org", "ids": ["acme"]}},
    "context_facts": [ROLE],
}  # fmt: skip
# A tool's result held for review.
RESULT = {"structuredContent": {"customers": [{"name": "Ann", "email": "ann@example.com"}]}}
# Targets that name what is nobody's (no flow has the callback's state, no connection or tool
# pin is there): refused when well formed, after every check of what they are sent.
NOBODYS = {"page, callback", "connections, revoke", "tools, accept"}


@dataclass(frozen=True)
class Target:
    """A well-formed request: method, path (``{name}`` for each of ``params``), JSON body (or a
    form's fields), query parameters, and which route family answers it."""

    method: str
    path: str
    body: Any = None
    params: dict = field(default_factory=dict)
    query: dict = field(default_factory=dict)
    family: str = "v1"  # "v1", "oso" or "page"
    form: bool = False
    key: str = "admin"  # "admin", "oso" (read, write and events) or "session" (a page's)


def targets(
    client_id: str,
    task_id: str,
    key_id: str,
    tokens: dict[str, str],
    held: dict[str, str],
    repo: str = "r2",
) -> dict:
    later = time.time() + 3600
    agent = {"type": "Agent", "id": client_id}
    return {
        # /v1: keys, agents, approvals, suspensions, signals, tasks.
        "keys, create": Target("POST", "/v1/keys", {"name": "k", "scopes": ["facts:read"],
                                                    "expires_in": 600}),
        "keys, revoke": Target("DELETE", "/v1/keys/{id}", params={"id": key_id}),
        "agents, list": Target("GET", "/v1/agents", query={"status": "active"}),
        "agents, show": Target("GET", "/v1/agents/{id}", params={"id": client_id}),
        "agents, update": Target("PATCH", "/v1/agents/{id}", {"owner": "sam", "name": "n",
                                 "purpose": "p", "parent": None}, params={"id": client_id}),
        "approvals, list": Target("GET", "/v1/approvals", query={"status": "pending",
                                                                 "approver": "sam", "limit": "5"}),
        "approvals, show": Target("GET", "/v1/approvals/{id}", params={"id": held["review"]},
                                  query={"reviewer": "avery"}),
        "approvals, approve": Target("POST", "/v1/approvals/{id}/approve", {
            "approver": "avery", "reason": "ok", "minutes": 5}, params={"id": held["approve"]}),
        "approvals, release": Target("POST", "/v1/approvals/{id}/approve", {
            "approver": "avery", "reason": "ok", "withheld_fields": ["customers.*.email"],
        }, params={"id": held["release"]}),
        "approvals, deny": Target("POST", "/v1/approvals/{id}/deny",
                                  {"approver": "avery", "reason": "no"},
                                  params={"id": held["deny"]}),
        "suspensions, create": Target("POST", "/v1/suspensions", {"kind": "user", "id": "zed",
                                                                  "expires_at": later}),
        "suspensions, list": Target("GET", "/v1/suspensions"),
        "suspensions, resume": Target("DELETE", "/v1/suspensions/{kind}/{id}",
                                      params={"kind": "user", "id": "zed"}),
        "signals, set": Target("POST", "/v1/signals", {"subject": SAM, "name": "device_compliant",
                               "value": True, "source": "mdm", "ttl_seconds": 600}),
        "signals, clear": Target("POST", "/v1/signals/clear", {"subject": SAM, "name": "risk"}),
        "signals, list": Target("GET", "/v1/signals", query={"subject": "User:sam",
                                                             "name": "device_compliant"}),
        "tasks, open": Target("POST", "/v1/tasks", {"user": "sam", "agent": client_id,
                              "purpose": "p", "expires_in": 600, "facts": [{"predicate":
                              "has_role", "args": [agent, "reader", {"type": "Repo", "id": repo}]}]}),
        "tasks, list": Target("GET", "/v1/tasks", query={"status": "open", "limit": "5"}),
        "tasks, show": Target("GET", "/v1/tasks/{id}", params={"id": task_id}),
        "tasks, end": Target("POST", "/v1/tasks/{id}/end", {"reason": "done"},
                             params={"id": task_id}),
        "connections, list": Target("GET", "/v1/connections", query={"subject": PERSON,
                                                                     "upstream": "desk"}),
        "connections, revoke": Target("DELETE", "/v1/connections/{subject}/{upstream}",
                                      params={"subject": "zed", "upstream": "desk"}),
        "labels, clear": Target("POST", "/v1/labels/clear", {"user": "sam", "agent": client_id,
                                                              "task": ""}),
        "labels, clear a task's": Target("POST", "/v1/labels/clear", {"task": "t1"}),
        "tools, list": Target("GET", "/v1/tools", query={"server": "desk", "pending": "true"}),
        "tools, accept": Target("POST", "/v1/tools/{server}/{name}/accept", {"digest": "d"},
                                params={"server": "desk", "name": "search"}),
        # /api: Oso Cloud's API, as the SDK sends it.
        "oso, authorize": Target("POST", "/api/authorize", {
            "actor_type": "User", "actor_id": "sam", "action": "read", "resource_type": "Repo",
            "resource_id": "r1", "context_facts": [ROLE]}, family="oso", key="oso"),
        "oso, list": Target("POST", "/api/list", {
            "actor_type": "User", "actor_id": "sam", "action": "read", "resource_type": "Repo",
            "context_facts": [], "page_size": 5, "page_token": "a"}, family="oso", key="oso"),
        "oso, actions": Target("POST", "/api/actions", {
            "actor_type": "User", "actor_id": "sam", "resource_type": "Repo",
            "resource_id": "r1"}, family="oso", key="oso"),
        "oso, evaluate_query": Target("POST", "/api/evaluate_query", QUERY, family="oso",
                                      key="oso"),
        "oso, facts": Target("GET", "/api/facts", query={"predicate": "has_role",
                             "args.0.type": "User", "args.0.id": "sam", "args.2.type": "Org"},
                             family="oso", key="oso"),
        "oso, batch": Target("POST", "/api/batch", [{"inserts": [ROLE]}, {"deletes": [
            {"predicate": "has_role", "args": [{"type": "User", "id": "zed"}, {"type": "String"},
                                               {"type": None, "id": None}]}]}],
            family="oso", key="oso"),
        "oso, policy": Target("POST", "/api/policy", {"src": POLICY + RULES,
                              "filename": "p.polar"}, family="oso", key="oso"),
        "oso, policy_metadata": Target("GET", "/api/policy_metadata", family="oso", key="oso"),
        "oso, tool_call_request": Target("POST", "/api/agents/event/tool_call_request", {
            "agent_id": "a1", "session_id": "s1", "users": [SAM], "tool_name": "search",
            "tool_parameters": {"q": [1, {"x": None}]}, "destructive": False},
            family="oso", key="oso"),
        "oso, tool_call_response": Target("POST", "/api/agents/event/tool_call_response", {
            "agent_id": "a1", "session_id": "s1", "tool_name": "search",
            "tool_result": {"r": ["x", 1.5]}}, family="oso", key="oso"),
        "oso, message_from_user": Target("POST", "/api/agents/event/message_from_user", {
            "agent_id": "a1", "session_id": "s1", "users": [SAM], "message": "hi"},
            family="oso", key="oso"),
        # The forms (and the links) of the connection pages.
        "page, connect": Target("GET", "/connections/{upstream}/connect",
                                params={"upstream": "desk"}, query={"user": PERSON},
                                family="page", key="session"),
        "page, connect form": Target("POST", "/connections/{upstream}/connect",
                                     {"user": PERSON, "csrf_token": tokens["connect"]},
                                     params={"upstream": "desk"}, family="page", form=True,
                                     key="session"),
        "page, revoke form": Target("POST", "/connections/{upstream}/revoke",
                                    {"csrf_token": tokens["revoke"]}, params={"upstream": "desk"},
                                    family="page", form=True, key="session"),
        "page, callback": Target("GET", "/connections/{upstream}/callback",
                                 params={"upstream": "desk"}, query={"state": "s", "code": "c",
                                 "iss": "x", "error": "access_denied"}, family="page",
                                 key="session"),
    }  # fmt: skip


# What a refusal may answer: the request was wrong (401 for a wrong key; 403 where a person or
# the policy may not; 404 for an id that is nothing; 409 for a task that is over).
REFUSED = {
    "v1": {400, 403, 404, 409, 413, 415, 422},
    "oso": {400, 404, 413, 415, 422},
    "page": {400, 403, 404, 413, 415},
}
PROBLEM = "application/problem+json"
INVALID_HTTP = "Invalid HTTP request received."


@dataclass
class Admin:
    server: ServerProcess
    db: Database
    http: httpx.Client
    oso_key: str
    session: str
    targets: dict[str, Target]

    def send(self, name: str, change: tuple) -> httpx.Response:
        """``name``'s request with ``change``: (where, the place, the value)."""
        target = self.targets[name]
        where, place, value = change
        headers = {"content-type": b"application/json"}
        if target.key == "admin":
            headers["authorization"] = f"Bearer {ADMIN_KEY}".encode()
        elif target.key == "oso":
            headers["authorization"] = f"Bearer {self.oso_key}".encode()
        else:
            headers["cookie"] = f"bastion_session={self.session}".encode()
        if target.form:
            headers["content-type"] = b"application/x-www-form-urlencoded"
        if where in ("content-type", "authorization"):
            headers[where] = value
        elif where == "cookie":
            headers[where] = b"bastion_session=" + value
        elif where == "osooffset":
            headers[where] = value

        params = {k: percent_encoded(v) for k, v in target.params.items()}
        query = [(quote(k), percent_encoded(v)) for k, v in target.query.items()]
        fields = [(quote(k), percent_encoded(v)) for k, v in (target.body or {}).items()] if (
            target.form
        ) else []  # fmt: skip
        for encoded in (query, fields):
            if where == ("query" if encoded is query else "form"):
                if place == NEW_MEMBER:
                    encoded.append((value, value))
                else:
                    encoded[:] = [(k, value if k == quote(place) else v) for k, v in encoded]
            elif where == ("query, twice" if encoded is query else "form, twice"):
                encoded.append((quote(place), value))
        if where == "path":
            params[place] = value
        path = target.path.format(**params)
        if query:
            path += "?" + "&".join(f"{k}={v}" for k, v in query)
        if target.form:
            content = "&".join(f"{k}={v}" for k, v in fields).encode()
        elif where == "body":
            content = placed(target.body, place, value.decode())
        elif where == "body, twice":
            content = twice(target.body, place, value.decode())
        elif target.body is not None:
            content = json.dumps(target.body).encode()
        else:
            content = b""
            headers.pop("content-type")
        return self.http.request(target.method, path, content=content, headers=headers)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def admin(request, tmp_path_factory) -> Iterator[Admin]:
    tmp = tmp_path_factory.mktemp("hostile-admin")
    database = postgres_schema() if request.param == "postgresql" else nullcontext(
        str(tmp / "bastion.db")
    )  # fmt: skip
    upstream = AuthorizationServer("desk", revocation=False)
    sock = free_socket()
    upstream.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with serve(upstream.app(), sock), database as url:
        policy = tmp / "policy.polar"
        policy.write_text(POLICY + RULES)
        server = ServerProcess(url, tmp, str(policy), {"BASTION_CONSISTENCY_TIMEOUT": "0.2"})
        server.key_dir = tmp / "keys"
        config = OAUTH % server.key_dir + UPSTREAM % {"upstream": upstream.base}
        (tmp / "bastion.toml").write_text(config.replace("{url}", server.url))
        server.env["BASTION_CONFIG"] = str(tmp / "bastion.toml")
        server.start()
        db = Database(url)
        try:
            with server.client() as http:
                yield _prepared(server, db, http)
        finally:
            db.close()
            server.stop()


def _prepared(server: ServerProcess, db: Database, http: httpx.Client) -> Admin:
    """The fixture's server with what the well-formed requests name: an agent, a task, a key,
    a person signed in with a connection to ``desk`` (the forms' CSRF tokens)."""
    facts = [{"predicate": "has_role", "args": [SAM, "member", {"type": "Org", "id": "acme"}]}]
    assert http.post("/v1/facts", json={"facts": facts}).status_code == 200
    made = http.post("/v1/keys", json={"name": "oso", "scopes": ["oso:read", "oso:write",
                                                                 "oso:events"]})  # fmt: skip
    assert made.status_code == 201, made.text
    oso_key = made.json()["key"]
    other = http.post("/v1/keys", json={"name": "other", "scopes": ["facts:read"]})
    registered = httpx.post(f"{server.url}/register", json={
        "redirect_uris": ["http://127.0.0.1:9/cb"], "client_name": "fuzz"})  # fmt: skip
    assert registered.status_code == 201, registered.text
    client_id = registered.json()["client_id"]
    store = OAuthStore(db)
    create_user(store, PERSON, "a password of sam's", time.time(), actor="test")
    session = store.create_session(PERSON, time.time(), 3600)
    with httpx.Client(base_url=server.url, cookies={"bastion_session": session}) as browser:
        connect = hidden_fields(browser.get("/connections/desk/connect").text)
        answer = browser.post("/connections/desk/connect", data=connect)
        assert answer.status_code == 303, answer.text
        answer = browser.get(answer.headers["location"])  # the upstream's server, back at once
        answer = browser.get(answer.headers["location"])
        assert answer.status_code == 200, answer.text
        revoke = hidden_fields(browser.get("/connections").text)
    tokens = {"connect": connect["csrf_token"], "revoke": revoke["csrf_token"]}
    admin = Admin(server, db, http, oso_key, session, {})
    keys = other.json()["id"]
    admin.targets = targets(client_id, "", keys, tokens, _held(server), repo="r1")
    opened = admin.send("tasks, open", ("", None, None))
    assert opened.status_code == 201, opened.text
    task_id = opened.json()["task"]["id"]
    admin.targets = targets(client_id, task_id, keys, tokens, _held(server))
    for name in admin.targets:  # each well formed: answered 2xx or 3xx
        answer = admin.send(name, ("", None, None))
        assert answer.status_code < 400 or name in NOBODYS, (name, answer.text)
    # Held again: what the fuzzing answers is held still.
    admin.targets = targets(client_id, task_id, keys, tokens, _held(server))
    return admin


def _held(server: ServerProcess) -> dict[str, str]:
    """The ids of calls and results held as the gateway holds them, on ``server``'s database
    and key directory: to approve, to deny, to review, to release with a field withheld."""
    holder = Holder(server.database, server.key_dir, server.url)
    try:
        held = {answer: holder.hold(SEND).id for answer in ("approve", "deny")}
        for answer in ("review", "release"):
            held[answer] = holder.hold(REPORT, kind="review", result=RESULT).id
    finally:
        holder.close()
    return held


def changes(target: Target) -> list[tuple[str, Any]]:
    """Where ``target`` may take a hostile value: (where, the place)."""
    found: list[tuple[str, Any]] = [("path", name) for name in target.params]
    for name in target.query:
        found += [("query", name), ("query, twice", name)]
    if target.query or target.method == "GET":
        found.append(("query", NEW_MEMBER))
    if target.form:
        for name in target.body:
            found += [("form", name), ("form, twice", name)]
        found.append(("form", NEW_MEMBER))
    elif target.body is not None:
        found += [("body", place) for place in places(target.body)]
        found += [("body, twice", place) for place in members(target.body)]
    return found


@st.composite
def requests(draw: st.DrawFn, all_targets: dict[str, Target]) -> tuple[str, tuple]:
    """(target, (where, the place, the value))."""
    name = draw(st.sampled_from(sorted(all_targets)))
    target = all_targets[name]
    header = "cookie" if target.key == "session" else "authorization"
    # Oso Cloud's SDK sends back the sequence of its last write, for reads to wait for.
    header += ",osooffset" if target.family == "oso" else ""
    where = draw(st.sampled_from(["value"] * 8 + ["content-type", *header.split(",")]))
    if where == "value":
        where, place = draw(st.sampled_from(changes(target)))
        value = draw(VALUES).encode() if where.startswith("body") else draw(URL_VALUES)
        # A path's dot segment is resolved by the client: another route is asked, not this one.
        assume(where != "path" or value not in (".", ".."))
        return name, (where, place, value)
    if where == "content-type":
        value = draw(st.one_of(st.sampled_from(JSON_TYPES + CONTENT_TYPE), HEADER_BYTES))
    elif where == "cookie":
        value = draw(HEADER_BYTES.filter(lambda b: b";" not in b))
    elif where == "osooffset":
        numbers = st.sampled_from(NUMBERS + ["1", " 1", "1 ", "+1", "0x1", "10" * 10, "\u0661"])
        value = draw(st.one_of(numbers.map(str.encode), HEADER_BYTES))
    else:
        value = draw(st.one_of(st.sampled_from(AUTHORIZATION),
                               HEADER_BYTES.map(b"Bearer ".__add__)))  # fmt: skip
    return name, (where, None, value)


def answered(admin, request: tuple, log: Path) -> httpx.Response:
    """``request`` (the target's name, the change drawn) sent, and its answer once it is known
    to be no 5xx and to have left no traceback in the server's log. A request this client
    will not send is no example (it tells nothing of the server)."""
    name, change = request
    seen = log.stat().st_size
    try:
        answer = admin.send(name, change)
    except (httpx.LocalProtocolError, httpx.InvalidURL, UnicodeError):
        assume(False)
        raise
    assert answer.status_code < 500, (request, answer.status_code, answer.text[:500])
    written = logged_since(log, seen)
    assert "Traceback" not in written, (request, written[-3000:])
    return answer


def test_no_hostile_value_in_an_admin_api_or_a_form_answers_5xx_or_changes_anything(admin):
    log = admin.server.log
    examples = 3000 if not admin.db.is_postgres else 1000

    @fuzzed(examples)
    @given(request=requests(admin.targets))
    def probe(request: tuple) -> None:
        name, change = request
        target = admin.targets[name]
        before = snapshot(admin.db)
        answer = answered(admin, request, log)
        status = answer.status_code
        if status < 400:
            return
        allowed = REFUSED[target.family] | ({401} if change[0] == "authorization" else set())
        assert status in allowed, (request, status, answer.text[:500])
        kind = answer.headers.get("content-type", "")
        if answer.text != INVALID_HTTP:
            if target.family == "v1":
                assert kind.startswith(PROBLEM), (request, kind, answer.text[:300])
                assert answer.json()["status"] == status, answer.text
            elif target.family == "oso":
                assert kind.startswith("application/json"), (request, kind, answer.text[:300])
                message = answer.json()
                assert set(message) == {"message"} and message["message"], answer.text
            elif status == 404 and kind.startswith(PROBLEM):
                # A path no route has (an empty segment): the server's own 404, as anywhere.
                assert "there is no route" in answer.json()["detail"], (request, answer.text)
            elif kind.startswith("application/json"):
                # Refused before the page sees it (a NUL, a body too large): the pages under the
                # issuer share the OAuth endpoints' limits and their error (docs/security.md).
                assert answer.json()["error"] == "invalid_request", (request, answer.text)
            else:
                assert kind.startswith("text/html"), (request, kind, answer.text[:300])
        changed = unexpected_changes(before, snapshot(admin.db))
        assert not changed, (request, status, answer.text[:300], changed)

    probe()
    assert "Traceback" not in log.read_text()


# -- alerts: the /v1/alerts API and the alert's page, with alerts really raised ------------------

ALERTS = """
[signals.alerts]
bulk_destructive_count = 1
escalate_after_seconds = 0.01
escalation_poll_seconds = 0.02
"""
ALERT_RULES = "\ndeclare manager(User, User);\ndeclare has_relation(Agent, String, User);\n"


def alert_targets(alert_id: str, token: str) -> dict[str, Target]:
    return {
        "alerts, list": Target("GET", "/v1/alerts", query={"state": "open", "limit": "5"}),
        "alerts, show": Target("GET", "/v1/alerts/{id}", params={"id": alert_id}),
        "alerts, acknowledge": Target("POST", "/v1/alerts/{id}/acknowledge", {"by": "ops"},
                                      params={"id": alert_id}),
        "page, alert": Target("GET", "/alerts/{id}", params={"id": alert_id}, family="page",
                              key="session"),
        "page, alert form": Target("POST", "/alerts/{id}", {"csrf_token": token},
                                   params={"id": alert_id}, family="page", form=True,
                                   key="session"),
    }  # fmt: skip


@pytest.fixture(scope="module")
def alerting(tmp_path_factory) -> Iterator[Admin]:
    """A served bastion (SQLite) whose alerts are configured, with an alert raised by Oso Cloud's
    agent events (bulk destructive calls) and escalated to sam, its owner's manager."""
    tmp = tmp_path_factory.mktemp("hostile-alerts")
    upstream = AuthorizationServer("desk", revocation=False)
    sock = free_socket()
    upstream.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with serve(upstream.app(), sock):
        policy = tmp / "policy.polar"
        policy.write_text(POLICY + RULES + ALERT_RULES)
        url = str(tmp / "bastion.db")
        server = ServerProcess(url, tmp, str(policy))
        config = OAUTH % (tmp / "keys") + UPSTREAM % {"upstream": upstream.base} + ALERTS
        (tmp / "bastion.toml").write_text(config.replace("{url}", server.url))
        server.env["BASTION_CONFIG"] = str(tmp / "bastion.toml")
        server.start()
        db = Database(url)
        try:
            with server.client() as http:
                made = http.post("/v1/keys", json={"name": "events", "scopes": ["oso:events"]})
                assert made.status_code == 201, made.text
                store = OAuthStore(db)
                create_user(store, PERSON, "a password of sam's", time.time(), actor="test")
                session = store.create_session(PERSON, time.time(), 3600)
                admin = Admin(server, db, http, made.json()["key"], session, {})
                fresh_alert(admin)
                yield admin
        finally:
            db.close()
            server.stop()


_raised = iter(range(1, 1_000_000))


def fresh_alert(admin: Admin) -> None:
    """Raise a new alert about a new agent of pat's, wait for it to escalate to sam (pat's
    manager), and aim the alert targets at it, with sam's CSRF token of its page."""
    agent = f"agent-{next(_raised)}"
    facts = [
        {"predicate": "has_relation", "args": [{"type": "Agent", "id": agent}, "owner",
                                               {"type": "User", "id": "pat"}]},
        {"predicate": "manager", "args": [{"type": "User", "id": "pat"}, SAM]},
    ]  # fmt: skip
    assert admin.http.post("/v1/facts", json={"facts": facts}).status_code == 200
    event = {"agent_id": agent, "session_id": "s", "tool_name": "delete_all",
             "tool_parameters": {}, "destructive": True}  # fmt: skip
    for _ in range(2):  # more than bulk_destructive_count
        answer = admin.http.post("/api/agents/event/tool_call_request", json=event,
                                 headers={"authorization": f"Bearer {admin.oso_key}"})  # fmt: skip
        assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + PATIENCE
    while True:
        found = [a for a in admin.http.get("/v1/alerts").json()["alerts"]
                 if a["principal"] == f'Agent{{"{agent}"}}']  # fmt: skip
        if found and found[0]["escalated_to"]:
            break
        assert time.monotonic() < deadline, found
        time.sleep(0.02)
    assert found[0]["escalated_to"] == ['User{"sam"}'], found
    with httpx.Client(base_url=admin.server.url, cookies={"bastion_session": admin.session}) as b:
        page = b.get(f"/alerts/{found[0]['id']}")
        assert page.status_code == 200, page.text
        token = hidden_fields(page.text)["csrf_token"]
    admin.targets = alert_targets(found[0]["id"], token)


def test_no_hostile_value_in_the_alerts_api_or_page_answers_5xx_or_changes_anything(alerting):
    admin = alerting
    log = admin.server.log
    shapes = alert_targets("x", "t")

    @fuzzed(400)
    @given(request=requests(shapes))
    def probe(request: tuple) -> None:
        name, change = request
        alert_id = admin.targets["alerts, show"].params["id"]
        if admin.http.get(f"/v1/alerts/{alert_id}").json()["state"] != "open":
            fresh_alert(admin)  # acknowledged by a draw before: each draw may acknowledge
            alert_id = admin.targets["alerts, show"].params["id"]  # the fresh one's
        target = admin.targets[name]
        before = snapshot(admin.db)
        answer = answered(admin, request, log)
        status = answer.status_code
        if status < 400:
            if name == "alerts, acknowledge":
                acked = admin.http.get(f"/v1/alerts/{alert_id}").json()
                assert acked["acknowledged_by"] == answer.json()["acknowledged_by"], acked
            return
        allowed = REFUSED[target.family] | ({401} if change[0] == "authorization" else set())
        assert status in allowed, (request, status, answer.text[:500])
        kind = answer.headers.get("content-type", "")
        if answer.text != INVALID_HTTP and target.family == "v1":
            assert kind.startswith(PROBLEM), (request, kind, answer.text[:300])
            assert answer.json()["status"] == status, answer.text
        elif answer.text != INVALID_HTTP and not kind.startswith("application/"):
            assert kind.startswith("text/html"), (request, kind, answer.text[:300])
        changed = unexpected_changes(before, snapshot(admin.db))
        assert not changed, (request, status, answer.text[:300], changed)

    probe()
    assert "Traceback" not in log.read_text()
