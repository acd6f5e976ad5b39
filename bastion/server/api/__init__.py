"""The `/v1` API: decisions, facts, policy, API keys, approvals and signals."""

from __future__ import annotations

from starlette.routing import BaseRoute

from bastion.server.api import approvals, decisions, facts, keys, policy, signals


def routes() -> list[BaseRoute]:
    return [
        *decisions.routes,
        *facts.routes,
        *policy.routes,
        *keys.routes,
        *approvals.routes,
        *signals.routes,
    ]
