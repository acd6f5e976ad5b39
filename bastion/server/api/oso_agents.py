"""The ``oso-cloud`` SDK's agent events (``oso.for_agents(...)``) under ``/api/agents/event/...``.

An application that runs its agents itself, not behind bastion's gateway, reports what they do;
each event feeds the behaviour counters of `bastion.signals.behavior` (per user, per agent, per
agent on a tool), so its policies read ``context.behavior`` and its alerts fire as for the
gateway's calls:

- ``tool_call_request``: a call; destructive when the event says ``"destructive": true``; its
  tool is a target of the user and the agent, its parameters (as a keyed digest) one of the
  agent on that tool.
- ``tool_call_error``: a call that was not carried out, counted as a refusal.
- ``tool_call_response``: the size of the result (its JSON) as bytes returned.
- ``message_from_user`` / ``message_to_user``: checked and accepted; nothing is counted or kept.

No event's text is stored: not the parameters, results or messages, nor the session id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion.facts.model import Entity
from bastion.server.api.oso_cloud import oso_errors, value_from_oso
from bastion.server.auth import require
from bastion.server.problems import bad_request, read_json
from bastion.server.problems import field as get_field
from bastion.signals.behavior import BehaviorUnavailable, scope_keys

# The scope of a key that may report agent events (and nothing else).
EVENTS = "oso:events"
KINDS = (
    "tool_call_request",
    "tool_call_response",
    "tool_call_error",
    "message_from_user",
    "message_to_user",
)
MAX_NAME = 256  # characters of an agent id, a tool name or a user id
MAX_USERS = 100  # users named by one event


@dataclass(frozen=True, slots=True)
class AgentEvent:
    kind: str
    agent: str
    users: tuple[str, ...]  # the users' ids
    tool: str | None
    destructive: bool


def _name(body: dict, name: str) -> str:
    value = get_field(body, name, str)
    if not value or len(value) > MAX_NAME:
        raise bad_request(f"the field {name!r} must be 1 to {MAX_NAME} characters")
    return value


def parse_event(kind: str, body: dict) -> AgentEvent:
    agent = _name(body, "agent_id")
    get_field(body, "session_id", str)
    users = get_field(body, "users", list, required=False) or []
    if len(users) > MAX_USERS:
        raise bad_request(f"an event names at most {MAX_USERS} users, got {len(users)}")
    ids = []
    for i, u in enumerate(users):
        value = value_from_oso(u, f"users[{i}]")
        # Each user is a behaviour counter's key: bounded as the agent and the tool are.
        if not 1 <= len(u["id"]) <= MAX_NAME:
            raise bad_request(f"the id of users[{i}] must be 1 to {MAX_NAME} characters")
        ids.append(value.id if isinstance(value, Entity) else str(value))
    tool = None
    if kind.startswith("tool_call"):
        tool = _name(body, "tool_name")
    if kind == "tool_call_request":
        get_field(body, "tool_parameters", dict)
    elif kind == "tool_call_response":
        if "tool_result" not in body:
            raise bad_request("the field 'tool_result' is required")
    elif kind.startswith("message"):
        get_field(body, "message", str)
    destructive = get_field(body, "destructive", bool, required=False) is True
    return AgentEvent(kind, agent, tuple(dict.fromkeys(ids)), tool, destructive)


def counter_keys(event: AgentEvent) -> tuple[str, ...]:
    """The behaviour keys of an event: each of its users, its agent, its agent on its tool
    (the gateway's keys for the same names)."""
    tool = event.tool or ""
    keys = [k for user in event.users for k in scope_keys(user, event.agent, tool)[:1]]
    _, agent_key, tool_key = scope_keys("", event.agent, tool)
    return (*keys, agent_key, tool_key)


async def receive(request: Request) -> Response:
    kind = request.url.path.rsplit("/", 1)[-1]
    await require(request, EVENTS)
    body = await read_json(request)
    event = parse_event(kind, body)
    behavior = request.app.state.behavior
    keys = counter_keys(event)
    if kind == "tool_call_request":
        digest = request.app.state.argument_digest(body["tool_parameters"])
        await _alerts(request, event)
        behavior.observe(keys, False, event.destructive, event.tool, digest)
    elif kind == "tool_call_error":
        behavior.observe(keys, True, False, event.tool, "")
    elif kind == "tool_call_response":
        size = len(json.dumps(body["tool_result"], separators=(",", ":")).encode())
        behavior.returned(keys, size)
    return JSONResponse({"message": "event recorded"})


async def _alerts(request: Request, event: AgentEvent) -> None:
    """The built-in behaviour alerts (bulk destructive calls, a spike over the baseline) for
    the agent, as the gateway raises them; only where alerts are configured."""
    alerts = request.app.state.alerts
    if alerts is None:
        return
    behavior = request.app.state.behavior
    view = behavior.view(event.users[0] if event.users else "", event.agent, event.tool or "")
    await behavior.prepare(view)
    try:
        raised = alerts.behavior_alerts(view, event.destructive, person=bool(event.users))
    except BehaviorUnavailable:
        return
    by_scope = {"agent": Entity("Agent", event.agent)}
    if event.users:
        by_scope["user"] = Entity("User", event.users[0])
    source = {"tool": event.tool, "source": "oso-cloud agent event"}
    chain = (*(Entity("User", user) for user in event.users), by_scope["agent"])
    await alerts.raise_all(
        [
            (name, severity, by_scope[scope], {**detail, **source})
            for scope, name, severity, detail in raised
        ],
        chain=chain,
    )


routes = [
    Route(f"/api/agents/event/{kind}", oso_errors(receive), methods=["POST"]) for kind in KINDS
]
