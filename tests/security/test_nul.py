"""The character U+0000 (NUL) in what a request sends: PostgreSQL stores no NUL in text, so each
one that reached a query was a 500 there (an unauthenticated ``client_id=%00`` at /token, a
``\\u0000`` in a fact, a tool named ``"\\u0000"`` whose decision record no write could store),
and in a name or an identifier a NUL is the classic way to make two programs read one string as
two. Every route refuses it alike, on SQLite as on PostgreSQL: in the path, the query string, a
form (``%00``, or as it is, even split across two pieces of the body) and a JSON body (its
escape), with a 400 in the route's own form that changes nothing; and a form sent as
multipart/form-data (whose parts may name a character set, such as UTF-7, that writes a NUL
without a NUL byte) is refused by every route."""

from __future__ import annotations

import json
import sys
import time

import httpx
import pytest

from bastion.db import Database
from bastion.facts.store import FactStore
from bastion.oauth.store import OAuthStore
from bastion.oauth.users import create_user
from tests.gateway import support as gateway_support
from tests.gateway.streams import modern_headers, modern_request
from tests.gateway.support import PASSWORD, QUICKSTART, Running
from tests.security.conftest import GATEWAY
from tests.server.conftest import ADMIN_KEY, POLICY

NUL = "\u0000"
USER = {"type": "User", "id": f"sam{NUL}"}
TEAM = {"type": "Team", "id": "support"}
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
FORM = {"content-type": "application/x-www-form-urlencoded"}

# What each route family says: the words of the refusal are in its answer.
SAID = {"problem": "detail", "oauth": "error_description", "rpc": "error", "oso": "message"}

# (method, path, headers, body, family): a JSON body with the escape (ASCII, as most send it).
JSON_BODIES = {
    "a fact written": ("POST", "/v1/facts", {"facts": [{"predicate": "has_role", "args": [USER, "member", TEAM]}]}, "problem"),
    "a fact's predicate": ("POST", "/v1/facts", {"facts": [{"predicate": f"has{NUL}role", "args": [TEAM]}]}, "problem"),
    "a fact deleted": ("POST", "/v1/facts/delete", {"patterns": [{"predicate": "has_role", "args": [USER, None, None]}]}, "problem"),
    "a policy's note": ("PUT", "/v1/policy", {"text": POLICY, "note": NUL}, "problem"),
    "a policy's text": ("PUT", "/v1/policy", {"text": POLICY + "# " + NUL + "\n"}, "problem"),
    "a decision": ("POST", "/v1/authorize", {"actor": USER, "action": "read", "resource": "Team:support"}, "problem"),
    "a decision's context key": ("POST", "/v1/authorize", {"actor": "User:sam", "action": "read", "resource": "Team:support", "context": {NUL: 1}}, "problem"),
    "a signal": ("POST", "/v1/signals", {"subject": USER, "name": "risk", "value": 1, "source": "t"}, "problem"),
    "an API key's name": ("POST", "/v1/keys", {"name": NUL, "scopes": ["decide"]}, "problem"),
    "an Oso Cloud fact": ("POST", "/api/batch", [{"inserts": [{"predicate": "has_role", "args": [USER, {"type": "String", "id": "member"}, TEAM]}]}], "oso"),
    "an AuthZEN evaluation": ("POST", "/access/v1/evaluation", {"subject": {"type": "User", "id": NUL}, "action": {"name": "read"}, "resource": {"type": "Team", "id": "support"}}, None),
    "a client registered": ("POST", "/register", {"client_name": NUL, "redirect_uris": ["http://127.0.0.1:9/cb"]}, "oauth"),
}  # fmt: skip

# (path, form body): unauthenticated forms, as anyone may send them.
FORMS = {
    "a token request": ("/token", b"grant_type=authorization_code&code=x&client_id=%00"),
    "a token request, NUL as it is": ("/token", b"grant_type=client_credentials&client_id=a\x00b"),
    "a revocation": ("/revoke", b"token=t&client_id=%00"),
    "an introspection": ("/introspect", b"token=%00"),
    "a backchannel request": ("/bc-authorize", b"scope=openid&client_id=%00&login_hint=sam"),
    "a consent": ("/authorize/consent", b"request_id=%00&decision=allow"),
    "a sign-in": ("/sign-in", b"username=sam%00&password=x"),
    "a backchannel approval": ("/bc-approve/r1", b"decision=%00"),
    "a login": ("/authorize/login", b"request_id=%00&username=sam&password=x"),
}

# GET paths and queries (the path's escape is decoded by the server, the query's by the route).
LOCATIONS = {
    "an authorization request's client": ("/authorize?client_id=%00&response_type=code", "oauth"),
    "a facts query": ("/v1/facts?predicate=has%00role", "problem"),
    "an Oso Cloud facts query": ("/api/facts?predicate=has%00role", "oso"),
    "an approval's id": ("/v1/approvals/a%00b", "problem"),
    "an MCP server's name": ("/mcp/desk%00", "rpc"),
    "a metadata document's path": ("/.well-known/oauth-protected-resource/mcp/%00", None),
}


@pytest.fixture
def bastion(database_url, tmp_path, served):
    """A served bastion (authorization server, gateway in front of the quickstart's desk) on
    SQLite or PostgreSQL, sam's token for desk, and the store."""
    policy = tmp_path / "policy.polar"
    policy.write_text(gateway_support.test_policy())
    config = GATEWAY % (tmp_path / "keys", sys.executable, QUICKSTART / "server.py")
    server = served(database_url, config)
    db = Database(database_url)
    create_user(OAuthStore(db), "sam", PASSWORD, time.time(), actor="test")
    FactStore(db).apply(gateway_support.facts())
    db.close()
    store = FactStore.open(database_url)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        token = Running(server.url, None, None, None, http, None).token("sam", "desk")
        yield server, http, token, store
    store.close()


def refused(response: httpx.Response, family: str | None, status: int = 400) -> str | None:
    """Why ``response`` is not the refusal of a NUL it should be, or None."""
    if response.status_code != status:
        return f"{response.status_code}: {response.text[:300]}"
    if family is None:
        said = response.text
    else:
        try:
            said = json.dumps(response.json().get(SAID[family]))
        except ValueError:
            return f"not JSON: {response.text[:300]}"
    word = "U+0000" if status == 400 else "multipart/form-data"
    return None if word in said else f"the answer does not say why: {response.text[:300]}"


def test_a_nul_is_refused_by_every_route_and_changes_nothing(bastion):
    server, http, token, store = bastion
    head = store.head()
    wrong: dict[str, str] = {}
    for name, (method, path, body, family) in JSON_BODIES.items():
        answer = http.request(
            method,
            path,
            content=json.dumps(body).encode(),
            headers={**ADMIN, "content-type": "application/json"},
        )
        if (why := refused(answer, family)) is not None:
            wrong[name] = why
    for name, (path, body) in FORMS.items():
        if (why := refused(http.post(path, content=body, headers=FORM), "oauth")) is not None:
            wrong[name] = why
    for name, (path, family) in LOCATIONS.items():
        if (why := refused(http.get(path, headers=ADMIN), family)) is not None:
            wrong[name] = why
    # A tool's name, in the gateway's JSON-RPC.
    call = modern_request(1, "tools/call", {"name": NUL, "arguments": {}})
    answer = http.post(
        "/mcp/desk",
        content=json.dumps(call).encode(),
        headers=modern_headers(token, "tools/call", "x"),
    )
    if (why := refused(answer, "rpc")) is not None:
        wrong["a tool's name"] = why
    assert not wrong, json.dumps(wrong, indent=1)
    assert store.head() == head  # no write, no entry in the change log
    log = server.log.read_text()
    assert "Traceback" not in log and "NUL" not in log, log[-3000:]
    # The server answers as before: a decision, a tool call.
    decided = http.post(
        "/v1/authorize",
        json={"actor": "User:sam", "action": "read", "resource": "Team:support"},
        headers=ADMIN,
    )
    assert decided.status_code == 200, decided.text
    call = modern_request(2, "tools/call", {"name": "search_customers", "arguments": {}})
    answer = http.post(
        "/mcp/desk",
        json=call,
        headers={
            **modern_headers(token, "tools/call", "search_customers"),
            "accept": "application/json",
        },
    )
    assert "result" in answer.json(), answer.text


def test_a_nul_split_across_two_pieces_of_a_form_is_refused(bastion):
    server, http, _token, _store = bastion

    def pieces():
        yield b"grant_type=client_credentials&client_id=%"
        yield b"00"

    # Sent chunked, in two pieces: neither holds all of "%00".
    answer = http.post("/token", content=pieces(), headers=FORM)
    assert refused(answer, "oauth") is None, answer.text
    answer = http.post("/token", content=iter([b"client_id=a%0", b"0b"]), headers=FORM)
    assert refused(answer, "oauth") is None, answer.text
    # "%2500" is the text "%00", not a NUL: read as a form, and refused only as a client unknown.
    answer = http.post(
        "/token", content=b"grant_type=client_credentials&client_id=%2500", headers=FORM
    )
    assert answer.status_code == 401 and answer.json()["error"] == "invalid_client", answer.text


def test_a_multipart_form_is_refused_by_every_route(bastion):
    server, http, _token, _store = bastion
    # A part in UTF-7, where "+AAA-" is a NUL and no byte of it is one.
    body = (
        b'--b\r\ncontent-disposition: form-data; name="client_id"\r\n\r\n+AAA-\r\n'
        b'--b\r\ncontent-disposition: form-data; name="grant_type"\r\n\r\n'
        b"client_credentials\r\n--b--\r\n"
    )
    headers = {**ADMIN, "content-type": "multipart/form-data; boundary=b; charset=utf-7"}
    # (The gateway takes only application/json, and answers any other body 415 once the caller
    # is known: it reads no form.)
    for path, family in [
        ("/token", "oauth"),
        ("/authorize/login", "oauth"),
        ("/v1/facts", "problem"),
    ]:
        answer = http.post(path, content=body, headers=headers)
        assert refused(answer, family, status=415) is None, (path, answer.text)


def test_a_refusal_quotes_a_key_it_could_not_write_as_its_escape(bastion):
    """A number refused under a key that is not text (the number is met first): every route's
    refusal is a 400 naming the place with the key written as its escape (a 500 at /register
    before: its answer, UTF-8, could not hold the key as it came), and changes nothing."""
    server, http, token, store = bastion
    head = store.head()
    wrong: dict[str, str] = {}
    for key in ["\\ud800", "a\\u0000b", "\\udfff\\u0000"]:
        body = f'{{"{key}": 1e999}}'.encode()  # ASCII text: the key's characters as escapes
        for name, (method, path, _body, family) in JSON_BODIES.items():
            answer = http.request(
                method, path, content=body, headers={**ADMIN, "content-type": "application/json"}
            )
            said = answer.text if family is None else json.dumps(answer.json().get(SAID[family]))
            if answer.status_code != 400 or "1e999 is too large" not in said:
                wrong[f"{name}, {key}"] = f"{answer.status_code}: {answer.text[:300]}"
        call = modern_headers(token, "tools/call", "x")
        answer = http.post("/mcp/desk", content=body, headers=call)
        if answer.status_code != 400 or "1e999 is too large" not in answer.text:
            wrong[f"a tool call, {key}"] = f"{answer.status_code}: {answer.text[:300]}"
    assert not wrong, json.dumps(wrong, indent=1)
    assert store.head() == head
    assert "Traceback" not in server.log.read_text()
