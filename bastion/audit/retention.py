"""Retention of the audit trail: audit events and decision records older than a number of days
(`[server] audit_retention_days`) are deleted, in small batches, by a task of the server's own
(never on a request's path) and by ``bastion audit prune``. Each prune that deletes anything is
itself recorded (``audit.pruned``), after the deletion, so the record stays."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

import anyio

from bastion.audit.actor import SERVER
from bastion.audit.decisions import DecisionRecords
from bastion.audit.log import AuditLog
from bastion.db import Database, first_line

log = logging.getLogger("bastion.audit")

DAY = 86_400.0
# How often a server prunes (also once just after it starts).
PRUNE_INTERVAL = 3600.0


@dataclass(frozen=True)
class Pruned:
    events: int
    decisions: int


def prune(db: Database, days: float, now: float | None = None, *, actor: str) -> Pruned:
    """Delete audit events and decision records older than ``days`` days; when any went,
    record ``audit.pruned`` (the cutoff, how many of each, ``actor``) after them."""
    if days <= 0:
        raise ValueError("the retention must be a positive number of days")
    before = (time.time() if now is None else now) - days * DAY
    events = AuditLog(db)
    pruned = Pruned(events.prune(before), DecisionRecords(db).prune(before))
    if pruned.events or pruned.decisions:
        events.record(
            "audit.pruned",
            before=before,
            days=days,
            events_deleted=pruned.events,
            decisions_deleted=pruned.decisions,
            actor=actor,
        )
    return pruned


async def prune_forever(db: Database, days: float, interval: float = PRUNE_INTERVAL) -> None:
    """Prune now, then every ``interval`` seconds, on a worker thread. A failure (the database is
    unavailable) is logged and tried again at the next round. ``days`` 0 keeps everything."""
    if days <= 0:
        return
    while True:
        try:
            pruned = await anyio.to_thread.run_sync(
                functools.partial(prune, db, days, actor=SERVER)
            )
        except Exception as e:
            log.warning("pruning the audit trail failed (%s); trying again later", first_line(e))
        else:
            if pruned.events or pruned.decisions:
                log.info(
                    "audit retention (%g days): deleted %d audit events and %d decision records",
                    days,
                    pruned.events,
                    pruned.decisions,
                )
        await asyncio.sleep(interval)
