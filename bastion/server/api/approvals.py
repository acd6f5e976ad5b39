"""Approval routes (scope ``approvals``): list held calls and results, read one, approve or deny
it (docs/approvals.md).

The API key vouches for the person: the caller is a chat bot or a console that authenticated
the approver and names them in ``approver``. Whether that person may answer is still the
policy's (`Approvals.answer`), and the key that vouched is kept in the audit event. An agent never
holds a key of this scope.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.approvals.service import (
    MAX_REASON,
    Approvals,
    NotAllowed,
    Unavailable,
    UnknownRequest,
    UnmatchedField,
    answer_problem,
)
from bastion.approvals.store import MAX_LIST as MAX_PAGE
from bastion.approvals.store import STATUSES, ApprovalRequest
from bastion.names import is_name
from bastion.server.auth import require
from bastion.server.problems import Problem, bad_request, page_limit, read_json, unprocessable
from bastion.server.problems import field as get_field
from bastion.untrusted_json import MAX_INTEGER

T = TypeVar("T")
SCOPE = "approvals"
# The longest a person's name is (as bastion.oauth.users allows).
MAX_PERSON = 128
# No request id is longer: a longer one is unknown without asking the database.
MAX_ID = 64


def _approvals(request: Request) -> Approvals:
    approvals: Approvals | None = request.app.state.approvals
    if approvals is None:
        raise Problem(
            503,
            "Approvals not configured",
            "this server holds no calls for approval: approvals come with the gateway; configure"
            " [oauth] and [gateway] in bastion.toml (docs/approvals.md)",
        )
    return approvals


def _person(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_PERSON:
        raise bad_request(f"{name} must be a person's user name: 1 to {MAX_PERSON} characters")
    return value


def _user_name(value: str, name: str) -> str:
    """A name no user can have is nobody who may answer (and is never written to the record)."""
    if not is_name(value):
        raise unprocessable(
            f"{name} {value!r:.80} cannot be a user's name: user names are printable, without"
            " surrounding spaces, and nothing in them shows blank (a second space, a filler)"
        )
    return value


def _text(body: dict, name: str, limit: int) -> str:
    value = get_field(body, name, str, required=False) or ""
    if len(value) > limit:
        raise bad_request(f"the field {name!r} holds at most {limit} characters, got {len(value)}")
    return value


def _minutes(body: dict) -> int:
    minutes = get_field(body, "minutes", int, required=False) or 0
    if not 0 <= minutes <= MAX_INTEGER:
        raise bad_request(
            "the field 'minutes' is a whole number of minutes, 0 (this call only) or more"
        )
    return minutes


def _withheld(body: dict) -> tuple[str, ...]:
    paths = tuple(get_field(body, "withheld_fields", list, required=False) or ())
    problem = answer_problem("", paths)
    if problem is not None:
        raise bad_request(f"withheld_fields: {problem}")
    return paths


async def _decided(approvals: Approvals, work: Callable[[], T]) -> T:
    """``work`` (which asks the policy) in a worker thread, once this replica is current; a 503
    while it is not (fail closed: an answer is never checked against facts or a policy that
    are no longer in force)."""
    try:
        await approvals.current()
        return await anyio.to_thread.run_sync(work)
    except Unavailable as e:
        raise Problem(503, "Policy not current here", str(e)) from None


def _unknown(request_id: str) -> Problem:
    return Problem(
        404,
        "Unknown approval request",
        f"no approval request has the id {request_id!r:.80} (see GET /v1/approvals)",
    )


async def list_requests(request: Request) -> JSONResponse:
    """Requests, newest first; ``status`` and ``approver`` narrow them."""
    await require(request, SCOPE)
    approvals = _approvals(request)
    params = request.query_params
    status = params.get("status")
    if status is not None and status not in STATUSES:
        raise bad_request(f"status must be one of {', '.join(STATUSES)}, got {status!r:.80}")
    approver = params.get("approver")
    if approver is not None:
        approver = _person(approver, "approver")
    limit = page_limit(request, MAX_PAGE)
    found = await anyio.to_thread.run_sync(
        lambda: approvals.listed(status=status, approver=approver, limit=limit)
    )
    return JSONResponse({"approvals": [r.summary() for r in found]})


async def get_request(request: Request) -> JSONResponse:
    """One request, its arguments in full and its answers; with ``reviewer``, a held result as
    that person may see it (masked for them by the policy), if they may review it now."""
    await require(request, SCOPE)
    approvals = _approvals(request)
    request_id = request.path_params["request_id"]
    reviewer = request.query_params.get("reviewer")
    if reviewer is not None:
        reviewer = _user_name(_person(reviewer, "reviewer"), "reviewer")

    def read() -> dict | None:
        found = approvals.get(request_id) if len(request_id) <= MAX_ID else None
        if found is None:
            return None
        shown = found.summary()
        if reviewer is not None:
            if found.kind != "review":
                raise unprocessable(
                    "this request holds a call, not a result: there is nothing to review;"
                    " leave out reviewer"
                )
            why = approvals.may_answer(found, reviewer)
            if why is not None:
                raise Problem(403, "Not allowed", f"{reviewer} may not review this result: {why}")
            shown["result"] = approvals.review_view(found, reviewer)
        return shown

    # Only a reviewer's view asks the policy (may they review it, what is masked for them).
    shown = await (
        _decided(approvals, read) if reviewer is not None else anyio.to_thread.run_sync(read)
    )
    if shown is None:
        raise _unknown(request_id)
    # A held result can be large: written out in a worker thread.
    return await anyio.to_thread.run_sync(_AsciiJSON, shown)


class _AsciiJSON(JSONResponse):
    """JSON escaped to ASCII: a held result may hold half of a surrogate pair (an upstream's
    text), which no UTF-8 answer holds as it is (Starlette's failed: a 500); its escape reads
    back as the same string."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


async def _answer(request: Request, answer: str) -> JSONResponse:
    key = await require(request, SCOPE)
    approvals = _approvals(request)
    request_id = request.path_params["request_id"]
    body = await read_json(request)
    person = _user_name(_person(get_field(body, "approver", str), "approver"), "approver")
    reason = _text(body, "reason", MAX_REASON)
    minutes, withheld = (_minutes(body), _withheld(body)) if answer == "approve" else (0, ())
    if len(request_id) > MAX_ID:
        raise _unknown(request_id)

    def run() -> ApprovalRequest:
        return approvals.answer(
            request_id,
            person,
            answer,
            minutes=minutes,
            channel="api",
            reason=reason,
            withheld_fields=withheld,
            via=key.principal,
        )

    try:
        answered = await _decided(approvals, run)
    except UnknownRequest:
        raise _unknown(request_id) from None
    except UnmatchedField as e:
        raise unprocessable(f"withheld_fields: {e}") from None
    except NotAllowed as e:
        raise Problem(403, "Not allowed", str(e)) from None
    return JSONResponse(answered.summary())


async def approve(request: Request) -> JSONResponse:
    """Approve a held call (for a review: release the result, perhaps with fields withheld)."""
    return await _answer(request, "approve")


async def deny(request: Request) -> JSONResponse:
    """Deny a held call (for a review: withhold the result)."""
    return await _answer(request, "deny")


routes = [
    Route("/v1/approvals", list_requests, methods=["GET"]),
    Route("/v1/approvals/{request_id}", get_request, methods=["GET"]),
    Route("/v1/approvals/{request_id}/approve", approve, methods=["POST"]),
    Route("/v1/approvals/{request_id}/deny", deny, methods=["POST"]),
]
