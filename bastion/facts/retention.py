"""Retention of the fact store: the rows of facts whose expiry passed more than a grace period
ago (`[server] fact_expired_grace_seconds`) are deleted by a task of the server's own, hourly,
on a worker thread (`FactStore.purge_expired`). The change log is pruned with the audit trail
(`bastion.audit.retention`, `prune_changes_before`): it is the record of who wrote which facts."""

from __future__ import annotations

import asyncio
import logging

import anyio

from bastion.db import round_failed
from bastion.facts.store import FactStore
from bastion.retries import Outage

log = logging.getLogger("bastion.facts")

# How often a server deletes expired fact rows (also once just after it starts).
PURGE_INTERVAL = 3600.0


async def purge_expired_forever(
    store: FactStore, grace: float, interval: float = PURGE_INTERVAL
) -> None:
    """`FactStore.purge_expired` now, then every ``interval`` seconds, on a worker thread. A
    failure (the database is unavailable) is tried again at the next round, and logged once for
    as long as it stays the same (`round_failed`), and once that the round works again."""
    outage = Outage(log)
    while True:
        try:
            purged = await anyio.to_thread.run_sync(store.purge_expired, grace)
        except Exception as e:
            round_failed(outage, e, "deleting expired facts failed")
        else:
            outage.ended("expired facts are deleted again")
            if purged:
                log.info("deleted %d facts that expired more than %g seconds ago", purged, grace)
        await asyncio.sleep(interval)
