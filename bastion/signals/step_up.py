"""Step-up on risk: the ``requires_recent_auth(actor, action, resource, seconds)`` rule.

When the policy asks for it, the person must have typed their password (the access token's
``auth_time``, RFC 9068 §2.2.1) no more than ``seconds`` ago; otherwise the gateway answers with
RFC 9470's challenge, HTTP 401 ``error="insufficient_user_authentication"`` with ``max_age``, which
MCP clients follow as any 401: they authorize again, and the person signs in again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from bastion.facts.model import Entity

if TYPE_CHECKING:
    from bastion.decide import Session

PREDICATE = "requires_recent_auth"
SHAPE = (PREDICATE, "bbbf")
ERROR = "insufficient_user_authentication"  # RFC 9470 §3


def required_auth_age(
    s: Session, principals: Iterable[Entity], action: str, resource: Entity
) -> int | None:
    """The fewest seconds since sign-in the policy accepts for this request, or None. A value
    that is not a whole number of seconds (or is negative) counts as 0: a sign-in is asked for,
    never skipped."""
    ages = [
        n if type(n) is int and n >= 0 else 0
        for p in principals
        for n in s.rows(PREDICATE, "bbbf", p, action, resource)
    ]
    return min(ages) if ages else None


def needs_sign_in(max_age: int | None, auth_time: int | None, now: float) -> bool:
    """Whether the token's sign-in is too old (or unknown) for ``max_age``."""
    if max_age is None:
        return False
    return auth_time is None or now - auth_time > max_age
