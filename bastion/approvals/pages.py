"""The approver's web pages: the list of requests waiting for the person signed in, one request
(who asks, what, the arguments in full, why, until when, the answers so far), and the answer.

``GET <issuer path>/approvals``, ``GET`` and ``POST <issuer path>/approvals/<id>``. The person
signs in with bastion's own login (the authorization server's session cookie; the sign-in page
otherwise). `Approvals.may_answer` is the authority on who may answer, as MCP's URL elicitation
requires of the page it opens (MCP 2025-11-25, Elicitation, URL mode: the page must check that
the person there is the one the request is for): a person who may not answer gets 403 and no
form, and an answer they send anyway is refused. Answers carry a CSRF token bound to the session
and the request (`bastion.oauth.csrf`). Pages are server-rendered with every value escaped, no
scripts, no framing, no caching (`bastion.oauth.pages.page`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion.approvals.service import (
    Approvals,
    NotAllowed,
    Unavailable,
    UnknownRequest,
    UnmatchedField,
)
from bastion.approvals.store import OPEN, ApprovalRequest
from bastion.db import DatabaseUnavailable
from bastion.decide.mcp import DECIDED_AS
from bastion.facts.model import Entity
from bastion.large_json import LargeMessage
from bastion.names import readable, readable_json
from bastion.oauth import pages
from bastion.oauth.sign_in import SESSION_COOKIE, read_cookie, sign_in_url, signed_in_as
from bastion.oauth.store import Client
from bastion.turns import PIECE, Turns
from bastion.whole_numbers import count_in

if TYPE_CHECKING:
    from bastion.oauth.server import AuthorizationServer

# The list page shows at most this many requests (newest first); the API lists the rest.
LIST_LIMIT = 100
_VERBS = {
    "approval": {"approve": "approved", "deny": "denied"},
    "review": {"approve": "released", "deny": "withheld"},
}
_PATH_SEPARATORS = re.compile(r"[\s,]+")


class _Refused(Exception):
    """A form that cannot be taken as it is: shown again with ``message``, nothing changed."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class _Shown:
    """One request as one person may see it (read in a worker thread)."""

    request: ApprovalRequest
    person: str
    refusal: str | None  # None: this person may answer now; else why not
    involved: bool  # the user, a named approver or someone who answered: sees the details
    client: Client | None
    result: Any  # a review's held result as this reviewer may see it (only when they may answer)


class ApprovalPages:
    """The pages over one `Approvals`, signed in through one authorization server."""

    def __init__(self, approvals: Approvals, oauth: AuthorizationServer) -> None:
        self.approvals = approvals
        self.oauth = oauth
        self.prefix = f"{oauth.settings.issuer_path}/approvals"

    def routes(self) -> list[Route]:
        return [
            Route(self.prefix, self.list_page, methods=["GET"]),
            Route(f"{self.prefix}/{{request_id}}", self.request_page, methods=["GET"]),
            self.oauth.form_route(f"{self.prefix}/{{request_id}}", self.answer),
        ]

    # -- who is there ----------------------------------------------------------------------------

    def _session(self, request: Request) -> str:
        return read_cookie(request, self.oauth.settings, SESSION_COOKIE)

    def _person(self, session: str) -> str | None:
        """In a worker thread: the person the session cookie names, if it is live."""
        return self.oauth.store.session_user(session, self.oauth.clock()) if session else None

    def _csrf_token(self, session: str, request_id: str) -> str:
        return self.oauth.form_tokens.token(f"approval:{request_id}", session)

    def _csrf_valid(self, token: str, session: str, request_id: str) -> bool:
        return self.oauth.form_tokens.valid(
            token, f"approval:{request_id}", session, self.oauth.settings.session_seconds
        )

    # -- GET /approvals ------------------------------------------------------------------------

    async def list_page(self, request: Request) -> Response:
        try:
            session = self._session(request)
            person = await run_in_threadpool(self._person, session)
            if person is None:
                return pages.redirect(sign_in_url(self.oauth.settings, self.prefix))
            await self.approvals.current()
            waiting = await run_in_threadpool(self._waiting_for, person)
            # An agent's request for access ahead of time (OpenID CIBA) waits here too.
            backchannel = await run_in_threadpool(self.oauth.ciba.pending_for, person)
        except (DatabaseUnavailable, Unavailable):
            return _unavailable()
        return _list_page(
            person,
            signed_in_as(self.oauth, session, person),
            waiting,
            backchannel,
            self.prefix,
            self.approvals.clock(),
        )

    def _waiting_for(self, person: str) -> list[ApprovalRequest]:
        """Pending requests that name ``person`` (`ApprovalRequest.names`: among their approvers,
        or, where none is named, as the one who confirms: the user, or the owner of an agent
        acting as itself), newest first, each one `may_answer` allows now."""
        named = self.approvals.listed(status=OPEN, approver=person, limit=LIST_LIMIT)
        return [r for r in named if self.approvals.may_answer(r, person) is None]

    # -- GET /approvals/<id> -------------------------------------------------------------------

    async def request_page(self, request: Request) -> Response:
        request_id = request.path_params["request_id"]
        try:
            session = self._session(request)
            person = await run_in_threadpool(self._person, session)
            if person is None:
                return pages.redirect(sign_in_url(self.oauth.settings, request.url.path))
            await self.approvals.current()
            shown = await run_in_threadpool(self._shown, request_id, person)
        except (DatabaseUnavailable, Unavailable):
            return _unavailable()
        if shown is None:
            return _not_found()
        return await run_in_threadpool(self._page, shown, session)

    def _shown(self, request_id: str, person: str, with_result: bool = True) -> _Shown | None:
        """In a worker thread: the request as ``person`` may see it, or None if there is none.
        A review's held result is read (and masked for them) only for a person who may answer
        it, and only when ``with_result``."""
        found = self.approvals.get(request_id)
        if found is None:
            return None
        # A person disabled or suspended is involved in nothing: their session may live on.
        barred = self.approvals.standing_refusal(person)
        refusal = barred or self.approvals.may_answer(found, person)
        involved = barred is None and (
            refusal is None
            or person in (found.subject, found.confirmer)
            or person in found.approvers
            or any(a.approver == person for a in found.answers)
        )
        client = self.oauth.store.client(found.client_id) if involved else None
        result = None
        if found.kind == "review" and refusal is None and with_result:
            result = self.approvals.review_view(found, person)
        return _Shown(found, person, refusal, involved, client, result)

    def _page(
        self,
        shown: _Shown,
        session: str,
        message: str | None = None,
        status: int | None = None,
        typed: dict[str, str] | None = None,
    ) -> Response:
        """In a worker thread: the page of a request (a held result in it can be large).
        ``typed``: what the person typed in the form whose answer was refused, shown again."""
        request = shown.request
        if status is None:
            # Who may not answer gets 403; who answered already, or took part in a request that
            # is over, sees where it stands (200).
            over = request.status != OPEN or request.expires_at <= self.approvals.clock()
            answered = any(a.approver == shown.person for a in request.answers)
            allowed = shown.refusal is None or (shown.involved and (answered or over))
            status = 200 if allowed else 403
        form = ""
        if shown.refusal is None:
            form = _answer_form(
                request,
                f"{self.prefix}/{quote(request.id, safe='')}",
                self._csrf_token(session, request.id),
                shown.result,
                typed or {},
            )
        signed_in = signed_in_as(self.oauth, session, shown.person)
        return _request_page(shown, self.approvals.clock(), signed_in, form, message, status)

    # -- POST /approvals/<id> ------------------------------------------------------------------

    async def answer(self, request: Request) -> Response:
        request_id = request.path_params["request_id"]
        try:
            form = await request.form()
            session = self._session(request)
            person = await run_in_threadpool(self._person, session)
            if person is None:
                return _not_signed_in(self.oauth.settings, request.url.path)
            if not self._csrf_valid(str(form.get("csrf_token", "")), session, request_id):
                await run_in_threadpool(self._record_csrf_refusal, request, person, request_id)
                return _csrf_refused(request.url.path)
            await self.approvals.current()
            shown = await run_in_threadpool(self._shown, request_id, person, False)
            if shown is None:
                return _not_found()
            if shown.refusal is not None:
                message = f"Your answer was not taken: {shown.refusal}."
                return await run_in_threadpool(self._page, shown, session, message, 403)
            # A refused answer's page keeps what was typed, to correct rather than type again.
            typed = {name: str(form.get(name, "")) for name in ("withheld", "reason")}
            try:
                given = _read_answer(form, shown.request)
                outcome = await run_in_threadpool(self._answered, request_id, person, given)
            except _Refused as refused:
                outcome = refused
            if isinstance(outcome, _Refused):
                shown = await run_in_threadpool(self._shown, request_id, person)
                if shown is None:
                    return _not_found()
                return await run_in_threadpool(
                    self._page, shown, session, outcome.message, outcome.status, typed
                )
        except (DatabaseUnavailable, Unavailable):
            return _unavailable()
        return pages.redirect(request.url.path)

    def _answered(self, request_id: str, person: str, given: _Answer) -> _Refused | None:
        """In a worker thread: the answer, or why it is refused (the model says)."""
        try:
            self.approvals.answer(
                request_id,
                person,
                given.answer,
                minutes=given.minutes,
                channel="page",
                reason=given.reason,
                withheld_fields=given.withheld,
            )
        except UnmatchedField as e:
            return _Refused(f"Nothing was answered: {e}.", 422)
        except NotAllowed as e:
            return _Refused(f"Your answer was not taken: {e}.", 403)
        except UnknownRequest:
            return _Refused("There is no such request.", 404)
        return None

    def _record_csrf_refusal(self, request: Request, person: str, request_id: str) -> None:
        self.oauth.refusals.record(
            "approval.csrf_refused",
            address=request.client.host if request.client else None,
            reason="csrf",
            username=person,
            request_id=request_id[:64],
        )


# -- reading the form ----------------------------------------------------------------------------


def _one(form: Any, name: str) -> str:
    values = form.getlist(name)
    if len(values) > 1:
        raise _Refused(f"The form sent {name} more than once.")
    return str(values[0]) if values else ""


@dataclass(frozen=True)
class _Answer:
    """An answer as the form gives it, checked for shape (the model checks the rest)."""

    answer: str  # approve | deny (a review: release | withhold)
    minutes: int = 0
    withheld: tuple[str, ...] = ()
    reason: str = ""


def _read_answer(form: Any, request: ApprovalRequest) -> _Answer:
    """The answer the form gives, or `_Refused` saying what is wrong with it."""
    for name in ("duration", "minutes"):
        _one(form, name)
    reason = _one(form, "reason").strip()
    choice = _one(form, "answer")
    withheld_text = _one(form, "withheld").strip()
    if request.kind == "review":
        if choice == "withhold":
            return _Answer("deny", reason=reason)
        if choice == "release":
            if withheld_text:
                raise _Refused(
                    "You entered fields to withhold: press “Release with these fields"
                    " withheld”, or empty the field to release the whole result."
                )
            return _Answer("approve", reason=reason)
        if choice == "release_withheld":
            fields = tuple(p for p in _PATH_SEPARATORS.split(withheld_text) if p)
            if not fields:
                raise _Refused("Enter the fields to withhold, such as customers.*.email.")
            return _Answer("approve", withheld=fields, reason=reason)
        raise _Refused("Choose release, release with fields withheld, or withhold.")
    if choice == "deny":
        return _Answer("deny", reason=reason)
    if choice != "approve":
        raise _Refused("Choose approve or deny.")
    duration = _one(form, "duration") or "once"
    if duration == "once":
        return _Answer("approve", reason=reason)
    if duration != "minutes":
        raise _Refused("Approve this call only, or for a number of minutes.")
    text = _one(form, "minutes").strip()
    minutes = count_in(text, request.window_minutes)
    if minutes is None:
        limit = request.window_minutes
        raise _Refused(
            f"Enter a whole number of minutes from 1 to {limit}."
            if limit
            else "This call may be approved once only, not for a time."
        )
    return _Answer("approve", minutes, reason=reason)


# -- rendering ---------------------------------------------------------------------------------


def _when(epoch: float, now: float) -> str:
    at = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    seconds = epoch - now
    if seconds <= 0:
        return at
    minutes = math.ceil(seconds / 60)
    return f"{at} (in {minutes} minute{'s' if minutes != 1 else ''})"


def _status(request: ApprovalRequest, now: float) -> str:
    if request.status == OPEN and request.expires_at <= now:
        return "expired"
    return request.status


def _json(value: Any) -> str:
    """``value`` as JSON to read on a page (`bastion.names.readable_json`: what would read as
    something else, or as nothing, as its escape), then escaped as any text; a large held
    result (a `LargeMessage`: the page is made on a worker thread) in turns, a `PIECE` of it
    escaped at a time (escaping maps each character alone: the same text)."""
    if value.__class__ is not LargeMessage:
        return escape(readable_json(value))
    turns = Turns()
    text = readable_json(value, turns)
    return "".join(escape(text[at : at + PIECE]) for at in turns.each(range(0, len(text), PIECE)))


def _agent(request: ApprovalRequest, client: Client | None) -> str:
    client_id = f"<code>{pages.shown(request.client_id)}</code>"
    if client is None:
        return f"client {client_id} (not a registered client)"
    if client.source == "admin":
        vouched = "<span class=verified>registered by your administrator</span>"
    else:
        vouched = "(an unverified name: the client registered itself)"
    return f"<strong>{pages.shown(client.client_name)}</strong> {vouched}, client {client_id}"


def _chain(request: ApprovalRequest) -> str:
    """A delegated call's chain, as the user's token passed it on: who the calling agent works
    for, so that a call is not judged as the calling agent's own."""
    steps = [f"<strong>{pages.shown(request.subject)}</strong>"]
    steps += [f"<code>{pages.shown(agent)}</code>" for agent in request.agents]
    return "<span id=chain>" + " &rarr; ".join(steps) + "</span> (delegated)"


def _rows(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _request_page(
    shown: _Shown, now: float, signed_in: str, form: str, message: str | None, status: int
) -> Response:
    request = shown.request
    state = _status(request, now)
    title = "Approve this call?" if request.kind == "approval" else "Release this result?"
    parts = [signed_in]
    if message:
        parts.append(f"<p class=error role=alert>{escape(message)}</p>")
    elif shown.refusal is not None and status == 403:
        parts.append(
            f"<p class=error role=alert>You may not answer this request: "
            f"{escape(shown.refusal)}.</p>"
        )
    what = (
        "holds this call until it is approved"
        if request.kind == "approval"
        else "holds the result of this call until a reviewer releases it"
    )
    summary = [
        ("Status", f"<strong id=status>{escape(state)}</strong>"),
        ("Expires", escape(_when(request.expires_at, now))),
        (
            "User",
            f"<strong>{pages.shown(request.subject)}</strong>"
            + ("" if request.person else " (the agent itself: no person signed in)"),
        ),
        ("Server", f"<code>{pages.shown(request.server)}</code>"),
        ("Method", f"<code>{pages.shown(request.method)}</code>"),
        ("Target", f"<code>{pages.shown(request.target)}</code>"),
    ]
    if shown.involved:
        summary.insert(3, ("Agent", _agent(request, shown.client)))
        if request.agents:
            summary.insert(4, ("For agents", _chain(request)))
        summary.insert(
            5 if request.agents else 4,
            (
                "Task",
                f"<code id=task>{pages.shown(request.task)}</code>"
                if request.task
                else "<span id=task>none (the token is for no task)</span>",
            ),
        )
    parts.append(f"<p>bastion {what}.</p>{_rows(summary)}")
    if shown.involved:
        parts.append(
            f"<h2>Arguments</h2><pre id=arguments>{_json(request.arguments)}</pre>"
            "<h2>Why</h2><ul>"
            + (
                "".join(f"<li><code>{pages.shown(rule)}</code></li>" for rule in request.rules)
                or "<li>(no rule was recorded)</li>"
            )
            + "</ul>"
            + _who_answers(request)
            + _answers(request)
        )
    if request.kind == "review" and shown.refusal is None:
        if shown.result is None:
            parts.append("<h2>The result</h2><p>No result is held any more.</p>")
        else:
            parts.append(
                "<h2>The result</h2><p class=note>As you may see it: what the policy masks for"
                f" you is masked.</p><pre id=result>{_json(shown.result)}</pre>"
            )
    parts.append(form)
    return pages.page(title, "".join(parts), status, wide=True)


def _who_answers(request: ApprovalRequest) -> str:
    if request.approvers:
        names = ", ".join(f"<strong>{pages.shown(a)}</strong>" for a in request.approvers)
        who = f"Approvers named by the policy: {names}"
    else:
        who = (
            f"No approver is named: <strong>{pages.shown(request.confirmer)}</strong> confirms"
            + ("" if request.person else ", the owner of the agent acting as itself")
            if request.confirmer
            else "No approver is named, and no person can confirm this call"
        )
    needed = f"; {request.required} distinct approvals needed" if request.required > 1 else ""
    if request.self_forbidden:
        needed += "; the user may not approve their own call"
    return f"<p>{who}{needed}.</p>"


def _answers(request: ApprovalRequest) -> str:
    if not request.answers:
        return "<p>No answer yet.</p>"
    rows = "".join(
        "<tr>"
        f"<td>{pages.shown(a.approver)}</td>"
        f"<td>{escape(_VERBS[request.kind].get(a.answer, a.answer))}"
        f"{f' for {a.minutes} minutes' if a.minutes else ''}</td>"
        f"<td>{pages.shown(a.channel)}</td><td>{escape(readable(a.reason, None))}</td>"
        f"<td>{escape(_when(a.at, a.at))}</td>"
        "</tr>"
        for a in request.answers
    )
    return (
        "<h2>Answers</h2><table id=answers><tr><th>Who</th><th>Answer</th><th>Channel</th>"
        f"<th>Reason</th><th>When</th></tr>{rows}</table>"
    )


def _answer_form(
    request: ApprovalRequest, action: str, csrf_token: str, result: Any, typed: dict[str, str]
) -> str:
    head = (
        f"<form method=post action='{escape(action, quote=True)}'>"
        f"<input type=hidden name=csrf_token value='{escape(csrf_token, quote=True)}'>"
    )
    reason = (
        "<label for=reason>Reason (optional)</label><input id=reason name=reason"
        f" value='{escape(typed.get('reason', ''), quote=True)}'>"
    )
    if request.kind == "review":
        return (
            f"{head}<label for=withheld>Fields to withhold (mask paths such as"
            " <code>customers.*.email</code>, separated by commas or spaces)</label>"
            f"<input id=withheld name=withheld"
            f" value='{escape(typed.get('withheld', ''), quote=True)}'>{reason}"
            "<button type=submit name=answer value=release>Release</button>"
            "<button type=submit name=answer value=release_withheld>Release with these fields"
            " withheld</button>"
            "<button type=submit name=answer value=withhold>Withhold</button></form>"
        )
    duration = ""
    if request.window_minutes > 0:
        window = request.window_minutes
        duration = (
            "<fieldset><legend>Approve</legend>"
            "<label><input type=radio name=duration value=once checked> this call only</label>"
            "<div><label class=inline><input type=radio name=duration value=minutes>"
            f" {_granted(request)}, for</label> <input aria-label=Minutes name=minutes"
            f" type=number min=1 max={window} value={min(window, 15)}> minutes (at most"
            f" {window})</div></fieldset>"
        )
    return (
        f"{head}{duration}{reason}"
        "<button type=submit name=answer value=approve>Approve</button>"
        "<button type=submit name=answer value=deny>Deny</button></form>"
    )


def _granted(request: ApprovalRequest) -> str:
    """What an approval for minutes lets through, as the grant says it (`approval_grant(user,
    agent, action, target)`): the action and target as the policy sees them, for this user
    through this agent (a delegated call's: this chain of agents), under this task (or none),
    with any arguments, and the MCP requests decided so."""
    resource = Entity.parse(request.target)
    requests = DECIDED_AS.get(resource.type)
    through = "this chain of agents" if request.agents else "this agent"
    task = (
        f"under task <code>{pages.shown(request.task)}</code>" if request.task else "under no task"
    )
    return (
        f"any <code>{pages.shown(request.action)}</code> of <code>{pages.shown(request.target)}"
        f"</code> by <strong>{pages.shown(request.subject)}</strong> through {through} {task},"
        " with any arguments" + (f" ({escape(requests)})" if requests else "")
    )


def _list_page(
    person: str,
    signed_in: str,
    waiting: list[ApprovalRequest],
    backchannel: list[dict[str, Any]],
    prefix: str,
    now: float,
) -> Response:
    intro = signed_in
    if not waiting and not backchannel:
        return pages.page("Requests waiting for you", f"{intro}<p>Nothing waits for you.</p>")
    access = "".join(
        "<tr>"
        f"<td><a href='{escape(b['url'], quote=True)}'>allow access</a></td>"
        f"<td>{pages.shown(person)}</td>"
        f"<td>{pages.shown(b['client_name'] or b['client_id'])}: <code>{pages.shown(b['scope'])}</code>"
        f" on <code>{pages.shown(b['resource'])}</code></td>"
        f"<td>{escape(_when(b['expires_at'], now))}</td>"
        "</tr>"
        for b in backchannel
    )
    rows = access + "".join(
        "<tr>"
        f"<td><a href='{escape(prefix, quote=True)}/{escape(quote(r.id, safe=''), quote=True)}'>"
        f"{'approve a call' if r.kind == 'approval' else 'review a result'}</a></td>"
        f"<td>{pages.shown(r.subject)}</td><td><code>{pages.shown(r.target)}</code></td>"
        f"<td>{escape(_when(r.expires_at, now))}</td>"
        "</tr>"
        for r in waiting
    )
    body = (
        f"{intro}<table id=waiting><tr><th>Request</th><th>User</th><th>Target</th>"
        f"<th>Expires</th></tr>{rows}</table>"
    )
    return pages.page("Requests waiting for you", body, wide=True)


def _message(title: str, text: str, status: int) -> Response:
    return pages.page(title, f"<p class=error role=alert>{text}</p>", status)


def _not_found() -> Response:
    return _message("No such request", "There is no approval request here.", 404)


def _unavailable() -> Response:
    response = _message(
        "Try again",
        "bastion cannot read its approval requests, or the policy that says who answers them,"
        " right now. Try again.",
        503,
    )
    response.headers["Retry-After"] = "1"
    return response


def _csrf_refused(path: str) -> Response:
    return _message(
        "Answer refused",
        "The form is missing its CSRF token, or comes from another session or page: nothing was"
        f" answered. <a href='{escape(path, quote=True)}'>Open the request again</a>.",
        403,
    )


def _not_signed_in(settings: Any, path: str) -> Response:
    return _message(
        "Answer refused",
        "You are not signed in: nothing was answered."
        f" <a href='{escape(sign_in_url(settings, path), quote=True)}'>Sign in</a>.",
        403,
    )
