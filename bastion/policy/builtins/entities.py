"""Entities made at evaluation: ``Device{context.device.id}`` is the ``Device`` whose id is the
string the request gives (bastion's extension of Polar, whose entity literals take a string).

Only a non-empty string is an id: a missing field, a number, a boolean, a list, an object, an
entity or ``""`` make no entity (MISSING), so the condition that reads it is false and a bad
value fails closed (an empty id names no device a header or a claim could have given).
"""

from __future__ import annotations

from typing import Any

from bastion.facts.model import Entity
from bastion.policy.runtime import MISSING


def entity_of(type_name: str, id_value: Any) -> Any:
    """The entity of ``type_name`` with id ``id_value``, or MISSING (see the module)."""
    if id_value.__class__ is str and id_value:
        return Entity(type_name, id_value)
    return MISSING
