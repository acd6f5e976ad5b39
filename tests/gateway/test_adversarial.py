"""What a hostile client (or upstream) tries against the message path added for notifications,
cancellation and requests to the client, and what bastion does instead: crafted ids get a 4xx,
never a 500; notifications of a resource reach only callers who may read it now, obligations
(a scope, an approval) included; a client is asked only in the modes it declared; what one user
(or a client that reads nothing) can make bastion hold is bounded."""

from __future__ import annotations

import contextlib
import json
import threading

import pytest

from bastion.gateway.enforce import Caller
from bastion.gateway.jsonrpc import SESSION_NOT_FOUND
from bastion.gateway.sessions import LIST_CHANGED, MAX_BACKLOG, MAX_STREAMS_PER_USER, Listener
from tests.waits import PATIENCE, eventually

from .streams import events, legacy_session, messages, modern_headers, modern_request


def _post(bastion, server, headers, body):
    return bastion.http.post(bastion.mcp_url(server), json=body, headers=headers)


@pytest.mark.parametrize("request_id", [[1], {"id": 1}, None, True, 1.5])
@pytest.mark.parametrize("era", ["legacy", "modern"])
def test_a_cancellation_naming_a_crafted_request_id_changes_nothing(bastion, request_id, era):
    token = bastion.token("sam", "lab")
    if era == "legacy":
        headers = legacy_session(bastion, token, "lab")
    else:
        headers = modern_headers(token, "notifications/cancelled")
    cancel = {
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"requestId": request_id, "reason": "crafted"},
    }
    response = _post(bastion, "lab", headers, cancel)
    assert response.status_code == 202, response.text
    # The gateway still answers this caller.
    if era == "legacy":
        ping = _post(bastion, "lab", headers, {"jsonrpc": "2.0", "id": 2, "method": "ping"})
    else:
        ping = _post(bastion, "lab", modern_headers(token, "ping"), modern_request(2, "ping", {}))
    assert ping.status_code == 200 and "result" in ping.json()


def _listen_ack(bastion, token, server, uris):
    wanted = {"resourceSubscriptions": uris}
    body = modern_request("watch", "subscriptions/listen", {"notifications": wanted})
    headers = modern_headers(token, "subscriptions/listen")
    with bastion.http.stream("POST", bastion.mcp_url(server), json=body, headers=headers) as r:
        assert r.status_code == 200
        ack = next(events(r))
    assert ack["method"] == "notifications/subscriptions/acknowledged"
    return ack["params"]["notifications"].get("resourceSubscriptions", [])


@pytest.mark.parametrize("server", ["lab", "labhttp"])
def test_a_listen_is_not_granted_a_resource_the_caller_could_not_read(bastion, server):
    # lab://guarded needs a scope sam's token lacks (resources/read gets a step-up), lab://held
    # a person's approval (held meanwhile): neither is granted to a listener.
    token = bastion.token("avery", server)
    read = _post(
        bastion,
        server,
        modern_headers(token, "resources/read", "lab://guarded"),
        modern_request(1, "resources/read", {"uri": "lab://guarded"}),
    )
    assert read.status_code == 403
    read = _post(
        bastion,
        server,
        modern_headers(token, "resources/read", "lab://held"),
        modern_request(2, "resources/read", {"uri": "lab://held"}),
    )
    assert messages(read)[-1]["error"]["data"]["reason"] == "approval_pending"
    granted = _listen_ack(bastion, token, server, ["lab://guarded", "lab://held", "lab://open"])
    assert granted == ["lab://open"]


def _ask_once(bastion, server, headers, tool):
    """Call ``tool`` in a 2025-11-25 session; the first frame of the answer."""
    call = {"jsonrpc": "2.0", "id": 41, "method": "tools/call"}
    call["params"] = {"name": tool, "arguments": {}}
    frames: list = []
    first = threading.Event()

    def run():
        with bastion.http.stream(
            "POST", bastion.mcp_url(server), json=call, headers=headers
        ) as response:
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                frames.append(json.loads(response.read()))
                first.set()
                return
            for frame in events(response):
                frames.append(frame)
                first.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert first.wait(PATIENCE)
    return frames[0]


@pytest.mark.parametrize("declared", [{}, {"form": {}}])
def test_a_client_that_declared_form_elicitation_is_not_sent_to_a_url(bastion, declared):
    # MCP: ``elicitation: {}`` means form mode only. An upstream asking for a URL (where the
    # person would be sent to sign in) is refused, and the client sees no URL.
    token = bastion.token("sam", "labhttp")
    headers = legacy_session(bastion, token, "labhttp", {"elicitation": declared})
    first = _ask_once(bastion, "labhttp", headers, "ask_by_url")
    assert first.get("method") != "elicitation/create", first
    assert first["id"] == 41 and "error" in first
    assert "phish.example" not in str(first)


def test_a_client_that_declared_url_elicitation_is_asked(bastion):
    token = bastion.token("sam", "labhttp")
    headers = legacy_session(bastion, token, "labhttp", {"elicitation": {"url": {}}})
    first = _ask_once(bastion, "labhttp", headers, "ask_by_url")
    assert first["method"] == "elicitation/create"
    assert first["params"]["url"] == "https://phish.example/login"
    answer = {"jsonrpc": "2.0", "id": first["id"], "result": {"action": "decline"}}
    assert _post(bastion, "labhttp", headers, answer).status_code == 202


def _open_stream(bastion, stack, server, token=None, headers=None):
    """A listen stream (2026-07-28, with ``token``) or a session's GET stream (``headers``),
    kept open in ``stack``; its HTTP status."""
    if headers is None:
        body = modern_request("watch", "subscriptions/listen", {"notifications": {}})
        opened = bastion.http.stream(
            "POST",
            bastion.mcp_url(server),
            json=body,
            headers=modern_headers(token, "subscriptions/listen"),
        )
    else:
        opened = bastion.http.stream("GET", bastion.mcp_url(server), headers=headers)
    response = stack.enter_context(opened)
    if response.status_code == 200:
        # Open once its first line has come; the reader is kept (dropping it closes the stream).
        next(stack.enter_context(contextlib.closing(response.iter_lines())))
    else:
        response.read()
    return response.status_code


def test_a_user_holds_a_bounded_number_of_streams_whatever_their_agents(bastion):
    # Each stream holds memory and a connection: a user's agents together hold at most
    # MAX_STREAMS_PER_USER on a server (listen and GET streams alike), another user is not
    # affected, and a stream closed makes room for one more.
    first, second = bastion.token("sam", "desk"), bastion.token("sam", "desk")
    session = legacy_session(bastion, second, "desk")
    del session["content-type"]
    session["accept"] = "text/event-stream"
    with contextlib.ExitStack() as streams, contextlib.ExitStack() as last:
        for _ in range(MAX_STREAMS_PER_USER - 2):
            assert _open_stream(bastion, streams, "desk", first) == 200
        assert _open_stream(bastion, last, "desk", second) == 200
        assert _open_stream(bastion, streams, "desk", headers=session) == 200
        assert _open_stream(bastion, streams, "desk", first) == 429
        assert _open_stream(bastion, streams, "desk", second) == 429
        other = legacy_session(bastion, first, "desk")
        del other["content-type"]
        other["accept"] = "text/event-stream"
        assert _open_stream(bastion, streams, "desk", headers=other) == 429
        assert _open_stream(bastion, streams, "desk", bastion.token("avery", "desk")) == 200
        last.close()
        # bastion notices the closed stream when its connection ends: wait for it.
        statuses: list[int] = []

        def let_go() -> bool:
            statuses.append(_open_stream(bastion, streams, "desk", first))
            return statuses[-1] != 429

        assert eventually(let_go, every=0.05), "the closed stream was never let go"
        assert statuses[-1] == 200


def test_a_client_that_reads_nothing_is_cut_off_instead_of_piling_up_notifications():
    caller = Caller("sam", "agent", frozenset(), "127.0.0.1", "2026-07-28")
    listener = Listener("watch", "lab", caller, "token", frozenset(LIST_CHANGED), set())
    for _ in range(MAX_BACKLOG + 5):
        listener.notify("notifications/tools/list_changed")
    # Cut off as refused (no listen result): the stream's next message is its end.
    assert listener.refused
    assert listener.stream.get_nowait() is None
    assert listener.stream.empty()


def test_a_user_holds_a_bounded_number_of_sessions_and_the_least_used_goes_first():
    from bastion.gateway.sessions import MAX_SESSIONS_PER_USER, SessionTable

    now = [0.0]
    table = SessionTable(idle_seconds=3600, clock=lambda: now[0])
    sessions = []
    for i in range(MAX_SESSIONS_PER_USER):
        now[0] += 1
        sessions.append(table.open("lab", "sam", (f"agent-{i % 3}",), "2025-11-25"))
    other = table.open("lab", "avery", ("agent-0",), "2025-11-25")
    now[0] += 1
    # sam uses his first session again: the second is now the one used least recently.
    assert table.find(sessions[0].id, "lab", "sam", ("agent-0",)) is sessions[0]
    now[0] += 1
    newest = table.open("lab", "sam", ("agent-9",), "2025-11-25")  # one more agent buys nothing
    assert table.find(sessions[1].id, "lab", "sam", ("agent-1",)) is None  # ended
    assert sessions[1].closed
    alive = [s for s in sessions if table.find(s.id, s.server, s.subject, s.chain)]
    assert len(alive) == MAX_SESSIONS_PER_USER - 1 and sessions[0] in alive
    assert table.find(newest.id, "lab", "sam", ("agent-9",)) is newest
    assert table.find(other.id, "lab", "avery", ("agent-0",)) is other  # other users untouched
    # Another server is counted on its own.
    assert table.find(
        table.open("labold", "sam", ("agent-0",), "2025-11-25").id, "labold", "sam", ("agent-0",)
    )


def test_another_users_session_id_serves_nothing_and_ends_nothing(bastion):
    """A 2025-11-25 session id is bound to the user (and chain) that opened it: avery, with a
    token of the very agent sam uses, holding sam's session id, is answered 404 on every method
    (a call, the GET stream resumed with ``Last-Event-ID``, DELETE), and sam's session goes on.
    Once sam ends it, its id serves no one, sam included."""
    from .support import register_public_client

    agent = register_public_client(bastion.http, bastion.url)
    sams = legacy_session(bastion, bastion.token("sam", "deskhttp", client_id=agent), "deskhttp")
    averys_token = bastion.token("avery", "deskhttp", client_id=agent)
    theirs = {**sams, "authorization": f"Bearer {averys_token}"}
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call"}
    call["params"] = {"name": "search_customers", "arguments": {"query": "a"}}
    url = bastion.mcp_url("deskhttp")
    attempts = [
        bastion.http.post(url, json=call, headers=theirs),
        bastion.http.get(
            url,
            headers={**theirs, "accept": "text/event-stream", "last-event-id": "0"},
            timeout=5,
        ),
        bastion.http.delete(url, headers=theirs),
    ]
    assert [r.status_code for r in attempts] == [404, 404, 404]
    assert all(r.json()["error"]["code"] == SESSION_NOT_FOUND for r in attempts)
    served = bastion.http.post(url, json=call, headers=sams)
    assert served.status_code == 200 and "result" in messages(served)[-1]
    assert bastion.http.delete(url, headers=sams).status_code == 204
    after = [bastion.http.post(url, json=call, headers=h) for h in (sams, theirs)]
    assert [r.status_code for r in after] == [404, 404]


def test_a_session_id_serves_only_the_server_it_was_opened_on(bastion):
    """Two servers behind one gateway share the table of sessions, never a session: sam's
    session of ``lab``, named on ``labhttp`` with sam's token for ``labhttp`` (the same user,
    the same agent), is unknown there on every method, and goes on where it was opened."""
    from .support import register_public_client

    agent = register_public_client(bastion.http, bastion.url)
    on_lab = legacy_session(bastion, bastion.token("sam", "lab", client_id=agent), "lab")
    elsewhere = {
        **on_lab,
        "authorization": f"Bearer {bastion.token('sam', 'labhttp', client_id=agent)}",
    }
    listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    url = bastion.mcp_url("labhttp")
    attempts = [
        bastion.http.post(url, json=listing, headers=elsewhere),
        bastion.http.get(url, headers={**elsewhere, "accept": "text/event-stream"}, timeout=5),
        bastion.http.delete(url, headers=elsewhere),
    ]
    assert [r.status_code for r in attempts] == [404, 404, 404]
    assert all(r.json()["error"]["code"] == SESSION_NOT_FOUND for r in attempts)
    served = bastion.http.post(bastion.mcp_url("lab"), json=listing, headers=on_lab)
    assert served.status_code == 200 and "result" in messages(served)[-1]


def test_a_2026_listen_request_naming_a_session_is_refused_and_opens_nothing(bastion):
    """2026-07-28 has no sessions: a ``subscriptions/listen`` that smuggles sam's own session
    id is refused before any stream opens (it would otherwise be read by a proxy keeping
    sessions on their replica as that session's)."""
    token = bastion.token("sam", "lab")
    session = legacy_session(bastion, token, "lab")["mcp-session-id"]
    request = modern_request("w", "subscriptions/listen", {"notifications": {}})
    headers = {**modern_headers(token, "subscriptions/listen"), "mcp-session-id": session}
    refused = bastion.http.post(bastion.mcp_url("lab"), json=request, headers=headers)
    assert refused.status_code == 400
    assert refused.headers["content-type"] == "application/json"
    assert "no sessions" in refused.json()["error"]["message"]
