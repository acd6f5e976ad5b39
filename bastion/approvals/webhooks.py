"""Webhooks that tell people of each new approval request (the outbox is `bastion.webhooks`).

Each configured webhook gets a JSON POST whose ``text`` a chat tool's incoming webhook shows as
it is, with the link to the request's page; never the arguments or a result. Signed, retried and
recorded as `bastion.webhooks` describes; its tables are ``approval_webhook_outbox`` and
``approval_webhook_deliveries``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from bastion.approvals.settings import ApprovalSettings
from bastion.approvals.store import ApprovalRequest
from bastion.db import Database
from bastion.webhooks import (
    DELIVERED,
    FAILED,
    PENDING,
    SWEEP_SECONDS,
    Delivery,
    Outbox,
    prune_outbox,
    shown,
    sign,
)

__all__ = ["DELIVERED", "EVENT", "FAILED", "PENDING", "WebhookNotifier", "payload", "sign"]

EVENT = "approval.requested"


def payload(request: ApprovalRequest, url: str, delivery_id: str) -> dict:
    """The JSON body told of ``request``: who asks what, and where to answer. No arguments and no
    result: they are data, shown on the page after sign-in, not in a chat channel. The event and
    the delivery id are in the body too, so that they are signed (the headers are not)."""
    who = f"{shown(request.client_id)} for {shown(request.subject)}"
    if len(request.agents) > 1:
        who += f" through {', '.join(map(shown, request.agents[:-1]))}"
    what = f"{shown(request.method)} {shown(request.target)} on {shown(request.server)}"
    if request.kind == "review":
        text = f"{who} got a result of {what}, held for review: release or withhold it at {url}"
    else:
        text = f"{who} asks to {what}: approve or deny at {url}"
    return {
        "text": text,
        "event": EVENT,
        "delivery": delivery_id,
        "approval": {
            "id": request.id,
            "kind": request.kind,
            "user": request.subject,
            "agent": request.client_id,
            "agents": list(request.agents),
            "task": request.task,
            "server": request.server,
            "method": request.method,
            "target": request.target,
            "expires_at": request.expires_at,
            "url": url,
        },
    }


# The outbox's name: its tables are approval_webhook_outbox and approval_webhook_deliveries.
OUTBOX = "approval_webhook"


def prune_deliveries(db: Database, before: float) -> dict[str, int]:
    """The audit retention's part here: the approval notifications finished before ``before``
    go, with their attempts (`bastion.webhooks.prune_outbox`)."""
    return prune_outbox(db, OUTBOX, before)


class WebhookNotifier(Outbox):
    """Sends each new approval request to the configured webhooks, in the background.

    ``notify`` (a hook of `Approvals.on_new_request`) may be called from any thread; on the
    approvals' own `Database`, its rows join the transaction that makes the request.
    ``url_of(request_id)`` is the request's page.
    """

    def __init__(
        self,
        settings: ApprovalSettings,
        db: Database,
        url_of: Callable[[str], str],
        *,
        clock: Callable[[], float] = time.time,
        sweep_seconds: float = SWEEP_SECONDS,
    ) -> None:
        super().__init__(OUTBOX, settings, db, clock=clock, sweep_seconds=sweep_seconds)
        self.url_of = url_of

    def notify(self, request: ApprovalRequest) -> None:
        """Queue ``request``'s notification for every webhook and wake the sender."""
        url = self.url_of(request.id)
        self.enqueue(request.id, lambda delivery_id: payload(request, url, delivery_id))

    def expires_at(self, delivery: Delivery) -> float | None:
        return json.loads(delivery.body)["approval"]["expires_at"]
