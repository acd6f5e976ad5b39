"""The `/v1` API: decisions, facts, policy and API keys."""

from __future__ import annotations

from starlette.routing import BaseRoute

from bastion.server.api import decisions, facts, keys, policy


def routes() -> list[BaseRoute]:
    return [*decisions.routes, *facts.routes, *policy.routes, *keys.routes]
