"""The `/v1` API (decisions, facts, policy, API keys, approvals, agents, signals, alerts and
tasks), AuthZEN, and Oso Cloud's API under `/api` (its SDK's calls and agent events)."""

from __future__ import annotations

from starlette.routing import BaseRoute

from bastion.server.api import (
    agents,
    alerts,
    approvals,
    authzen,
    connections,
    decisions,
    facts,
    keys,
    labels,
    oso_agents,
    oso_cloud,
    policy,
    signals,
    suspensions,
    tasks,
    tools,
)


def routes() -> list[BaseRoute]:
    return [
        *decisions.routes,
        *facts.routes,
        *policy.routes,
        *keys.routes,
        *approvals.routes,
        *suspensions.routes,
        *connections.routes,
        *tools.routes,
        *agents.routes,
        *signals.routes,
        *alerts.routes,
        *labels.routes,
        *tasks.routes,
        *authzen.routes,
        *oso_cloud.routes,
        *oso_agents.routes,
    ]
