"""Alert routes (scope ``alerts``): list alerts, read one, acknowledge it (docs/signals.md).

The API key vouches for the person who acknowledges (``by``); the channel recorded is "api", and the
key is named (``via``) in the ``alert.acknowledged`` audit event. Acknowledged, an alert is not
escalated any further. With ``owner_may_acknowledge = false`` an acknowledgement by someone the
alert is about (its agent's owner, the user it acted for) is refused: 403, saying why.
"""

from __future__ import annotations

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.server.auth import require
from bastion.server.problems import Problem, bad_request, page_limit, read_json, unprocessable
from bastion.server.problems import field as get_field
from bastion.signals.alerts import (
    ACKNOWLEDGED,
    OPEN,
    AcknowledgementRefused,
    AlertError,
    AlertNotFound,
    Alerts,
)
from bastion.signals.alerts import MAX_LIST as MAX_PAGE

SCOPE = "alerts"
MAX_PERSON = 128
MAX_ID = 64


def _alerts(request: Request) -> Alerts:
    alerts: Alerts | None = getattr(request.app.state, "alerts", None)
    if alerts is None:
        raise Problem(
            503,
            "Alerts not configured",
            "this server raises no alerts: alerts come with the gateway; configure [oauth] and"
            " [gateway] in bastion.toml (docs/signals.md)",
        )
    return alerts


def _unknown(alert_id: str) -> Problem:
    return Problem(
        404, "Unknown alert", f"no alert has the id {alert_id!r:.80} (see GET /v1/alerts)"
    )


async def list_alerts(request: Request) -> JSONResponse:
    """Alerts, most recently raised first; ``state`` narrows them."""
    await require(request, SCOPE)
    alerts = _alerts(request)
    params = request.query_params
    state = params.get("state")
    if state is not None and state not in (OPEN, ACKNOWLEDGED):
        raise bad_request(f"state must be {OPEN} or {ACKNOWLEDGED}, got {state!r:.80}")
    limit = page_limit(request, MAX_PAGE)
    found = await anyio.to_thread.run_sync(lambda: alerts.store.list(state, limit))
    return JSONResponse({"alerts": [a.public() for a in found]})


async def get_alert(request: Request) -> JSONResponse:
    await require(request, SCOPE)
    alerts = _alerts(request)
    alert_id = request.path_params["alert_id"]
    if len(alert_id) > MAX_ID:
        raise _unknown(alert_id)
    try:
        alert = await anyio.to_thread.run_sync(alerts.store.get, alert_id)
    except AlertNotFound:
        raise _unknown(alert_id) from None
    return JSONResponse(alert.public())


async def acknowledge(request: Request) -> JSONResponse:
    """Acknowledge for the person named in ``by``: no escalation after this."""
    key = await require(request, SCOPE)
    alerts = _alerts(request)
    alert_id = request.path_params["alert_id"]
    body = await read_json(request)
    by = get_field(body, "by", str)
    if not by or len(by) > MAX_PERSON:
        raise bad_request(
            f"by must be the acknowledging person's name: 1 to {MAX_PERSON} characters"
        )
    if not by.isprintable() or by.strip() != by:
        raise unprocessable(
            f"by {by!r:.80} cannot be a person's name: names are printable, without surrounding"
            " spaces"
        )
    if len(alert_id) > MAX_ID:
        raise _unknown(alert_id)
    try:
        alert = await anyio.to_thread.run_sync(
            lambda: alerts.acknowledge(alert_id, by, "api", via=f"key:{key.id}")
        )
    except AlertNotFound:
        raise _unknown(alert_id) from None
    except AcknowledgementRefused as e:
        raise Problem(403, "Not theirs to acknowledge", str(e)) from None
    except AlertError as e:
        raise Problem(409, "Already acknowledged", str(e)) from None
    return JSONResponse(alert.public())


routes = [
    Route("/v1/alerts", list_alerts, methods=["GET"]),
    Route("/v1/alerts/{alert_id}", get_alert, methods=["GET"]),
    Route("/v1/alerts/{alert_id}/acknowledge", acknowledge, methods=["POST"]),
]
