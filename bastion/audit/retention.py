"""Retention of the audit trail: audit events and decision records older than a number of days
(`[server] audit_retention_days`) are deleted, in small batches, by a task of the server's own
(never on a request's path) and by ``bastion audit prune``; so are the rows that grow with use
and are over once all they record is that old (`ROWS`, each pruned beside its tables). Each
prune that deletes anything is itself recorded (``audit.pruned``), after the deletion, so the
record stays."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from bastion.approvals import webhooks as approval_webhooks
from bastion.approvals.store import prune_requests
from bastion.audit.actor import SERVER
from bastion.audit.decision_log import prune_decision_log
from bastion.audit.decisions import DecisionRecords
from bastion.audit.log import AuditLog
from bastion.db import Database, round_failed
from bastion.delegation.tasks import prune_tasks
from bastion.facts.store import prune_changes_before
from bastion.oauth.store import prune_grants
from bastion.retries import Outage
from bastion.signals import alert_webhooks
from bastion.signals.alerts import prune_alerts

log = logging.getLogger("bastion.audit")

DAY = 86_400.0
# How often a server prunes (also once just after it starts).
PRUNE_INTERVAL = 3600.0


# Rows kept as long as the audit trail, then deleted with it: each function deletes those of
# its tables older than the cutoff, in batches, and says how many went per table.
ROWS: tuple[Callable[[Database, float], dict[str, int]], ...] = (
    prune_requests,
    approval_webhooks.prune_deliveries,
    prune_alerts,
    alert_webhooks.prune_deliveries,
    prune_tasks,
    prune_grants,
    prune_changes_before,
    prune_decision_log,
)


@dataclass(frozen=True)
class Pruned:
    events: int
    decisions: int
    rows: dict[str, int] = field(default_factory=dict)  # the other tables' (`ROWS`)


def prune(db: Database, days: float, now: float | None = None, *, actor: str) -> Pruned:
    """Delete audit events, decision records and `ROWS` older than ``days`` days; when any
    went, record ``audit.pruned`` (the cutoff, how many of each, ``actor``) after them."""
    if days <= 0:
        raise ValueError("the retention must be a positive number of days")
    before = (time.time() if now is None else now) - days * DAY
    events = AuditLog(db)
    rows: dict[str, int] = {}
    for prune_table in ROWS:
        rows.update(prune_table(db, before))
    pruned = Pruned(events.prune(before), DecisionRecords(db).prune(before), rows)
    if pruned.events or pruned.decisions or pruned.rows:
        events.record(
            "audit.pruned",
            before=before,
            days=days,
            events_deleted=pruned.events,
            decisions_deleted=pruned.decisions,
            rows_deleted=pruned.rows,
            actor=actor,
        )
    return pruned


def pruned_text(pruned: Pruned) -> str:
    """What a prune deleted, as the log and ``bastion audit prune`` say it."""
    rows = "".join(f", {n} {table}" for table, n in sorted(pruned.rows.items()))
    return f"{pruned.events} audit events and {pruned.decisions} decision records{rows}"


async def prune_forever(db: Database, days: float, interval: float = PRUNE_INTERVAL) -> None:
    """Prune now, then every ``interval`` seconds, on a worker thread. A failure (the database is
    unavailable) is tried again at the next round, and logged once for as long as it stays the
    same (`round_failed`), and once that the round works again. ``days`` 0 keeps everything."""
    if days <= 0:
        return
    outage = Outage(log)
    while True:
        try:
            pruned = await anyio.to_thread.run_sync(
                functools.partial(prune, db, days, actor=SERVER)
            )
        except Exception as e:
            round_failed(outage, e, "pruning the audit trail failed")
        else:
            outage.ended("the audit trail is pruned again")
            if pruned.events or pruned.decisions or pruned.rows:
                log.info(
                    "audit retention (%g days): deleted %s",
                    days,
                    pruned_text(pruned),
                )
        await asyncio.sleep(interval)
