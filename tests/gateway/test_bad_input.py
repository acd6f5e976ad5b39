"""Bad input is refused with a clear error before anything reaches the upstream."""

from __future__ import annotations

import base64
import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.gateway.uris import spelling_refused
from tests.clock import ManualClock

from .lab_server import SECRET
from .streams import legacy_session, modern_headers, modern_request
from .support import register_public_client

ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


@pytest.fixture(scope="module")
def token(bastion):
    return bastion.token("sam", "deskhttp")


def post(bastion, token, body=None, content=None, **headers):
    return bastion.http.post(
        bastion.mcp_url("deskhttp"),
        json=body,
        content=content,
        headers={
            "authorization": f"Bearer {token}",
            "content-type": "application/json",
            # Answered as JSON however long it takes (httpx's default */* takes event streams).
            "accept": "application/json",
            **headers,
        },
    )


def call(name="search_customers", **params):
    return {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": name, "arguments": {}, "_meta": ENVELOPE, **params},
    }


MODERN = {
    "mcp-protocol-version": "2026-07-28",
    "mcp-method": "tools/call",
    "mcp-name": "search_customers",
}

CASES = {
    "not JSON": (dict(content=b"{not json"), 400, -32700),
    "not JSON-RPC": (dict(body={"hello": "world"}), 400, -32600),
    "a batch": (dict(body=[call(), call()], **MODERN), 400, -32600),
    "Mcp-Method differs from the body": (
        dict(body=call(), **{**MODERN, "mcp-method": "tools/list"}),
        400,
        -32020,
    ),
    "Mcp-Name differs from the body": (
        dict(body=call(), **{**MODERN, "mcp-name": "delete_customer"}),
        400,
        -32020,
    ),
    "no envelope in a 2026-07-28 request": (
        dict(
            body={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": "search_customers"},
            },
            **MODERN,
        ),
        400,
        -32602,
    ),
    "an unknown session id": (
        dict(
            body=call(),
            **{"mcp-protocol-version": "2025-11-25", "mcp-session-id": "no-such-session"},
        ),
        404,
        -32005,
    ),
    "no session id in the 2025-11-25 era": (
        dict(body=call(), **{"mcp-protocol-version": "2025-11-25"}),
        400,
        -32600,
    ),
    "an unsupported protocol version": (
        dict(body=call(), **{"mcp-protocol-version": "1999-01-01"}),
        400,
        -32022,
    ),
    "an oversized body": (dict(body=call(arguments={"query": "x" * 70000}), **MODERN), 413, -32600),
    # Half of a surrogate pair, which JSON's grammar allows and no Unicode text holds: the SDK's
    # upstream never answered such a call (a 60 s wait), and as a tool's name it stopped the
    # writing of every decision record after it.
    "a lone surrogate in an argument": (
        dict(content=json.dumps(call(arguments={"query": "\ud800"})).encode(), **MODERN),
        400,
        -32700,
    ),
    "a lone surrogate as the tool's name": (
        dict(content=json.dumps(call(name="x\udfff")).encode(), **MODERN),
        400,
        -32700,
    ),
    **{
        f"arguments that are {shape}": (dict(body=call(arguments=value), **MODERN), 400, -32602)
        for shape, value in (("a list", []), ("false", False), ("0", 0), ("empty text", ""))
    },
    "a prompt's arguments that are a list": (
        dict(
            body={
                **call(),
                "method": "prompts/get",
                "params": {**call()["params"], "name": "apology", "arguments": []},
            },
            **{**MODERN, "mcp-method": "prompts/get", "mcp-name": "apology"},
        ),
        400,
        -32602,
    ),
    "completion arguments that are not an object": (
        dict(
            body={
                **call(),
                "method": "completion/complete",
                "params": {
                    "ref": {"type": "ref/prompt", "name": "apology"},
                    "argument": {"name": "customer_name", "value": "A"},
                    "context": {"arguments": 0},
                    "_meta": ENVELOPE,
                },
            },
            **{**MODERN, "mcp-method": "completion/complete"},
        ),
        400,
        -32602,
    ),
    "a lone surrogate in a key": (
        dict(content=json.dumps(call(_meta={**ENVELOPE, "\udc00": 1})).encode(), **MODERN),
        400,
        -32700,
    ),
}

# A member named twice, each body taken by a reader that keeps the last value (Python's, most
# upstreams') as a harmless call, and by one that keeps the first (a proxy, a log) as another.
TWICE = {
    "an argument": (
        b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name":'
        b' "search_customers", "arguments": {"query": "everyone", "query": "ada"}}}',
        "query",
    ),
    "the tool's name": (
        b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "delete_customer",'
        b' "name": "search_customers", "arguments": {}}}',
        "name",
    ),
    "the method": (
        b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "method": "tools/list",'
        b' "params": {}}',
        "method",
    ),
}


@pytest.mark.parametrize("case", list(TWICE))
@pytest.mark.parametrize("era", ["2025-11-25", "2026-07-28"])
def test_a_member_named_twice_is_refused_whole_in_either_era_and_nothing_is_forwarded(
    bastion, token, era, case
):
    """Refused with the parse error, never read as its last value: a proxy or firewall in front
    that keeps the first (`delete_customer`, `everyone`) would judge another call than bastion
    decides (I-JSON, RFC 7493 §2.3). Before, the gateway alone of bastion's readers took it."""
    content, member = TWICE[case]
    if era == "2025-11-25":
        headers = legacy_session(bastion, token, "deskhttp")
    else:
        headers = {"authorization": f"Bearer {token}", "content-type": "application/json", **MODERN}
    before = len(bastion.recorder.requests)
    response = bastion.http.post(
        bastion.mcp_url("deskhttp"),
        content=content,
        headers={**headers, "accept": "application/json"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == -32700
    assert f"names the member '{member}' twice" in error["message"], error
    assert len(bastion.recorder.requests) == before  # the upstream saw nothing


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_a_clear_error_and_nothing_is_forwarded(bastion, token, case):
    kwargs, status, code = CASES[case]
    before = len(bastion.recorder.requests)
    response = post(bastion, token, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert len(bastion.recorder.requests) == before  # the upstream saw nothing


@pytest.mark.parametrize(
    "content_type",
    [
        "application/jsonp",
        "application/json-seq",
        "application/json+x",
        "application/jsonfoo; charset=utf-8",
        "application/json garbage",
        "application/json/x",
        "text/plain; x=application/json",
        "",
    ],
)
def test_a_body_not_sent_as_application_json_is_refused_and_nothing_is_forwarded(
    bastion, token, content_type
):
    """The media type was compared with "starts with": application/jsonp passed for JSON."""
    before = len(bastion.recorder.requests)
    response = post(bastion, token, call(), **{**MODERN, "content-type": content_type})
    assert response.status_code == 415, response.text
    assert response.json()["error"]["code"] == -32600
    assert len(bastion.recorder.requests) == before  # the upstream saw nothing


@pytest.mark.parametrize(
    "content_type",
    ["Application/JSON", "application/json; charset=utf-8", "application/json ;charset=UTF-8"],
)
def test_application_json_is_taken_in_any_case_and_with_parameters(bastion, token, content_type):
    response = post(
        bastion, token, call(arguments={"query": "a"}), **{**MODERN, "content-type": content_type}
    )
    assert response.status_code == 200, response.text
    assert "result" in response.json()


@pytest.mark.parametrize("name", ["mcp-method", "mcp-name", "mcp-protocol-version"])
def test_a_routing_header_sent_twice_is_refused(bastion, token, name):
    # Twice with the same value, and the second spelt in capitals: still one header twice.
    headers = [
        ("authorization", f"Bearer {token}"),
        ("content-type", "application/json"),
        *MODERN.items(),
        (name.upper(), MODERN[name]),
    ]
    before = len(bastion.recorder.requests)
    response = bastion.http.post(bastion.mcp_url("deskhttp"), json=call(), headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == -32020 and "sent twice" in error["message"]
    assert len(bastion.recorder.requests) == before


def test_another_users_session_id_is_unknown(bastion, token):
    session = legacy_session(bastion, token, "deskhttp")["mcp-session-id"]
    other = bastion.token("avery", "deskhttp")
    before = len(bastion.recorder.requests)
    response = post(
        bastion,
        other,
        body=call(),
        **{"mcp-protocol-version": "2025-11-25", "mcp-session-id": session},
    )
    assert response.status_code == 404
    assert len(bastion.recorder.requests) == before
    # DELETE ends the session for its owner; afterwards it is unknown.
    headers = {
        "authorization": f"Bearer {token}",
        "mcp-session-id": session,
        "mcp-protocol-version": "2025-11-25",
    }
    assert bastion.http.delete(bastion.mcp_url("deskhttp"), headers=headers).status_code == 204
    again = post(
        bastion,
        token,
        body=call(),
        **{"mcp-protocol-version": "2025-11-25", "mcp-session-id": session},
    )
    assert again.status_code == 404


def test_a_session_unused_longer_than_its_idle_limit_is_unknown(bastion, token):
    sessions = bastion.app.state.gateway.sessions
    clock = ManualClock(float(int(time.monotonic()) + 1))  # whole seconds: exact sums
    saved, sessions.clock = sessions.clock, clock
    try:
        used = legacy_session(bastion, token, "deskhttp")["mcp-session-id"]
        forgotten = legacy_session(bastion, token, "deskhttp")["mcp-session-id"]
        headers = {"mcp-protocol-version": "2025-11-25", "mcp-session-id": used}
        clock.now += sessions.idle_seconds  # at the limit: still the session's
        assert post(bastion, token, body=call(), **headers).status_code == 200
        clock.now += sessions.idle_seconds + 1
        before = len(bastion.recorder.requests)
        response = post(bastion, token, body=call(), **headers)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == -32005
        assert "unknown or expired session" in response.json()["error"]["message"]
        assert len(bastion.recorder.requests) == before
        # The session nobody used again is ended too, as the next one opens (the sweep).
        assert sessions.get(forgotten) is not None
        legacy_session(bastion, token, "deskhttp")
        assert sessions.get(forgotten) is None
    finally:
        sessions.clock = saved


@pytest.mark.parametrize("holder", ["another agent of the same user", "another user's same agent"])
def test_a_session_is_known_only_to_its_user_through_its_agent(bastion, holder):
    # A session is owned by the pair (user, client): sharing either one is not enough.
    agent = register_public_client(bastion.http, bastion.url)
    token = bastion.token("sam", "deskhttp", client_id=agent)
    session = legacy_session(bastion, token, "deskhttp")["mcp-session-id"]
    if holder == "another agent of the same user":
        other = bastion.token("sam", "deskhttp")
    else:
        other = bastion.token("avery", "deskhttp", client_id=agent)
    headers = {"mcp-protocol-version": "2025-11-25", "mcp-session-id": session}
    before = len(bastion.recorder.requests)
    response = post(bastion, other, body=call(), **headers)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == -32005
    assert len(bastion.recorder.requests) == before
    # The owner still has it: the refusal was of the holder, not of the session.
    assert post(bastion, token, body=call(), **headers).status_code == 200


def test_unknown_methods_are_refused_by_default(bastion, token):
    body = {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "tasks/list",
        "params": {"_meta": ENVELOPE},
    }
    before = len(bastion.recorder.requests)
    response = post(
        bastion,
        token,
        body=body,
        **{"mcp-protocol-version": "2026-07-28", "mcp-method": "tasks/list"},
    )
    assert response.json()["error"]["code"] == -32601
    assert len(bastion.recorder.requests) == before


@pytest.mark.parametrize("meta", ["x", ["a"], 5, True])
@pytest.mark.parametrize("server", ["deskhttp", "labhttp"])
def test_a_meta_that_is_not_an_object_is_refused_in_either_era(bastion, server, meta):
    """``_meta`` is an object or nothing. Another shape from a 2025-11-25 client reached a
    2026-07-28 upstream's envelope (a TypeError in bastion: -32603, after the call was allowed,
    counted by rate limits, and left unrecorded)."""
    token = bastion.token("sam", server)
    bastion.flush()  # the records of earlier calls
    seq = bastion.records.last_seq()
    arguments = {"seconds": 0, "tag": "meta"} if server == "labhttp" else {"query": "Ada"}
    name = "wait" if server == "labhttp" else "search_customers"
    legacy = {"name": name, "arguments": arguments, "_meta": meta}
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": legacy}
    modern = {**MODERN, "mcp-name": name, "authorization": f"Bearer {token}"}
    for response in (
        bastion.http.post(
            bastion.mcp_url(server), json=body, headers=legacy_session(bastion, token, server)
        ),
        bastion.http.post(
            bastion.mcp_url(server),
            json=call(name, arguments=arguments, _meta=meta),
            headers=modern,
        ),
    ):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == -32602 and "_meta must be an object" in error["message"], error
    bastion.flush()
    assert [r.method for _, r in bastion.records.after(seq)] == ["initialize"]


# Other spellings of lab://leaky (whose reading is masked) and lab://secret (refused to sam),
# each one the MCP SDK's AnyUrl (or a path normaliser) reads as the URI itself.
SPELLINGS = [
    "LAB://leaky",
    " lab://leaky",
    "lab://leaky\n",
    "lab://LEAKY",
    "lab://leaky/.",
    "lab://x/../secret",
    "lab://x/%2e%2e/secret",
    "lab://%73ecret",
]


def _resource_requests(uri: str) -> dict:
    """Each request that names a resource URI, in 2026-07-28: method -> params."""
    return {
        "resources/read": {"uri": uri},
        "completion/complete": {
            "ref": {"type": "ref/resource", "uri": uri},
            "argument": {"name": "name", "value": ""},
        },
        "subscriptions/listen": {"notifications": {"resourceSubscriptions": ["lab://open", uri]}},
    }


def _spelled(name: str) -> str:
    """``name`` as an Mcp-Name header carries any text (base64, as MCP says)."""
    return f"=?base64?{base64.b64encode(name.encode()).decode()}?="


@pytest.mark.parametrize("uri", SPELLINGS)
def test_a_resource_uri_is_taken_in_one_spelling_only(bastion, uri):
    """Resources are decided by the literal text of their URI, and some upstreams read other
    spellings as the same resource: every other spelling is refused before it is decided, in
    each request that names a resource (2025-11-25 subscriptions too)."""
    token = bastion.token("sam", "labhttp")
    for method, params in _resource_requests(uri).items():
        response = bastion.http.post(
            bastion.mcp_url("labhttp"),
            json=modern_request(3, method, params),
            headers=modern_headers(token, method, _spelled(uri) if "read" in method else None),
        )
        assert response.status_code == 400, (method, response.text)
        error = response.json()["error"]
        assert error["code"] == -32602 and "one spelling only" in error["message"], error
        assert SECRET not in response.text
    headers = legacy_session(bastion, bastion.token("sam", "labold"), "labold")
    for method in ("resources/subscribe", "resources/unsubscribe"):
        body = {"jsonrpc": "2.0", "id": 4, "method": method, "params": {"uri": uri}}
        response = bastion.http.post(bastion.mcp_url("labold"), json=body, headers=headers)
        assert response.status_code == 400, (method, response.text)
        assert response.json()["error"]["code"] == -32602


_scheme = st.from_regex(r"[a-z][a-z0-9+.-]{0,6}", fullmatch=True)
_part = st.from_regex(r"[a-z0-9_~-]{1,8}", fullmatch=True)


@given(
    _scheme,
    _part,
    st.lists(_part, max_size=4),
    st.sampled_from(["upper-case scheme", "whitespace", "dot segment", "encoded", "upper host"]),
    st.data(),
)
def test_every_other_spelling_of_a_uri_bastion_takes_is_refused(
    scheme, host, segments, change, data
):
    uri = f"{scheme}://{host}/" + "/".join(segments)
    assert spelling_refused(uri) is None
    if change == "upper-case scheme":
        other = scheme.upper() + uri[len(scheme) :]
        if other == uri:
            return
    elif change == "whitespace":
        other = data.draw(st.sampled_from([" ", "\t", "\n", "\u3000"])) + uri
    elif change == "dot segment":
        dot = data.draw(st.sampled_from([".", ".."]))
        other = f"{scheme}://{host}/{dot}/" + "/".join(segments)
    elif change == "encoded":
        at = data.draw(st.integers(len(scheme) + 3, len(uri) - 1))
        char = uri[at]
        if char in ":/":
            return
        other = f"{uri[:at]}%{ord(char):02X}{uri[at + 1 :]}"
    else:
        other = uri.replace(host, host.upper(), 1)
        if other == uri:
            return
    assert spelling_refused(other) is not None, other


def _claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def test_refusals_before_any_decision_are_audited_aggregated_with_their_caller(bastion):
    """A request refused before any decision (a forged requestState, an attack signal; a resource
    URI in another spelling; malformed JSON-RPC) leaves an ``mcp.refused`` audit row naming the
    user, the agent, the server, the method and the JSON-RPC error, aggregated per agent, address
    and reason: a flood of a thousand bad requests leaves a bounded number of rows, its count
    whole."""
    oauth = bastion.app.state.oauth

    def rows(client_id: str) -> list:
        return [e for e in oauth.audit.events("mcp.refused", 100000) if e.client_id == client_id]

    desk = bastion.token("sam", "deskhttp")
    forged = post(bastion, desk, call(requestState="forged", inputResponses={}), **MODERN)
    assert forged.status_code == 400 and "requestState was not issued" in forged.text
    [row] = rows(_claims(desk)["client_id"])
    assert (row.subject, row.detail["server"], row.detail["method"]) == (
        "sam",
        "deskhttp",
        "tools/call",
    )
    assert (row.detail["reason"], row.detail["code"]) == ("invalid_params", -32602)
    assert row.detail["message"].startswith("requestState was not issued by bastion")

    lab = bastion.token("sam", "labhttp")
    uri = "lab://x/../secret"
    spelled = bastion.http.post(
        bastion.mcp_url("labhttp"),
        json=modern_request(3, "resources/read", {"uri": uri}),
        headers=modern_headers(lab, "resources/read", _spelled(uri)),
    )
    assert spelled.status_code == 400
    [row] = rows(_claims(lab)["client_id"])
    assert (row.detail["server"], row.detail["method"], row.detail["reason"]) == (
        "labhttp",
        "resources/read",
        "invalid_params",
    )
    assert "one spelling only" not in row.detail["message"]  # its first words only

    flood = bastion.token("sam", "deskhttp")
    bad = [
        dict(body={"hello": "world"}),
        dict(body=call(requestState="forged", inputResponses={}), **MODERN),
        dict(content=b"{not json"),
    ]
    for i in range(1000):
        assert post(bastion, flood, **bad[i % 3]).status_code == 400
    client_id = _claims(flood)["client_id"]
    # The first of each reason is a row; the rest are counted (written every 5 s, and at close).
    assert len([e for e in rows(client_id) if "repeats" not in e.detail]) == 3
    oauth.refusals.flush(everything=True)  # as at shutdown: the windows' counts are written
    written = rows(client_id)
    assert len([e for e in written if "repeats" not in e.detail]) == 3
    assert len(written) < 90  # two per reason, and one more per 5 s the flood lasted
    assert sum(e.detail.get("repeats", 1) for e in written) == 1000


# A name a client sends (a tool's, a prompt's, a resource URI) is a key of what the gateway keeps:
# decision records (100,000 buffered while the database is away), behaviour counters (100,000
# keys, and each key's targets), rate-limit windows, subscriptions and the resources followed
# upstream. One past gateway.max_name_chars is refused before any of them holds it.
LONG = "x" * 5000
NAMED = {
    "a tool's name": ("tools/call", {"name": LONG, "arguments": {}}, LONG),
    "a prompt's name": ("prompts/get", {"name": LONG, "arguments": {}}, LONG),
    "a resource URI": ("resources/read", {"uri": f"desk://{LONG}"}, f"desk://{LONG}"),
    "a completed prompt's name": (
        "completion/complete",
        {"ref": {"type": "ref/prompt", "name": LONG}, "argument": {"name": "a", "value": ""}},
        None,
    ),
    "a completed resource's URI": (
        "completion/complete",
        {
            "ref": {"type": "ref/resource", "uri": f"desk://{LONG}"},
            "argument": {"name": "a", "value": ""},
        },
        None,
    ),
}


@pytest.mark.parametrize("case", list(NAMED))
def test_a_name_longer_than_the_limit_is_refused_and_nothing_keeps_it(bastion, token, case):
    method, params, header = NAMED[case]
    bastion.flush()  # the records of earlier calls
    seq = bastion.records.last_seq()
    behavior = bastion.app.state.gateway.enforcer.behavior
    keys = len(behavior._keys) if behavior is not None else 0
    before = len(bastion.recorder.requests)
    body = {"jsonrpc": "2.0", "id": 7, "method": method, "params": {**params, "_meta": ENVELOPE}}
    headers = {**MODERN, "mcp-method": method}
    if header is None:
        del headers["mcp-name"]
    else:
        headers["mcp-name"] = header
    response = post(bastion, token, body=body, **headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == -32602, error
    assert "gateway.max_name_chars" in error["message"] and "2048" in error["message"], error
    bastion.flush()
    assert list(bastion.records.after(seq)) == []  # no decision, so no record holds it
    assert (len(behavior._keys) if behavior is not None else 0) == keys
    assert len(bastion.recorder.requests) == before


def test_a_session_keeps_only_the_capabilities_bastion_relays(bastion, token):
    """A 2025-11-25 session keeps what its client declared at initialize for as long as it
    lives, 64 sessions per user and server: only the capabilities bastion relays (sampling,
    elicitation, roots) are kept, and a declaration of those longer than 16,384 characters of
    JSON is refused, so a session holds a few KiB, not a body's worth (1 MiB)."""
    sessions = bastion.app.state.gateway.sessions
    declared = {"experimental": {"x": "y" * 50_000}, "roots": {"listChanged": True}}
    headers = legacy_session(bastion, token, "deskhttp", declared)
    assert sessions.get(headers["mcp-session-id"]).capabilities == {"roots": {"listChanged": True}}
    before = len(sessions)
    response = bastion.http.post(
        bastion.mcp_url("deskhttp"),
        json={
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {"sampling": {"x": "y" * 20_000}},
                "clientInfo": {"name": "t", "version": "1"},
            },
        },
        headers={"authorization": f"Bearer {token}", "mcp-protocol-version": "2025-11-25"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == -32602 and "16384" in error["message"], error
    assert len(sessions) == before


def test_a_caller_is_remembered_only_with_headers_bastion_could_accept(bastion, token):
    """The gateway remembers the `Caller` made for a token, address, protocol version and
    session id (4,096 of them), to give it again. A session id or version no session or era of
    bastion's has (here 20,000 characters, refused 404) is not remembered with it: each such
    request kept its header text until the table was full (4,096 heads of 64 KiB)."""
    callers = bastion.app.state.gateway._endpoint._callers
    assert post(bastion, token, body=call(), **MODERN).status_code == 200
    before = len(callers)
    for n in range(20):
        headers = {"mcp-protocol-version": "2025-11-25", "mcp-session-id": f"{n}{'s' * 20_000}"}
        response = post(bastion, token, body=call(), **headers)
        assert response.status_code == 404, response.text
    assert len(callers) == before


def test_refused_gets_and_deletes_are_audited_as_mcp_refusals_of_their_caller(bastion):
    """A 2025-11-25 stream (GET) or session end (DELETE) refused at the HTTP level — a method
    the endpoint does not take, a wrong Accept, an unknown or another user's session, no session
    header, a version bastion does not speak, a 2026-07-28 client asking for either (and a POST
    that is not JSON) — leaves an ``mcp.refused`` row naming the
    user, the agent, the server, the method and the reason, as a refused POST does. A request
    with no token proves nothing and leaves none."""
    oauth = bastion.app.state.oauth
    agent = register_public_client(bastion.http, bastion.url)
    token = bastion.token("sam", "deskhttp", client_id=agent)
    mine = legacy_session(bastion, token, "deskhttp")
    theirs = legacy_session(bastion, bastion.token("avery", "deskhttp"), "deskhttp")
    url = bastion.mcp_url("deskhttp")
    legacy = {"authorization": f"Bearer {token}", "mcp-protocol-version": "2025-11-25"}
    stream = {**legacy, "accept": "text/event-stream"}
    refused = [
        (
            "GET",
            {**legacy, "accept": "application/json", "mcp-session-id": mine["mcp-session-id"]},
            406,
            "not_acceptable",
        ),
        ("GET", {**stream, "mcp-session-id": theirs["mcp-session-id"]}, 404, "session_not_found"),
        ("GET", stream, 400, "invalid_request"),
        ("DELETE", {**legacy, "mcp-session-id": "no-such-session"}, 404, "session_not_found"),
        ("DELETE", {**legacy, "mcp-protocol-version": "2026-07-28"}, 405, "method_not_allowed"),
        ("PUT", legacy, 405, "method_not_allowed"),
        ("GET", {**stream, "mcp-protocol-version": "1999-01"}, 400, "unsupported_protocol_version"),
        ("POST", {**legacy, "content-type": "text/plain"}, 415, "unsupported_media_type"),
    ]
    for method, headers, status, _ in refused:
        response = bastion.http.request(method, url, headers=headers)
        assert response.status_code == status, (method, headers, response.text)
    unproven = bastion.http.request("DELETE", url, headers={"mcp-session-id": "x"})
    assert unproven.status_code == 401

    def rows() -> list:
        return [e for e in oauth.audit.events("mcp.refused", 100000) if e.client_id == agent]

    # The first refusal of each reason is written at once, naming its method (a POST refused
    # before its body is read names no JSON-RPC method); the others of its reason are counted.
    first: dict[str, str | None] = {}
    for method, _, _, reason in refused:
        first.setdefault(reason, None if method == "POST" else method)
    written = [e for e in rows() if "repeats" not in e.detail]
    assert sorted((e.detail["reason"], e.detail["method"]) for e in written) == sorted(
        first.items()
    )
    assert {(e.subject, e.detail["server"]) for e in written} == {("sam", "deskhttp")}
    oauth.refusals.flush(everything=True)
    assert sum(e.detail.get("repeats", 1) for e in rows()) == len(refused)
    # The session the refused requests named is still its owner's.
    assert bastion.http.delete(url, headers=mine).status_code == 204


def test_a_discover_is_recorded_under_no_session_but_the_callers_own(bastion, token):
    """``server/discover`` is answered without a session in 2025-11-25 (a probe), and its
    decision record names the ``Mcp-Session-Id`` it came with (``session``, what `bastion audit`
    filters by). Another user's session id, or a made-up one, is refused there as on any other
    request (404), so no one's decisions are filed under a session that is not theirs; without
    one, or with the caller's own, the probe is answered and recorded so."""
    sams = legacy_session(bastion, token, "deskhttp")["mcp-session-id"]
    avery = bastion.token("avery", "deskhttp")
    discover = {"jsonrpc": "2.0", "id": 4, "method": "server/discover", "params": {}}
    bastion.flush()
    seq = bastion.records.last_seq()
    for headers in (
        {"mcp-session-id": sams, "mcp-protocol-version": "2025-11-25"},
        {"mcp-session-id": sams},
        {"mcp-session-id": "made-up"},
    ):
        response = post(bastion, avery, body=discover, **headers)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == -32005
    bastion.flush()
    assert [r.session for _, r in bastion.records.after(seq)] == []
    own = legacy_session(bastion, avery, "deskhttp")["mcp-session-id"]
    bastion.flush()
    seq = bastion.records.last_seq()
    for headers in ({}, {"mcp-session-id": own}):
        response = post(bastion, avery, body=discover, **headers)
        assert response.status_code == 200 and "result" in response.json(), response.text
    bastion.flush()
    assert [r.session for _, r in bastion.records.after(seq)] == ["", own]


def _twice(name: str, other: str, mine: dict, second: dict, own: str) -> list[tuple[str, str]]:
    """The headers of a 2025-11-25 request on ``mine`` with ``name`` sent twice: first a value
    that would make another request of it, then the one it was answered by (the last)."""
    first = {
        "authorization": f"Bearer {other}",
        "mcp-protocol-version": "2026-07-28",
        "mcp-session-id": second["mcp-session-id"],
        "origin": "https://evil.example",
        "content-type": "text/plain",
    }[name]
    return [
        *((k, v) for k, v in mine.items() if k != name),
        (name, first),
        (name.upper(), mine.get(name, own)),
    ]


@pytest.mark.parametrize(
    "name",
    ["authorization", "mcp-protocol-version", "mcp-session-id", "origin", "content-type"],
)
def test_a_header_that_names_the_caller_session_or_era_sent_twice_is_refused_in_either_era(
    bastion, token, name
):
    """A header bastion reads as one value, sent twice, reads as two requests: one reader (a
    proxy, a load balancer keeping sessions on their replica, a log) takes the first, bastion
    took the last. 2026-07-28 routing headers were refused twice already, but only once the
    last MCP-Protocol-Version said 2026-07-28: a first one saying it and a last saying
    2025-11-25 skipped the check. Each such header sent twice is refused (400), in either era
    and for every HTTP method, and nothing is forwarded or ended."""
    other = bastion.token("avery", "deskhttp")
    mine = legacy_session(bastion, token, "deskhttp")
    second = legacy_session(bastion, token, "deskhttp")
    url = bastion.mcp_url("deskhttp")
    listing = {"jsonrpc": "2.0", "id": 5, "method": "tools/list"}
    before = len(bastion.recorder.requests)
    headers = _twice(name, other, mine, second, bastion.url)
    response = bastion.http.post(url, json=listing, headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == -32020 and "sent twice" in error["message"]
    deleted = bastion.http.delete(url, headers=headers)
    assert deleted.status_code == 400, deleted.text
    assert len(bastion.recorder.requests) == before
    # Both sessions go on.
    for session in (mine, second):
        assert bastion.http.post(url, json=listing, headers=session).status_code == 200
