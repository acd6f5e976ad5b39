"""A ``rate_limit`` counts what a client sends, never what it is sent: a notification on a stream
has its ``connect`` decided again (`Gateway.may_hear`), but is not counted under the caller's
limits. Were it counted, anyone who can make an upstream speak (another user calling a tool that
changes a list, a noisy upstream) would spend a listener's budget, cut its stream off and have
its own next message refused as rate limited."""

from __future__ import annotations

import queue
import threading

import pytest

from tests.waits import PATIENCE

from .streams import call_tool, events, legacy_session, modern_headers, modern_request
from .support import start

# An agent may send 4 messages an hour to lab (each test's tokens are of agents of their own).
LIMIT = 4
POLICY = f'\nrate_limit(_agent: Agent, "connect", McpServer{{"lab"}}, {LIMIT}, 3600);\n'
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


def test_notifications_on_a_listen_stream_spend_none_of_its_users_rate_limit(bastion):
    token = bastion.token("sam", "lab")
    with bastion.http.stream(
        "POST",
        bastion.mcp_url("lab"),
        json=modern_request(
            "w", "subscriptions/listen", {"notifications": {"toolsListChanged": True}}
        ),
        headers=modern_headers(token, "subscriptions/listen"),
    ) as stream:  # 1
        assert stream.status_code == 200
        frames = events(stream)
        assert next(frames)["method"] == "notifications/subscriptions/acknowledged"
        announce_tools(bastion, LIMIT + 2)
        told = heard(frames, LIMIT + 2)
        assert [m["method"] for m in told] == [TOOLS_CHANGED["method"]] * (LIMIT + 2)
    listed = bastion.http.post(
        bastion.mcp_url("lab"),
        json=modern_request(2, "tools/list", {}),
        headers=modern_headers(token, "tools/list"),
    )  # 2
    assert "result" in listed.json(), listed.json()
