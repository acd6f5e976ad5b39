"""The decision contract the gateway enforces: principal chains and obligations.

A request acts for a chain of principals (the user, the agent acting for them, any sub-agent).
It is allowed only if *every* principal is allowed, so an agent never exceeds the person it acts
for. The policy can attach obligations with these rules (each optional):

| rule | obligation |
|---|---|
| ``requires_scope(action, resource, scope)`` | the OAuth token must carry ``scope`` (else step-up) |
| ``mask(actor, action, resource, path)`` | redact the JSON path ``path`` of the result |
| ``rate_limit(actor, action, resource, max, seconds)`` | at most ``max`` calls per ``seconds`` |
| ``requires_approval(actor, action, resource)`` | hold for a human before it runs |
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bastion.decide import Authorizer, Variable
from bastion.facts.model import Entity


@dataclass(frozen=True, slots=True)
class RateLimit:
    principal: Entity
    max: int
    seconds: int


@dataclass(frozen=True, slots=True)
class Obligations:
    masks: tuple[str, ...] = ()
    rate_limits: tuple[RateLimit, ...] = ()
    required_scopes: tuple[str, ...] = ()
    requires_approval: bool = False


@dataclass(frozen=True, slots=True)
class ChainDecision:
    """The answer for one request over a principal chain."""

    allowed: bool
    principals: tuple[Entity, ...]
    refused_by: Entity | None = None  # the first principal the policy did not allow
    missing_scopes: tuple[str, ...] = ()  # required scopes the token lacks (403 step-up)
    obligations: Obligations = field(default_factory=Obligations)


def _values(
    authz: Authorizer,
    predicate: str,
    args: Sequence[Any],
    context: dict | None,
    picks: Sequence[int],
) -> list[tuple]:
    if not authz.defines(predicate, len(args)):
        return []
    return [
        tuple(row[1 + i] for i in picks) for row in authz.query(predicate, *args, context=context)
    ]


def decide_chain(
    authz: Authorizer,
    principals: Sequence[Entity],
    action: str,
    resource: Entity,
    context: dict | None = None,
    granted_scopes: Iterable[str] | None = None,
) -> ChainDecision:
    """Decide ``action`` on ``resource`` for every principal of the chain, with obligations.

    ``granted_scopes`` are the token's scopes; when given, a scope that ``requires_scope``
    demands and the token lacks refuses the request with ``missing_scopes`` set.
    """
    chain = tuple(principals)
    if not chain:
        return ChainDecision(False, chain)
    for principal in chain:
        if not authz.authorize(principal, action, resource, context):
            return ChainDecision(False, chain, refused_by=principal)
    required = tuple(
        sorted(
            {
                s
                for (s,) in _values(
                    authz, "requires_scope", (action, resource, Variable("s")), context, (2,)
                )
                if isinstance(s, str)
            }
        )
    )
    if granted_scopes is not None:
        missing = tuple(s for s in required if s not in set(granted_scopes))
        if missing:
            return ChainDecision(
                False,
                chain,
                missing_scopes=missing,
                obligations=Obligations(required_scopes=required),
            )
    masks: set[str] = set()
    limits: list[RateLimit] = []
    approval = False
    for principal in chain:
        masks.update(
            p
            for (p,) in _values(
                authz, "mask", (principal, action, resource, Variable("p")), context, (3,)
            )
            if isinstance(p, str)
        )
        for n, secs in _values(
            authz,
            "rate_limit",
            (principal, action, resource, Variable("n"), Variable("s")),
            context,
            (3, 4),
        ):
            if (
                isinstance(n, int)
                and isinstance(secs, int)
                and not isinstance(n, bool)
                and secs > 0
            ):
                limits.append(RateLimit(principal, n, secs))
        approval = approval or (
            authz.defines("requires_approval", 3)
            and authz.holds("requires_approval", principal, action, resource, context=context)
        )
    return ChainDecision(
        True,
        chain,
        obligations=Obligations(tuple(sorted(masks)), tuple(limits), required, approval),
    )
