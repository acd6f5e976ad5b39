"""What a hostile client (or upstream) tries against the message path added for notifications,
cancellation and requests to the client, and what bastion does instead: crafted ids get a 4xx,
never a 500; notifications of a resource reach only callers who may read it now, obligations
(a scope, an approval) included; a client is asked only in the modes it declared."""

from __future__ import annotations

import json
import threading

import pytest

from .streams import events, legacy_session, modern_headers, modern_request


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
    # a human's approval (refused meanwhile): neither is granted to a listener.
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
    assert read.json()["error"]["data"]["reason"] == "requires_approval"
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
    assert first.wait(15)
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
