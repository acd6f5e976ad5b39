"""The policy language: parse -> lower and check -> compile -> evaluate (see docs/architecture.md).

`load` (`loader`) turns Polar source files into a checked `LoadedPolicy`; `CompiledPolicy`
(`compile`) generates the evaluation functions over a fact index.
"""

from bastion.policy.errors import EvaluationLimit, PolicyError
from bastion.policy.limits import PolicyLimits
from bastion.policy.loader import LoadedPolicy, load

__all__ = ["EvaluationLimit", "LoadedPolicy", "PolicyError", "PolicyLimits", "load"]
