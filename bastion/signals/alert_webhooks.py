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
from bastion.signals.alerts import Alert, AlertSettings, FoldedWindow
from bastion.webhooks import SWEEP_SECONDS, Outbox, prune_outbox, shown

EVENTS = {"raised": "alert.raised", "escalated": "alert.escalated"}
TOO_MANY = "alert.too_many"
# The recipients a body lists (the first ones; ``more_recipients`` says how many it leaves
# out): an owner may have any number of managers, and ``fallback_recipients`` any length.
MAX_LISTED = 10
# The most bytes of a body besides the alert's URL (twice in it: the text and ``url``), whatever
# the alert names; written by ``json.dumps``, which escapes every character beyond ASCII. The
# name: 200 characters, each at most 12 bytes (a surrogate pair), 2,402. The principal: 1,500
# bytes of UTF-8, each at most 6 (a control character), 9,002. The owner and each of the
# `MAX_LISTED` recipients: an entity of a stored fact, whose key is at most 2,600 ASCII
# characters (`facts.store.MAX_FACT_KEY`), at most twice that here (a quote, escaped in the
# key, is escaped again by the entity's spelling), 5,220 each (a fallback recipient, 128
# characters, less). The text: the name, the principal and the recipients each shown cut
# (`webhooks.shown`, at most 300 bytes here), 3,900 with its words. The decision ids: at most
# `alerts.MAX_DECISIONS`, 32 hex digits each, 35,000. The keys and the rest, 1,000. That is
# 108,724 bytes; a window's summary (its recipients the fallback ones) is smaller.
# `tests/signals/test_alert_flood.py` sends the costliest it can make.
MAX_BODY_BYTES = 128 * 1024


def _listed(recipients: tuple[str, ...]) -> tuple[list[str], int, str]:
    """The first `MAX_LISTED` of ``recipients``, how many more there are, and how the text
    names them."""
    listed = list(recipients[:MAX_LISTED])
    more = len(recipients) - len(listed)
    to = ", ".join(shown(r) for r in listed) + (f" and {more} more" if more else "")
    return listed, more, to or "nobody (no owner, no fallback recipients)"


def payload(
    alert: Alert, stage: str, recipients: tuple[str, ...], url: str, delivery_id: str
) -> dict[str, Any]:
    """The JSON body told of ``alert`` at ``stage``: what, for whom (the first `MAX_LISTED`),
    who should look, where to acknowledge. The event and the delivery id are in the body, so
    that they are signed."""
    listed, more, to = _listed(recipients)
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
            "recipients": listed,
            "count": alert.count,
            "decision_ids": list(alert.decision_ids),
            "url": url,
            "more_recipients": more,
        },
    }


def too_many_payload(window: FoldedWindow, delivery_id: str) -> dict[str, Any]:
    """The JSON body of a window's one summary: how many notifications it folded, between
    when, and where the alerts are listed."""
    listed, more, to = _listed(window.recipients)
    of_them = f" ({window.escalations} of them escalations)" if window.escalations else ""
    text = (
        f"CRITICAL too many alerts, for {to}: {window.folded} notifications of alerts{of_them}"
        f" between {_utc(window.start)} and {_utc(window.end)} were not sent one by one (more"
        f" than {window.limit} in {window.end - window.start:g} s). Every alert is stored:"
        f" list them at {window.url} or with `bastion alerts list --state open`"
    )
    return {
        "text": text,
        "event": TOO_MANY,
        "delivery": delivery_id,
        "too_many": {
            "severity": "critical",
            "from": window.start,
            "until": window.end,
            "limit": window.limit,
            "folded": window.folded,
            "escalations": window.escalations,
            "recipients": listed,
            "more_recipients": more,
            "url": window.url,
        },
    }


def _utc(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


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

    def notify_folded(self, window: FoldedWindow) -> None:
        """`Alerts.notify_folded`: queue a window's summary (its deliveries are those of
        ``too_many:<start>``)."""
        self.enqueue(f"too_many:{window.start:.0f}", lambda d: too_many_payload(window, d))
