"""The `/v1` API (decisions, facts, policy, API keys, approvals, signals, alerts and tasks),
and AuthZEN."""

from __future__ import annotations

from starlette.routing import BaseRoute

from bastion.server.api import (
    alerts,
    approvals,
    authzen,
    decisions,
    facts,
    keys,
    labels,
    policy,
    signals,
    suspensions,
    tasks,
)


def routes() -> list[BaseRoute]:
    return [
        *decisions.routes,
        *facts.routes,
        *policy.routes,
        *keys.routes,
        *approvals.routes,
        *suspensions.routes,
        *signals.routes,
        *alerts.routes,
        *labels.routes,
        *tasks.routes,
        *authzen.routes,
    ]
