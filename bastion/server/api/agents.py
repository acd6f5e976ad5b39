"""Agent registry routes (docs/delegation.md, `bastion.agents.registry`): list the agents (OAuth
clients) with owner, parent, name, purpose and status, show one, and change its owner, name,
purpose or parent. Reading needs the key scope ``agents:read``, changing ``agents:write``
(as ``facts:read``/``facts:write`` and ``policy:read``/``policy:write``). Suspending an agent is
the kill switch's (``/v1/suspensions``, scope ``suspensions``).

An owner or parent is a fact: the answer to a change comes once this replica applies it
(bounded by ``consistency_timeout``), with the change's ``sequence``.
"""

from __future__ import annotations

import contextlib

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.agents.identity import AgentError
from bastion.agents.registry import STATUSES, UnknownAgent, list_agents, show_agent, update_agent
from bastion.facts.store import FactStore
from bastion.oauth.store import OAuthStore
from bastion.server.auth import require
from bastion.server.problems import Problem, bad_request, read_json, unprocessable
from bastion.server.problems import field as get_field
from bastion.server.replica import ConsistencyTimeout, Replica

READ_SCOPE = "agents:read"
WRITE_SCOPE = "agents:write"
_FIELDS = ("owner", "name", "purpose", "parent")


def _stores(request: Request) -> tuple[OAuthStore, FactStore]:
    oauth = request.app.state.oauth
    if oauth is None:
        raise Problem(
            404,
            "No agents",
            "this server has no authorization server ([oauth] in bastion.toml): no agents",
        )
    return oauth.store, request.app.state.store


def _unknown(error: UnknownAgent) -> Problem:
    return Problem(404, "Unknown agent", str(error))


async def list_all(request: Request) -> JSONResponse:
    await require(request, READ_SCOPE)
    status = request.query_params.get("status")
    if status is not None and status not in STATUSES:
        raise bad_request(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    clients, facts = _stores(request)
    found = await anyio.to_thread.run_sync(lambda: list_agents(clients, facts, status))
    return JSONResponse({"agents": [a.to_json() for a in found]})


async def show(request: Request) -> JSONResponse:
    await require(request, READ_SCOPE)
    clients, facts = _stores(request)
    client_id = request.path_params["client_id"]
    try:
        agent = await anyio.to_thread.run_sync(lambda: show_agent(clients, facts, client_id))
    except UnknownAgent as e:
        raise _unknown(e) from None
    return JSONResponse({"agent": agent.to_json()})


async def update(request: Request) -> JSONResponse:
    """Change what the body gives: owner, name, purpose, parent (null: no parent)."""
    key = await require(request, WRITE_SCOPE)
    body = await read_json(request)
    unknown = sorted(set(body) - set(_FIELDS))
    if unknown:
        raise bad_request(f"unknown fields {unknown}; an agent's {', '.join(_FIELDS)} may change")
    if not body:
        raise bad_request(f"give at least one of {', '.join(_FIELDS)}")
    changes = {name: get_field(body, name, str, required=False) for name in _FIELDS}
    given_parent = changes.pop("parent")
    # parent null removes the parent; leaving it out leaves it as it is.
    parent = given_parent if "parent" in body else ...
    clients, facts = _stores(request)
    client_id = request.path_params["client_id"]
    try:
        agent, seq = await anyio.to_thread.run_sync(
            lambda: update_agent(
                clients, facts, client_id, f"key:{key.id}", parent=parent, **changes
            )
        )
    except UnknownAgent as e:
        raise _unknown(e) from None
    except AgentError as e:
        # Well formed, refused: a name or purpose that is not printable, a parent that loops.
        raise unprocessable(str(e)) from None
    if seq is not None:
        replica: Replica = request.app.state.replica
        # Committed either way; on a timeout the other replicas still apply it from the log.
        with contextlib.suppress(ConsistencyTimeout):
            await replica.wait_for(seq, request.app.state.config.consistency_timeout)
    return JSONResponse({"agent": agent.to_json(), "sequence": seq})


routes = [
    Route("/v1/agents", list_all, methods=["GET"]),
    Route("/v1/agents/{client_id:path}", show, methods=["GET"]),
    Route("/v1/agents/{client_id:path}", update, methods=["PATCH"]),
]
