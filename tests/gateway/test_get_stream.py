"""A 2025-11-25 session's GET stream is held to the token that opened it and to the policy: before
each notification the token is checked again and ``connect`` decided again, and if either is
refused the stream ends, hearing nothing more (as a 2026-07-28 listen stream does)."""

from __future__ import annotations

import asyncio
import base64
import json
import threading

import anyio
import pytest
from mcp.types import ToolListChangedNotification

from bastion.gateway.enforce import Caller
from bastion.gateway.sessions import Listener
from bastion.gateway.transport import _end_at_expiry
from bastion.policy.parser import parse_fact
from tests.waits import PATIENCE

from .streams import (
    call_tool,
    events,
    first_event,
    legacy_session,
    modern_headers,
    modern_request,
    revoke,
)

TOOLS_CHANGED = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
SAM_IS_A_MEMBER = parse_fact('has_role(User{"sam"}, "member", Team{"support"})')


def open_get(bastion, server, headers):
    get = {k: v for k, v in headers.items() if k != "content-type"}
    return bastion.http.stream(
        "GET", bastion.mcp_url(server), headers={**get, "accept": "text/event-stream"}
    )


def announce_tools(bastion, server):
    """Someone else (avery, in 2026-07-28) makes the upstream say its tools changed."""
    answer = call_tool(
        bastion, bastion.token("avery", server), server, "announce", {"kind": "tools"}
    )
    assert "error" not in answer, answer


@pytest.mark.parametrize("server", ["lab", "labhttp", "labold"])
def test_a_get_stream_hears_the_upstreams_list_changes(bastion, server):
    headers = legacy_session(bastion, bastion.token("sam", server), server)
    with open_get(bastion, server, headers) as response:
        assert response.status_code == 200
        frames = events(response)
        assert first_event(frames, lambda: announce_tools(bastion, server)) == TOOLS_CHANGED


def test_a_session_holds_one_get_stream(bastion):
    headers = legacy_session(bastion, bastion.token("sam", "lab"), "lab")
    with open_get(bastion, "lab", headers) as first:
        assert first.status_code == 200
        with open_get(bastion, "lab", headers) as second:
            assert second.status_code == 409


@pytest.mark.parametrize("server", ["lab", "labhttp", "labold"])
def test_a_get_stream_whose_token_is_revoked_is_cut_off_and_hears_nothing_more(bastion, server):
    token = bastion.token("sam", server)
    headers = legacy_session(bastion, token, server)
    with open_get(bastion, server, headers) as response:
        assert response.status_code == 200
        frames = events(response)
        revoke(bastion, token)
        announce_tools(bastion, server)
        # The stream ends without the notification.
        assert list(frames) == []
    # And it cannot be opened again with that token.
    with open_get(bastion, server, headers) as again:
        assert again.status_code == 401


@pytest.mark.parametrize("server", ["lab", "labhttp"])
def test_a_get_stream_whose_user_loses_connect_is_cut_off_and_the_refusal_recorded(bastion, server):
    headers = legacy_session(bastion, bastion.token("sam", server), server)
    with open_get(bastion, server, headers) as response:
        assert response.status_code == 200
        frames = events(response)
        seq = bastion.records.last_seq()
        bastion.apply(deletes=[SAM_IS_A_MEMBER])  # sam is no longer on the server's team
        try:
            announce_tools(bastion, server)
            assert list(frames) == []
            # Opening the stream again is decided again, and refused.
            with open_get(bastion, server, headers) as again:
                assert again.status_code == 403
                refusal = json.loads(again.read())["error"]
                assert refusal["data"]["reason"] == "not_permitted"
        finally:
            bastion.apply(inserts=[SAM_IS_A_MEMBER])
    bastion.flush()
    refused = [
        r
        for _, r in bastion.records.after(seq)
        if r.result == "deny" and 'User{"sam"}' in r.principals
    ]
    cut_off, reopened = refused
    assert cut_off.method == "notifications/tools/list_changed"
    assert cut_off.target == f'McpServer{{"{server}"}}'
    assert cut_off.reason == "not_permitted"
    assert (reopened.method, reopened.id) == ("GET", refusal["data"]["decision_id"])


def test_an_sdk_client_hears_list_changes_on_its_get_stream(bastion):
    heard: list = []
    arrived = anyio.Event()

    async def on_message(message) -> None:
        if isinstance(message, ToolListChangedNotification):
            heard.append(message)
            arrived.set()

    async def script(client, seen):
        # The SDK opens its GET stream on its own time: announce, a second apart, until it is
        # heard (see streams.first_event).
        with anyio.move_on_after(PATIENCE):
            while not arrived.is_set():
                await client.call_tool("announce", {"kind": "tools"})
                with anyio.move_on_after(1):
                    await arrived.wait()

    seen = bastion.sdk("sam", "labold", "legacy", script, message_handler=on_message)
    assert seen["protocol_version"] == "2025-11-25"
    assert heard


def _listener(token: str) -> Listener:
    caller = Caller("sam", "agent", frozenset(), "127.0.0.1", "2025-11-25")
    return Listener(None, "lab", caller, token, frozenset(), set())


def _token(claims: dict) -> str:
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"e30.{body}.signature"


def test_a_stream_ends_when_its_token_expires_even_without_notifications():
    async def main():
        expired = _listener(_token({"exp": 1}))
        unreadable = _listener("not a token")
        valid = _listener(_token({"exp": 2**40}))
        timers = [_end_at_expiry(x) for x in (expired, unreadable, valid)]
        async with asyncio.timeout(PATIENCE):
            ends = [await expired.stream.get(), await unreadable.stream.get()]
        for timer in timers:
            timer.cancel()
        return ends, expired, unreadable, valid

    ends, expired, unreadable, valid = asyncio.run(main())
    assert ends == [None, None] and expired.refused and unreadable.refused
    assert valid.stream.empty() and not valid.refused


def test_a_get_that_loses_a_race_with_delete_opens_nothing(bastion, monkeypatch):
    # The GET is held inside its `connect` decision while the session is deleted: when it
    # resumes, the session is gone, and no stream may open on it.
    gateway = bastion.app.state.gateway
    token = bastion.token("sam", "lab")
    headers = legacy_session(bastion, token, "lab")
    deciding, release = threading.Event(), threading.Event()
    decide = gateway.enforcer.decide

    async def held(caller, server, method, *args, **kwargs):
        if method == "GET":
            deciding.set()
            await anyio.to_thread.run_sync(release.wait, PATIENCE)
        return await decide(caller, server, method, *args, **kwargs)

    monkeypatch.setattr(gateway.enforcer, "decide", held)
    seen = {}

    def get():
        with open_get(bastion, "lab", headers) as response:
            seen["status"] = response.status_code
            seen["body"] = response.read()

    thread = threading.Thread(target=get, daemon=True)
    thread.start()
    assert deciding.wait(PATIENCE)
    deleted = bastion.http.delete(
        bastion.mcp_url("lab"), headers={k: v for k, v in headers.items() if k != "content-type"}
    )
    assert deleted.status_code == 204
    release.set()
    thread.join(PATIENCE)
    assert seen["status"] == 404, seen
    assert b"-32005" in seen["body"]
    assert not [
        listener
        for listener in gateway.sessions.listeners_of("lab")
        if listener.caller.subject == "sam" and listener.id is None
    ]


@pytest.mark.parametrize("era", ["legacy", "modern"])
def test_revoking_a_token_ends_its_streams_at_once(bastion, era):
    # No notification comes: the stream must end because of the revocation itself. A token of
    # another grant keeps its stream.
    token, other = bastion.token("sam", "lab"), bastion.token("sam", "lab")
    if era == "legacy":
        opened = [
            open_get(bastion, "lab", legacy_session(bastion, t, "lab")) for t in (token, other)
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
    with opened[0] as revoked_stream, opened[1] as kept_stream:
        assert revoked_stream.status_code == kept_stream.status_code == 200
        frames = events(revoked_stream)
        if era == "modern":
            assert next(frames)["method"] == "notifications/subscriptions/acknowledged"
        revoke(bastion, token)
        assert list(frames) == []  # ended (a client read timeout would fail the test instead)
        assert [
            listener
            for listener in bastion.app.state.gateway.sessions.listeners_of("lab")
            if listener.token == other
        ]
