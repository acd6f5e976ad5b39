"""bastion: authorization for AI agents and the Model Context Protocol."""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use, so that ``import bastion.db`` (say, in a migration) stays cheap.
_EXPORTS = {
    "Authorizer": "bastion.decide",
    "Decision": "bastion.decide",
    "Variable": "bastion.decide",
    "Entity": "bastion.facts.model",
    "EvaluationLimit": "bastion.policy.errors",
    "FactError": "bastion.facts.model",
    "PolicyError": "bastion.policy.errors",
    "PolicyLimits": "bastion.policy.limits",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bastion' has no attribute {name!r}")
