"""2025-11-25 clients subscribe to a resource's updates with ``resources/subscribe``: decided as
``read`` on the resource, and each update is decided again before it goes on the session's GET
stream, so a caller who may no longer read the resource hears no more of it."""

from __future__ import annotations

import json
import uuid

import anyio
import pytest
from mcp.types import ResourceUpdatedNotification

from bastion.gateway import handlers
from bastion.gateway import upstream as upstream_module
from bastion.policy.parser import parse_fact
from tests.waits import PATIENCE

from .lab_server import SECRET
from .streams import (
    call_tool,
    events,
    first_event,
    legacy_session,
    modern_headers,
    modern_request,
    traced,
)
from .test_get_stream import TOOLS_CHANGED, open_get

SERVERS = ["lab", "labhttp", "labold"]


def post(bastion, server, headers, method: str, params: dict, request_id=7):
    body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
    return bastion.http.post(bastion.mcp_url(server), json=body, headers=headers)


def subscribe(bastion, server, headers, uri: str) -> dict:
    response = post(bastion, server, headers, "resources/subscribe", {"uri": uri})
    assert response.status_code == 200, response.text
    return response.json()


def announce(bastion, server, kind: str, uri: str = "") -> None:
    """avery (an admin, in 2026-07-28) makes the upstream announce a change."""
    token = bastion.token("avery", server)
    answer = call_tool(bastion, token, server, "announce", {"kind": kind, "uri": uri})
    assert "error" not in answer, answer


def updated(uri: str) -> dict:
    return {"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": uri}}


def capabilities(bastion, server: str) -> dict:
    headers = legacy_session(bastion, bastion.token("sam", server), server)
    del headers["mcp-session-id"]
    body = {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    }
    return post(bastion, server, headers, "initialize", body).json()["result"]["capabilities"]


def test_subscribe_is_offered_only_when_the_upstream_has_it(bastion):
    assert capabilities(bastion, "lab")["resources"]["subscribe"] is True
    assert capabilities(bastion, "labold")["resources"]["subscribe"] is True
    assert not capabilities(bastion, "desk")["resources"].get("subscribe")


@pytest.mark.parametrize("server", SERVERS)
def test_sam_hears_the_updates_of_a_resource_he_subscribed_to_and_no_other(bastion, server):
    headers = legacy_session(bastion, bastion.token("sam", server), server)
    with open_get(bastion, server, headers) as response:
        frames = events(response)
        assert subscribe(bastion, server, headers, "lab://open") == {
            "jsonrpc": "2.0",
            "id": 7,
            "result": {},
        }

        def both() -> None:
            # Not subscribed to (and not for sam): had it been sent, it would come first.
            announce(bastion, server, "updated", "lab://secret")
            announce(bastion, server, "updated", "lab://open")

        assert first_event(frames, both) == updated("lab://open")
    if server != "labhttp":  # a 2026-07-28 upstream is asked through its listen stream
        assert traced(bastion, "subscribed", "lab://open")


@pytest.mark.parametrize("server", SERVERS)
def test_subscribing_to_a_resource_one_may_not_read_is_refused_and_forwards_nothing(
    bastion, server
):
    headers = legacy_session(bastion, bastion.token("sam", server), server)
    hidden = f"lab://hidden-{uuid.uuid4().hex}"  # no fact relates it to the server: no read
    with open_get(bastion, server, headers) as response:
        frames = events(response)
        seq = bastion.records.last_seq()
        answer = subscribe(bastion, server, headers, hidden)
        error = answer["error"]
        assert error["code"] == -32003 and error["data"]["reason"] == "not_permitted"
        assert not traced(bastion, "subscribed", hidden, seconds=0)
        assert subscribe(bastion, server, headers, "lab://open")["result"] == {}
        announce(bastion, server, "updated", hidden)
        announce(bastion, server, "updated", "lab://open")
        assert next(frames) == updated("lab://open")
    bastion.flush()
    record = bastion.records.get(error["data"]["decision_id"])
    assert (record.method, record.result) == ("resources/subscribe", "deny")
    assert record.target == f'McpResource{{"{server}/{hidden}"}}'
    assert record.id in {r.id for _, r in bastion.records.after(seq)}


@pytest.mark.parametrize("server", ["lab", "labhttp"])
def test_losing_read_mid_session_stops_the_updates(bastion, server):
    headers = legacy_session(bastion, bastion.token("avery", server), server)
    with open_get(bastion, server, headers) as response:
        frames = events(response)
        assert subscribe(bastion, server, headers, "lab://secret")["result"] == {}
        assert subscribe(bastion, server, headers, "lab://open")["result"] == {}
        announce(bastion, server, "updated", "lab://secret")
        assert next(frames) == updated("lab://secret")
        admin = parse_fact(f'has_role(User{{"avery"}}, "admin", McpServer{{"{server}"}})')
        member = parse_fact('has_role(User{"avery"}, "member", Team{"support"})')
        # avery stays a user of the server, but may no longer read the secret.
        seq = bastion.records.last_seq()
        bastion.apply(inserts=[member], deletes=[admin])
        try:
            announce(bastion, server, "updated", "lab://secret")
            announce(bastion, server, "updated", "lab://secret")
            announce(bastion, server, "updated", "lab://open")
            assert next(frames) == updated("lab://open")
        finally:
            bastion.apply(inserts=[admin], deletes=[member])
        # Readable again: the next update is heard.
        announce(bastion, server, "updated", "lab://secret")
        assert next(frames) == updated("lab://secret")
    # Each change of what the stream hears is a decision record, not each update: withheld
    # once (twice announced), heard again once; the open resource, never withheld, none.
    bastion.flush()
    heard = [
        (r.result, r.reason, r.target)
        for _, r in bastion.records.after(seq)
        if r.method == "notifications/resources/updated"
    ]
    secret = f'McpResource{{"{server}/lab://secret"}}'
    assert heard == [("deny", "not_permitted", secret), ("allow", "", secret)]


def test_unsubscribe_stops_the_updates(bastion):
    headers = legacy_session(bastion, bastion.token("sam", "lab"), "lab")
    with open_get(bastion, "lab", headers) as response:
        frames = events(response)
        assert subscribe(bastion, "lab", headers, "lab://open")["result"] == {}
        answer = post(bastion, "lab", headers, "resources/unsubscribe", {"uri": "lab://open"})
        assert answer.json()["result"] == {}
        announce(bastion, "lab", "updated", "lab://open")
        announce(bastion, "lab", "tools")
        assert next(frames) == TOOLS_CHANGED


def test_subscriptions_are_the_sessions_own(bastion):
    mine = legacy_session(bastion, bastion.token("sam", "lab"), "lab")
    other = legacy_session(bastion, bastion.token("sam", "lab"), "lab")
    assert subscribe(bastion, "lab", mine, "lab://open")["result"] == {}
    with open_get(bastion, "lab", other) as response:
        frames = events(response)
        announce(bastion, "lab", "updated", "lab://open")
        announce(bastion, "lab", "tools")
        assert next(frames) == TOOLS_CHANGED


def test_an_upstream_without_subscriptions_is_not_asked(bastion):
    headers = legacy_session(bastion, bastion.token("sam", "desk"), "desk")
    error = subscribe(bastion, "desk", headers, "customers://plans")["error"]
    # bastion's answer (the upstream's own would not name it).
    assert error == {
        "code": -32601,
        "message": "upstream desk does not offer resource subscriptions",
    }


def test_a_2026_client_listens_instead(bastion):
    token = bastion.token("sam", "lab")
    response = bastion.http.post(
        bastion.mcp_url("lab"),
        json=modern_request(3, "resources/subscribe", {"uri": "lab://open"}),
        headers=modern_headers(token, "resources/subscribe"),
    )
    assert response.json()["error"]["code"] == -32601


BAD_PARAMS = {"no uri": {}, "an empty uri": {"uri": ""}, "a uri that is not text": {"uri": 7}}


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_a_malformed_subscribe_is_refused(bastion, case):
    headers = legacy_session(bastion, bastion.token("sam", "lab"), "lab")
    response = post(bastion, "lab", headers, "resources/subscribe", BAD_PARAMS[case])
    assert response.status_code == 400
    assert response.json()["error"]["code"] == -32602


def test_a_session_subscribes_to_a_bounded_number_of_resources(bastion, monkeypatch):
    monkeypatch.setattr(handlers, "MAX_SUBSCRIPTIONS", 1)
    headers = legacy_session(bastion, bastion.token("avery", "lab"), "lab")
    assert subscribe(bastion, "lab", headers, "lab://open")["result"] == {}
    assert subscribe(bastion, "lab", headers, "lab://open")["result"] == {}  # the same again
    response = post(bastion, "lab", headers, "resources/subscribe", {"uri": "lab://secret"})
    assert response.status_code == 400
    assert json.loads(response.text)["error"]["code"] == -32602


def refused_as_too_many(response) -> bool:
    error = response.json().get("error", {})
    return (
        response.status_code == 400
        and error["code"] == -32602
        and "gateway.max_subscriptions_per_user" in error.get("message", "")
    )


def listen(bastion, token: str, uris: list[str]):
    body = modern_request("watch", "subscriptions/listen", {"notifications": {
        "resourceSubscriptions": uris}})  # fmt: skip
    headers = modern_headers(token, "subscriptions/listen")
    return bastion.http.stream("POST", bastion.mcp_url("lab"), json=body, headers=headers)


def test_a_user_follows_a_bounded_number_of_resources_across_sessions_and_streams(
    bastion, monkeypatch
):
    # gateway.max_subscriptions_per_user, for avery on lab: all his sessions, listen streams
    # and agents together (two more than the earlier tests left him). More sessions buy no more.
    sessions = bastion.app.state.gateway.sessions
    before = sessions.subscriptions_of("lab", "avery")
    monkeypatch.setattr(sessions, "max_subscriptions_per_user", before + 2)
    token = bastion.token("avery", "lab")
    first, second = legacy_session(bastion, token, "lab"), legacy_session(bastion, token, "lab")
    assert subscribe(bastion, "lab", first, "lab://open")["result"] == {}
    assert subscribe(bastion, "lab", second, "lab://secret")["result"] == {}
    assert subscribe(bastion, "lab", second, "lab://secret")["result"] == {}  # the same again
    third = legacy_session(bastion, token, "lab")
    assert refused_as_too_many(
        post(bastion, "lab", third, "resources/subscribe", {"uri": "lab://open"})
    )
    with listen(bastion, token, ["lab://open"]) as response:
        response.read()
        assert refused_as_too_many(response)
    # Another user follows resources of their own.
    sam = legacy_session(bastion, bastion.token("sam", "lab"), "lab")
    assert subscribe(bastion, "lab", sam, "lab://open")["result"] == {}
    # Unsubscribing makes room, for a session or a listen stream.
    gone = post(bastion, "lab", second, "resources/unsubscribe", {"uri": "lab://secret"})
    assert gone.status_code == 200, gone.text
    with listen(bastion, token, ["lab://secret"]) as response:
        frames = events(response)  # held: the stream stays open while it is read
        ack = next(frames)
        assert ack["params"]["notifications"]["resourceSubscriptions"] == ["lab://secret"]
        # The stream's resource counts while it is open.
        assert refused_as_too_many(
            post(bastion, "lab", third, "resources/subscribe", {"uri": "lab://secret"})
        )


@pytest.mark.filterwarnings("ignore:resources/subscribe is removed")
def test_an_sdk_client_subscribes_and_hears_the_updates(bastion):
    heard: list = []
    arrived = anyio.Event()

    async def on_message(message) -> None:
        if isinstance(message, ResourceUpdatedNotification):
            heard.append(message.params.uri)
            arrived.set()

    async def script(client, seen):
        seen["offered"] = client.server_capabilities.resources.subscribe
        await client.subscribe_resource("lab://open")
        # The SDK opens its GET stream on its own time: announce, a second apart, until it is
        # heard (see streams.first_event).
        with anyio.move_on_after(PATIENCE):
            while not arrived.is_set():
                await client.call_tool("announce", {"kind": "updated", "uri": "lab://open"})
                with anyio.move_on_after(1):
                    await arrived.wait()

    seen = bastion.sdk("sam", "labold", "legacy", script, message_handler=on_message)
    assert seen["offered"] is True
    assert heard and {str(uri) for uri in heard} == {"lab://open"}


@pytest.mark.parametrize("server", ["lab", "labold"])  # a 2026-07-28 upstream has no subscribe
def test_an_upstreams_refusal_to_subscribe_to_a_masked_resource_comes_without_its_text(
    bastion, server
):
    # Reading lab://leaky is masked (customers.*.email): the upstream's refusal to subscribe is
    # its free text, which names the address.
    headers = legacy_session(bastion, bastion.token("sam", server), server)
    error = subscribe(bastion, server, headers, "lab://leaky")["error"]
    assert "withheld by bastion" in error["message"], error
    assert SECRET not in json.dumps(error)
    # Where no mask applies, the upstream's reason is given (its message, not its data), with
    # the decision that let the subscription through.
    error = subscribe(bastion, server, headers, "lab://locked")["error"]
    assert f"locked by {SECRET}" in error["message"], error
    assert list(error["data"]) == ["decision_id"], error


@pytest.mark.parametrize("server", ["lab", "labold"])
def test_the_resources_followed_for_all_clients_are_bounded(bastion, server, monkeypatch):
    # bastion never asks an upstream to stop sending a resource's updates: what it follows for
    # every client together only grows, up to a bound.
    headers = legacy_session(bastion, bastion.token("sam", server), server)
    assert subscribe(bastion, server, headers, "lab://open")["result"] == {}
    connection = bastion.app.state.gateway.upstreams[server].upstream
    monkeypatch.setattr(upstream_module, "MAX_WATCHED", len(connection._watched))
    error = subscribe(bastion, server, headers, "lab://locked")["error"]
    assert "at most" in error["message"] and "resources of upstream" in error["message"], error
    assert "lab://locked" not in connection._watched
    assert subscribe(bastion, server, headers, "lab://open")["result"] == {}  # followed already


def test_the_bound_on_a_users_subscriptions_is_a_setting_of_gateway():
    from bastion.gateway.config import GatewayConfig
    from bastion.server.config import ConfigError

    assert GatewayConfig.from_mapping({}, {}).max_subscriptions_per_user == 2000
    assert (
        GatewayConfig.from_mapping(
            {"max_subscriptions_per_user": 50}, {}
        ).max_subscriptions_per_user
        == 50
    )
    for bad in (0, -1, 1.5, True, "many"):
        with pytest.raises(ConfigError, match="gateway.max_subscriptions_per_user"):
            GatewayConfig.from_mapping({"max_subscriptions_per_user": bad}, {})


# A 2026-07-28 SDK upstream (labhttp) sends its listen stream only the URIs it was asked for, as
# written: it never sends another spelling to bastion.
@pytest.mark.parametrize("server", ["lab", "labold"])
@pytest.mark.parametrize("sent", ["LAB://%6Fpen", "lab://%6fpen", "lab://open#line-3"])
def test_an_update_the_upstream_spells_otherwise_reaches_the_subscription_in_bastions_spelling(
    bastion, server, sent
):
    """Clients subscribe in one spelling only (`bastion.gateway.uris`); an upstream that names
    the same resource in another (an upper-case scheme, a percent-encoded letter, lower-case
    hex, a fragment) is read as RFC 3986 reads it, so the subscription is not missed, and the
    update is decided and sent under the client's spelling."""
    headers = legacy_session(bastion, bastion.token("sam", server), server)
    with open_get(bastion, server, headers) as response:
        frames = events(response)
        subscribe(bastion, server, headers, "lab://open")
        event = first_event(frames, lambda: announce(bastion, server, "updated", sent), 5)
        assert event == updated("lab://open")


def test_an_update_is_not_heard_with_a_sign_in_older_than_a_read_accepts():
    """A resource's update goes on a stream only where ``resources/read`` would be allowed now:
    a ``requires_recent_auth`` on its ``read`` with a sign-in older than that withholds it (the
    read would send the client to sign in again), as a scope the token lacks does."""
    import time

    from bastion import Authorizer
    from bastion.gateway.enforce import Caller
    from bastion.gateway.sessions import read_decision

    authz = Authorizer(
        'actor User {}\nactor Agent {}\nresource McpResource {}\nallow(_, "read", _: McpResource);\n'
        'requires_recent_auth(_: User, "read", _: McpResource, 300);'
    )
    now = time.time()
    context = {"server": "desk"}
    for signed_in, heard in ((now - 60, True), (now - 3600, False), (None, False)):
        caller = Caller("sam", "bot", frozenset(), "127.0.0.1", "2025-11-25", auth_time=signed_in)
        got = read_decision(authz, caller, "desk", "notes/a", context, lambda: now)[2]
        assert got is heard, signed_in
