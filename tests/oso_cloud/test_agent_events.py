"""The SDK's agent events (``oso.for_agents(...)``) feed the behaviour counters: an application
that runs its agents itself, not behind the gateway, gets the same figures, and its policy reads
them back through ``context.behavior`` (the policy in tests/oso_cloud/conftest.py)."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import httpx
import pytest
from oso_cloud import Value


@pytest.fixture(scope="module")
def oso(bastion):
    """One key for decisions and events, as an application holds it."""
    return bastion.oso("oso:read", "oso:events")


def agent(oso, *users: Value):
    name = f"bot-{uuid.uuid4().hex[:8]}"
    return name, oso.for_agents(name, uuid.uuid4(), list(users))


def may_call(oso, name: str, tool: str = "search") -> bool:
    return oso.authorize(Value("Agent", name), "call", Value("Tool", tool))


@pytest.fixture(autouse=True)
def every_event_is_accepted(caplog):
    """The SDK only logs an event it could not send: none may be logged."""
    with caplog.at_level(logging.ERROR, logger="oso_cloud.for_agents"):
        yield
    assert [r.getMessage() for r in caplog.records if r.name == "oso_cloud.for_agents"] == []


def test_tool_call_requests_count_as_calls(oso):
    name, events = agent(oso)
    for i in range(4):
        events.tool_call_request("search", {"q": i})
    assert may_call(oso, name) is True  # 4 calls this minute
    events.tool_call_request("search", {"q": 4})
    assert may_call(oso, name) is False  # 5: the rule's limit
    # Another agent's figures are its own.
    other, _ = agent(oso)
    assert may_call(oso, other) is True


def test_a_destructive_call_is_counted_as_such(oso):
    name, events = agent(oso)
    events.tool_call_request("delete_repo", {"repo": "anvil"}, destructive=False)
    assert may_call(oso, name) is True
    events.tool_call_request("delete_repo", {"repo": "anvil"}, destructive=True)
    assert may_call(oso, name) is False


def test_tool_call_errors_count_as_refusals(oso):
    name, events = agent(oso)
    events.tool_call_error("search", error="timeout")
    assert may_call(oso, name) is True
    events.tool_call_error("search", error="timeout")
    assert may_call(oso, name) is False


def test_distinct_tools_are_the_agents_targets(oso):
    name, events = agent(oso)
    events.tool_call_request("search", {"q": 1})
    events.tool_call_request("fetch", {"url": "a"})
    assert may_call(oso, name) is True
    events.tool_call_request("search", {"q": 2})  # not a new target
    assert may_call(oso, name) is True
    events.tool_call_request("send_mail", {"to": "x"})
    assert may_call(oso, name) is False


def test_results_count_as_bytes_of_the_agent_on_that_tool(oso):
    name, events = agent(oso)
    events.tool_call_response("fetch", {"body": "x" * 500})
    assert may_call(oso, name, "fetch") is True
    events.tool_call_response("fetch", {"body": "x" * 600})
    assert may_call(oso, name, "fetch") is False
    # The agent on another tool has its own figures.
    assert may_call(oso, name, "search") is True


def test_the_events_users_are_counted(oso):
    user = Value("User", f"u-{uuid.uuid4().hex[:8]}")
    _, events = agent(oso, user)
    assert oso.authorize(user, "call", Value("Tool", "search")) is True
    events.tool_call_request("search", {"q": 1})
    assert oso.authorize(user, "call", Value("Tool", "search")) is True
    # Another agent, the same user: the user's figures add up.
    _, more = agent(oso, user)
    more.tool_call_request("search", {"q": 2})
    assert oso.authorize(user, "call", Value("Tool", "search")) is False


def test_messages_are_accepted_and_neither_counted_nor_stored(oso, bastion):
    name, events = agent(oso)
    secret = f"my card number is {uuid.uuid4().hex}"
    for _ in range(10):
        events.message_from_user(secret)
        events.message_to_user(secret)
    assert may_call(oso, name) is True
    events.tool_call_request("search", {"query": secret})
    events.tool_call_response("search", {"answer": secret})
    database = bastion.server.database
    if "://" not in database:
        for path in Path(database).parent.glob(Path(database).name + "*"):
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in bastion.server.log.read_text()


def test_malformed_events_are_refused(bastion, oso):
    headers = {"authorization": f"Bearer {oso.api.token}"}
    good = {"agent_id": "a", "session_id": "s", "users": [], "tool_name": "t"}
    with httpx.Client(base_url=bastion.url, headers=headers) as client:
        for kind, body in (
            ("tool_call_request", {**good, "tool_parameters": "not an object"}),
            ("tool_call_request", {**good, "agent_id": "", "tool_parameters": {}}),
            ("tool_call_request", {**good, "tool_name": "x" * 300, "tool_parameters": {}}),
            ("tool_call_response", good),
            ("tool_call_error", {**good, "users": [{"type": "User"}]}),
            ("message_to_user", {**good, "message": 3}),
            ("tool_call_request", {**good, "tool_parameters": {}, "destructive": "yes"}),
        ):
            r = client.post(f"/api/agents/event/{kind}", json=body)
            assert r.status_code == 400, (kind, body, r.text)
            assert r.json()["message"]
        ok = client.post("/api/agents/event/tool_call_error", json=good)
        assert ok.status_code == 200
        assert client.post("/api/agents/event/no_such_event", json=good).status_code == 404


def test_a_user_id_longer_than_a_name_may_be_is_refused_and_not_counted(bastion, oso):
    """Each user of an event is a behaviour counter's key (100,000 kept per process): one longer
    than the agent's and the tool's bound (256 characters) would be kept whole."""
    headers = {"authorization": f"Bearer {oso.api.token}"}
    long = f"u{uuid.uuid4().hex}" + "x" * 300
    body = {
        "agent_id": f"bot-{uuid.uuid4().hex[:8]}",
        "session_id": "s",
        "users": [{"type": "User", "id": long}],
        "tool_name": "search",
        "tool_parameters": {},
    }
    with httpx.Client(base_url=bastion.url, headers=headers) as client:
        r = client.post("/api/agents/event/tool_call_request", json=body)
    assert r.status_code == 400, r.text
    assert "users[0]" in r.json()["message"] and "256" in r.json()["message"]
