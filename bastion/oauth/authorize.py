"""The authorization endpoint (RFC 6749 §4.1, as profiled by OAuth 2.1 and MCP): validates the
request, has the person log in and consent, and redirects back with a code and the issuer
(RFC 9207). PKCE S256 is required (RFC 7636), the redirect URI must match a registered one
exactly (but for the port of a loopback IP literal: `redirect_uri_allowed`), and the ``resource``
(RFC 8707) must be one of the configured protected resources.

Errors that cannot be trusted to the redirect URI (unknown client, unregistered redirect URI,
a forged or expired form) are shown on a page. An error in the request itself goes back to the
redirect URI of a client the deployment vouches for (an administrator registered it); for any
other, anyone could have registered that URI, so the error is shown on bastion's page with a link
there rather than redirected (RFC 9700 §4.11.2: bastion is no open redirect). Once the person has
acted (they denied consent), the answer goes back to the client either way.

A remembered consent skips the page only where RFC 8252 §8.6 allows it (`consent_is_remembered`).
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from bastion.agents.identity import record_first_owner
from bastion.constant_time import same
from bastion.oauth import pages, pkce
from bastion.oauth.errors import InvalidScope, InvalidTarget, OAuthError
from bastion.oauth.redirect_uris import is_claimed_https, redirect_uri_allowed
from bastion.oauth.sign_in import (
    BROWSER_COOKIE,
    FORM_SECONDS,
    SESSION_COOKIE,
    browser_binding,
    browser_cookie,
    check_login,
    read_cookie,
    set_cookie,
    set_session_cookie,
    start_session,
)
from bastion.oauth.sign_in_context import PASSWORD, UNKNOWN, SignInContext
from bastion.oauth.store import (
    Client,
    Grant,
    GrantRefused,
    PendingAuthorization,
    digest,
    new_secret,
)
from bastion.oauth.throttle import client_address
from bastion.whole_numbers import count_in

if TYPE_CHECKING:
    from bastion.oauth.server import AuthorizationServer

PENDING_SECONDS = FORM_SECONDS
_SINGLE = (
    "response_type",
    "client_id",
    "redirect_uri",
    "state",
    "scope",
    "code_challenge",
    "code_challenge_method",
    "resource",
    "prompt",
    "max_age",
)
# The longest max_age (OpenID Connect Core 1.0 §3.1.2.1) taken as given: ten years.
MAX_AGE_LIMIT = 10 * 365 * 24 * 3600


def _max_age(value: str | None) -> int | None:
    """The ``max_age`` of an authorization request (OpenID Connect Core 1.0 §3.1.2.1): the
    most seconds since the person typed their password that the client accepts."""
    if value is None:
        return None
    seconds = count_in(value, MAX_AGE_LIMIT, least=0)
    if seconds is None:
        raise OAuthError(
            "invalid_request",
            f"max_age must be a whole number of seconds from 0 to {MAX_AGE_LIMIT}",
        )
    return seconds


class _PageError(Exception):
    """An error shown to the person, never sent to a redirect URI that is not trusted."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.response = pages.error_page(error, description, status)


def with_query(uri: str, params: dict[str, str | None]) -> str:
    """``uri`` with ``params`` added to its query (keeping the query it already has)."""
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query += [(k, v) for k, v in params.items() if v is not None]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


def redirect_with(uri: str, params: dict[str, str | None], status: int = 302) -> RedirectResponse:
    """Redirect to ``uri`` with ``params`` added to its query (keeping the query it already has)."""
    location = with_query(uri, params)
    return pages.redirect(location, status)


def select_scope(requested: str | None, resource_scopes: tuple[str, ...], client: Client) -> str:
    """The scope to ask the user for: the requested one if allowed; when none is requested, the
    resource's scopes within the client's registered scope (all of them if it registered none).

    Allowed: the resource's scopes, narrowed to the client's registered scope only when an
    administrator registered it. A client that registered itself (dynamic registration, a
    metadata document) could have registered every scope, so its registered scope limits
    nothing; MCP clients register with the scope of the first challenge and must be able to
    step up later (the MCP SDK does exactly that). The user consents to each scope either way.
    """
    registered = set(client.scope.split()) if client.scope is not None else None
    if requested is None or not requested.strip():
        return " ".join(s for s in resource_scopes if registered is None or s in registered)
    allowed = set(resource_scopes)
    if registered is not None and client.vouched_for:
        allowed &= registered
    wanted = list(dict.fromkeys(requested.split()))
    refused = [s for s in wanted if s not in allowed]
    if refused:
        raise InvalidScope(
            f"scopes {refused} are not available to this client for this resource;"
            f" available: {sorted(allowed)}"
        )
    return " ".join(wanted)


def consent_is_remembered(client: Client, redirect_uri: str) -> bool:
    """Whether a consent given at ``redirect_uri`` may later stand for the person's answer, so
    that a request to exactly that redirect URI (port included) gets its code without the page.

    RFC 8252 §8.6: unless the client's identity can be assured, a request is processed as if none
    had been approved before. A confidential client proves itself at the token endpoint: a code
    sent to its redirect URI is of no use to whoever else listens there. A public client is
    assured only by a claimed https redirect (`is_claimed_https`). At a loopback one, any
    program on the device can listen (on any port, or on the client's own while the client is not
    running), open the person's browser on a request of its own with the client's id and its own
    PKCE challenge, and redeem the code: so its person is asked every time."""
    return not client.is_public or is_claimed_https(redirect_uri)


class AuthorizationEndpoint:
    def __init__(self, server: AuthorizationServer) -> None:
        self.server = server
        self.settings = server.settings
        self.store = server.store

    # GET /authorize

    async def authorize(self, request: Request) -> Response:
        try:
            return await self._authorize(request)
        except _PageError as error:
            return error.response

    async def _authorize(self, request: Request) -> Response:
        query = request.query_params
        repeated = [k for k in _SINGLE if len(query.getlist(k)) > 1]
        client_id = query.get("client_id")
        if not client_id:
            raise _PageError("invalid_request", "client_id is missing")
        client = await self._client(client_id, client_address(request))
        redirect_uri = query.get("redirect_uri")
        if redirect_uri is None and len(client.redirect_uris) == 1:
            redirect_uri = client.redirect_uris[0]
        if redirect_uri is None or "redirect_uri" in repeated:
            raise _PageError("invalid_request", "redirect_uri is required (exactly once)")
        if not redirect_uri_allowed(client.redirect_uris, redirect_uri):
            raise _PageError(
                "invalid_request",
                "redirect_uri does not exactly match any redirect URI registered for this client"
                " (only the port of a loopback IP literal may differ)",
            )
        state = query.get("state") if "state" not in repeated else None
        try:
            pending = self._validate(query, client, redirect_uri, state, repeated)
        except OAuthError as error:
            # Anyone can send this request for any client: aggregated, not a row each.
            await run_in_threadpool(
                functools.partial(
                    self.server.refusals.record,
                    "authorization.refused",
                    address=client_address(request),
                    reason=error.error,
                    client_id=client.client_id,
                    description=error.description,
                )
            )
            return self._request_error(client, redirect_uri, state, error)
        browser = browser_binding(request, self.server)
        prompt, max_age = query.get("prompt"), _max_age(query.get("max_age"))
        pending = replace(
            pending,
            browser_digest=digest(browser),
            max_age=0 if prompt == "login" else max_age,
        )
        response = await run_in_threadpool(
            self._begin,
            pending,
            client,
            read_cookie(request, self.settings, SESSION_COOKIE),
            prompt,
            max_age,
        )
        self._set_cookie(response, BROWSER_COOKIE, browser, PENDING_SECONDS)
        return response

    def _begin(
        self,
        pending: PendingAuthorization,
        client: Client,
        session: str | None,
        prompt: str | None,
        max_age: int | None = None,
    ) -> Response:
        """In a worker thread (the database): keep the pending request, then the login page, or
        for a person signed in already (recently enough for ``max_age``, and not asked to sign in
        again by ``prompt=login``), the consent page or the code."""
        self.store.save_pending(pending)
        login = self.store.session_login(session, self.server.clock()) if session else None
        if login is not None and prompt != "login":
            authenticated_at = login.authenticated_at
            if max_age is None or (
                authenticated_at is not None and self.server.clock() - authenticated_at <= max_age
            ):
                return self._after_login(
                    pending, client, login.username, prompt, 302, authenticated_at, login.sign_in
                )
        return self._login_page(pending, client)

    def _validate(
        self, query, client: Client, redirect_uri: str, state: str | None, repeated: list[str]
    ) -> PendingAuthorization:
        if repeated:
            raise OAuthError("invalid_request", f"parameters {repeated} must appear at most once")
        if query.get("response_type") != "code":
            raise OAuthError(
                "unsupported_response_type",
                f"response_type {query.get('response_type')!r} is not supported; use 'code'",
            )
        if "authorization_code" not in client.grant_types:
            raise OAuthError(
                "unauthorized_client", "this client is not registered for authorization_code"
            )
        challenge = pkce.require_s256_challenge(
            query.get("code_challenge"), query.get("code_challenge_method")
        )
        resources = query.getlist("resource")
        if len(resources) != 1:
            raise InvalidTarget(
                "exactly one resource parameter (RFC 8707) naming the protected resource is required"
            )
        resource = self.settings.resource(resources[0])
        if resource is None:
            raise InvalidTarget(
                f"resource {resources[0]!r} is not a protected resource of this server"
            )
        scope = select_scope(query.get("scope"), resource.scopes, client)
        _max_age(query.get("max_age"))  # checked here, so that a bad one is an error redirect
        return PendingAuthorization(
            request_id=new_secret(),
            browser_digest="",
            csrf_token=new_secret(),
            client_id=client.client_id,
            redirect_uri=redirect_uri,
            state=state,
            resource=resource.uri,
            scope=scope,
            code_challenge=challenge,
            expires_at=self.server.clock() + PENDING_SECONDS,
        )

    # POST /authorize/login

    async def login(self, request: Request) -> Response:
        try:
            form = await request.form()
            pending, client = await self._pending_from_form(request, form)
            if not self.server.passwords_allowed:
                # [identity].local_passwords = false: only the providers sign people in.
                raise _PageError(
                    "access_denied",
                    "sign-in with a password is turned off here: use your organisation's"
                    " sign-in on the login page",
                    403,
                )
            username = str(form.get("username", ""))
            password = str(form.get("password", ""))
            refused = await self._refuse_login(request, pending, client, username, password)
            if refused is not None:
                return refused
            return await run_in_threadpool(self._signed_in, request, pending, client, username)
        except _PageError as error:
            return error.response

    def resume_signed_in(
        self, pending: PendingAuthorization, client: Client, username: str, sign_in: SignInContext
    ) -> Response:
        """In a worker thread (the database): after a login elsewhere (an identity provider,
        `bastion.identity.oidc_login`, which starts the session), consent or the code, exactly
        as after a password login; the grant keeps how the person signed in there."""
        try:
            return self._after_login(
                pending,
                client,
                username,
                prompt=None,
                status=303,
                auth_time=self.server.clock(),
                sign_in=sign_in,
            )
        except _PageError as error:
            return error.response

    def _signed_in(
        self, request: Request, pending: PendingAuthorization, client: Client, username: str
    ) -> Response:
        """In a worker thread (the database): a session for the person (the one the browser
        held ended: `start_session`), then consent or the code."""
        self.server.audit.record("login.succeeded", subject=username, client_id=client.client_id)
        session = start_session(self.server, request, username, PASSWORD)
        response = self._after_login(
            pending,
            client,
            username,
            prompt=None,
            status=303,
            auth_time=self.server.clock(),
            sign_in=PASSWORD,
        )
        set_session_cookie(response, self.settings, session)
        return response

    async def _refuse_login(
        self,
        request: Request,
        pending: PendingAuthorization,
        client: Client,
        username: str,
        password: str,
    ) -> Response | None:
        """The answer to a sign-in that does not succeed, or None when the password is right.

        `check_login` throttles and checks, as for every sign-in; here, once a password-check
        slot is taken, the attempt also counts against this pending request, and a request that
        has used its attempts ends."""
        limit = self.settings.login.max_failures_per_request
        attempt = 0

        async def count_attempt() -> None:
            nonlocal attempt
            counted = await run_in_threadpool(
                self.store.use_login_attempt, pending.request_id, limit
            )
            if counted is None:
                raise _PageError(
                    "access_denied",
                    "too many failed sign-ins for this request; return to the application"
                    " and start again",
                    403,
                )
            attempt = counted

        refusal = await check_login(
            self.server,
            client_address(request),
            username,
            password,
            client_id=client.client_id,
            before_hash=count_attempt,
        )
        if refusal is None:
            return None
        if refusal.status == 401 and attempt >= limit:
            await run_in_threadpool(self.store.finish_pending, pending.request_id)
            raise _PageError(
                "access_denied",
                f"{attempt} failed sign-ins: this request has ended; return to the application"
                " and start again",
                403,
            )
        response = self._login_page(pending, client, refusal.message, refusal.status, username)
        if refusal.retry_after is not None:
            response.headers["Retry-After"] = str(refusal.retry_after)
        return response

    # POST /authorize/consent

    async def consent(self, request: Request) -> Response:
        try:
            form = await request.form()
            pending, client = await self._pending_from_form(request, form)
            return await run_in_threadpool(
                self._answered,
                pending,
                client,
                read_cookie(request, self.settings, SESSION_COOKIE),
                form.get("decision"),
            )
        except _PageError as error:
            return error.response

    def _answered(
        self, pending: PendingAuthorization, client: Client, session: str | None, decision: Any
    ) -> Response:
        """In a worker thread (the database): the person's answer on the consent page."""
        login = self.store.session_login(session, self.server.clock()) if session else None
        if login is None:
            raise _PageError("access_denied", "you are not signed in; start again", 403)
        username = login.username
        self._refuse_suspended(username)
        if decision not in ("allow", "deny"):
            raise _PageError("invalid_request", "decision must be 'allow' or 'deny'")
        if not self.store.finish_pending(pending.request_id):
            raise _PageError("invalid_request", "this authorization request was already answered")
        if decision == "deny":
            self.server.audit.record(
                "consent.denied",
                subject=username,
                client_id=client.client_id,
                resource=pending.resource,
                scope=pending.scope,
            )
            return self._error_redirect(
                pending.redirect_uri,
                pending.state,
                OAuthError("access_denied", "the user denied the request"),
                status=303,
            )
        if consent_is_remembered(client, pending.redirect_uri):
            self.store.remember_consent(
                username,
                client.client_id,
                pending.resource,
                pending.redirect_uri,
                pending.scope,
                self.server.clock(),
            )
        # The first person to consent to an agent owns it (unless an administrator named one).
        record_first_owner(self.server.facts, client.client_id, username, f"consent:{username}")
        self.server.audit.record(
            "consent.granted",
            subject=username,
            client_id=client.client_id,
            resource=pending.resource,
            scope=pending.scope,
        )
        return self._issue_code(
            pending,
            username,
            status=303,
            auth_time=login.authenticated_at,
            sign_in=login.sign_in,
        )

    # shared steps

    async def _client(self, client_id: str, address: str | None) -> Client:
        try:
            client = await self.server.find_client(client_id, address)
        except OAuthError as error:
            raise _PageError(error.error, error.description) from error
        if client is None or client.revoked_at is not None:
            raise _PageError("invalid_client", f"client {client_id!r} is unknown or revoked")
        return client

    async def _pending_from_form(
        self, request: Request, form
    ) -> tuple[PendingAuthorization, Client]:
        """The pending request a form answers, after the CSRF and browser-binding checks."""
        request_id = str(form.get("request_id", ""))
        pending = (
            await run_in_threadpool(self.store.pending, request_id, self.server.clock())
            if request_id
            else None
        )
        if pending is None:
            raise _PageError("invalid_request", "this authorization request is unknown or expired")
        csrf = str(form.get("csrf_token", ""))
        browser = browser_cookie(request, self.server)
        if not (
            csrf
            and same(csrf, pending.csrf_token)
            and browser
            and same(digest(browser), pending.browser_digest)
        ):
            await run_in_threadpool(
                functools.partial(
                    self.server.refusals.record,
                    "authorization.csrf_refused",
                    address=client_address(request),
                    reason="csrf",
                    client_id=pending.client_id,
                )
            )
            raise _PageError(
                "access_denied",
                "the form is missing its CSRF token or comes from another browser",
                403,
            )
        return pending, await self._client(pending.client_id, client_address(request))

    def _after_login(
        self,
        pending: PendingAuthorization,
        client: Client,
        username: str,
        prompt: str | None,
        status: int,
        auth_time: float | None = None,
        sign_in: SignInContext = UNKNOWN,
    ) -> Response:
        self._refuse_suspended(username)
        consented = (
            self.store.consented_scope(
                username, client.client_id, pending.resource, pending.redirect_uri
            )
            if consent_is_remembered(client, pending.redirect_uri)
            else None
        )
        if (
            prompt != "consent"
            and consented is not None
            and set(pending.scope.split()) <= consented
        ):
            if not self.store.finish_pending(pending.request_id):
                raise _PageError(
                    "invalid_request", "this authorization request was already answered"
                )
            return self._issue_code(
                pending, username, status=status, auth_time=auth_time, sign_in=sign_in
            )
        resource = self.settings.resource(pending.resource)
        return pages.consent_page(
            action=self.settings.endpoint("authorize/consent"),
            request_id=pending.request_id,
            csrf_token=pending.csrf_token,
            username=username,
            client=self._shown(client, pending),
            resource_name=resource.name if resource is not None else "",
            resource_uri=pending.resource,
            scopes=[
                pages.ScopeShown(s, resource.describe(s) if resource is not None else None)
                for s in pending.scope.split()
            ],
        )

    def _refuse_suspended(self, username: str) -> None:
        """A person the kill switch holds neither consents nor gets a code, whatever session
        their browser holds (the request stays unanswered: it works once they are resumed)."""
        refusal = self.server.refuse_person(username)
        if refusal is not None:
            raise _PageError("access_denied", refusal, 403)

    @staticmethod
    def _shown(client: Client, pending: PendingAuthorization) -> pages.ClientShown:
        return pages.ClientShown(
            name=client.client_name,
            client_id=client.client_id,
            source=client.source,
            redirect_host=urlsplit(pending.redirect_uri).netloc,
        )

    def _login_page(
        self,
        pending: PendingAuthorization,
        client: Client,
        error: str | None = None,
        status: int = 200,
        username: str = "",
    ) -> Response:
        return pages.login_page(
            action=self.settings.endpoint("authorize/login"),
            request_id=pending.request_id,
            csrf_token=pending.csrf_token,
            client=self._shown(client, pending),
            error=error,
            status=status,
            username=username,
            providers=self.server.login_choices(),
            passwords=self.server.passwords_allowed,
        )

    def _issue_code(
        self,
        pending: PendingAuthorization,
        username: str,
        status: int,
        auth_time: float | None = None,
        sign_in: SignInContext = UNKNOWN,
    ) -> Response:
        now = self.server.clock()
        grant = Grant(
            grant_id=uuid.uuid4().hex,
            client_id=pending.client_id,
            username=username,
            resource=pending.resource,
            scope=pending.scope,
            created_at=now,
            expires_at=now + max(self.settings.refresh_token_seconds, self.settings.code_seconds),
            revoked_at=None,
            auth_time=auth_time,
            sign_in=sign_in,
        )
        code = new_secret()
        with self.store.db.transaction():
            try:
                self.store.create_grant(grant, authorized_at=auth_time)
            except GrantRefused as refused:
                raise _PageError(
                    "access_denied", f"{refused}; return to the application and start again", 403
                ) from None
            self.store.save_code(
                code,
                grant.grant_id,
                pending.redirect_uri,
                pending.code_challenge,
                now + self.settings.code_seconds,
            )
        self.server.audit.record(
            "code.issued",
            subject=username,
            client_id=pending.client_id,
            grant_id=grant.grant_id,
            resource=pending.resource,
            scope=pending.scope,
        )
        return redirect_with(
            pending.redirect_uri,
            {"code": code, "state": pending.state, "iss": self.settings.issuer},
            status=status,
        )

    def _request_error(
        self, client: Client, redirect_uri: str, state: str | None, error: OAuthError
    ) -> Response:
        """An error in the authorization request, found before the person did anything:
        redirected only to a client the deployment vouches for, else shown here."""
        if client.vouched_for:
            return self._error_redirect(redirect_uri, state, error)
        location = with_query(redirect_uri, self._error_params(state, error))
        return pages.unsent_error_page(error.error, error.description, location)

    def _error_redirect(
        self, redirect_uri: str, state: str | None, error: OAuthError, status: int = 302
    ) -> Response:
        return redirect_with(redirect_uri, self._error_params(state, error), status=status)

    def _error_params(self, state: str | None, error: OAuthError) -> dict[str, str | None]:
        """What an error tells the client at its redirect URI (RFC 6749 §4.1.2.1, RFC 9207)."""
        return {
            "error": error.error,
            "error_description": error.description,
            "state": state,
            "iss": self.settings.issuer,
        }

    def _set_cookie(self, response: Response, name: str, value: str, seconds: int) -> None:
        set_cookie(response, self.settings, name, value, seconds)
