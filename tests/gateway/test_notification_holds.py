"""A notification asks no person anything: its ``connect`` is decided again before it goes on a
stream (`Gateway.may_hear`), and where that ``connect`` now needs a person's approval (a hold
put on it, or the approval for minutes that covered it lapsed), the stream ends as on a refusal,
and no approval request is filed. Else a person would be asked to approve something no client
asked for (a ``notifications/tools/list_changed``), and an approval given for it would let
through nothing the client sends. The client's next message is held as usual."""

from __future__ import annotations

import json

import pytest

from bastion.cli import main
from bastion.policy.parser import parse_fact

from .streams import (
    call_tool,
    events,
    first_event,
    legacy_session,
    listening_to_tools,
    modern_headers,
    modern_request,
)
from .support import register_public_client, start, test_policy

TOOLS_CHANGED = "notifications/tools/list_changed"
# An approval of sam's connect may be given for minutes: an ``approval_grant`` fact (the test
# policy holds connect where a ``connect_held`` fact says so).
POLICY = """
declare approval_grant(User, Agent, String, McpServer);
approval_window(_user: User, "connect", _server: McpServer, 30);
declare connect_reviewed(McpServer, User);
requires_review(user: User, "connect", server: McpServer) if connect_reviewed(server, user);
self_approval_forbidden(user: User, "connect", server: McpServer) if
  connect_reviewed(server, user);
"""


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    with start(tmp_path_factory.mktemp("notification-holds"), policy_extra=POLICY) as running:
        yield running


def announce_tools(bastion, server: str) -> None:
    """avery (not held) makes the upstream say its tools changed."""
    token = bastion.token("avery", server)
    answer = call_tool(bastion, token, server, "announce", {"kind": "tools"})
    assert "error" not in answer, answer


def requests_of(bastion, subject: str, server: str) -> list:
    return [
        r
        for r in bastion.app.state.approvals.store.listed(limit=1000)
        if (r.subject, r.server) == (subject, server)
    ]


def filed_since(bastion, server: str, before: list) -> list[tuple[str, str]]:
    """The method and status of each request for sam on ``server`` not among ``before``."""
    return [(r.method, r.status) for r in requests_of(bastion, "sam", server) if r not in before]


def records_of(bastion, seq: int, client: str, method: str) -> list:
    bastion.flush()
    agent = f'Agent{{"{client}"}}'
    return [
        r for _, r in bastion.records.after(seq) if r.method == method and agent in r.principals
    ]


def list_tools(bastion, headers: dict) -> dict:
    body = {"jsonrpc": "2.0", "id": 9, "method": "tools/list", "params": {}}
    return bastion.http.post(bastion.mcp_url("lab"), json=body, headers=headers).json()


def test_a_connect_approval_for_minutes_that_lapses_ends_a_get_stream_and_asks_nobody(bastion):
    """sam's connect to lab is held, and an approval for minutes (its ``approval_grant``) covers
    his agent: his GET stream opens. The window ends (the grant goes) while the stream is open:
    the next notification ends the stream, recorded as refused for want of an approval, and
    files no request; sam's next message is held for a person, as any message is."""
    client = register_public_client(bastion.http, bastion.url)
    token = bastion.token("sam", "lab", client_id=client)
    held = parse_fact('connect_held(McpServer{"lab"}, User{"sam"})')
    grant = parse_fact(
        f'approval_grant(User{{"sam"}}, Agent{{"{client}"}}, "connect", McpServer{{"lab"}})'
    )
    bastion.apply(inserts=[held, grant])
    try:
        headers = legacy_session(bastion, token, "lab")
        get = {k: v for k, v in headers.items() if k != "content-type"}
        get["accept"] = "text/event-stream"
        with bastion.http.stream("GET", bastion.mcp_url("lab"), headers=get) as stream:
            assert stream.status_code == 200
            frames = events(stream)
            asked_before = requests_of(bastion, "sam", "lab")
            bastion.flush()
            seq = bastion.records.last_seq()
            bastion.apply(deletes=[grant])  # the window ends
            # The stream ends (None) rather than carry the notification.
            assert first_event(frames, lambda: announce_tools(bastion, "lab")) is None
            assert filed_since(bastion, "lab", asked_before) == []
        [refused] = records_of(bastion, seq, client, TOOLS_CHANGED)
        assert (refused.action, refused.result) == ("connect", "deny")
        assert refused.reason == "requires_approval"
        assert "approval" not in refused.obligations
        # sam's client sends something: that is held for a person, as before.
        error = list_tools(bastion, headers)["error"]
        assert error["data"]["reason"] == "approval_pending", error
        assert filed_since(bastion, "lab", asked_before) == [("tools/list", "pending")]
    finally:
        bastion.apply(deletes=[held, grant])


def test_a_hold_put_on_connect_ends_a_listen_stream_and_asks_nobody(bastion):
    client = register_public_client(bastion.http, bastion.url)
    token = bastion.token("sam", "labhttp", client_id=client)
    held = parse_fact('connect_held(McpServer{"labhttp"}, User{"sam"})')
    with listening_to_tools(bastion, token) as frames:
        asked_before = requests_of(bastion, "sam", "labhttp")
        bastion.flush()
        seq = bastion.records.last_seq()
        bastion.apply(inserts=[held])
        try:
            announce_tools(bastion, "labhttp")
            assert list(frames) == []  # ended, without its result
            assert filed_since(bastion, "labhttp", asked_before) == []
            [refused] = records_of(bastion, seq, client, TOOLS_CHANGED)
            assert (refused.action, refused.result) == ("connect", "deny")
            assert refused.reason == "requires_approval"
            # sam's client sends something: that is held for a person, as any message is.
            again = bastion.http.post(
                bastion.mcp_url("labhttp"),
                json=modern_request(2, "tools/list", {}),
                headers=modern_headers(token, "tools/list"),
            ).json()
            assert again["error"]["data"]["reason"] == "approval_pending", again
            assert filed_since(bastion, "labhttp", asked_before) == [("tools/list", "pending")]
        finally:
            bastion.apply(deletes=[held])


def test_a_review_put_on_connect_asks_nobody_about_a_notification(bastion, tmp_path, capsys):
    """A review on ``connect`` holds nothing (a connect has no result), and a notification asks
    no person anything: it goes on, recorded as allowed, with no approval of any kind, whether
    or not anyone could review (here nobody may: sam is forbidden to answer for himself, and no
    approver rule names anyone). Before, the notification looked its review up in the approval
    store, was refused ``no_approver`` with an approval of kind ``review`` in its record (a hold
    it never had), and ended the stream. sam's own messages are still refused, as documented
    (docs/gateway.md: a review on connect that nobody may answer)."""
    client = register_public_client(bastion.http, bastion.url)
    token = bastion.token("sam", "labhttp", client_id=client)
    reviewed = parse_fact('connect_reviewed(McpServer{"labhttp"}, User{"sam"})')
    with listening_to_tools(bastion, token) as frames:
        asked_before = requests_of(bastion, "sam", "labhttp")
        bastion.flush()
        seq = bastion.records.last_seq()
        bastion.apply(inserts=[reviewed])
        try:
            heard = first_event(frames, lambda: announce_tools(bastion, "labhttp"))
            decided = records_of(bastion, seq, client, TOOLS_CHANGED)
            assert decided, "the notification's connect was not recorded"
            for record in decided:
                assert "approval" not in record.obligations, record.obligations
                assert (record.action, record.result, record.reason) == ("connect", "allow", "")
            assert heard is not None and heard["method"] == TOOLS_CHANGED, heard
            assert filed_since(bastion, "labhttp", asked_before) == []
            # sam's client sends something: refused, nobody may review his connect.
            again = bastion.http.post(
                bastion.mcp_url("labhttp"),
                json=modern_request(2, "tools/list", {}),
                headers=modern_headers(token, "tools/list"),
            ).json()
            assert again["error"]["data"]["reason"] == "no_approver", again
            # Replayed by the same policy (the review put on again), the notification is let
            # through again: a review of a connect holds nothing.
            candidate = tmp_path / "same.polar"
            candidate.write_text(test_policy() + POLICY)
            database = bastion.app.state.config.database
            argv = ["audit", "replay", "--policy", str(candidate), "--database", database]
            assert main([*argv, "--json"]) in (0, 1)
            changed = {c["id"]: c for c in json.loads(capsys.readouterr().out)["changed"]}
            assert not {r.id for r in decided} & set(changed), list(changed.values())
        finally:
            bastion.apply(deletes=[reviewed])
