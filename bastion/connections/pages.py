"""The pages where a person connects their own account at an upstream MCP server, sees their
connections and revokes them.

``GET <issuer path>/connections`` (the list), ``GET|POST .../connections/<upstream>/connect``
(what an URL elicitation opens; the POST starts the authorization at the upstream's server),
``GET .../connections/<upstream>/callback`` (where that server sends the person back), ``POST
.../connections/<upstream>/revoke``. The person signs in with bastion's own sign-in. MCP's URL
elicitation requires the page to check that the person there is the user the elicitation was
for (MCP 2025-11-25, Elicitation, URL mode): a link naming another user is refused (403), and
the callback finishes a connection only for the person who started it, in the browser session
that started it. Forms carry a CSRF token bound to the session (`bastion.oauth.csrf`); pages use bastion's frame (`bastion.oauth.pages`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from typing import TYPE_CHECKING
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion.connections.service import PATH, Connections, ConnectionUnavailable, FlowRefused
from bastion.connections.upstream_oauth import UpstreamOAuthError
from bastion.db import DatabaseUnavailable
from bastion.oauth import pages
from bastion.oauth.sign_in import SESSION_COOKIE, read_cookie, sign_in_url, signed_in_as

if TYPE_CHECKING:
    from bastion.oauth.server import AuthorizationServer


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M UTC")


class ConnectionPages:
    """The pages over one `Connections`, signed in through one authorization server."""

    def __init__(self, connections: Connections, oauth: AuthorizationServer) -> None:
        self.connections = connections
        self.oauth = oauth
        self.prefix = f"{oauth.settings.issuer_path}{PATH}"

    def routes(self) -> list[Route]:
        return [
            Route(self.prefix, self.list_page, methods=["GET"]),
            Route(f"{self.prefix}/{{upstream}}/callback", self.callback, methods=["GET"]),
            Route(f"{self.prefix}/{{upstream}}/connect", self.connect_page, methods=["GET"]),
            self.oauth.form_route(f"{self.prefix}/{{upstream}}/connect", self.connect),
            self.oauth.form_route(f"{self.prefix}/{{upstream}}/revoke", self.revoke),
        ]

    # -- who is there ----------------------------------------------------------------------------

    async def _person(self, request: Request) -> tuple[str, str | None]:
        session = read_cookie(request, self.oauth.settings, SESSION_COOKIE)
        if not session:
            return "", None
        person = await run_in_threadpool(self.oauth.store.session_user, session, self.oauth.clock())
        return session, person

    def _csrf(self, session: str, purpose: str) -> str:
        return self.oauth.form_tokens.token(f"connection:{purpose}", session)

    def _csrf_valid(self, token: str, session: str, purpose: str) -> bool:
        return self.oauth.form_tokens.valid(
            token, f"connection:{purpose}", session, self.oauth.settings.session_seconds
        )

    def _sign_in(self, request: Request) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return pages.redirect(sign_in_url(self.oauth.settings, target))

    # -- GET /connections ----------------------------------------------------------------------

    async def list_page(self, request: Request) -> Response:
        try:
            session, person = await self._person(request)
            if person is None:
                return self._sign_in(request)
            mine = await run_in_threadpool(self.connections.listed, person)
        except DatabaseUnavailable:
            return _unavailable()
        connected = {c.upstream: c for c in mine}
        rows = []
        for name in sorted(self.connections.settings):
            c = connected.get(name)
            if c is None:
                action = (
                    f"<a href='{escape(self.prefix)}/{quote(name, safe='')}/connect'>Connect</a>"
                )
                rows.append(
                    f"<tr><td>{escape(name)}</td><td>not connected</td><td>{action}</td></tr>"
                )
                continue
            form = (
                f"<form method=post action='{escape(self.prefix)}/{quote(name, safe='')}/revoke'>"
                f"<input type=hidden name=csrf_token value='{escape(self._csrf(session, 'revoke:' + name), quote=True)}'>"
                "<button type=submit>Revoke</button></form>"
            )
            rows.append(
                f"<tr><td>{escape(name)}</td><td>connected since {_when(c.created_at)}"
                f" (<code>{escape(c.scope or '-')}</code>)</td><td>{form}</td></tr>"
            )
        body = (
            f"{signed_in_as(self.oauth, session, person)}<p>These MCP servers get your own"
            " authorization, sent only on your calls to them.</p>"
            "<table><tr><th>Server</th><th>Connection</th><th></th></tr>"
            f"{''.join(rows)}</table>"
        )
        return pages.page("Your connections", body, wide=True)

    # -- GET/POST /connections/<upstream>/connect --------------------------------------------

    def _checked(self, request: Request, person: str, user: str) -> Response | None:
        """Why this person may not connect here (a page), or None."""
        upstream = request.path_params["upstream"]
        if upstream not in self.connections.settings:
            return pages.message_page(
                "No such server", "bastion has no such server to connect.", 404
            )
        if user and user != person:
            # The elicitation was for another user: the person here must not finish it.
            return pages.message_page(
                "Not your link",
                f"This link is for another user; you are signed in as {person}. Nothing was"
                " connected.",
                403,
            )
        return self._suspended(person)

    def _suspended(self, person: str) -> Response | None:
        """A page refusing a person the kill switch holds: connecting is consenting, which
        they may not do until resumed (revoking stays open to them)."""
        refusal = self.oauth.refuse_person(person)
        if refusal is None:
            return None
        return pages.message_page("Account suspended", f"{refusal} Nothing was connected.", 403)

    async def connect_page(self, request: Request) -> Response:
        upstream = request.path_params["upstream"]
        user = request.query_params.get("user", "")
        try:
            session, person = await self._person(request)
        except DatabaseUnavailable:
            return _unavailable()
        if person is None:
            return self._sign_in(request)
        refused = self._checked(request, person, user)
        if refused is not None:
            return refused
        action = f"{self.prefix}/{quote(upstream, safe='')}/connect"
        body = (
            f"{signed_in_as(self.oauth, session, person)}"
            f"<p><strong>{escape(upstream)}</strong> needs your own authorization. Connect once:"
            " you sign in there and allow bastion to call it for you. bastion keeps the tokens"
            " sealed and sends them only on your calls to this server.</p>"
            f"<form method=post action='{escape(action, quote=True)}'>"
            f"<input type=hidden name=user value='{escape(user or person, quote=True)}'>"
            f"<input type=hidden name=csrf_token value='{escape(self._csrf(session, 'connect:' + upstream), quote=True)}'>"
            "<button type=submit>Connect</button></form>"
            f"<p class=note><a href='{escape(self.prefix)}'>Your connections</a></p>"
        )
        return pages.page(f"Connect to {upstream}", body)

    async def connect(self, request: Request) -> Response:
        upstream = request.path_params["upstream"]
        try:
            form = await request.form()
            session, person = await self._person(request)
        except DatabaseUnavailable:
            return _unavailable()
        if person is None:
            return pages.message_page("Not signed in", "Sign in first: nothing was connected.", 403)
        if not self._csrf_valid(str(form.get("csrf_token", "")), session, "connect:" + upstream):
            return _csrf_refused()
        refused = self._checked(request, person, str(form.get("user", "")))
        if refused is not None:
            return refused
        try:
            location = await self.connections.start(person, upstream, browser=session)
        except (UpstreamOAuthError, ConnectionUnavailable) as e:
            return pages.message_page("Cannot connect now", f"{upstream}: {e}", 502)
        except DatabaseUnavailable:
            return _unavailable()
        return pages.redirect(location)

    # -- GET /connections/<upstream>/callback --------------------------------------------------

    async def callback(self, request: Request) -> Response:
        upstream = request.path_params["upstream"]
        state = request.query_params.get("state", "")
        code = request.query_params.get("code", "")
        iss = request.query_params.get("iss")
        try:
            session, person = await self._person(request)
            if person is None:
                return self._sign_in(request)
            if (suspended := self._suspended(person)) is not None:
                return suspended  # the flow stays unfinished: it expires (flow_seconds)
            if not state or not code:
                if state:
                    # The person said no there, or the server refused: the flow is spent.
                    await run_in_threadpool(self.connections.store.take_flow, state)
                return pages.message_page(
                    "Not connected", _refusal(request.query_params.get("error"), code), 400
                )
            connection = await self.connections.finish(
                person, upstream, state, code, iss, browser=session
            )
        except FlowRefused as e:
            return pages.message_page("Not connected", e.message, e.status)
        except DatabaseUnavailable:
            return _unavailable()
        return pages.message_page(
            "Connected",
            f"{connection.upstream} is connected for {person}. Go back to your application and"
            " try again.",
            link=(self.prefix, "Your connections"),
        )

    # -- POST /connections/<upstream>/revoke ---------------------------------------------------

    async def revoke(self, request: Request) -> Response:
        upstream = request.path_params["upstream"]
        try:
            form = await request.form()
            session, person = await self._person(request)
            if person is None:
                return pages.message_page(
                    "Not signed in", "Sign in first: nothing was revoked.", 403
                )
            if not self._csrf_valid(str(form.get("csrf_token", "")), session, "revoke:" + upstream):
                return _csrf_refused()
            await self.connections.revoke(person, upstream, actor=f"user:{person}")
        except DatabaseUnavailable:
            return _unavailable()
        return pages.redirect(self.prefix)


# The error codes of an authorization response (RFC 6749 §4.1.2.1, and RFC 8707 §2 for the
# resource bastion names), each said in bastion's own words. Anyone can send a signed-in person
# to the callback with any text: no text of the query is ever shown on bastion's page.
AUTHORIZATION_ERRORS = {
    "access_denied": "The authorization was declined there.",
    "invalid_request": "The server found bastion's request invalid.",
    "unauthorized_client": "The server does not let bastion's client ask this way.",
    "unsupported_response_type": "The server does not offer bastion's client the code flow.",
    "invalid_scope": "The server refused the scopes bastion asked for.",
    "server_error": "The server failed to answer the request.",
    "temporarily_unavailable": "The server cannot authorize now; try again later.",
    "invalid_target": "The server refused the address bastion asked a token for.",
}


def _refusal(error: str | None, code: str) -> str:
    """What to tell the person about an authorization response without a code (or state)."""
    if error is not None:
        return AUTHORIZATION_ERRORS.get(error, "The server answered with an unknown error.")
    if not code:
        return "The server sent no authorization code."
    return "The server's answer names no connection (it has no state)."


def _csrf_refused() -> Response:
    return pages.message_page(
        "Refused",
        "The form is missing its CSRF token, or comes from another session or page: nothing"
        " changed.",
        403,
    )


def _unavailable() -> Response:
    response = pages.message_page("Try again", "bastion cannot read its connections now.", 503)
    response.headers["Retry-After"] = "1"
    return response
