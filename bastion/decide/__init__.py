"""The policy decision point: authorize, decide (with an explanation), list, actions and query.

`authorizer`: the `Authorizer`, a policy in force over a fact index, with its `FactSet` and
`Session`; `contract`: the decision contract the gateway enforces (principal chains and
obligations); `mcp`: the action each MCP message is decided as.
"""

from bastion.decide.authorizer import (
    CONTRACT_SHAPES,
    Authorizer,
    Decision,
    FactSet,
    Session,
    Variable,
)

__all__ = ["CONTRACT_SHAPES", "Authorizer", "Decision", "FactSet", "Session", "Variable"]
