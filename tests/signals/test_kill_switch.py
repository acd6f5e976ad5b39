"""The kill switch against a running bastion: suspending an agent, a user or a 2025-11-25 session
(API or command line) refuses its very next call with reason ``suspended`` (recorded) and ends its
open streams at once; resuming lifts it on the same token. While it holds, the token endpoint
issues the user or agent nothing (every grant) and introspection calls their tokens inactive, so
no token made during a suspension outlives it. Every malformed or unauthorised suspension is
refused and changes nothing."""

from __future__ import annotations

import base64
import json
import time
import uuid
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import httpx
import pytest

from bastion.audit.actor import cli_actor
from bastion.cli import main
from bastion.facts.model import Entity
from bastion.facts.store import FactStore
from bastion.oauth import registration
from bastion.signals.suspensions import SCOPE, stored
from tests.gateway.streams import (
    call_tool,
    events,
    legacy_session,
    modern_headers,
    modern_request,
    post_in_background,
    streamed_in_background,
    traced,
)
from tests.gateway.support import REDIRECT_URI, register_public_client, start
from tests.oauth.support import hidden_fields, log_in_and_consent, pkce_pair
from tests.signals.support import ERAS, attempt, latest_agent, running
from tests.waits import PATIENCE, eventually

QUERY = {"query": "a"}


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    yield from running(tmp_path_factory, "kill-switch", "")


@pytest.fixture(scope="module")
def key(bastion) -> str:
    key, _ = bastion.app.state.keys.create("kill switch", ["suspensions"], created_by="test")
    return key


def api(bastion, key: str, method: str, path: str = "", **kwargs):
    return bastion.http.request(
        method,
        f"{bastion.url}/v1/suspensions{path}",
        headers={"authorization": f"Bearer {key}"},
        **kwargs,
    )


def suspend(bastion, key: str, kind: str, id: str) -> None:
    answer = api(bastion, key, "POST", json={"kind": kind, "id": id})
    assert answer.status_code == 201, answer.text
    assert answer.json()["suspension"] == {"kind": kind, "id": id, "expires_at": None}


def resume(bastion, key: str, kind: str, id: str) -> None:
    answer = api(bastion, key, "DELETE", f"/{kind}/{quote(id, safe='')}")
    assert answer.status_code == 200, answer.text


def suspension_events(bastion, capsys, id: str) -> list[dict]:
    """The kill switch's audit events about ``id``, oldest first, as ``bastion audit events``
    shows them."""
    capsys.readouterr()
    database = bastion.app.state.config.database
    assert main(["audit", "events", "--kind", "suspension.", "--json", "--database", database]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return [e for e in shown if e["detail"]["id"] == id]


def client_id(token: str) -> str:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["client_id"]


def error_of(answer: dict) -> dict:
    assert "error" in answer, answer
    return answer["error"]


@pytest.mark.parametrize("mode", ERAS)
def test_a_suspended_agent_is_refused_at_its_next_call_and_works_again_once_resumed(
    bastion, key, mode
):
    async def script(client, seen):
        await attempt(client, seen, "calls", "search_customers", QUERY)
        agent = seen["agent"] = latest_agent(bastion)
        suspend(bastion, key, "agent", agent)
        await attempt(client, seen, "calls", "search_customers", QUERY)
        try:
            await client.list_tools()
            seen["listed"] = True
        except Exception as e:  # the SDK raises the JSON-RPC error
            seen["listed"] = e
        resume(bastion, key, "agent", agent)
        await attempt(client, seen, "calls", "search_customers", QUERY)

    seen = bastion.sdk("sam", "deskhttp", mode, script)
    before, (_, code, data), after = seen["calls"]
    assert before[0] == "ok" and after[0] == "ok"  # the same token, before and after
    assert (code, data["reason"]) == (-32003, "suspended")
    assert seen["listed"] is not True  # every call, not only tools/call
    assert len(seen["redirects"]) == 1
    bastion.flush()
    record = bastion.records.get(data["decision_id"])
    assert (record.result, record.reason) == ("deny", "suspended")
    assert record.context["suspended"] == f'Agent{{"{seen["agent"]}"}}'
    assert not stored(bastion.store)
    # Built in: a suspended agent that still calls raises an alert, once per cooldown, linked
    # to the refusals that raised it.
    [alert] = [
        a
        for a in bastion.app.state.alerts.store.list()
        if a.name == "suspended_still_calling" and a.principal == f'Agent{{"{seen["agent"]}"}}'
    ]
    assert alert.severity == "high" and data["decision_id"] in alert.decision_ids


def test_a_suspended_agent_gets_no_ping_notification_or_response_through(bastion, key):
    """ping, a notification and a response to bastion's request were answered (200, 202) with
    no decision: the kill switch refuses them as every other message, recorded as the calls'
    refusals are. A DELETE of the agent's own session, or a cancellation of its own request,
    only ends what it holds: they stay allowed."""
    token = bastion.token("sam", "deskhttp")
    headers = legacy_session(bastion, token, "deskhttp")
    url = bastion.mcp_url("deskhttp")
    ping = {"jsonrpc": "2.0", "id": 7, "method": "ping"}
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    answer = {"jsonrpc": "2.0", "id": "bastion-1", "result": {}}
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 9}}
    assert bastion.http.post(url, json=ping, headers=headers).json()["result"] == {}
    agent = client_id(token)
    suspend(bastion, key, "agent", agent)
    try:
        pinged = bastion.http.post(url, json=ping, headers=headers)
        modern = bastion.http.post(
            url, json=modern_request(8, "ping", {}), headers=modern_headers(token, "ping")
        )
        notified = bastion.http.post(url, json=initialized, headers=headers)
        responded = bastion.http.post(url, json=answer, headers=headers)
        cancelled = bastion.http.post(url, json=cancel, headers=headers)
        deleted = bastion.http.delete(url, headers=headers)
    finally:
        resume(bastion, key, "agent", agent)
    refusals = [error_of(pinged.json()), error_of(modern.json())]
    for sent in (notified, responded):
        assert sent.status_code == 403, sent.text
        refusals.append(error_of(sent.json()))
    assert [(e["code"], e["data"]["reason"]) for e in refusals] == [(-32003, "suspended")] * 4
    bastion.flush()
    for refusal in refusals:
        record = bastion.records.get(refusal["data"]["decision_id"])
        assert (record.result, record.reason) == ("deny", "suspended")
        assert record.context["suspended"] == f'Agent{{"{agent}"}}'
    assert cancelled.status_code == 202 and deleted.status_code == 204


def test_suspending_a_user_refuses_all_their_agents_and_no_one_else(bastion, key):
    sam, avery = bastion.token("sam", "deskhttp"), bastion.token("avery", "deskhttp")
    suspend(bastion, key, "user", "sam")
    try:
        refused = error_of(call_tool(bastion, sam, "deskhttp", "search_customers", QUERY))
        # A new authorization (a new agent, a fresh token) is no way around it: the sign-in
        # itself is refused (tests/signals/test_standing.py), so no code and no token.
        signed_in = sign_in(bastion, "sam")
        other = call_tool(bastion, avery, "deskhttp", "search_customers", QUERY)
    finally:
        resume(bastion, key, "user", "sam")
    assert refused["data"]["reason"] == "suspended"
    assert signed_in.status_code == 403 and "suspended" in signed_in.text
    assert "result" in other
    assert "result" in call_tool(bastion, sam, "deskhttp", "search_customers", QUERY)


def authorize_url(bastion, client: str, challenge: str, server: str = "deskhttp") -> str:
    """The authorization request of the public client ``client`` for ``server`` (PKCE)."""
    params = {
        "response_type": "code",
        "client_id": client,
        "redirect_uri": REDIRECT_URI,
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": bastion.mcp_url(server),
        "scope": "customers:read",
    }
    return f"{bastion.url}/authorize?{urlencode(params)}"


def authorization_code(bastion, username: str, server: str = "deskhttp") -> dict:
    """The token request that redeems a fresh sign-in and consent of ``username``: a new public
    client's code, with its PKCE verifier."""
    client = register_public_client(bastion.http, bastion.url)
    verifier, challenge = pkce_pair()
    authorize = authorize_url(bastion, client, challenge, server)
    bastion.logins.append(username)
    answer = log_in_and_consent(bastion.url, authorize, username, bastion.password)
    return {
        "grant_type": "authorization_code",
        "code": parse_qs(urlsplit(answer.headers["location"]).query)["code"][0],
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
        "client_id": client,
    }


def sign_in(bastion, username: str):
    """The answer to ``username``'s sign-in at /authorize, for a new public client."""
    client = register_public_client(bastion.http, bastion.url)
    _, challenge = pkce_pair()
    with httpx.Client(follow_redirects=False, timeout=10) as browser:
        page = browser.get(authorize_url(bastion, client, challenge))
        fields = {**hidden_fields(page.text), "username": username, "password": bastion.password}
        return browser.post(f"{bastion.url}/authorize/login", data=fields)


def token_request(bastion, form: dict, auth: tuple[str, str] | None = None):
    return bastion.http.post(f"{bastion.url}/token", data=form, auth=auth)


def confidential_client(bastion, name: str, **metadata) -> tuple[str, str]:
    """A confidential client registered as `bastion clients create` does: its id and secret."""
    oauth = bastion.app.state.oauth
    values = registration.validate_client_metadata(
        {
            "client_name": name,
            "grant_types": ["client_credentials"],
            "token_endpoint_auth_method": "client_secret_basic",
            "scope": "customers:read",
        },
        oauth.settings,
    )
    registered = registration.new_client(values, source="admin", now=time.time(), **metadata)
    oauth.store.save_client(registered.client)
    created = registered.response()
    return created["client_id"], created["client_secret"]


def refused_while_suspended(answer, principal: str) -> None:
    assert answer.status_code == 400, answer.text
    error = answer.json()
    assert error["error"] == "invalid_grant"
    assert f"{principal} is suspended" in error["error_description"]


def test_a_suspended_user_is_issued_no_token_and_their_tokens_introspect_inactive(bastion, key):
    resource_server = confidential_client(
        bastion, "resource server", introspection_resources=("*",)
    )
    issued = token_request(bastion, authorization_code(bastion, "sam")).json()
    refresh = {
        "grant_type": "refresh_token",
        "refresh_token": issued["refresh_token"],
        "client_id": client_id(issued["access_token"]),
    }

    def introspect(token: str) -> dict:
        url = f"{bastion.url}/introspect"
        return bastion.http.post(url, data={"token": token}, auth=resource_server).json()

    assert introspect(issued["access_token"])["active"] is True
    code = authorization_code(bastion, "sam")  # consented before the suspension
    suspend(bastion, key, "user", "sam")
    try:
        inactive = [introspect(issued["access_token"]), introspect(issued["refresh_token"])]
        refreshed = token_request(bastion, refresh)
        redeemed = token_request(bastion, code)
    finally:
        resume(bastion, key, "user", "sam")
    assert inactive == [{"active": False}, {"active": False}]
    # The answers say nothing of why (RFC 7662 §2.2); their audit rows do.
    answers = bastion.app.state.oauth.audit.events("token.introspected")
    held = [e for e in answers if e.client_id == resource_server[0] and e.detail["active"] is False]
    assert sorted(e.detail["token_kind"] for e in held) == ["access_token", "refresh_token"]
    for row in held:
        assert row.subject == "sam" and row.detail["reason"] == "suspended"
        assert row.detail["suspended"] == repr(Entity("User", "sam"))
        assert row.detail["token_client_id"] == client_id(issued["access_token"])
    refused_while_suspended(refreshed, "user 'sam'")
    refused_while_suspended(redeemed, "user 'sam'")
    # Nothing was spent by the refusals: once resumed the same refresh token and code work.
    assert introspect(issued["access_token"])["active"] is True
    assert token_request(bastion, refresh).status_code == 200
    assert token_request(bastion, code).status_code == 200


def test_a_suspended_agent_is_issued_no_token_by_client_credentials(bastion, key):
    agent = confidential_client(bastion, "nightly agent")
    form = {"grant_type": "client_credentials", "resource": bastion.mcp_url("deskhttp")}
    assert token_request(bastion, form, agent).status_code == 200
    suspend(bastion, key, "agent", agent[0])
    try:
        refused = token_request(bastion, form, agent)
    finally:
        resume(bastion, key, "agent", agent[0])
    refused_while_suspended(refused, f"agent {agent[0]!r}")
    assert token_request(bastion, form, agent).status_code == 200


def test_each_refusal_of_a_token_to_a_suspended_user_is_audited_naming_them(bastion, key):
    """The kill switch's refusals at /token are rare and security-relevant: each has a row of its
    own with reason ``suspended``, naming the user and agent, and is not counted in with the
    other invalid_grants of a public client (which anyone can name)."""
    issued = token_request(bastion, authorization_code(bastion, "sam")).json()
    agent = client_id(issued["access_token"])
    refresh = {"grant_type": "refresh_token", "refresh_token": issued["refresh_token"]}
    suspend(bastion, key, "user", "sam")
    try:
        for _ in range(3):
            refused_while_suspended(
                token_request(bastion, {**refresh, "client_id": agent}), "user 'sam'"
            )
    finally:
        resume(bastion, key, "user", "sam")
    rows = [
        e
        for e in bastion.app.state.oauth.audit.events("token.refused", 10000)
        if e.client_id == agent
    ]
    assert len(rows) == 3
    for row in rows:
        assert (row.subject, row.detail["reason"], row.detail["error"]) == (
            "sam",
            "suspended",
            "invalid_grant",
        )
        assert row.detail["suspended"] == 'User{"sam"}' and row.detail["agents"] == [agent]
        assert row.detail["grant_type"] == "refresh_token" and "repeats" not in row.detail


@pytest.mark.parametrize("era", ["legacy", "modern"])
def test_suspending_an_agent_ends_its_open_streams_at_once_and_no_others(bastion, key, era):
    token, other = bastion.token("sam", "lab"), bastion.token("sam", "lab")
    if era == "legacy":
        opened = [
            bastion.http.stream(
                "GET",
                bastion.mcp_url("lab"),
                headers={
                    **{
                        k: v
                        for k, v in legacy_session(bastion, t, "lab").items()
                        if k != "content-type"
                    },
                    "accept": "text/event-stream",
                },
            )
            for t in (token, other)
        ]
    else:
        opened = [
            bastion.http.stream(
                "POST",
                bastion.mcp_url("lab"),
                json=modern_request(f"w-{i}", "subscriptions/listen", {"notifications": {}}),
                headers=modern_headers(t, "subscriptions/listen"),
            )
            for i, t in enumerate((token, other))
        ]
    agent = client_id(token)
    try:
        with opened[0] as suspended_stream, opened[1] as kept_stream:
            assert suspended_stream.status_code == kept_stream.status_code == 200
            frames = events(suspended_stream)
            if era == "modern":
                assert next(frames)["method"] == "notifications/subscriptions/acknowledged"
            suspend(bastion, key, "agent", agent)
            assert list(frames) == []  # ended (a client read timeout would fail the test instead)
            kept = [
                listener
                for listener in bastion.app.state.gateway.sessions.listeners_of("lab")
                if listener.token == other and not listener.refused
            ]
            assert kept
    finally:
        resume(bastion, key, "agent", agent)


@pytest.mark.parametrize("server", ["lab", "labhttp"])
@pytest.mark.parametrize("accept", ["application/json", "application/json, text/event-stream"])
def test_suspending_an_agent_stops_its_calls_under_way_and_no_others(bastion, key, server, accept):
    """The kill switch refused a suspended agent's next call and ended its streams, but a call
    already at its upstream ran on, and its result reached the agent after it was suspended.
    Now the call is cancelled at its upstream at once and answered as the suspended agent's
    next call is (-32003, reason ``suspended``), naming the decision that let it through, whose
    record says why it has no result. Another agent of the same user goes on."""
    token, other = bastion.token("sam", server), bastion.token("sam", server)
    agent = client_id(token)
    tag, kept = uuid.uuid4().hex, uuid.uuid4().hex
    events_first = "event-stream" in accept
    headers = {**modern_headers(token, "tools/call", "wait"), "accept": accept}
    wait = {"name": "wait", "arguments": {"seconds": 30, "tag": tag}}
    answer = (streamed_in_background if events_first else post_in_background)(
        bastion, server, headers, modern_request(7, "tools/call", wait)
    )
    untouched = post_in_background(
        bastion,
        server,
        modern_headers(other, "tools/call", "wait"),
        modern_request(
            8, "tools/call", {"name": "wait", "arguments": {"seconds": 1.5, "tag": kept}}
        ),
    )
    try:
        assert traced(bastion, "wait-started", tag) and traced(bastion, "wait-started", kept)
        if events_first:  # answered as events once the call runs for a while
            assert answer["began"].wait(PATIENCE), "the answer never began"
        suspend(bastion, key, "agent", agent)
        assert traced(bastion, "wait-cancelled", tag)
        answer["thread"].join(PATIENCE)
        assert not answer["thread"].is_alive()
    finally:
        resume(bastion, key, "agent", agent)
    assert answer["status"] == 200, answer
    if events_first:
        assert answer["type"].startswith("text/event-stream")
        data = [line[5:] for line in answer["text"].splitlines() if line.startswith("data:")]
        refused = json.loads(data[-1])
    else:
        refused = json.loads(answer["text"])
    assert refused["id"] == 7 and "result" not in refused, refused
    assert (refused["error"]["code"], refused["error"]["data"]["reason"]) == (-32003, "suspended")
    bastion.flush()
    record = bastion.records.get(refused["error"]["data"]["decision_id"])
    assert (record.result, record.reason) == ("allow", "its caller was suspended while it ran")
    untouched["thread"].join(PATIENCE)
    assert untouched["status"] == 200 and "waited 1.5s" in untouched["text"], untouched


def test_suspending_a_session_refuses_it_and_ends_it_while_a_new_session_works(bastion, key):
    token = bastion.token("sam", "deskhttp")
    headers = legacy_session(bastion, token, "deskhttp")
    session = headers["mcp-session-id"]
    call = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "search_customers", "arguments": QUERY},
    }
    suspend(bastion, key, "session", session)
    try:
        answer = bastion.http.post(bastion.mcp_url("deskhttp"), json=call, headers=headers)
        fresh = legacy_session(bastion, token, "deskhttp")
        other = bastion.http.post(bastion.mcp_url("deskhttp"), json=call, headers=fresh)
    finally:
        resume(bastion, key, "session", session)
    # The session was ended when the suspension came: it is gone (404), or refused if the
    # call raced its ending; either way the call never ran.
    assert answer.status_code == 404 or "suspended" in answer.text, answer.text
    assert other.status_code == 200 and "result" in other.text, other.text


def test_the_command_line_suspends_and_resumes_on_the_deployments_database(bastion, capsys):
    token = bastion.token("sam", "deskhttp")
    agent = client_id(token)
    database = bastion.app.state.config.database
    assert main(["agents", "suspend", agent, "--database", database]) == 0
    refused = until(
        lambda: call_tool(bastion, token, "deskhttp", "search_customers", QUERY), "error"
    )
    assert error_of(refused)["data"]["reason"] == "suspended"
    assert main(["agents", "list", "--suspended", "--database", database, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["id"] == agent
    assert main(["agents", "resume", agent, "--database", database]) == 0
    answer = until(
        lambda: call_tool(bastion, token, "deskhttp", "search_customers", QUERY), "result"
    )
    assert "result" in answer
    assert main(["agents", "resume", agent, "--database", database]) == 2  # nothing to resume
    # Who suspended the agent and who lifted it, each once (nothing to resume: no record).
    events = suspension_events(bastion, capsys, agent)
    assert [(e["kind"], e["client_id"], e["detail"]["actor"]) for e in events] == [
        ("suspension.created", agent, cli_actor()),
        ("suspension.lifted", agent, cli_actor()),
    ]
    assert events[0]["detail"]["suspended"] == "agent"
    assert events[0]["detail"]["expires_at"] is None


def test_a_suspension_longer_than_ten_years_is_refused_before_anything_is_stored(tmp_path, capsys):
    """`--minutes` had no bound: 99999999999 stored the suspension, then failed to print its
    end (year 192159). The bound is the API's (`MAX_SUSPENSION_SECONDS`), checked first."""
    database = str(tmp_path / "bastion.db")
    FactStore.open(database).close()
    with pytest.raises(SystemExit) as refused:
        main(["agents", "suspend", "nope", "--minutes", "99999999999", "--database", database])
    assert refused.value.code == 2
    assert "give a whole number from 1 to 5256000" in capsys.readouterr().err
    store = FactStore.open(database)
    try:
        assert not stored(store)
    finally:
        store.close()
    longest = ["--minutes", "5256000", "--unregistered", "--database", database]
    assert main(["agents", "suspend", "nope", *longest]) == 0
    assert capsys.readouterr().out.startswith("suspended agent nope until 20")


def until(call, key: str) -> dict:
    """Call until the answer has ``key``: the server hears of the command line's write through
    the change log (a poll on SQLite), a moment later."""
    answer = call()

    def answered() -> bool:
        nonlocal answer
        if key not in answer:
            answer = call()
        return key in answer

    eventually(answered, every=0.05)
    return answer


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"kind": "robot", "id": "x"}, 400),
        ({"kind": "agent"}, 400),
        ({"kind": "agent", "id": ""}, 400),
        ({"kind": "agent", "id": "x" * 513}, 400),
        ({"kind": "agent", "id": "line\nbreak"}, 400),
        # Else stored as "x\n" and answered 201, while agent "x" is not held (fail open).
        ({"kind": "agent", "id": "x\n"}, 400),
        ({"kind": "agent", "id": 7}, 400),
        ({"kind": "agent", "id": "x", "expires_at": "soon"}, 400),
        ({"kind": "agent", "id": "x", "expires_at": 1}, 422),  # already over
        ({"kind": "agent", "id": "x", "expires_at": time.time() + 11 * 365 * 86400}, 422),
        ([], 400),
    ],
)
def test_a_malformed_suspension_is_refused_and_changes_nothing(bastion, key, body, status):
    answer = api(bastion, key, "POST", json=body)
    assert answer.status_code == status, answer.text
    assert answer.json()["detail"]
    assert not stored(bastion.store)


def test_suspensions_need_a_key_with_their_scope(bastion, key):
    body = {"kind": "agent", "id": "x"}
    no_key = bastion.http.post(f"{bastion.url}/v1/suspensions", json=body)
    assert no_key.status_code == 401
    assert api(bastion, "bst_not-a-key", "POST", json=body).status_code == 401
    facts_only, _ = bastion.app.state.keys.create("facts", ["facts:write"], created_by="test")
    assert api(bastion, facts_only, "POST", json=body).status_code == 403
    assert api(bastion, facts_only, "GET").status_code == 403
    assert api(bastion, facts_only, "DELETE", "/agent/x").status_code == 403
    assert not stored(bastion.store)


ONE = {"predicate": "suspended", "args": [{"type": "Agent", "id": "stopped-app"}]}
# Oso Cloud's spelling: a typed value, or a wildcard.
OSO_ANYONE = {"predicate": "suspended", "args": [{"type": None, "id": None}]}


def fact_writes(bastion, key: str) -> list[httpx.Response]:
    """Each fact API's way to lift the suspension of ``Agent{"stopped-app"}`` or to suspend
    it, tried with ``key``: deletes by value and by wildcard, a batch, an insert, an import,
    and Oso Cloud's batch (its SDK's ``insert``, ``delete`` and ``batch``)."""
    anyone = {"predicate": "suspended", "args": [None]}
    attempts = [
        ("/v1/facts/delete", {"json": {"patterns": [ONE]}}),
        ("/v1/facts/delete", {"json": {"patterns": [anyone]}}),
        ("/v1/facts/batch", {"json": {"delete": [anyone], "insert": []}}),
        ("/v1/facts", {"json": {"facts": [ONE]}}),
        ("/v1/facts/import", {"content": json.dumps(ONE).encode() + b"\n"}),
        ("/api/batch", {"json": [{"deletes": [ONE]}]}),
        ("/api/batch", {"json": [{"deletes": [OSO_ANYONE]}]}),
        ("/api/batch", {"json": [{"inserts": [ONE]}]}),
    ]
    return [
        bastion.http.post(
            f"{bastion.url}{path}", headers={"authorization": f"Bearer {key}"}, **body
        )
        for path, body in attempts
    ]


@pytest.mark.parametrize("declared", [False, True])
def test_no_key_of_the_fact_apis_lifts_or_makes_a_suspension_without_the_scope(tmp_path, declared):
    """A suspension is a fact, but the keys that write facts (``facts:write``, Oso Cloud's
    ``oso:write``: an application running its own agents holds one) must not lift the kill
    switch that stops those agents, nor suspend anyone: every fact write that touches a
    ``suspended`` fact is refused 403 and changes nothing, unless the key has ``suspensions``
    (a restore of an export, say). Inserts pass the policy's check first: where it does not
    declare ``suspended`` they are 422, as before."""
    rules = "declare suspended(Agent);" if declared else ""
    with start(tmp_path, policy_extra=rules) as bastion:
        keys = bastion.app.state.keys
        kill_switch, _ = keys.create("kill switch", ["suspensions"], created_by="test")
        writer, _ = keys.create("app", ["facts:write", "oso:write"], created_by="test")
        suspend(bastion, kill_switch, "agent", "stopped-app")
        held = stored(bastion.store)
        assert held
        for answer in fact_writes(bastion, writer):
            request = answer.request
            inserts = request.url.path in ("/v1/facts", "/v1/facts/import")
            expected = 422 if not declared and (inserts or b'"inserts"' in request.content) else 403
            assert answer.status_code == expected, (request.url.path, request.content, answer.text)
            if expected == 403:
                assert "'suspensions'" in answer.text, answer.text
            assert stored(bastion.store) == held, request.content
        restore, _ = keys.create("restore", ["facts:write", "oso:write", SCOPE], created_by="test")
        answer = bastion.http.post(
            f"{bastion.url}/v1/facts/delete",
            headers={"authorization": f"Bearer {restore}"},
            json={"patterns": [ONE]},
        )
        assert answer.status_code == 200 and answer.json()["deleted"] == 1, answer.text
        assert not stored(bastion.store)


def test_resuming_what_is_not_suspended_is_404_and_listing_shows_what_is(bastion, key, capsys):
    head = bastion.store.head()
    assert api(bastion, key, "DELETE", "/agent/nobody").status_code == 404
    assert api(bastion, key, "DELETE", "/robot/x").status_code == 400
    assert bastion.store.head() == head  # refused, and nothing written: no change logged
    suspend(bastion, key, "agent", "https://agent.example/client.json")
    try:
        listed = api(bastion, key, "GET").json()["suspensions"]
    finally:
        resume(bastion, key, "agent", "https://agent.example/client.json")
    assert listed == [
        {"kind": "agent", "id": "https://agent.example/client.json", "expires_at": None}
    ]
    assert api(bastion, key, "GET").json() == {"suspensions": []}
    # Recorded with the API key that did it; the refused resume recorded nothing.
    key_id = bastion.app.state.keys.verify(key).id
    events = suspension_events(bastion, capsys, "https://agent.example/client.json")
    assert [(e["kind"], e["detail"]["actor"]) for e in events] == [
        ("suspension.created", f"key:{key_id}"),
        ("suspension.lifted", f"key:{key_id}"),
    ]
    assert suspension_events(bastion, capsys, "nobody") == []


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    yield from running(tmp_path_factory, "kill-switch-replicas", "", replicas=1)


def test_a_suspension_taken_by_one_replica_is_enforced_by_another(two_replicas):
    bastion = two_replicas
    key, _ = bastion.app.state.keys.create("kill switch", ["suspensions"], created_by="test")
    token = bastion.token("sam", "deskhttp")
    other = bastion.replicas[0]

    def call_other() -> dict:
        response = bastion.http.post(
            f"{other}/mcp/deskhttp",
            json=modern_request(1, "tools/call", {"name": "search_customers", "arguments": QUERY}),
            headers=modern_headers(token, "tools/call", "search_customers"),
        )
        return response.json()

    assert "result" in call_other()
    suspend(bastion, key, "agent", client_id(token))
    assert error_of(until(call_other, "error"))["data"]["reason"] == "suspended"
    resume(bastion, key, "agent", client_id(token))
    assert "result" in until(call_other, "result")
