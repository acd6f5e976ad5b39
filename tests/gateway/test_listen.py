"""2026-07-28 clients hear of changes through ``subscriptions/listen``: bastion acknowledges what
it grants, relays the upstream's list_changed, and sends a resource's updates only to callers
allowed to read that resource, deciding again for every notification."""

from __future__ import annotations

import base64
import json

import pytest
from mcp.client.subscriptions import PromptsListChanged, ResourceUpdated, ToolsListChanged

from bastion.policy.parser import parse_fact

from .lab_server import SECRET
from .streams import call_tool, events, legacy_session, modern_headers, modern_request

LISTS = dict(tools_list_changed=True, prompts_list_changed=True, resources_list_changed=True)


@pytest.mark.parametrize("server", ["lab", "labhttp"])
def test_a_2026_client_hears_the_upstreams_list_changes(bastion, server):
    async def script(client, seen):
        async with client.listen(**LISTS) as subscription:
            seen["honored"] = subscription.honored
            await client.call_tool("announce", {"kind": "tools"})
            seen["first"] = await anext(subscription)
            await client.call_tool("announce", {"kind": "prompts"})
            seen["second"] = await anext(subscription)

    seen = bastion.sdk("sam", server, "auto", script)
    assert seen["protocol_version"] == "2026-07-28"
    assert seen["honored"].tools_list_changed and seen["honored"].prompts_list_changed
    assert seen["first"] == ToolsListChanged()
    assert seen["second"] == PromptsListChanged()


@pytest.mark.parametrize("server", ["lab", "labhttp"])
def test_resource_updates_reach_only_callers_allowed_to_read_the_resource(bastion, server):
    uris = ["lab://secret", "lab://open"]

    def listen_as(user):
        async def script(client, seen):
            async with client.listen(resource_subscriptions=uris) as subscription:
                seen["honored"] = subscription.honored.resource_subscriptions
                # The secret one first: had it been sent, it would be the first event.
                await client.call_tool("announce", {"kind": "updated", "uri": "lab://secret"})
                await client.call_tool("announce", {"kind": "updated", "uri": "lab://open"})
                seen["first"] = await anext(subscription)

        return bastion.sdk(user, server, "auto", script)

    sam = listen_as("sam")  # a member of the team: lab://secret is for admins
    assert sam["honored"] == ["lab://open"]
    assert sam["first"] == ResourceUpdated(uri="lab://open")
    avery = listen_as("avery")  # an admin of the server
    assert avery["honored"] == ["lab://open", "lab://secret"]
    assert avery["first"] == ResourceUpdated(uri="lab://secret")


def _open_listen(bastion, token, server, notifications, request_id="watch-1"):
    return bastion.http.stream(
        "POST",
        bastion.mcp_url(server),
        json=modern_request(request_id, "subscriptions/listen", {"notifications": notifications}),
        headers=modern_headers(token, "subscriptions/listen"),
    )


def test_the_stream_opens_with_what_was_granted_and_stamps_the_clients_id(bastion):
    token = bastion.token("sam", "labhttp")
    wanted = {"toolsListChanged": True, "resourceSubscriptions": ["lab://secret"]}
    with _open_listen(bastion, token, "labhttp", wanted) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = events(response)
        ack = next(frames)
        assert ack["method"] == "notifications/subscriptions/acknowledged"
        assert ack["params"]["notifications"] == {"toolsListChanged": True}
        assert ack["params"]["_meta"] == {"io.modelcontextprotocol/subscriptionId": "watch-1"}
        call_tool(bastion, token, "labhttp", "announce", {"kind": "tools"})
        changed = next(frames)
        assert changed == {
            "jsonrpc": "2.0",
            "method": "notifications/tools/list_changed",
            "params": {"_meta": {"io.modelcontextprotocol/subscriptionId": "watch-1"}},
        }


def test_a_listener_whose_agent_is_blocked_is_cut_off_and_hears_nothing_more(bastion):
    token = bastion.token("sam", "lab")
    with _open_listen(bastion, token, "lab", {"toolsListChanged": True}) as response:
        frames = events(response)
        assert next(frames)["method"] == "notifications/subscriptions/acknowledged"
        client_id = _client_id(bastion, token)
        blocked = parse_fact(f'blocked(Agent{{"{client_id}"}})')
        bastion.apply(inserts=[blocked])
        try:
            other = bastion.token("avery", "lab")
            call_tool(bastion, other, "lab", "announce", {"kind": "tools"})
            # The stream ends without a notification and without the listen request's result.
            assert list(frames) == []
        finally:
            bastion.apply(deletes=[blocked])


@pytest.mark.parametrize("server", ["lab", "labhttp"])
def test_an_update_is_decided_again_when_it_comes(bastion, server):
    token = bastion.token("avery", server)
    wanted = {"resourceSubscriptions": ["lab://secret", "lab://open"]}
    with _open_listen(bastion, token, server, wanted) as response:
        frames = events(response)
        granted = next(frames)["params"]["notifications"]
        assert granted == {"resourceSubscriptions": ["lab://open", "lab://secret"]}
        admin = parse_fact(f'has_role(User{{"avery"}}, "admin", McpServer{{"{server}"}})')
        member = parse_fact('has_role(User{"avery"}, "member", Team{"support"})')
        # avery stays a user of the server, but may no longer read the secret.
        bastion.apply(inserts=[member], deletes=[admin])
        try:
            sam = bastion.token("sam", server)
            call_tool(bastion, sam, server, "announce", {"kind": "updated", "uri": "lab://secret"})
            call_tool(bastion, sam, server, "announce", {"kind": "updated", "uri": "lab://open"})
            assert next(frames)["params"]["uri"] == "lab://open"
        finally:
            bastion.apply(inserts=[admin], deletes=[member])


@pytest.mark.parametrize("server", ["lab", "labhttp"])
def test_each_resource_a_listen_filter_asks_for_is_a_recorded_decision(bastion, server):
    """What a filter is granted tells its caller what it may read: each resource it names is
    decided and recorded as a resources/subscribe is, the refused ones too, so no caller learns
    what it may read without a trace."""
    token = bastion.token("sam", server)  # a member of the team: lab://secret is for admins
    seq = bastion.records.last_seq()
    wanted = {"resourceSubscriptions": ["lab://secret", "lab://open"]}
    with _open_listen(bastion, token, server, wanted) as response:
        granted = next(events(response))["params"]["notifications"]
    assert granted == {"resourceSubscriptions": ["lab://open"]}
    bastion.flush()
    # Only sam's: a listener an earlier test opened for another person may still be deciding
    # updates (its records land after `seq`).
    heard = {
        r.target: (r.result, r.reason, r.action, tuple(r.principals))
        for _, r in bastion.records.after(seq)
        if r.method == "subscriptions/listen"
        and r.target.startswith("McpResource")
        and r.principals[0] == 'User{"sam"}'
    }
    principals = ('User{"sam"}', f'Agent{{"{_client_id(bastion, token)}"}}')
    assert heard == {
        f'McpResource{{"{server}/lab://secret"}}': ("deny", "not_permitted", "read", principals),
        f'McpResource{{"{server}/lab://open"}}': ("allow", "", "read", principals),
    }


def _client_id(bastion, token: str) -> str:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["client_id"]


BAD_FILTERS = {
    "no filter": None,
    "a flag that is not a boolean": {"toolsListChanged": "yes"},
    "URIs that are not a list": {"resourceSubscriptions": "lab://open"},
    "a URI that is not a string": {"resourceSubscriptions": [7]},
    "too many URIs": {"resourceSubscriptions": [f"lab://{i}" for i in range(1001)]},
}


@pytest.mark.parametrize("case", list(BAD_FILTERS))
def test_a_malformed_listen_request_is_refused_and_opens_nothing(bastion, case):
    token = bastion.token("sam", "labhttp")
    params = {} if BAD_FILTERS[case] is None else {"notifications": BAD_FILTERS[case]}
    response = bastion.http.post(
        bastion.mcp_url("labhttp"),
        json=modern_request(9, "subscriptions/listen", params),
        headers=modern_headers(token, "subscriptions/listen"),
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == -32602
    assert not list(bastion.app.state.gateway.sessions.listeners_of("labhttp"))


def test_a_2025_client_cannot_listen(bastion):
    headers = legacy_session(bastion, bastion.token("sam", "labhttp"), "labhttp")
    response = bastion.http.post(
        bastion.mcp_url("labhttp"),
        json={"jsonrpc": "2.0", "id": 2, "method": "subscriptions/listen", "params": {}},
        headers=headers,
    )
    assert response.json()["error"]["code"] == -32601


@pytest.mark.parametrize("server", ["lab", "labold"])  # upstreams that take resources/subscribe
def test_an_upstreams_refusal_to_follow_a_masked_resource_comes_without_its_text(bastion, server):
    # Reading lab://leaky is masked (customers.*.email), and the upstream refuses to subscribe
    # to it naming the address: a listen filter that asks for it gets that refusal without the
    # upstream's text, as resources/subscribe does (test_subscriptions).
    token = bastion.token("sam", server)
    wanted = {"resourceSubscriptions": ["lab://leaky"]}
    with _open_listen(bastion, token, server, wanted) as response:
        response.read()
    assert SECRET not in response.text, response.text
    assert "withheld by bastion" in response.json()["error"]["message"], response.text
