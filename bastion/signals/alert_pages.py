"""The alert's web page: what was raised, for whom, the decisions that raised it, and a button
to acknowledge it. ``GET`` and ``POST <issuer path>/alerts/<id>`` (the link in each webhook).

The person signs in with bastion's own login (the authorization server's session cookie; the
sign-in page otherwise). Only someone the alert was told to (its owner, a recipient, the
manager it escalated to: `Alerts.may_acknowledge`), or who acknowledged it, sees the page
(`Alerts.may_see`); to anyone else it is the page of an alert that does not exist (404, the same
bytes: an id is not confirmed). Only those it was told to see the form; an acknowledgement sent
by anyone else is refused. With ``owner_may_acknowledge = false`` nobody the alert is about (its
agent's owner, the user it acted for: `Alerts.acknowledgement_refusal`) sees the form: the page
says why, and their acknowledgement is refused (403, saying why). The form carries a CSRF token
bound to the session and the alert (`bastion.oauth.csrf`). Rendered with every value escaped, no scripts (`bastion.oauth.pages`);
the names in it, the alert's own among them (a rule may bind it to what an agent sent), as
`bastion.names.readable` shows them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion.db import DatabaseUnavailable
from bastion.names import readable
from bastion.oauth import pages
from bastion.oauth.sign_in import SESSION_COOKIE, read_cookie, sign_in_url
from bastion.signals.alerts import (
    ACKNOWLEDGED,
    AcknowledgementRefused,
    Alert,
    AlertError,
    AlertNotFound,
    Alerts,
)

if TYPE_CHECKING:
    from bastion.oauth.server import AuthorizationServer

MAX_ID = 64


class AlertPages:
    def __init__(self, alerts: Alerts, oauth: AuthorizationServer) -> None:
        self.alerts = alerts
        self.oauth = oauth
        self.prefix = f"{oauth.settings.issuer_path}/alerts"

    def routes(self) -> list[Route]:
        return [
            Route(f"{self.prefix}/{{alert_id}}", self.alert_page, methods=["GET"]),
            self.oauth.form_route(f"{self.prefix}/{{alert_id}}", self.acknowledge),
        ]

    def _person(self, session: str) -> str | None:
        return self.oauth.store.session_user(session, self.oauth.clock()) if session else None

    def _csrf_token(self, session: str, alert_id: str) -> str:
        return self.oauth.form_tokens.token(f"alert:{alert_id}", session)

    def _csrf_valid(self, token: str, session: str, alert_id: str) -> bool:
        return self.oauth.form_tokens.valid(
            token, f"alert:{alert_id}", session, self.oauth.settings.session_seconds
        )

    def _get(self, alert_id: str, person: str) -> Alert | None:
        """The alert, if there is one and ``person`` may see it: else None, the same answer
        for both."""
        if len(alert_id) > MAX_ID:
            return None
        try:
            alert = self.alerts.store.get(alert_id)
        except AlertNotFound:
            return None
        return alert if self.alerts.may_see(alert, person) else None

    async def alert_page(self, request: Request) -> Response:
        alert_id = request.path_params["alert_id"]
        session = read_cookie(request, self.oauth.settings, SESSION_COOKIE)
        try:
            person = await run_in_threadpool(self._person, session)
            if person is None:
                return pages.redirect(sign_in_url(self.oauth.settings, request.url.path))
            alert = await run_in_threadpool(self._get, alert_id, person)
            refusal = None
            if alert is not None and alert.state != ACKNOWLEDGED:
                refusal = await run_in_threadpool(
                    self.alerts.acknowledgement_refusal, alert, person
                )
        except DatabaseUnavailable:
            return _message("Try again", "bastion cannot read its alerts right now.", 503)
        if alert is None:
            return _not_found()
        return self._page(alert, person, session, refusal)

    async def acknowledge(self, request: Request) -> Response:
        alert_id = request.path_params["alert_id"]
        session = read_cookie(request, self.oauth.settings, SESSION_COOKIE)
        try:
            form = await request.form()
            person = await run_in_threadpool(self._person, session)
            if person is None:
                return _message("Refused", "You are not signed in: nothing was acknowledged.", 403)
            if not self._csrf_valid(str(form.get("csrf_token", "")), session, alert_id):
                return _message(
                    "Refused",
                    "The form is missing its CSRF token, or comes from another session or"
                    " page: nothing was acknowledged.",
                    403,
                )
            alert = await run_in_threadpool(self._get, alert_id, person)
            if alert is None:
                return _not_found()
            if not self.alerts.may_acknowledge(alert, person):
                return _message(
                    "Refused",
                    "This alert was not sent to you: nothing was acknowledged.",
                    403,
                )
            # A suspended account (perhaps taken over) silences no alert, its agents' least.
            suspended = self.oauth.refuse_person(person)
            if suspended is not None:
                return _message("Refused", escape(suspended) + " Nothing was acknowledged.", 403)
            try:
                await run_in_threadpool(self.alerts.acknowledge, alert_id, person, "page")
            except AcknowledgementRefused as e:
                return _message("Refused", escape(str(e)) + " Nothing was acknowledged.", 403)
            except AlertError as e:
                return _message("Already acknowledged", escape(str(e)), 409)
        except DatabaseUnavailable:
            return _message("Try again", "bastion cannot write its alerts right now.", 503)
        return pages.redirect(request.url.path)

    def _page(self, alert: Alert, person: str, session: str, refusal: str | None) -> Response:
        rows = [
            ("Alert", readable(alert.name)),
            ("Severity", alert.severity),
            ("About", readable(alert.principal)),
            ("State", alert.state),
            ("Raised", f"{alert.count} time(s), last at {_when(alert.last_at)}"),
            ("Owner", readable(alert.owner) if alert.owner else "none"),
            ("Told", ", ".join(map(readable, alert.recipients)) or "nobody"),
            ("Escalated to", ", ".join(map(readable, alert.escalated_to)) or "-"),
            ("Decisions", ", ".join(alert.decision_ids) or "-"),
        ]
        if alert.state == ACKNOWLEDGED:
            rows.append(
                (
                    "Acknowledged",
                    f"by {readable(alert.acknowledged_by or '')} ({alert.acknowledged_channel}) at"
                    f" {_when(alert.acknowledged_at)}",
                )
            )
        table = "".join(
            f"<tr><th>{escape(k)}</th><td id='{escape(k.lower().replace(' ', '-'))}'>"
            f"{escape(v)}</td></tr>"
            for k, v in rows
        )
        form = ""
        if refusal is not None:
            form = f"<p id=not-acknowledgeable>{escape(refusal)}</p>"
        elif alert.state != ACKNOWLEDGED and self.alerts.may_acknowledge(alert, person):
            token = escape(self._csrf_token(session, alert.id), quote=True)
            form = (
                "<form method=post>"
                f"<input type=hidden name=csrf_token value='{token}'>"
                "<button type=submit id=acknowledge>Acknowledge</button></form>"
            )
        return pages.page(f"Alert: {readable(alert.name)}", f"<table>{table}</table>{form}")


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _not_found() -> Response:
    """For an alert that does not exist, and one the person may not see."""
    return _message("No such alert", "There is no alert here.", 404)


def _message(title: str, text: str, status: int) -> Response:
    return pages.page(title, f"<p class=error role=alert>{text}</p>", status)
