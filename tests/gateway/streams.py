"""Raw Streamable HTTP for the transport tests: requests in either era, and SSE read line by
line (what an SDK client hides: the exact frames bastion sends)."""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import threading
from collections.abc import Iterator

from tests.waits import PATIENCE, eventually

ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


def modern_headers(token: str, method: str, name: str | None = None) -> dict[str, str]:
    headers = {
        "authorization": f"Bearer {token}",
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": method,
    }
    if name is not None:
        headers["mcp-name"] = name
    return headers


def modern_request(request_id, method: str, params: dict, capabilities: dict | None = None):
    envelope = {**ENVELOPE, "io.modelcontextprotocol/clientCapabilities": capabilities or {}}
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": method,
        "params": {**params, "_meta": envelope},
    }


def call_tool(bastion, token: str, server: str, tool: str, arguments: dict, request_id=1):
    """tools/call in 2026-07-28; the JSON-RPC response."""
    response = bastion.http.post(
        bastion.mcp_url(server),
        json=modern_request(request_id, "tools/call", {"name": tool, "arguments": arguments}),
        headers=modern_headers(token, "tools/call", tool),
    )
    assert response.status_code == 200, response.text
    # Plain JSON, or an event stream when the upstream sent something first (under load).
    return messages(response)[-1]


def events(response):
    """The JSON-RPC messages of an SSE response, as they arrive (comments skipped)."""
    data: list[str] = []
    for line in response.iter_lines():
        if line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            yield json.loads("\n".join(data))
            data = []


@contextlib.contextmanager
def listening_to_tools(bastion, token: str, server: str = "labhttp") -> Iterator[Iterator[dict]]:
    """A 2026-07-28 listen stream on ``server`` for its tool list's changes, acknowledged: its
    frames to come."""
    with bastion.http.stream(
        "POST",
        bastion.mcp_url(server),
        json=modern_request(
            "w", "subscriptions/listen", {"notifications": {"toolsListChanged": True}}
        ),
        headers=modern_headers(token, "subscriptions/listen"),
    ) as response:
        assert response.status_code == 200
        frames = events(response)
        assert next(frames)["method"] == "notifications/subscriptions/acknowledged"
        yield frames


def messages(response) -> list[dict]:
    """The JSON-RPC messages of an answer, whether it came as JSON or (taking longer, or with
    notifications first) as an event stream; the response is the last."""
    if response.headers["content-type"].startswith("text/event-stream"):
        return list(events(response))
    return [response.json()]


def first_event(frames, trigger, attempts: int = 20) -> dict:
    """The first message of ``frames`` (from `events`), calling ``trigger()`` until one comes.

    A 2025-11-25 upstream built on the SDK sends its GET stream's headers a moment before it
    registers the stream, and drops what it sends in between; bastion cannot see that moment.
    So a test that makes the upstream notify right after a stream opened tries again, a fixed
    number of times, rather than depend on that moment having passed."""
    found: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: found.put(next(frames, None)), daemon=True).start()
    for _ in range(attempts):
        trigger()
        try:
            return found.get(timeout=1)
        except queue.Empty:
            continue
    raise AssertionError(f"nothing arrived after {attempts} attempts")


def legacy_session(
    bastion, token: str, server: str, capabilities: dict | None = None
) -> dict[str, str]:
    """Open a 2025-11-25 session (the client declaring ``capabilities``); the headers that use
    it."""
    opened = bastion.http.post(
        bastion.mcp_url(server),
        json={
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": capabilities or {},
                "clientInfo": {"name": "raw test client", "version": "1"},
            },
        },
        headers={"authorization": f"Bearer {token}", "mcp-protocol-version": "2025-11-25"},
    )
    assert opened.status_code == 200, opened.text
    return {
        "authorization": f"Bearer {token}",
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2025-11-25",
        "mcp-session-id": opened.headers["mcp-session-id"],
    }


def traced(bastion, kind: str, tag: str, seconds: float = PATIENCE) -> bool:
    """Whether the lab server notes ``kind`` for ``tag`` (waiting up to ``seconds`` for it; 0
    for whether it has by now)."""

    def noted() -> bool:
        if not bastion.lab_trace.exists():
            return False
        entries = [json.loads(line) for line in bastion.lab_trace.read_text().splitlines()]
        return any(e["kind"] == kind and e.get("tag") == tag for e in entries)

    return eventually(noted, within=seconds, every=0.02)


def post_in_background(bastion, server, headers, body) -> dict:
    """POST ``body`` on a thread of its own; its answer (``status``, ``type``, ``text``) once
    ``thread`` has ended."""
    answer: dict = {}

    def post():
        response = bastion.http.post(bastion.mcp_url(server), json=body, headers=headers)
        answer["status"] = response.status_code
        answer["type"] = response.headers.get("content-type", "")
        answer["text"] = response.text

    thread = threading.Thread(target=post)
    thread.start()
    answer["thread"] = thread
    return answer


def streamed_in_background(bastion, server, headers, body) -> dict:
    """`post_in_background`, its answer read as it comes: ``began`` is set once its head has."""
    answer: dict = {"began": threading.Event()}

    def post():
        url = bastion.mcp_url(server)
        with bastion.http.stream("POST", url, json=body, headers=headers) as response:
            answer["status"] = response.status_code
            answer["type"] = response.headers.get("content-type", "")
            answer["began"].set()
            answer["text"] = response.read().decode()

    thread = threading.Thread(target=post)
    thread.start()
    answer["thread"] = thread
    return answer


def revoke(bastion, token: str) -> None:
    """Revoke ``token`` at bastion's RFC 7009 endpoint, as its client would."""
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    revoked = bastion.http.post(
        f"{bastion.url}/revoke", data={"token": token, "client_id": claims["client_id"]}
    )
    assert revoked.status_code == 200, revoked.text
