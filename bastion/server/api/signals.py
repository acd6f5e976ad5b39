"""Signal routes (scope ``signals``): set, clear and list signals about users, devices, agents
and sessions, for any source that is not a Shared Signals transmitter (an MDM, a SIEM, a script).

A signal is stored as an expiring ``signal`` fact (`bastion.signals.store`), checked first
against the policy in force: a signal the policy cannot hold is a 422, as on ``/v1/facts``.
Every write returns its change-log sequence.
"""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.facts.model import Entity, FactError
from bastion.facts.store import FactStore, WriteResult
from bastion.server.auth import require
from bastion.server.problems import (
    ENTITY_SHORT_FORM,
    bad_request,
    page_limit,
    read_json,
    unprocessable,
)
from bastion.server.problems import field as get_field
from bastion.server.replica import ConsistencyTimeout, Replica
from bastion.signals.store import MAX_LIST as MAX_PAGE
from bastion.signals.store import (
    SignalError,
    SignalSettings,
    check_name,
    check_subject,
    check_value,
    clear_signal,
    list_signals,
    new_signal,
    set_signal,
)

SCOPE = "signals"


def _settings(request: Request) -> SignalSettings:
    return request.app.state.signal_settings


def _checked(check: Any, *args: Any) -> Any:
    """A part of the request checked by `bastion.signals.store`: malformed is a 400."""
    try:
        return check(*args)
    except SignalError as e:
        raise bad_request(str(e)) from None


def _subject(body: dict) -> Entity:
    subject = get_field(body, "subject", dict)
    if set(subject) != {"type", "id"}:
        raise bad_request('the field \'subject\' must be {"type": "User", "id": "sam"}')
    return _checked(check_subject, subject["type"], subject["id"])


async def _committed(request: Request, result: WriteResult) -> None:
    """Wait (bounded) until this replica reflects the write, so the next decision sees it."""
    request.app.state.metrics.writes.labels("signals").inc()
    replica: Replica = request.app.state.replica
    with contextlib.suppress(ConsistencyTimeout):
        await replica.wait_for(result.seq, request.app.state.config.consistency_timeout)


async def set_one(request: Request) -> JSONResponse:
    """Set a signal, replacing the subject's earlier value of that name."""
    key = await require(request, SCOPE)
    body = await read_json(request)
    subject = _subject(body)
    name = _checked(check_name, get_field(body, "name", str))
    source = _checked(check_name, get_field(body, "source", str), "source")
    if "value" not in body:
        raise bad_request("the field 'value' is required (a boolean, an integer or a string)")
    value = _checked(check_value, body["value"])
    ttl = get_field(body, "ttl_seconds", int, required=False)
    if ttl is not None and ttl < 1:
        raise bad_request(f"ttl_seconds must be at least 1, got {ttl}")
    try:
        signal = new_signal(subject, name, value, source, ttl, _settings(request))
    except SignalError as e:  # well formed, beyond this server's limits
        raise unprocessable(str(e)) from None
    store: FactStore = request.app.state.store
    validate = request.app.state.replica.authz.facts.validate
    try:
        result = await anyio.to_thread.run_sync(
            lambda: set_signal(store, signal, actor=key.principal, validate=validate)
        )
    except FactError as e:
        raise unprocessable(
            f"the policy in force cannot hold this signal: {e}. Declare the signal facts it"
            " reads, e.g. declare signal(User, String, Boolean, String, Integer);"
        ) from None
    await _committed(request, result)
    return JSONResponse({"sequence": result.seq, "signal": signal.to_json()})


async def clear(request: Request) -> JSONResponse:
    """Clear a subject's signal ``name``, or every signal of the subject without one."""
    key = await require(request, SCOPE)
    body = await read_json(request)
    subject = _subject(body)
    name = get_field(body, "name", str, required=False)
    if name is not None:
        _checked(check_name, name)
    store: FactStore = request.app.state.store
    result = await anyio.to_thread.run_sync(
        lambda: clear_signal(store, subject, name, actor=key.principal)
    )
    await _committed(request, result)
    return JSONResponse({"sequence": result.seq, "cleared": result.deleted})


async def get(request: Request) -> JSONResponse:
    """Live signals, of one subject (``subject=User:sam``) and one name when asked."""
    await require(request, SCOPE)
    params = request.query_params
    subject = None
    if "subject" in params:
        short = ENTITY_SHORT_FORM.fullmatch(params["subject"])
        if short is None:
            raise bad_request("subject must be Type:id, such as User:sam")
        subject = _checked(check_subject, short[1], short[2])
    name = params.get("name")
    if name is not None:
        _checked(check_name, name)
    limit = page_limit(request, MAX_PAGE)
    store: FactStore = request.app.state.store
    found = await anyio.to_thread.run_sync(lambda: list_signals(store, subject, name, limit=limit))
    return JSONResponse({"signals": [s.to_json() for s in found]})


routes = [
    Route("/v1/signals", get, methods=["GET"]),
    Route("/v1/signals", set_one, methods=["POST"]),
    Route("/v1/signals/clear", clear, methods=["POST"]),
]
