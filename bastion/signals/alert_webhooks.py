"""Webhooks that tell people of alerts: raised (naming the owner) and escalated (the manager).

The outbox, signing (``Bastion-Signature``, RFC 2104 HMAC-SHA256) and retries are
`bastion.webhooks`; this module writes the body. Its ``text`` a chat tool shows as it is; the
identifiers in it are shown as code (`bastion.webhooks.shown`), so that a client id cannot
mention ``@channel`` or add a link. Tables: ``alert_webhook_outbox``, ``alert_webhook_deliveries``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bastion.db import Database
from bastion.signals.alerts import Alert, AlertSettings
from bastion.webhooks import SWEEP_SECONDS, Outbox, prune_outbox, shown

EVENTS = {"raised": "alert.raised", "escalated": "alert.escalated"}


def payload(
    alert: Alert, stage: str, recipients: tuple[str, ...], url: str, delivery_id: str
) -> dict[str, Any]:
    """The JSON body told of ``alert`` at ``stage``: what, for whom, who should look, where to
    acknowledge. The event and the delivery id are in the body, so that they are signed."""
    to = ", ".join(shown(r) for r in recipients) or "nobody (no owner, no fallback recipients)"
    what = f"{alert.severity.upper()} alert {shown(alert.name)} for {shown(alert.principal)}"
    if stage == "escalated":
        text = f"{what} not acknowledged in time, escalated to {to}: acknowledge at {url}"
    else:
        text = f"{what}, for {to}: acknowledge at {url}"
    return {
        "text": text,
        "event": EVENTS[stage],
        "delivery": delivery_id,
        "alert": {
            "id": alert.id,
            "name": alert.name,
            "severity": alert.severity,
            "principal": alert.principal,
            "owner": alert.owner or None,
            "recipients": list(recipients),
            "count": alert.count,
            "decision_ids": list(alert.decision_ids),
            "url": url,
        },
    }


# The outbox's name: its tables are alert_webhook_outbox and alert_webhook_deliveries.
OUTBOX = "alert_webhook"


def prune_deliveries(db: Database, before: float) -> dict[str, int]:
    """The audit retention's part here: the alert notifications finished before ``before``
    go, with their attempts (`bastion.webhooks.prune_outbox`)."""
    return prune_outbox(db, OUTBOX, before)


class AlertWebhooks(Outbox):
    """The alerts' outbox; ``notify`` is `Alerts.notify` (any thread, only inserts rows)."""

    def __init__(
        self,
        settings: AlertSettings,
        db: Database,
        url_of: Callable[[str], str],
        *,
        clock: Callable[[], float] = time.time,
        sweep_seconds: float = SWEEP_SECONDS,
    ) -> None:
        super().__init__(OUTBOX, settings, db, clock=clock, sweep_seconds=sweep_seconds)
        self.url_of = url_of

    def notify(self, alert: Alert, stage: str, recipients: tuple[str, ...]) -> None:
        url = self.url_of(alert.id)
        self.enqueue(alert.id, lambda d: payload(alert, stage, recipients, url, d))
