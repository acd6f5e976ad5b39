"""A request whose client leaves, or cancels it, is cancelled upstream: bastion sends
``notifications/cancelled`` for its own request id (stdio, 2025-11-25) or closes the request's
stream (2026-07-28), and stops waiting. Only the caller who sent a request can cancel it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from urllib.parse import urlsplit

import anyio
import pytest

from tests.waits import PATIENCE, eventually

from .streams import (
    legacy_session,
    modern_headers,
    modern_request,
    post_in_background,
    revoke,
    streamed_in_background,
    traced,
)


def _wait_call(request_id, tag: str, seconds: float = 30) -> dict:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": "wait", "arguments": {"seconds": seconds, "tag": tag}},
    }


@pytest.mark.parametrize("server", ["lab", "labhttp"])
def test_a_client_that_goes_away_cancels_the_upstream_call(bastion, server):
    token = bastion.token("sam", server)
    tag = uuid.uuid4().hex
    body = json.dumps(
        modern_request(3, "tools/call", {"name": "wait", "arguments": {"seconds": 30, "tag": tag}})
    ).encode()
    headers = {**modern_headers(token, "tools/call", "wait"), "content-length": str(len(body))}
    url = urlsplit(bastion.mcp_url(server))
    raw = f"POST {url.path} HTTP/1.1\r\nhost: {url.netloc}\r\n"
    raw += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection((url.hostname, url.port)) as client:
        client.sendall(raw.encode() + body)
        assert traced(bastion, "wait-started", tag)
    # The client is gone: the upstream's handler is cancelled, long before it would finish.
    assert traced(bastion, "wait-cancelled", tag)
    assert not traced(bastion, "wait-finished", tag, seconds=0)


def _cancel(bastion, server, headers, request_id) -> int:
    body = {
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"requestId": request_id, "reason": "the user pressed stop"},
    }
    return bastion.http.post(bastion.mcp_url(server), json=body, headers=headers).status_code


@pytest.mark.parametrize("server", ["lab", "labhttp"])
def test_notifications_cancelled_from_the_client_cancels_the_upstream_call(bastion, server):
    headers = legacy_session(bastion, bastion.token("sam", server), server)
    tag = uuid.uuid4().hex
    answer = post_in_background(bastion, server, headers, _wait_call(5, tag))
    assert traced(bastion, "wait-started", tag)
    assert _cancel(bastion, server, headers, 5) == 202
    assert traced(bastion, "wait-cancelled", tag)
    answer["thread"].join(PATIENCE)
    # The cancelled request is not answered: its stream ends with no JSON-RPC response.
    assert answer["status"] == 200 and answer["type"].startswith("text/event-stream")
    assert "jsonrpc" not in answer["text"]


@pytest.mark.parametrize("server", ["lab", "labhttp"])
def test_no_one_else_can_cancel_a_callers_request(bastion, server):
    owner = legacy_session(bastion, bastion.token("sam", server), server)
    tag = uuid.uuid4().hex
    call = {
        "jsonrpc": "2.0",
        "id": 6,
        "method": "tools/call",
        "params": {"name": "run_until_released", "arguments": {"tag": tag}},
    }
    answer = streamed_in_background(bastion, server, owner, call)
    assert traced(bastion, "run-started", tag)
    # Still running, its answer has begun as an event stream (a client sends a cancellation
    # only then); the call runs until it is let go, after the cancellations (a call of 1.5 s
    # could end first on a busy machine: they then named nothing).
    assert answer["began"].wait(PATIENCE), "the answer never began"
    # Another user, the same user in another session, and 2026-07-28 (no session) all name
    # request 6; none of them is the session that sent it.
    avery = legacy_session(bastion, bastion.token("avery", server), server)
    again = legacy_session(bastion, bastion.token("sam", server), server)
    assert _cancel(bastion, server, avery, 6) == 202
    assert _cancel(bastion, server, again, 6) == 202
    modern = modern_headers(bastion.token("sam", server), "notifications/cancelled")
    assert _cancel(bastion, server, modern, 6) == 202
    # bastion matches a cancellation to its request before it answers 202 (and cancels that
    # request then): none was taken if the call still runs to its end.
    with bastion.lab_trace.open("a") as trace:
        trace.write(json.dumps({"kind": "release", "tag": tag}) + "\n")
    answer["thread"].join(PATIENCE)
    data = [line[5:] for line in answer["text"].splitlines() if line.startswith("data:")]
    assert answer["type"].startswith("text/event-stream")
    assert data, f"the call was cancelled: {answer['text']!r}"
    assert json.loads(data[-1])["result"]["content"][0]["text"] == f"released {tag}"
    assert traced(bastion, "run-finished", tag)


@pytest.mark.parametrize("server", ["lab", "labhttp"])
@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_an_sdk_client_that_cancels_a_call_cancels_it_upstream(bastion, server, mode):
    tag = uuid.uuid4().hex

    async def script(client, seen):
        async with anyio.create_task_group() as group:
            group.start_soon(client.call_tool, "wait", {"seconds": 30, "tag": tag})
            await anyio.to_thread.run_sync(traced, bastion, "wait-started", tag)
            group.cancel_scope.cancel()

    bastion.sdk("sam", server, mode, script)
    assert traced(bastion, "wait-cancelled", tag)


def _record_of_wait(bastion, tag: str, seconds: float, after: int):
    """The decision record of the ``wait`` call with these arguments, written after ``after``
    (waiting a little for it: the upstream may note the cancellation first)."""
    wanted = bastion.app.state.gateway.enforcer.digest({"seconds": seconds, "tag": tag})

    def found() -> list:
        bastion.flush()
        return [r for _, r in bastion.records.after(after) if r.arguments_digest == wanted]

    eventually(found, every=0.02)
    (record,) = found()
    return record


@pytest.mark.parametrize("server", ["lab", "labhttp"])
def test_the_record_of_a_call_its_client_cancelled_says_so(bastion, server):
    headers = legacy_session(bastion, bastion.token("sam", server), server)
    seq = bastion.records.last_seq()
    cancelled, finished = uuid.uuid4().hex, uuid.uuid4().hex
    answer = post_in_background(bastion, server, headers, _wait_call(8, cancelled))
    assert traced(bastion, "wait-started", cancelled)
    assert _cancel(bastion, server, headers, 8) == 202
    assert traced(bastion, "wait-cancelled", cancelled)
    answer["thread"].join(PATIENCE)
    record = _record_of_wait(bastion, cancelled, 30, seq)
    assert (record.method, record.result) == ("tools/call", "allow")
    assert record.reason == "cancelled by the client"
    # A call left alone is recorded without that reason.
    answer = post_in_background(bastion, server, headers, _wait_call(9, finished, seconds=0))
    answer["thread"].join(PATIENCE)
    assert traced(bastion, "wait-finished", finished)
    assert _record_of_wait(bastion, finished, 0, seq).reason == ""


def test_the_record_of_a_call_whose_client_went_away_says_it_was_cancelled(bastion):
    token = bastion.token("sam", "labhttp")
    seq = bastion.records.last_seq()
    tag = uuid.uuid4().hex
    body = json.dumps(
        modern_request(3, "tools/call", {"name": "wait", "arguments": {"seconds": 30, "tag": tag}})
    ).encode()
    headers = {**modern_headers(token, "tools/call", "wait"), "content-length": str(len(body))}
    url = urlsplit(bastion.mcp_url("labhttp"))
    raw = f"POST {url.path} HTTP/1.1\r\nhost: {url.netloc}\r\n"
    raw += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection((url.hostname, url.port)) as client:
        client.sendall(raw.encode() + body)
        assert traced(bastion, "wait-started", tag)
    assert traced(bastion, "wait-cancelled", tag)
    assert _record_of_wait(bastion, tag, 30, seq).reason == "cancelled by the client"


def test_the_record_of_a_call_bastion_failed_to_forward_says_so(bastion, monkeypatch):
    """An allowed call is recorded however it ends: a failure of bastion's own while it forwards
    (the call never reaches the upstream) is recorded as an internal error, never left out, and
    the client's -32603 names that record."""
    upstream = bastion.app.state.gateway.upstreams["labhttp"].upstream

    async def fails(*args, **kwargs):
        raise TypeError("a failure bastion did not foresee")

    monkeypatch.setattr(upstream, "request", fails)
    headers = legacy_session(bastion, bastion.token("sam", "labhttp"), "labhttp")
    seq = bastion.records.last_seq()
    tag = uuid.uuid4().hex
    response = bastion.http.post(
        bastion.mcp_url("labhttp"), json=_wait_call(4, tag, seconds=0), headers=headers
    )
    record = _record_of_wait(bastion, tag, 0, seq)
    assert response.json()["error"] == {
        "code": -32603,
        "message": "internal error in bastion",
        "data": {"decision_id": record.id},
    }
    assert (record.method, record.result, record.reason) == (
        "tools/call",
        "allow",
        "internal error",
    )


@pytest.mark.parametrize("server", ["lab", "labhttp"])
@pytest.mark.parametrize(
    "accept, progress",
    [
        ("application/json", False),
        ("application/json, text/event-stream", False),
        # Answered as events once the upstream reports progress: it reports none here.
        ("application/json, text/event-stream", True),
    ],
)
def test_a_call_whose_token_is_revoked_while_it_runs_is_cancelled_and_its_result_withheld(
    bastion, server, accept, progress
):
    """A call already at its upstream when its token is revoked (by its client here; a Shared
    Signals event, a disabled user and another replica on PostgreSQL revoke alike) ran on, and
    its result reached the revoked client: what a stolen token's agent had asked for before it
    was cut off was still delivered. Now the call is cancelled upstream at once and answered as
    a revoked token is (401 invalid_token, or in an answer begun as events a JSON-RPC error whose
    reason says so), and its record says why. Another grant's call of the same user goes on."""
    token, other = bastion.token("sam", server), bastion.token("sam", server)
    seq = bastion.records.last_seq()
    tag, kept = uuid.uuid4().hex, uuid.uuid4().hex
    headers = {**modern_headers(token, "tools/call", "wait"), "accept": accept}
    events = "event-stream" in accept and not progress
    call = modern_request(4, "tools/call", _wait_call(4, tag)["params"])
    if progress:
        call["params"]["_meta"]["progressToken"] = tag
    answer = (streamed_in_background if events else post_in_background)(
        bastion, server, headers, call
    )
    untouched = post_in_background(
        bastion,
        server,
        modern_headers(other, "tools/call", "wait"),
        modern_request(5, "tools/call", _wait_call(5, kept, seconds=1.5)["params"]),
    )
    assert traced(bastion, "wait-started", tag) and traced(bastion, "wait-started", kept)
    if events:  # a client that takes events is answered so once a call runs for a while
        assert answer["began"].wait(PATIENCE), "the answer never began"
    revoke(bastion, token)
    assert traced(bastion, "wait-cancelled", tag)
    answer["thread"].join(PATIENCE)
    assert not answer["thread"].is_alive()
    if not events:
        assert answer["status"] == 401, answer
        assert answer["type"].startswith("application/json")
        assert json.loads(answer["text"])["error"] == "invalid_token"
    else:  # begun as events before the revocation: the refusal is the stream's last message
        assert answer["status"] == 200 and answer["type"].startswith("text/event-stream"), answer
        data = [line[5:] for line in answer["text"].splitlines() if line.startswith("data:")]
        refused = json.loads(data[-1])
        assert refused["id"] == 4 and refused["error"]["data"]["reason"] == "invalid_token"
        assert "result" not in answer["text"]
    assert _record_of_wait(bastion, tag, 30, seq).reason == "its token was revoked while it ran"
    # The same user's call under another grant is not touched.
    untouched["thread"].join(PATIENCE)
    assert traced(bastion, "wait-finished", kept, seconds=0)
    assert untouched["status"] == 200 and "waited 1.5s" in untouched["text"], untouched
    assert _record_of_wait(bastion, kept, 1.5, seq).reason == ""


def test_a_burst_of_revocations_checks_a_call_under_way_once(bastion):
    """Each revocation heard has the requests of its grant checked again (all the trusted
    issuers' requests, for a user's standing changed): a burst of them (a script disabling many
    users) made one check per request each, all at once. A check not begun yet now stands for
    those heard before it begins."""
    token = bastion.token("sam", "labhttp")
    tag = uuid.uuid4().hex
    headers = {**modern_headers(token, "tools/call", "wait"), "accept": "application/json"}
    call = modern_request(8, "tools/call", _wait_call(8, tag, seconds=1)["params"])
    answer = post_in_background(bastion, "labhttp", headers, call)
    assert traced(bastion, "wait-started", tag)
    gateway = bastion.app.state.gateway
    (flight,) = gateway.in_flight.values()
    checked = []
    still_valid = flight.exchange.still_valid

    async def counted():
        checked.append(1)
        return await still_valid()

    flight.exchange.still_valid = counted
    grant = flight.exchange.caller.grant_id

    def burst():
        for _ in range(20):
            gateway._grant_revoked(grant)

    flight.task.get_loop().call_soon_threadsafe(burst)
    assert eventually(lambda: checked and not gateway._checks)
    assert checked == [1]
    answer["thread"].join(PATIENCE)
    assert answer["status"] == 200 and "waited 1" in answer["text"], answer


@pytest.mark.parametrize("server", ["lab", "labhttp"])
def test_a_call_whose_token_is_revoked_before_it_is_under_way_is_refused(bastion, server):
    """A revocation stops the requests under way; one whose token was checked but which was not
    under way yet (its body still coming, here) was found by none, and ran: the revoked client
    had its result. Now a request that becomes under way after a revocation was heard has its
    token checked again first: refused 401, and nothing reaches the upstream."""
    token = bastion.token("sam", server)
    tag = uuid.uuid4().hex
    body = json.dumps(
        modern_request(7, "tools/call", _wait_call(7, tag, seconds=0.1)["params"])
    ).encode()
    headers = {
        **modern_headers(token, "tools/call", "wait"),
        "accept": "application/json",
        "content-length": str(len(body)),
    }
    url = urlsplit(bastion.mcp_url(server))
    raw = f"POST {url.path} HTTP/1.1\r\nhost: {url.netloc}\r\nconnection: close\r\n"
    raw += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    tokens = bastion.app.state.gateway.tokens
    with socket.create_connection((url.hostname, url.port), timeout=PATIENCE) as client:
        client.sendall(raw.encode() + body[:10])
        # The token is checked when the head has come (and then remembered): the body is awaited.
        assert eventually(lambda: any(key[0] == token for key in tokens._tokens))
        revoke(bastion, token)
        client.sendall(body[10:])
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    head, _, text = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), answer
    assert json.loads(text)["error"] == "invalid_token"
    assert not traced(bastion, "wait-started", tag, seconds=0)


@pytest.mark.parametrize("server", ["lab", "labhttp"])
def test_a_call_whose_token_another_process_revokes_is_stopped_too(bastion, server):
    """On SQLite a revocation by another process (here `bastion`'s store in a process of its
    own, as the CLI or a replica on the same file revokes) is announced to no one: the call under
    way ran on. The gateway now looks at its requests still under way every second once the
    database has changed, and stops one whose token is revoked, as above."""
    from tests.gateway.test_revocation import REVOKE, jti

    assert not bastion.app.state.gateway.tokens.db.is_postgres
    token = bastion.token("sam", server)
    tag = uuid.uuid4().hex
    headers = {**modern_headers(token, "tools/call", "wait"), "accept": "application/json"}
    answer = post_in_background(
        bastion, server, headers, modern_request(6, "tools/call", _wait_call(6, tag)["params"])
    )
    assert traced(bastion, "wait-started", tag)
    subprocess.run(
        [sys.executable, "-c", REVOKE, bastion.app.state.config.database, "token", jti(token)],
        check=True,
        timeout=60,
    )
    assert traced(bastion, "wait-cancelled", tag)
    answer["thread"].join(PATIENCE)
    assert answer["status"] == 401, answer
    assert json.loads(answer["text"])["error"] == "invalid_token"
