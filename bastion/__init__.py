"""bastion: authorization for AI agents and the Model Context Protocol."""

from bastion.decide import Authorizer, Decision
from bastion.facts.model import Entity, FactError
from bastion.policy.errors import PolicyError

__all__ = ["Authorizer", "Decision", "Entity", "FactError", "PolicyError"]
