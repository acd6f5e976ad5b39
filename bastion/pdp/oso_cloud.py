"""Oso Cloud's HTTP API: its values as bastion's, and its ``authorize`` as a bastion decision
(the policy's ``allow`` for one actor, whose context facts hold for that question alone).

An Oso Cloud value is ``{"type": T, "id": str}``: a String, Integer or Boolean for those three
types, an entity for any other. Nothing here knows HTTP: `bastion.server.api.oso_cloud` serves
the API (docs/oso-cloud.md), and ``bastion audit replay`` asks a stored ``authorize`` again by
the same function.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from bastion.decide import Authorizer
from bastion.facts.model import Entity
from bastion.policy.errors import EvaluationLimit
from bastion.untrusted_json import MAX_INTEGER, MIN_INTEGER, writable

# The SDK's value types; any other type names an entity.
VALUE_TYPES = {"String": str, "Integer": int, "Boolean": bool}
# An Integer value's id: plain digits, an optional minus first.
_INTEGER = re.compile(r"-?[0-9]+")


def value_of(type_: str, id_: str) -> Any:
    """The value ``{"type": type_, "id": id_}`` names; `ValueError` saying why for a Boolean or
    an Integer whose id is not one."""
    kind = VALUE_TYPES.get(type_)
    if kind is None:
        return Entity(type_, id_)
    if kind is str:
        return id_
    if kind is bool:
        if id_ not in ("true", "false"):
            raise ValueError(f'a Boolean is "true" or "false", got {id_!r}')
        return id_ == "true"
    # Plain ASCII digits: int() takes other scripts' digits, spaces, "_" and "+" as well (two
    # spellings of one value), and past 4300 digits raises. The range is the fact store's.
    if _INTEGER.fullmatch(id_) is None:
        raise ValueError(
            f"an Integer's id is its digits (an optional '-', then 0-9), got {writable(id_[:40])!r}"
        )
    if len(id_) > 20 or not MIN_INTEGER <= (value := int(id_)) <= MAX_INTEGER:
        raise ValueError(
            f"an Integer is 64-bit, from {MIN_INTEGER} to {MAX_INTEGER}; got"
            f" {id_[:24]}{'...' if len(id_) > 24 else ''} ({len(id_)} characters)"
        )
    return value


def value_to_oso(value: Any) -> dict:
    """``value`` as Oso Cloud writes it (`value_of` reads it back)."""
    if isinstance(value, Entity):
        return {"type": value.type, "id": value.id}
    if isinstance(value, bool):
        return {"type": "Boolean", "id": "true" if value else "false"}
    if isinstance(value, int):
        return {"type": "Integer", "id": str(value)}
    return {"type": "String", "id": value}


def authorize(
    authz: Authorizer,
    actor: Any,
    action: str,
    resource: Any,
    context: dict | None = None,
    facts: Sequence[tuple] = (),
) -> tuple[bool, str | None]:
    """Oso Cloud's ``authorize``: whether the policy allows ``actor`` to ``action`` ``resource``
    (``allow``, and no ``deny``), ``facts`` holding for this question alone; and why it was
    refused otherwise than by the policy (over the evaluation budget: ``evaluation_limit``),
    else None."""
    try:
        with authz.session(context, facts=facts) as session:
            return session.allowed(actor, action, resource), None
    except EvaluationLimit as over:
        return False, over.reason
