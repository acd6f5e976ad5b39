"""Shadow mode: rules that say what they would have done, recorded and counted, never enforced.

A policy writes an adaptive rule's condition once, and states its effect in one of two ways:

    bulk_delete(agent: Agent, "call", tool: Tool) if
      context.behavior.agent.destructive.minute.count > 10;
    # monitor first: recorded, not enforced
    would(agent: Agent, "call", tool: Tool, "approval", "bulk_delete") if
      bulk_delete(agent, "call", tool);
    # once calibrated, enforce instead:
    # requires_approval(agent: Agent, "call", tool: Tool) if bulk_delete(agent, "call", tool);

``would(actor, action, resource, effect, name)`` is asked of every principal of a decision (after
the decision, with the same context). Each answer is written in the decision record as
``obligations.shadow = [{"rule": name, "effect": effect, "principal": ...}]`` and counted in
``bastion_shadow_would_total{rule, effect}``; the decision itself is unchanged. ``effect`` is free
text naming the obligation it would have been (``deny``, ``approval``, ``review``, ``read_only``,
``throttle``, ``mask``, ``alert``...). ``bastion signals shadow-report`` reads the records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from bastion.decide import Authorizer
from bastion.facts.model import Entity
from bastion.policy.errors import EvaluationLimit

log = logging.getLogger("bastion.signals.shadow")

PREDICATE, MASK = "would", "bbbff"


class Shadow:
    """Asks ``would`` after each decision; ``on_fire(rule, effect)`` counts what it found."""

    def __init__(self) -> None:
        self.on_fire: Callable[[str, str], None] = lambda rule, effect: None

    def evaluate(
        self,
        authz: Authorizer,
        principals: Sequence[Entity],
        action: str,
        resource: Entity,
        context: dict[str, Any],
        record: dict[str, Any],
    ) -> None:
        """Add ``obligations.shadow`` to ``record`` when a ``would`` rule holds."""
        if not authz.defines(PREDICATE, len(MASK)):
            return
        fired: list[dict[str, str]] = []
        try:
            with authz.session(context) as s:
                for principal in principals:
                    for effect, name in sorted(
                        s.rows(PREDICATE, MASK, principal, action, resource), key=repr
                    ):
                        fired.append(
                            {"rule": str(name), "effect": str(effect), "principal": repr(principal)}
                        )
        except EvaluationLimit as e:
            # A shadow rule never changes a decision, not even by spending the budget.
            fired.append({"rule": "", "effect": "unknown", "principal": "", "error": e.reason})
        if not fired:
            return
        record["obligations"]["shadow"] = fired
        for item in fired:
            self.on_fire(item["rule"], item["effect"])


def report(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per monitored rule and effect: how often it would have fired, and for whom."""
    rules: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        for item in (record.get("obligations") or {}).get("shadow") or ():
            key = (item.get("rule", ""), item.get("effect", ""))
            entry = rules.setdefault(
                key,
                {
                    "rule": key[0],
                    "effect": key[1],
                    "fired": 0,
                    "principals": {},
                    "results": {},
                    "first": record.get("at"),
                    "last": record.get("at"),
                },
            )
            entry["fired"] += 1
            who = item.get("principal", "")
            entry["principals"][who] = entry["principals"].get(who, 0) + 1
            result = record.get("result", "")
            entry["results"][result] = entry["results"].get(result, 0) + 1
            at = record.get("at")
            if at is not None:
                entry["first"] = min(entry["first"] or at, at)
                entry["last"] = max(entry["last"] or at, at)
    return sorted(rules.values(), key=lambda e: (-e["fired"], e["rule"], e["effect"]))
