"""Every way the gateway refuses or fails a client's request once its token is verified leads to
what records it, as docs/gateway.md ("Decision records and `bastion audit tail`") promises:

- a refusal or failure after a decision: the error names ``data.decision_id`` (in the JSON-RPC
  error, or the body of a 401/403 step-up), and ``bastion audit show <id>`` prints its record,
  naming the user and the agent, the server, the method, the target, the reason and the policy
  version the client was decided under;
- a refusal before any decision (the request itself is bad): no id, and an ``mcp.refused`` audit
  row naming the user, the agent, the server, the method and the reason;
- an error the upstream answered with is neither of bastion's refusals: it is relayed with the
  id of the decision that let the call through, whose record says what the upstream answered,
  and it leaves no ``mcp.refused`` row saying bastion refused the request. A list has no
  decision of its own: an upstream's error there is relayed and logged, and written nowhere
  else;
- a call let through that bastion itself ends (a limit found past once the upstream answered,
  a question of the upstream's it will not relay, its own failure) names the decision, whose
  record says so: ``bastion error`` and the code, or ``internal error`` (logged with its
  traceback), never ``upstream error``.

Each case is driven by the MCP SDK's client where it can send it, by raw HTTP where it cannot.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from mcp.shared.exceptions import MCPError

from bastion.cli import main
from bastion.gateway import handlers, transport
from bastion.policy.parser import parse_fact
from bastion.signals.suspensions import suspend, suspension
from tests.waits import PATIENCE

from .lab_server import REFUSED_CURSORS
from .streams import legacy_session, messages, modern_headers, modern_request, traced

LONG = "x" * 5000


@dataclass(frozen=True)
class Expected:
    """What must record a case: ``kind`` "decision" (a record ``audit show`` finds by the id the
    client was given), "refused" (an ``mcp.refused`` row of the caller, no id given),
    "upstream" (an upstream's error where there is no decision: relayed as it came, and a line
    in the log naming ``reason``, the server, the method and the agent, no row) or "unrecorded"
    (refused before the token is looked at, as the docs say: neither)."""

    kind: str
    reason: str
    server: str
    method: str
    target: str | None = None
    result: str | None = None  # the record's result (a decision)


@dataclass
class Outcome:
    """What the client was answered: its error's ``data`` (or a step-up's body), and the agent."""

    data: dict | None
    client_id: str
    user: str = "sam"
    code: int | None = None  # the JSON-RPC error's


def _claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def _sdk(user: str, server: str, script) -> Callable:
    """A case driven by the SDK's client (2025-11-25, sessions and all): ``script(client)``
    must raise the `MCPError` the case is about."""

    def drive(bastion) -> Outcome:
        async def run(client, seen):
            with pytest.raises(MCPError) as refused:
                await script(client)
            seen["data"] = refused.value.error.data
            seen["code"] = refused.value.error.code

        seen = bastion.sdk(user, server, "legacy", run)
        token = seen["tokens"].access_token
        return Outcome(seen["data"], _claims(token)["client_id"], user, seen["code"])

    return drive


def _http(server: str, send, user: str = "sam", status: int = 200) -> Callable:
    """A case sent as raw HTTP: ``send(bastion, token)`` -> the response (of ``status``)."""

    def drive(bastion) -> Outcome:
        token = bastion.token(user, server)
        response = send(bastion, token)
        assert response.status_code == status, response.text
        body = messages(response)[-1] if response.content else {}
        data = body.get("error", {}).get("data") if "jsonrpc" in body else body
        code = body.get("error", {}).get("code") if "jsonrpc" in body else None
        return Outcome(data, _claims(token)["client_id"], user, code)

    return drive


def _post(server: str, method: str, params: dict, name: str | None = None, **headers):
    def send(bastion, token):
        return bastion.http.post(
            bastion.mcp_url(server),
            json=modern_request(9, method, params),
            headers={**modern_headers(token, method, name), **headers},
        )

    return send


def _raw(server: str, content: bytes, **headers):
    def send(bastion, token):
        return bastion.http.post(
            bastion.mcp_url(server),
            content=content,
            headers={**modern_headers(token, "tools/call", "search_customers"), **headers},
        )

    return send


def _suspended_agent(bastion, token):
    """The kill switch on the caller's agent, then a call."""
    agent = _claims(token)["client_id"]
    bastion.store.db  # noqa: B018 (the store is open)
    suspend(bastion.store, suspension("agent", agent), actor="test")
    bastion.apply()
    return _post("deskhttp", "tools/call", _search, "search_customers")(bastion, token)


_search = {"name": "search_customers", "arguments": {"query": "a"}}


def _over_rate(bastion, token):
    """send_email (open world: 5 a minute per agent) once more than the limit."""
    params = {
        "name": "send_email",
        "arguments": {"to": "a@example.com", "subject": "s", "body": ""},
    }
    send = _post("deskhttp", "tools/call", params, "send_email")
    for _ in range(5):
        answered = send(bastion, token)
        assert "error" not in messages(answered)[-1], answered.text
    return send(bastion, token)


def _failing_upstream(bastion, token):
    """The upstream breaks down (HTTP 502) on the call bastion let through."""
    bastion.recorder.fail_next("search_customers")
    return _post("deskhttp", "tools/call", _search, "search_customers")(bastion, token)


def _failing(step: str, send):
    """``send`` while one step of bastion's own raises, as no input can make it (a monkeypatch:
    a failure bastion did not foresee): ``forward`` while it forwards the call it let through,
    ``release`` once the upstream has answered, as it releases the result."""

    def sent(bastion, token):
        with pytest.MonkeyPatch.context() as patch:
            if step == "forward":
                upstream = bastion.app.state.gateway.upstreams["deskhttp"].upstream
                patch.setattr(upstream, "request", _unforeseen_async)
            else:
                patch.setattr(handlers, "mask_result", _unforeseen)
            return send(bastion, token)

    return sent


UNFORESEEN = "a failure bastion did not foresee"


async def _unforeseen_async(*args, **kwargs):
    raise TypeError(UNFORESEEN)


def _unforeseen(*args, **kwargs):
    raise TypeError(UNFORESEEN)


def _subscribed_meanwhile(bastion, token):
    """Two sessions of one user, one subscription short of ``max_subscriptions_per_user``: a
    subscription is let through and waits at the upstream (lab://slow), another is made
    meanwhile, then the upstream answers the first. Room is checked again once it has: the user
    has none left, which bastion finds only after the call was let through.

    The held subscription accepts JSON only: a request still running after 0.1 s whose client
    accepts events has its answer begun as an event stream (a 200, the refusal an event in it),
    and how long this one is held depends on how quickly this test gets to release it."""
    sessions = bastion.app.state.gateway.sessions
    slow, quick = legacy_session(bastion, token, "labold"), legacy_session(bastion, token, "labold")
    slow["accept"] = "application/json"
    answered: list = []
    with pytest.MonkeyPatch.context() as patch:  # a setting, made small for this case
        patch.setattr(
            sessions, "max_subscriptions_per_user", sessions.subscriptions_of("labold", "sam") + 1
        )
        waiting = threading.Thread(
            target=lambda: answered.append(_subscribe(bastion, slow, "lab://slow"))
        )
        waiting.start()
        try:
            assert traced(bastion, "subscribed", "lab://slow")
            meanwhile = _subscribe(bastion, quick, "lab://open")
            assert meanwhile.json() == {"jsonrpc": "2.0", "id": 7, "result": {}}
        finally:
            with bastion.lab_trace.open("a") as trace:
                trace.write(json.dumps({"kind": "release", "tag": "lab://slow"}) + "\n")
            waiting.join(PATIENCE)
    [response] = answered
    return response


def _subscribe(bastion, session: dict, uri: str):
    body = {"jsonrpc": "2.0", "id": 7, "method": "resources/subscribe", "params": {"uri": uri}}
    return bastion.http.post(bastion.mcp_url("labold"), json=body, headers=session, timeout=30)


def _get_without_accept(bastion, token):
    session = legacy_session(bastion, token, "deskhttp")
    return bastion.http.get(
        bastion.mcp_url("deskhttp"), headers={**session, "accept": "application/json"}
    )


def _under(fact: str, send):
    """``send`` once ``fact`` holds (an obligation on connect), the fact taken back after."""

    def sent(bastion, token):
        rule = parse_fact(fact)
        bastion.apply(inserts=[rule])
        try:
            return send(bastion, token)
        finally:
            bastion.apply(deletes=[rule])

    return sent


def _get_stream(server: str, fact: str):
    """A 2025-11-25 session opened, then its GET stream asked for once ``fact`` holds."""

    def send(bastion, token):
        session = legacy_session(bastion, token, server)
        return _under(fact, lambda b, t: b.http.get(b.mcp_url(server), headers=session))(
            bastion, token
        )

    return send


_listen = {"notifications": {"toolsListChanged": True}}


def _listen_past_the_limit(bastion, token):
    """A listen stream for one resource more than ``max_subscriptions_per_user`` lets the user
    follow: ``connect`` is allowed (and recorded), then the stream is refused (HTTP 400). A GET
    stream refused at that step (a second one, one past the streams a user may hold) leaves an
    ``mcp.refused`` row: so must a listen stream."""
    sessions = bastion.app.state.gateway.sessions
    with pytest.MonkeyPatch.context() as patch:  # a setting, made small for this case
        patch.setattr(
            sessions, "max_subscriptions_per_user", sessions.subscriptions_of("labhttp", "sam")
        )
        wanted = {"notifications": {"resourceSubscriptions": ["lab://open"]}}
        return _post("labhttp", "subscriptions/listen", wanted)(bastion, token)


def _begun_as_events(send):
    """``send`` with every answer begun as an event stream at once, as one is that takes longer
    than 0.1 s: a refusal decided after that is a JSON-RPC error in the stream, not a 403."""

    def sent(bastion, token):
        watch_after = transport._WATCH_AFTER
        transport._WATCH_AFTER = 0
        try:
            response = send(bastion, token)
        finally:
            transport._WATCH_AFTER = watch_after
        assert response.headers["content-type"].startswith("text/event-stream")
        return response

    return sent


CASES: dict[str, tuple[Callable, Expected]] = {
    # -- refused by a decision ---------------------------------------------------------------
    "the policy refuses the call": (
        _sdk("sam", "deskhttp", lambda c: c.call_tool("delete_customer", {"customer_id": "c"})),
        Expected(
            "decision",
            "not_permitted",
            "deskhttp",
            "tools/call",
            'Tool{"deskhttp/delete_customer"}',
            "deny",
        ),
    ),
    "the policy refuses the resource": (
        _sdk("sam", "labhttp", lambda c: c.read_resource("lab://secret")),
        Expected(
            "decision",
            "not_permitted",
            "labhttp",
            "resources/read",
            'McpResource{"labhttp/lab://secret"}',
            "deny",
        ),
    ),
    "the call waits for approval": (
        _sdk("sam", "labhttp", lambda c: c.read_resource("lab://held")),
        Expected(
            "decision",
            "approval_pending",
            "labhttp",
            "resources/read",
            'McpResource{"labhttp/lab://held"}',
            "held",
        ),
    ),
    "the caller's agent is suspended": (
        _http("deskhttp", _suspended_agent),
        # Refused at the connect decision every message goes through, before the call's own.
        Expected(
            "decision", "suspended", "deskhttp", "tools/call", 'McpServer{"deskhttp"}', "deny"
        ),
    ),
    "the agent is over its rate limit": (
        _http("deskhttp", _over_rate, user="avery"),
        Expected(
            "decision",
            "rate_limited",
            "deskhttp",
            "tools/call",
            'Tool{"deskhttp/send_email"}',
            "rate_limited",
        ),
    ),
    "the token lacks a scope the policy requires (403)": (
        _http(
            "labhttp",
            _post("labhttp", "resources/read", {"uri": "lab://guarded"}, "lab://guarded"),
            status=403,
        ),
        Expected(
            "decision",
            "insufficient_scope",
            "labhttp",
            "resources/read",
            'McpResource{"labhttp/lab://guarded"}',
            "step_up",
        ),
    ),
    "a GET stream held for approval": (
        _http(
            "labold",
            _get_stream("labold", 'connect_held(McpServer{"labold"}, User{"sam"})'),
            status=403,
        ),
        Expected("decision", "approval_pending", "labold", "GET", 'McpServer{"labold"}', "held"),
    ),
    "a GET stream needing a scope the token lacks (403)": (
        _http(
            "labold",
            _get_stream("labold", 'connect_scope(McpServer{"labold"}, "customers:write")'),
            status=403,
        ),
        Expected(
            "decision", "insufficient_scope", "labold", "GET", 'McpServer{"labold"}', "step_up"
        ),
    ),
    "a listen stream needing a scope the token lacks (403)": (
        _http(
            "labhttp",
            _under(
                'connect_scope(McpServer{"labhttp"}, "customers:write")',
                _post("labhttp", "subscriptions/listen", _listen),
            ),
            status=403,
        ),
        Expected(
            "decision",
            "insufficient_scope",
            "labhttp",
            "subscriptions/listen",
            'McpServer{"labhttp"}',
            "step_up",
        ),
    ),
    "a listen stream held for approval": (
        _http(
            "labhttp",
            _under(
                'connect_held(McpServer{"labhttp"}, User{"sam"})',
                _post("labhttp", "subscriptions/listen", _listen),
            ),
            status=200,
        ),
        Expected(
            "decision",
            "approval_pending",
            "labhttp",
            "subscriptions/listen",
            'McpServer{"labhttp"}',
            "held",
        ),
    ),
    # On the stdio desk, which no other case calls: the decision waits for the upstream to start
    # and list its tools (their hints), so it comes after the answer has begun.
    "a step-up decided once the answer has begun as events": (
        _http(
            "desk",
            _begun_as_events(
                _post(
                    "desk",
                    "tools/call",
                    {"name": "delete_customer", "arguments": {"customer_id": "c-1"}},
                    "delete_customer",
                )
            ),
            user="avery",
        ),
        Expected(
            "decision",
            "insufficient_scope",
            "desk",
            "tools/call",
            'Tool{"desk/delete_customer"}',
            "step_up",
        ),
    ),
    # -- failed upstream, after a decision let the call through --------------------------------
    "the upstream answers an error (masked)": (
        _sdk("sam", "labhttp", lambda c: c.call_tool("leak_error", {})),
        Expected(
            "decision",
            "upstream error -32602",
            "labhttp",
            "tools/call",
            'Tool{"labhttp/leak_error"}',
            "allow",
        ),
    ),
    "the upstream answers an error that names a decision of its own": (
        _sdk("sam", "labhttp", lambda c: c.call_tool("pose_as_bastion", {})),
        Expected(
            "decision",
            "upstream error -32003",
            "labhttp",
            "tools/call",
            'Tool{"labhttp/pose_as_bastion"}',
            "allow",
        ),
    ),
    "the upstream refuses a subscription": (
        _sdk("sam", "labold", lambda c: c.subscribe_resource("lab://locked")),
        Expected(
            "decision",
            "upstream error -32000",
            "labold",
            "resources/subscribe",
            'McpResource{"labold/lab://locked"}',
            "allow",
        ),
    ),
    "the upstream breaks down": (
        _http("deskhttp", _failing_upstream),
        Expected(
            "decision",
            "upstream error -32000",
            "deskhttp",
            "tools/call",
            'Tool{"deskhttp/search_customers"}',
            "allow",
        ),
    ),
    # -- ended by bastion, after a decision let the call through -------------------------------
    "bastion fails while it forwards a call it let through": (
        _http(
            "deskhttp",
            _failing("forward", _post("deskhttp", "tools/call", _search, "search_customers")),
        ),
        Expected(
            "decision",
            "internal error",
            "deskhttp",
            "tools/call",
            'Tool{"deskhttp/search_customers"}',
            "allow",
        ),
    ),
    "bastion fails while it releases the result of a call it let through": (
        _http(
            "deskhttp",
            _failing("release", _post("deskhttp", "tools/call", _search, "search_customers")),
        ),
        Expected(
            "decision",
            "internal error",
            "deskhttp",
            "tools/call",
            'Tool{"deskhttp/search_customers"}',
            "allow",
        ),
    ),
    "a question of the upstream's that bastion will not relay": (
        # labhttp answers input_required asking for elicitation, which this client did not
        # declare: bastion refuses to ask it, after the call was let through.
        _sdk("sam", "labhttp", lambda c: c.call_tool("ask_anyway", {})),
        Expected(
            "decision",
            "bastion error -32601",
            "labhttp",
            "tools/call",
            'Tool{"labhttp/ask_anyway"}',
            "allow",
        ),
    ),
    "a subscription past the limit, found once the upstream answered": (
        _http("labold", _subscribed_meanwhile, status=400),
        Expected(
            "decision",
            "bastion error -32602",
            "labold",
            "resources/subscribe",
            'McpResource{"labold/lab://slow"}',
            "allow",
        ),
    ),
    # -- an upstream's error where there is no decision: a list -------------------------------
    **{
        f"the upstream refuses {method} ({code})": (
            _sdk("sam", "labhttp", lambda c, call=call, cursor=cursor: call(c)(cursor=cursor)),
            Expected("upstream", f"upstream error {code}", "labhttp", method),
        )
        for (method, call), (cursor, code) in zip(
            {
                "tools/list": lambda c: c.list_tools,
                "prompts/list": lambda c: c.list_prompts,
                "resources/list": lambda c: c.list_resources,
                "resources/templates/list": lambda c: c.list_resource_templates,
            }.items(),
            REFUSED_CURSORS.items(),
            strict=True,
        )
    },
    # -- refused before any decision --------------------------------------------------------
    "a tool name past max_name_chars": (
        _sdk("sam", "deskhttp", lambda c: c.call_tool(LONG, {})),
        Expected("refused", "invalid_params", "deskhttp", "tools/call"),
    ),
    "arguments that are not an object": (
        # The SDK's client checks a prompt's arguments before it sends them.
        _http(
            "deskhttp",
            _post("deskhttp", "prompts/get", {"name": "apology", "arguments": []}, "apology"),
            status=400,
        ),
        Expected("refused", "invalid_params", "deskhttp", "prompts/get"),
    ),
    "an unknown method": (
        _http("deskhttp", _post("deskhttp", "tools/frobnicate", {}), status=200),
        Expected("refused", "method_not_found", "deskhttp", "tools/frobnicate"),
    ),
    "a body that is not JSON": (
        _http("deskhttp", _raw("deskhttp", b"{not json"), status=400),
        Expected("refused", "parse_error", "deskhttp", None),
    ),
    "a message that is not JSON-RPC": (
        _http("deskhttp", _raw("deskhttp", b'{"hello": 1}'), status=400),
        Expected("refused", "invalid_request", "deskhttp", None),
    ),
    "Mcp-Name differs from the body": (
        _http("deskhttp", _post("deskhttp", "tools/call", _search, "delete_customer"), status=400),
        Expected("refused", "header_mismatch", "deskhttp", "tools/call"),
    ),
    "an unsupported protocol version": (
        _http(
            "deskhttp",
            _post(
                "deskhttp",
                "tools/call",
                _search,
                "search_customers",
                **{"mcp-protocol-version": "1999-01-01"},
            ),
            status=400,
        ),
        Expected("refused", "unsupported_protocol_version", "deskhttp", "tools/call"),
    ),
    "an unknown session": (
        _http(
            "deskhttp",
            _post(
                "deskhttp",
                "tools/call",
                _search,
                "search_customers",
                **{"mcp-protocol-version": "2025-11-25", "mcp-session-id": "no-such-session"},
            ),
            status=404,
        ),
        Expected("refused", "session_not_found", "deskhttp", "tools/call"),
    ),
    "a body that is not application/json (415)": (
        _http("deskhttp", _raw("deskhttp", b"{}", **{"content-type": "text/plain"}), status=415),
        Expected("refused", "unsupported_media_type", "deskhttp", None),
    ),
    # -- refused before the token is looked at: it proves nothing, so nothing is recorded
    # (docs/gateway.md, "Known limits": refusals in the audit trail) ---------------------------
    "an Origin not allowed (403)": (
        _http("deskhttp", _raw("deskhttp", b"{}", origin="https://evil.example"), status=403),
        Expected("unrecorded", "", "deskhttp", None),
    ),
    "a body over max_body_bytes (413)": (
        _http("deskhttp", _raw("deskhttp", b" " * 70000), status=413),
        Expected("unrecorded", "", "deskhttp", None),
    ),
    "a listen stream past max_subscriptions_per_user (400)": (
        _http("labhttp", _listen_past_the_limit, status=400),
        Expected("refused", "invalid_params", "labhttp", "subscriptions/listen"),
    ),
    "a GET stream without Accept: text/event-stream (406)": (
        _http("deskhttp", _get_without_accept, status=406),
        Expected("refused", "not_acceptable", "deskhttp", "GET"),
    ),
}


def _show(capsys, decision_id: str, database: str) -> tuple[int, dict | None, str]:
    """``bastion audit show <id>`` -> (exit status, what it printed, its error output)."""
    try:
        code = main(["audit", "show", decision_id, "--database", database])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, json.loads(out.out) if code == 0 else None, out.err


@pytest.mark.parametrize("case", list(CASES))
def test_every_refusal_leads_to_its_record(bastion, capsys, caplog, case):
    drive, expected = CASES[case]
    oauth = bastion.app.state.oauth
    caplog.set_level(logging.INFO, logger="bastion.gateway")
    outcome = drive(bastion)
    failures = [r for r in caplog.records if r.exc_info and UNFORESEEN in str(r.exc_info[1])]
    rows = [
        e for e in oauth.audit.events("mcp.refused", 100000) if e.client_id == outcome.client_id
    ]
    if expected.kind == "decision":
        assert outcome.data is not None and "decision_id" in outcome.data, outcome.data
        bastion.flush()
        code, shown, err = _show(
            capsys, outcome.data["decision_id"], bastion.app.state.config.database
        )
        assert code == 0, err
        record = shown["record"]
        assert record["principals"] == [
            f'User{{"{outcome.user}"}}',
            f'Agent{{"{outcome.client_id}"}}',
        ]
        assert (record["server"], record["method"], record["target"]) == (
            expected.server,
            expected.method,
            expected.target,
        )
        assert (record["result"], record["reason"]) == (expected.result, expected.reason)
        assert record["policy_version"] == bastion.store.policy().version
        assert shown["policy"]["version"] == record["policy_version"]
        # A decision's refusal is in the decision records, not also an mcp.refused row.
        assert rows == []
        # bastion's own failure is in the log once, with its traceback, and only it.
        assert len(failures) == (expected.reason == "internal error")
    elif expected.kind == "upstream":
        assert outcome.data is None or "decision_id" not in outcome.data, outcome.data
        assert f"upstream error {outcome.code}" == expected.reason
        assert rows == []
        [line] = [
            r.getMessage()
            for r in caplog.records
            if r.name == "bastion.gateway" and outcome.client_id in r.getMessage()
        ]
        assert all(part in line for part in (expected.reason, expected.server, expected.method)), (
            line
        )
    elif expected.kind == "unrecorded":
        assert outcome.data is None or "decision_id" not in outcome.data, outcome.data
        assert rows == []
    else:
        assert outcome.data is None or "decision_id" not in outcome.data, outcome.data
        [row] = rows
        assert (row.subject, row.detail["server"], row.detail["method"]) == (
            outcome.user,
            expected.server,
            expected.method,
        )
        assert row.detail["reason"] == expected.reason
