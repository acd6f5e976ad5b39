"""Signing in to bastion: the password check and login throttle every sign-in goes through
(`check_login`, used by the authorization endpoint's login and by this page), the session
cookie, the sign-in page of bastion's own pages, which no OAuth authorization request starts
(``GET/POST <issuer path>/sign-in?next=<local path>``), and the sign-out that ends the session
(``GET/POST <issuer path>/sign-out``, `SignOutEndpoint`).

The page is the authorization endpoint's login without a client: the same throttle (failures
counted per username and per address before any hashing, `bastion.oauth.throttle`), the same
limit on password checks at once, the same session. Its form carries a CSRF token bound to the
browser cookie (`bastion.oauth.csrf`), so another site cannot sign a browser in to an account of
its choosing (login CSRF). ``next`` must be a path on this server: anything that a browser could
read as another host (``//host``, ``/\\host``, a scheme, control characters) is refused, never
followed (no open redirect, RFC 9700 §4.11 and the OWASP unvalidated-redirects cheat sheet).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from bastion.oauth import pages
from bastion.oauth.sign_in_context import PASSWORD, SignInContext
from bastion.oauth.throttle import client_address
from bastion.oauth.users import check_password

if TYPE_CHECKING:
    from bastion.oauth.server import AuthorizationServer
    from bastion.oauth.settings import OAuthSettings

SESSION_COOKIE = "bastion_session"
BROWSER_COOKIE = "bastion_browser"
# How long a sign-in form may be left open before it is sent (its CSRF token's age), and how
# long the browser cookie it is bound to lasts; the same as an authorization request's.
FORM_SECONDS = 600
# The longest ``next`` followed: a path of bastion's own pages is far shorter.
MAX_NEXT_LENGTH = 2048
CSRF_PURPOSE = "sign-in"
SIGN_OUT_PURPOSE = "sign-out"


@dataclass(frozen=True)
class LoginRefusal:
    """A sign-in that did not succeed: the status to answer, the sentence to show the person,
    and how long to wait before trying again (a ``Retry-After``), if that is the point."""

    status: int
    message: str
    retry_after: int | None = None


async def check_login(
    server: AuthorizationServer,
    address: str | None,
    username: str,
    password: str,
    *,
    client_id: str | None = None,
    before_hash: Callable[[], Awaitable[None]] | None = None,
) -> LoginRefusal | None:
    """None when ``password`` is ``username``'s; else why not, as the person should be told.

    In order, each before any hashing it makes unnecessary: a missing field; a username or
    address that must wait (429), else the attempt is counted as a failure at once (taken back
    if it checks nothing or succeeds); no free password-check slot (503); then ``before_hash``
    (the authorization endpoint counts the attempts of one request there; an exception it raises
    takes the count back and ends the check). Then the password is checked off the event loop;
    a right one of a person the kill switch holds is refused (403), and recorded
    (``login.refused``, reason ``suspended``).
    """
    throttle = server.login_throttle

    def refused(reason: str, kind: str = "login.failed", **detail) -> None:
        server.refusals.record(kind, address=address, reason=reason, client_id=client_id, **detail)

    if not (username and password):
        await run_in_threadpool(refused, "incomplete")
        return LoginRefusal(401, "Enter your username and password.")
    wait = await run_in_threadpool(throttle.begin, username, address)
    if wait is not None:
        await run_in_threadpool(
            lambda: refused(wait.counter, "login.throttled", **_recorded_name(server, username))
        )
        whose = "for this username" if wait.counter == "user" else "from your network"
        return LoginRefusal(
            429,
            f"Too many failed sign-ins {whose}. Try again in {wait.seconds} seconds.",
            wait.seconds,
        )
    if not server.password_checks.take():
        await run_in_threadpool(throttle.take_back, username, address)
        await run_in_threadpool(refused, "busy", "login.throttled")
        return LoginRefusal(503, "The server is busy. Try again in a moment.", 1)
    try:
        if before_hash is not None:
            try:
                await before_hash()
            except Exception:
                await run_in_threadpool(throttle.take_back, username, address)
                raise
        # Argon2 takes a while on purpose: keep it off the event loop.
        if await run_in_threadpool(check_password, server.store, username, password):
            await run_in_threadpool(throttle.succeeded, username, address)
            # Told only to whoever knows the password: no one learns who is suspended.
            suspended = server.refuse_person(username)
            if suspended is None:
                return None
            await run_in_threadpool(
                functools.partial(
                    server.audit.record,
                    "login.refused",
                    subject=username,
                    client_id=client_id,
                    address=address,
                    reason="suspended",
                )
            )
            return LoginRefusal(403, suspended)
    finally:
        server.password_checks.give_back()
    await run_in_threadpool(_login_failed, server, address, client_id, username)
    return LoginRefusal(401, "Wrong username or password.")


def _recorded_name(server: AuthorizationServer, username: str) -> dict[str, str]:
    """The username a record of an attempt may hold: only a user's. People type their password
    into the username field, and a name that is no user's is kept nowhere."""
    return {"username": username} if server.store.user_password_hash(username) is not None else {}


def _login_failed(
    server: AuthorizationServer, address: str | None, client_id: str | None, username: str
) -> None:
    """Audit the failure (`LoginThrottle.begin` counted it): one for an existing user is a row of
    its own (the throttle bounds how many), one for a name that does not exist is aggregated."""
    if _recorded_name(server, username):
        server.audit.record("login.failed", subject=username, client_id=client_id, address=address)
    else:
        server.refusals.record(
            "login.failed", address=address, reason="unknown_user", client_id=client_id
        )
    server.housekeeping()


def cookie_name(settings: OAuthSettings, name: str) -> str:
    """The name of one of bastion's cookies (`SESSION_COOKIE`, `BROWSER_COOKIE`) under this
    issuer. On https, ``__Host-`` when the issuer is at the host's root: a browser takes such a
    cookie only from this very host, over https, Secure, for path / and with no Domain, so
    neither a sibling subdomain nor plain HTTP can plant one (RFC 6265bis §4.1.3.2); with an
    issuer path, ``__Secure-`` (plain HTTP cannot set it; a sibling subdomain on https could)."""
    if not settings.issuer.startswith("https://"):
        return name
    return f"{'__Secure-' if settings.issuer_path else '__Host-'}{name}"


def read_cookie(request: Request, settings: OAuthSettings, name: str) -> str:
    """The value of one of bastion's cookies the request carries (under `cookie_name`), or ""."""
    return request.cookies.get(cookie_name(settings, name), "")


def browser_cookie(request: Request, server: AuthorizationServer) -> str:
    """The browser cookie's value if bastion made it, else "": a value planted by someone else
    binds nothing."""
    value = read_cookie(request, server.settings, BROWSER_COOKIE)
    return value if value and server.form_tokens.made_here(value) else ""


def browser_binding(request: Request, server: AuthorizationServer) -> str:
    """The browser cookie's value to bind a new form to: the request's if bastion made it (a
    person's other tabs stay bound to it), else a new one."""
    return browser_cookie(request, server) or server.form_tokens.browser_id()


def set_cookie(
    response: Response, settings: OAuthSettings, name: str, value: str, seconds: int
) -> None:
    """One of bastion's cookies (named by `cookie_name`): for the issuer's path, HTTP only,
    SameSite=Lax, and Secure when the issuer is https."""
    response.set_cookie(
        cookie_name(settings, name),
        value,
        max_age=seconds,
        path=settings.issuer_path or "/",
        secure=settings.issuer.startswith("https://"),
        httponly=True,
        samesite="lax",
    )


def clear_cookie(response: Response, settings: OAuthSettings, name: str) -> None:
    """Tell the browser to forget one of bastion's cookies (as `set_cookie` set it: a
    ``__Host-`` cookie is only replaced with the same attributes)."""
    response.delete_cookie(
        cookie_name(settings, name),
        path=settings.issuer_path or "/",
        secure=settings.issuer.startswith("https://"),
        httponly=True,
        samesite="lax",
    )


def start_session(
    server: AuthorizationServer, request: Request, username: str, sign_in: SignInContext
) -> str:
    """In a worker thread (the database): a new session for ``username``, who just signed in
    (how: ``sign_in``, `PASSWORD` for a password typed here), and the end of the session the request's cookie named, whoever's it was. Every sign-in
    comes here (this page, an authorization request's login, an identity provider's): a
    session id that was in the browser before the sign-in, planted or copied out of it, is
    never worth anything after it (session fixation, OWASP Session Management Cheat Sheet,
    "Renew the Session ID After Any Privilege Level Change")."""
    previous = read_cookie(request, server.settings, SESSION_COOKIE)
    if previous:
        server.store.end_session(previous)
    return server.store.create_session(
        username, server.clock(), server.settings.session_seconds, sign_in
    )


def set_session_cookie(response: Response, settings: OAuthSettings, session: str) -> None:
    """The session cookie of a session `start_session` made, for as long as it lasts."""
    set_cookie(response, settings, SESSION_COOKIE, session, settings.session_seconds)


def signed_in_as(server: AuthorizationServer, session: str, username: str) -> str:
    """The line of bastion's pages that says who is signed in, with the sign-out button (its
    form token bound to the session it ends)."""
    return pages.signed_in_as(
        username,
        f"{server.settings.issuer_path}/sign-out",
        server.form_tokens.token(SIGN_OUT_PURPOSE, session),
    )


def local_path(value: str) -> str | None:
    """``value`` if it is a path on this server that a browser cannot read as another host;
    else None. A path begins with one ``/`` and holds printable ASCII only: no ``//host``, no
    backslash (browsers read ``/\\host`` as ``//host``), no scheme, no spaces or controls."""
    if not (0 < len(value) <= MAX_NEXT_LENGTH) or not value.startswith("/"):
        return None
    if value.startswith("//") or "\\" in value:
        return None
    if any(not 0x21 <= ord(c) <= 0x7E for c in value):
        return None
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return None
    return value


def sign_in_url(settings: OAuthSettings, next_path: str) -> str:
    """Where to send a person who must sign in before ``next_path``."""
    return f"{settings.issuer_path}/sign-in?{urlencode({'next': next_path})}"


def _refused_next() -> Response:
    body = (
        "<p class=error role=alert>The address to go to after signing in must be a page of"
        " this server (a path such as <code>/approvals</code>); this one is not, so it is not"
        " followed.</p>"
    )
    return pages.page("Cannot sign in", body, 400)


class SignInEndpoint:
    """``GET`` shows the form (or goes on to ``next`` for a person signed in already); ``POST``
    checks it and, on success, starts a session and goes on to ``next``."""

    def __init__(self, server: AuthorizationServer) -> None:
        self.server = server
        self.settings = server.settings

    def _form(
        self,
        browser: str,
        next_path: str,
        error: str | None = None,
        status: int = 200,
        username: str = "",
    ) -> Response:
        response = pages.sign_in_page(
            action=f"{self.settings.issuer_path}/sign-in",
            next_path=next_path,
            csrf_token=self.server.form_tokens.token(CSRF_PURPOSE, browser),
            error=error,
            status=status,
            username=username,
            providers=self.server.login_choices(),
            passwords=self.server.passwords_allowed,
        )
        set_cookie(response, self.settings, BROWSER_COOKIE, browser, FORM_SECONDS)
        return response

    async def page(self, request: Request) -> Response:
        next_path = local_path(request.query_params.get("next", f"{self.settings.issuer_path}/"))
        if next_path is None:
            return _refused_next()
        session = read_cookie(request, self.settings, SESSION_COOKIE)
        if session and await run_in_threadpool(
            self.server.store.session_user, session, self.server.clock()
        ):
            return pages.redirect(next_path)
        return self._form(browser_binding(request, self.server), next_path)

    async def submit(self, request: Request) -> Response:
        form = await request.form()
        next_path = local_path(str(form.get("next", "")))
        if next_path is None:
            return _refused_next()
        address = client_address(request)
        browser = browser_cookie(request, self.server)
        if not self.server.form_tokens.valid(
            str(form.get("csrf_token", "")), CSRF_PURPOSE, browser, FORM_SECONDS
        ):
            await run_in_threadpool(
                functools.partial(
                    self.server.refusals.record,
                    "sign_in.csrf_refused",
                    address=address,
                    reason="csrf",
                )
            )
            # Nothing was checked; a fresh form lets a person who left it open too long go on.
            return self._form(
                browser or self.server.form_tokens.browser_id(),
                next_path,
                "This form expired or came from another page. Sign in again.",
                403,
            )
        if not self.server.passwords_allowed:
            return self._form(
                browser,
                next_path,
                "Sign-in with a password is turned off here: use your organisation's sign-in.",
                403,
            )
        username = str(form.get("username", ""))
        password = str(form.get("password", ""))
        refusal = await check_login(self.server, address, username, password)
        if refusal is not None:
            response = self._form(browser, next_path, refusal.message, refusal.status, username)
            if refusal.retry_after is not None:
                response.headers["Retry-After"] = str(refusal.retry_after)
            return response
        session = await run_in_threadpool(self._signed_in, request, username)
        response = pages.redirect(next_path)
        set_session_cookie(response, self.settings, session)
        return response

    def _signed_in(self, request: Request, username: str) -> str:
        """In a worker thread (the database): the audit record and a new session."""
        self.server.audit.record("login.succeeded", subject=username, page="sign-in")
        return start_session(self.server, request, username, PASSWORD)


class SignOutEndpoint:
    """``GET <issuer path>/sign-out`` asks (a GET never signs out: any page can make a browser
    follow a link); ``POST`` with the form token bound to the session ends it: the session row
    is deleted, so the cookie is worth nothing anywhere, and the browser is told to forget it.
    A form from another site is refused before this (`AuthorizationServer.form_route`), and one
    without the token (a sibling subdomain's, an old page's) here."""

    def __init__(self, server: AuthorizationServer) -> None:
        self.server = server
        self.settings = server.settings

    async def page(self, request: Request) -> Response:
        if request.method == "POST":
            return await self.submit(request)
        session = read_cookie(request, self.settings, SESSION_COOKIE)
        username = session and await run_in_threadpool(
            self.server.store.session_user, session, self.server.clock()
        )
        if not username:
            return self._signed_out()
        return pages.page("Sign out of bastion?", signed_in_as(self.server, session, username))

    async def submit(self, request: Request) -> Response:
        form = await request.form()
        session = read_cookie(request, self.settings, SESSION_COOKIE)
        if not self.server.form_tokens.valid(
            str(form.get("csrf_token", "")),
            SIGN_OUT_PURPOSE,
            session,
            self.settings.session_seconds,
        ):
            await run_in_threadpool(
                functools.partial(
                    self.server.refusals.record,
                    "sign_out.csrf_refused",
                    address=client_address(request),
                    reason="csrf",
                )
            )
            return pages.message_page(
                "Not signed out",
                "This form expired or came from another page, so nothing was done. Open"
                " bastion's sign-out page and sign out from there.",
                403,
                (f"{self.settings.issuer_path}/sign-out", "Sign out"),
            )
        await run_in_threadpool(self._end, session)
        response = self._signed_out()
        clear_cookie(response, self.settings, SESSION_COOKIE)
        return response

    def _end(self, session: str) -> None:
        """In a worker thread (the database): delete the session, and audit it."""
        username = self.server.store.end_session(session)
        if username is not None:
            self.server.audit.record("logout.succeeded", subject=username, page="sign-out")

    def _signed_out(self) -> Response:
        return pages.message_page(
            "Signed out",
            "You are signed out of bastion.",
            link=(sign_in_url(self.settings, f"{self.settings.issuer_path}/"), "Sign in again"),
        )
