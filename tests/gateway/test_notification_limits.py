"""A ``rate_limit`` counts what a client sends, never what it is sent: a notification on a stream
has its ``connect`` decided again (`Gateway.may_hear`), but is not counted under the caller's
limits. Were it counted, anyone who can make an upstream speak (another user calling a tool that
changes a list, a noisy upstream) would spend a listener's budget, cut its stream off and have
its own next message refused as rate limited."""

from __future__ import annotations

import queue
import threading

import pytest

from bastion.policy.parser import parse_fact
from tests.waits import PATIENCE

from .streams import (
    call_tool,
    events,
    first_event,
    legacy_session,
    listening_to_tools,
    modern_headers,
    modern_request,
)
from .support import start

# An agent may send 4 messages an hour to lab (each test's tokens are of agents of their own),
# and read its secret 4 times an hour.
LIMIT = 4
SECRET = 'McpResource{"lab/lab://secret"}'
# Read only with a person's approval (the tests' policy), and limited too.
HELD = 'McpResource{"lab/lab://held"}'
POLICY = (
    f'\nrate_limit(_agent: Agent, "connect", McpServer{{"lab"}}, {LIMIT}, 3600);\n'
    f'rate_limit(_agent: Agent, "read", {SECRET}, {LIMIT}, 3600);\n'
    f'rate_limit(_agent: Agent, "read", {HELD}, {LIMIT}, 3600);\n'
)
TOOLS_CHANGED = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    with start(tmp_path_factory.mktemp("limits"), policy_extra=POLICY) as running:
        yield running


def heard(frames, count: int) -> list[dict]:
    """The next ``count`` messages of ``frames``, or fewer if the stream ends first (each
    waited for up to PATIENCE)."""
    found: queue.Queue = queue.Queue()

    def read() -> None:
        for _ in range(count):
            found.put(next(frames, None))

    threading.Thread(target=read, daemon=True).start()
    got = []
    for _ in range(count):
        message = found.get(timeout=PATIENCE)
        if message is None:
            break
        got.append(message)
    return got


def announce_tools(bastion, times: int) -> None:
    """Someone else (avery, each time through an agent of their own) makes the upstream say
    its tools changed, ``times`` times."""
    for _ in range(times):
        token = bastion.token("avery", "lab")
        answer = call_tool(bastion, token, "lab", "announce", {"kind": "tools"})
        assert "error" not in answer, answer


def test_notifications_on_a_get_stream_spend_none_of_its_users_rate_limit(bastion):
    headers = legacy_session(bastion, bastion.token("sam", "lab"), "lab")  # 1 message
    get = {k: v for k, v in headers.items() if k != "content-type"}
    get["accept"] = "text/event-stream"
    with bastion.http.stream("GET", bastion.mcp_url("lab"), headers=get) as stream:  # 2
        assert stream.status_code == 200
        frames = events(stream)
        announce_tools(bastion, LIMIT + 2)
        assert heard(frames, LIMIT + 2) == [TOOLS_CHANGED] * (LIMIT + 2)
    ping = bastion.http.post(
        bastion.mcp_url("lab"), json={"jsonrpc": "2.0", "id": 9, "method": "ping"}, headers=headers
    )  # 3
    assert ping.json() == {"jsonrpc": "2.0", "id": 9, "result": {}}


def test_the_record_of_a_notification_s_connect_says_its_rate_limit_was_not_counted(bastion):
    """Each notification's ``connect`` is recorded (a rate limit is an obligation to decide in
    full), and what the record says was applied is what was: the rate limit the policy named,
    not counted, is listed apart, never among the limits applied."""
    bastion.flush()  # the records of the tests before
    seq = bastion.records.last_seq()
    token = bastion.token("sam", "lab")
    headers = legacy_session(bastion, token, "lab")
    get = {k: v for k, v in headers.items() if k != "content-type"}
    get["accept"] = "text/event-stream"
    with bastion.http.stream("GET", bastion.mcp_url("lab"), headers=get) as stream:
        assert stream.status_code == 200
        frames = events(stream)
        announce_tools(bastion, 2)
        assert heard(frames, 2) == [TOOLS_CHANGED] * 2
    bastion.flush()
    sams = [r for _, r in bastion.records.after(seq) if 'User{"sam"}' in r.principals]
    by_method = {}
    for record in sams:
        by_method.setdefault(record.method, []).append(record)
    notified = by_method[TOOLS_CHANGED["method"]]
    assert [(r.action, r.result) for r in notified] == [("connect", "allow")] * 2
    limit = {"principal": notified[0].principals[-1], "max": LIMIT, "seconds": 3600}
    for record in notified:
        assert record.obligations["rate_limits"] == [], record.obligations
        assert record.obligations["rate_limits_not_counted"] == [limit], record.obligations
    # The messages sam's client sent were counted, and their records say so.
    [opened] = by_method["GET"]
    assert opened.obligations["rate_limits"] == [limit]
    assert "rate_limits_not_counted" not in opened.obligations


def test_notifications_on_a_listen_stream_spend_none_of_its_users_rate_limit(bastion):
    token = bastion.token("sam", "lab")
    with listening_to_tools(bastion, token, "lab") as frames:  # 1
        announce_tools(bastion, LIMIT + 2)
        told = heard(frames, LIMIT + 2)
        assert [m["method"] for m in told] == [TOOLS_CHANGED["method"]] * (LIMIT + 2)
    listed = bastion.http.post(
        bastion.mcp_url("lab"),
        json=modern_request(2, "tools/list", {}),
        headers=modern_headers(token, "tools/list"),
    )  # 2
    assert "result" in listed.json(), listed.json()


def test_the_record_of_an_update_heard_again_says_its_rate_limit_was_not_counted(bastion):
    """Whether a resource's update goes on a stream is decided again for each update, and
    recorded when the answer changes; never counted under ``read``'s rate limits. The record of
    an update heard again says so: the limit is listed apart, not among the limits applied."""
    headers = legacy_session(bastion, bastion.token("avery", "lab"), "lab")
    get = {k: v for k, v in headers.items() if k != "content-type"}
    get["accept"] = "text/event-stream"
    updated = {
        "jsonrpc": "2.0",
        "method": "notifications/resources/updated",
        "params": {"uri": "lab://secret"},
    }
    body = {"jsonrpc": "2.0", "id": 7, "method": "resources/subscribe"}
    body["params"] = {"uri": "lab://secret"}

    def announce(uri: str) -> None:
        token = bastion.token("sam", "lab")
        answer = call_tool(bastion, token, "lab", "announce", {"kind": "updated", "uri": uri})
        assert "error" not in answer, answer

    admin = parse_fact('has_role(User{"avery"}, "admin", McpServer{"lab"})')
    member = parse_fact('has_role(User{"avery"}, "member", Team{"support"})')
    with bastion.http.stream("GET", bastion.mcp_url("lab"), headers=get) as stream:
        assert stream.status_code == 200
        frames = events(stream)
        subscribed = bastion.http.post(bastion.mcp_url("lab"), json=body, headers=headers)
        assert subscribed.json()["result"] == {}, subscribed.text
        assert first_event(frames, lambda: announce("lab://secret")) == updated
        bastion.flush()
        seq = bastion.records.last_seq()
        bastion.apply(inserts=[member], deletes=[admin])  # avery may no longer read it
        try:
            announce("lab://secret")
        finally:
            bastion.apply(inserts=[admin], deletes=[member])
        announce("lab://secret")
        assert heard(frames, 1) == [updated]
    bastion.flush()
    records = [
        r
        for _, r in bastion.records.after(seq)
        if r.method == updated["method"] and r.action == "read" and 'User{"avery"}' in r.principals
    ]
    assert [(r.result, r.target) for r in records] == [("deny", SECRET), ("allow", SECRET)]
    again = records[-1]
    limit = {"principal": again.principals[-1], "max": LIMIT, "seconds": 3600}
    assert again.obligations["rate_limits"] == [], again.obligations
    assert again.obligations["rate_limits_not_counted"] == [limit], again.obligations


def test_the_record_of_a_call_held_before_it_was_counted_says_its_rate_limit_was_not_counted(
    bastion,
):
    """A client's message is counted under its rate limits only once nothing else stops it
    first: held for a person's approval, it was not counted, and its record (as a
    notification's) lists the policy's limits apart, never among the limits applied. The
    ``connect`` it was decided under first, counted, lists its own as applied."""
    bastion.flush()
    seq = bastion.records.last_seq()
    headers = legacy_session(bastion, bastion.token("sam", "lab"), "lab")
    body = {"jsonrpc": "2.0", "id": 3, "method": "resources/read"}
    body["params"] = {"uri": "lab://held"}
    answer = bastion.http.post(bastion.mcp_url("lab"), json=body, headers=headers).json()
    assert answer["error"]["data"]["reason"] == "approval_pending", answer
    bastion.flush()
    [held] = [
        r
        for _, r in bastion.records.after(seq)
        if r.target == HELD and 'User{"sam"}' in r.principals
    ]
    assert (held.result, held.reason) == ("held", "approval_pending")
    limit = {"principal": held.principals[-1], "max": LIMIT, "seconds": 3600}
    assert held.obligations["rate_limits"] == [], held.obligations
    assert held.obligations["rate_limits_not_counted"] == [limit], held.obligations
