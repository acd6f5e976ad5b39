"""The server's part in the audit trail's hash chains: it chains new audit events every second,
and logs each chain's head (seq and hash) at intervals, `[server] audit_checkpoint_seconds`, as
a checkpoint line. Shipped with the log to a system the database's administrators do not
control, a checkpoint lets ``bastion audit verify --checkpoint`` tell the chain it leads to from
one rewritten since (docs/operations.md, "Audit trail tamper evidence")."""

from __future__ import annotations

import asyncio
import logging
import time

import anyio

from bastion.audit import decision_log, decisions, log
from bastion.audit.chain import head
from bastion.audit.decisions import DecisionRecords
from bastion.audit.log import AuditLog
from bastion.db import Database, first_line
from bastion.retries import Outage

# Its own logger, at INFO whatever the server's log_level: a checkpoint is evidence, not chatter.
checkpoint_log = logging.getLogger("bastion.audit.checkpoint")
checkpoint_log.setLevel(logging.INFO)
_log = logging.getLogger("bastion.audit")

# How often new audit events are chained.
CHAIN_INTERVAL = 1.0


def checkpoint_line(db: Database) -> str | None:
    """``decisions=SEQ:HASH events=SEQ:HASH decision_log=SEQ:HASH``: each chain's head, as
    ``audit verify --checkpoint``, ``--events-checkpoint`` and ``--decision-log-checkpoint``
    take them; None while none has a row. The decision service's only where it is chained
    (`bastion.audit.decision_log.chained`)."""
    chains = [("decisions", decisions.CHAIN), ("events", log.CHAIN)]
    if decision_log.chained(db):
        chains.append(("decision_log", decision_log.CHAIN))
    parts = []
    for name, chain in chains:
        last = head(db, chain)
        if last is not None and last[1] is not None:
            parts.append(f"{name}={last[0]}:{last[1]}")
    return " ".join(parts) or None


def keep_chains(events: AuditLog, logged: str | None) -> str | None:
    """One round: chain new events; log the heads if they moved since ``logged``. Returns the
    line the heads make now."""
    events.chain()
    line = checkpoint_line(events.db)
    if line is not None and line != logged:
        checkpoint_log.info("audit checkpoint: %s", line)
    return line


def _opened(db: Database) -> AuditLog:
    DecisionRecords(db)  # its table, in a server without a gateway too
    return AuditLog(db)


async def keep_chains_forever(db: Database, checkpoint_seconds: float) -> None:
    """Chain new audit events every `CHAIN_INTERVAL`, and log a checkpoint every
    ``checkpoint_seconds`` when a head moved (and once at start), on a worker thread. A
    failure (the database is unavailable) is logged and tried again at the next round."""
    events: AuditLog | None = None
    logged: str | None = None
    due = 0.0
    outage = Outage(_log)
    while True:
        try:
            if events is None:
                events = await anyio.to_thread.run_sync(_opened, db)
            if time.monotonic() >= due:
                logged = await anyio.to_thread.run_sync(keep_chains, events, logged)
                due = time.monotonic() + checkpoint_seconds
            else:
                await anyio.to_thread.run_sync(events.chain)
        except Exception as e:
            outage.failed("chaining the audit trail failed (%s); trying again", first_line(e))
        else:
            outage.ended("the audit trail is chained again")
        await asyncio.sleep(CHAIN_INTERVAL)
