"""Held calls on the wire: how an MCP client waits for the people a call, or its result, waits for.

- A 2026-07-28 client that declared URL elicitation gets an ``input_required`` result asking it
  to open the approval page (``elicitation/create``, mode ``url``), with a ``requestState`` that
  bastion signs; its retry names the request, and is decided again (SEP-2322).
- A 2025-11-25 client that declared URL elicitation and reads the answer's event stream is sent
  ``elicitation/create`` (mode ``url``) during the held call (MCP 2025-11-25, Elicitation).
- Every held request then waits, up to ``[approvals] wait_seconds``, for an answer (progress
  notifications keep it alive when the client gave a progress token); answered, it is decided
  again at once. Not answered: a JSON-RPC error with ``reason`` approval_pending (or
  review_pending), the ``approval_id``, the page's ``url`` and ``retry_after``; an identical
  retry after the answer is decided again.
- A wait ends early, once a second at most, when nobody may answer its request any more (an
  approver removed, disabled or suspended meanwhile): decided again, the call is refused
  ``no_approver``.
- A retry of a call whose approved run is still upstream waits the same way for that run to end
  (its result then held for review, where it is), and is then decided again; not ended, it is
  answered the same error with ``reason`` approval_in_progress. It is never held for a new
  approval meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import anyio

from bastion.approvals.service import Approvals, Unavailable
from bastion.approvals.store import ApprovalRequest
from bastion.constant_time import same
from bastion.gateway.enforce import Held
from bastion.gateway.jsonrpc import (
    APPROVAL_PENDING,
    INVALID_PARAMS,
    MODERN_VERSIONS,
    URL_ELICITATION_REQUIRED,
    RpcError,
    notification,
)

if TYPE_CHECKING:
    from bastion.gateway.handlers import Exchange

log = logging.getLogger("bastion.gateway")

# The key of bastion's question among a 2026-07-28 result's inputRequests, and the prefix of the
# requestState bastion signs for a held call (any other is taken only as
# `ClientRequests.sealed` says).
INPUT_KEY = "io.bastion/approval"
STATE_PREFIX = "bastion-hold.v1."
# How often a waiting request looks for an answer, and sends progress to keep the client's
# request alive.
POLL_SECONDS = 0.25
PROGRESS_SECONDS = 5.0
# How often a waiting request asks whether anyone may still answer it (a policy evaluation;
# the polls between only read its status).
LOOK_SECONDS = 1.0


class RequestStates:
    """The ``requestState`` values bastion gives 2026-07-28 clients: a value of bastion's (a held
    call's request id; an upstream's questions, `bastion.gateway.client_requests`) after its
    kind's prefix, signed (HMAC-SHA256 under a key of the deployment) with that kind and the user
    and chain of agents it was given to (`Caller.chain`), so that no other caller can present it
    (a sub-agent neither, working for another agent), no client can make one up, and one kind is
    never read as another."""

    def __init__(self, key: bytes) -> None:
        self._keyed = hmac.new(key, b"bastion request state", hashlib.sha256)

    def _mac(self, kind: str, value: str, subject: str, chain: tuple[str, ...]) -> str:
        mac = self._keyed.copy()
        mac.update(json.dumps([kind, value, subject, chain], separators=(",", ":")).encode())
        return mac.hexdigest()

    def sign(
        self, value: str, subject: str, chain: tuple[str, ...], kind: str = STATE_PREFIX
    ) -> str:
        """``value`` (text without a ``.`` at its end) as a state of ``kind``."""
        return f"{kind}{value}.{self._mac(kind, value, subject, chain)}"

    def read(
        self, state: str, subject: str, chain: tuple[str, ...], kind: str = STATE_PREFIX
    ) -> str | None:
        """The value of a state of ``kind``; None unless bastion gave it to this caller."""
        if not state.startswith(kind):
            return None
        value, _, mac = state[len(kind) :].rpartition(".")
        if not value or not same(mac, self._mac(kind, value, subject, chain)):
            return None
        return value


def retried(ex: Exchange) -> tuple[str | None, dict[str, Any]]:
    """The request a 2026-07-28 retry names (from bastion's ``requestState``), and the params
    to send upstream: without bastion's state and answers, which are not the upstream's."""
    params = ex.message.params
    state = params.get("requestState")
    modern = ex.caller.protocol_version in MODERN_VERSIONS
    if not modern or not isinstance(state, str) or not state.startswith(STATE_PREFIX):
        return None, params
    answers = params.get("inputResponses")
    answer = answers.get(INPUT_KEY) if isinstance(answers, dict) else None
    if isinstance(answer, dict) and answer.get("action") in ("decline", "cancel"):
        ex.notes["declined"] = True
    request_id = ex.gateway.states.read(state, ex.caller.subject, ex.caller.chain)
    if request_id is None:
        raise RpcError(
            INVALID_PARAMS,
            "requestState was not issued by bastion to this user and chain of agents",
            {"reason": "approval_mismatch"},
        )
    upstream = {k: v for k, v in params.items() if k != "requestState"}
    answers = upstream.get("inputResponses")
    if isinstance(answers, dict):
        answers = {k: v for k, v in answers.items() if k != INPUT_KEY}
        if answers:
            upstream["inputResponses"] = answers
        else:
            upstream.pop("inputResponses")
    return request_id, upstream


def _declares_url_elicitation(capabilities: dict[str, Any]) -> bool:
    declared = capabilities.get("elicitation")
    return isinstance(declared, dict) and isinstance(declared.get("url"), dict)


def _answerable_by_caller(held: Held) -> bool:
    """Whether the token's user can answer this hold on the page (a person, who confirms their
    own agent's call or is among the approvers): only then is the client asked to open it.
    Others wait for the people the policy names (or an agent acting as itself for its owner),
    who hear of it by the list page or a webhook."""
    request = held.request
    return held.reason == "approval_pending" and request.person and request.names(request.subject)


def _question(held: Held) -> dict[str, Any]:
    request = held.request
    what = f"{request.method} {held.target}"  # as a refusal names it: desk/send_email
    return {
        "mode": "url",
        "elicitationId": request.id,
        "url": held.url,
        "message": f"bastion holds {what} until it is approved: open the page to answer",
    }


async def answer_held(ex: Exchange, held: Held, retry: bool) -> dict[str, Any] | None:
    """Answer a held call for this client: an ``input_required`` result to return (2026-07-28,
    first time), None once people answered within the wait (decide again), or raise the
    pending error."""
    modern = ex.caller.protocol_version in MODERN_VERSIONS
    elicit = _answerable_by_caller(held) and _declares_url_elicitation(ex.capabilities)
    if modern and elicit and not retry:
        states = ex.gateway.states
        return {
            "resultType": "input_required",
            "inputRequests": {
                INPUT_KEY: {"method": "elicitation/create", "params": _question(held)}
            },
            "requestState": states.sign(held.request.id, ex.caller.subject, ex.caller.chain),
        }
    asked: asyncio.Task | None = None
    if elicit and not modern and ex.emit is not None and not ex.masks:
        asked = asyncio.create_task(ex.ask_client("elicitation/create", _question(held)))
    try:
        # A person who declined to open the page is not waited for.
        answered = not ex.notes.get("declined") and await _wait(ex, held, asked)
    finally:
        if asked is not None:
            asked.cancel()
    if answered:
        # Decided again next, and run: only for a token still valid now.
        await _token_still_valid(ex)
        if asked is not None and ex.emit is not None:
            await ex.emit(
                notification(
                    "notifications/elicitation/complete", {"elicitationId": held.request.id}
                )
            )
        return None
    raise pending_error(held, url_mode=elicit and not modern)


def pending_error(held: Held, url_mode: bool = False) -> RpcError:
    """The error of a call still waiting: where to answer it and when to try again. A client that
    declared URL elicitation gets MCP's URLElicitationRequiredError (-32042) carrying it."""
    request = held.request
    data: dict[str, Any] = {
        "decision_id": held.decision_id,
        "reason": held.reason,
        "approval_id": request.id,
        "url": held.url,
        "retry_after": held.retry_after,
        "expires_at": request.expires_at,
    }
    if held.reason == "approval_in_progress":
        data["running_until"] = request.running_until
        message = (
            f"bastion holds this request ({held.target}): the approved run of this same call is"
            " in progress upstream, and it is not run again on that approval; retry after it"
            " ends (a result it leaves for review is then found by the retry)"
        )
    else:
        what = (
            "its result is held for review"
            if held.reason == "review_pending"
            else "it waits for approval"
        )
        message = f"bastion holds this request ({held.target}): {what}; retry after it is answered"
    if url_mode:
        data["elicitations"] = [_question(held)]
        return RpcError(URL_ELICITATION_REQUIRED, message, data)
    return RpcError(APPROVAL_PENDING, message, data)


async def _wait(ex: Exchange, held: Held, asked: asyncio.Task | None) -> bool:
    """Whether people answered (or the request expired) within ``wait_seconds``, or, for
    a call whose approved run is in progress, that run ended; not waited further once the
    client says its user declined or cancelled the elicitation."""
    approvals = ex.gateway.enforcer.approvals
    assert approvals is not None
    deadline = time.monotonic() + approvals.settings.wait_seconds
    meta = ex.message.params.get("_meta")
    token = meta.get("progressToken") if isinstance(meta, dict) else None
    beat = time.monotonic() + PROGRESS_SECONDS
    beats = 0
    running = held.reason == "approval_in_progress"
    waiting_for = "waiting for the approved run" if running else "waiting for people"
    # Held just now, by people who could answer it then: asked again a second on.
    look = time.monotonic() + LOOK_SECONDS
    while time.monotonic() < deadline:
        request = await anyio.to_thread.run_sync(lambda: approvals.get(held.request.id, look=False))
        now = approvals.clock()
        if request is None or (
            not request.running(now)
            if running
            else request.status != "pending" or request.expires_at <= now
        ):
            return True
        if time.monotonic() >= look:
            look = time.monotonic() + LOOK_SECONDS
            # A token revoked meanwhile ends the wait, refused as at the request's arrival.
            await _token_still_valid(ex)
            if not running and await _stranded(approvals, request):
                return True  # decided again: the retry closes it and is refused
        if token is not None and ex.progress is not None and time.monotonic() >= beat:
            beats += 1
            beat += PROGRESS_SECONDS
            await ex.progress(
                notification(
                    "notifications/progress",
                    {"progressToken": token, "progress": beats, "message": waiting_for},
                )
            )
        if asked is not None and asked.done() and _declined(asked):
            return False
        await asyncio.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
    return False


async def _token_still_valid(ex: Exchange) -> None:
    """Check the request's token again (`Exchange.still_valid`): a token revoked since the
    request arrived (by its client, a Shared Signals event, its user disabled) raises the 401
    its arrival would have got now."""
    if ex.still_valid is not None:
        await ex.still_valid()


async def _stranded(approvals: Approvals, request: ApprovalRequest) -> bool:
    """Whether nobody may answer ``request`` any more (`Approvals.stranded`). Not known (the
    policy cannot be read here now): waited on; the decision after the wait refuses the call
    if it still cannot tell."""
    try:
        return await anyio.to_thread.run_sync(approvals.stranded, request) is not None
    except Unavailable:
        return False


def _declined(asked: asyncio.Task) -> bool:
    if asked.cancelled() or asked.exception() is not None:
        return False
    result = asked.result().get("result")
    return isinstance(result, dict) and result.get("action") in ("decline", "cancel")
