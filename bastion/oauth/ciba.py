"""OpenID Connect Client-Initiated Backchannel Authentication (CIBA) Core 1.0, poll mode: a
client asks ahead of time for a person's approval (§7 the backchannel authentication endpoint,
``/bc-authorize``), the person answers on a page of bastion (§8, here ``/bc-approve/<id>``, signed
in as the very person the client named), and the client polls the token endpoint with
``urn:openid:params:grant-type:ciba`` (§10.1) until it gets the token or one of the errors of §11:
``authorization_pending``, ``slow_down``, ``expired_token``, ``access_denied``.

An auth_req_id is the client's secret, kept only as a digest, and single use: once its token is
delivered, presenting it again is ``invalid_grant``. The page names the request by another id,
so the person's browser never sees the auth_req_id. No ID token is issued (bastion is an OAuth
authorization server, not an OpenID provider): the answer is an access token for the resource,
and a refresh token when the client has that grant, both ending with the grant (§4 metadata:
`metadata_fields`).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from bastion.agents.identity import record_first_owner
from bastion.names import readable, visible
from bastion.oauth import pages
from bastion.oauth.errors import (
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    OAuthError,
    UnauthorizedClient,
)
from bastion.oauth.sign_in import SESSION_COOKIE, read_cookie, signed_in_as
from bastion.oauth.store import (
    BackchannelRequest,
    Client,
    Grant,
    GrantRefused,
    SessionLogin,
    new_secret,
)
from bastion.oauth.throttle import client_address
from bastion.oauth.users import UserError, validate_username

if TYPE_CHECKING:
    from bastion.oauth.server import AuthorizationServer

CIBA_GRANT_TYPE = "urn:openid:params:grant-type:ciba"
# §11: each poll sooner than the interval raises it by at least 5 s, for good.
SLOW_DOWN_STEP = 5
# The token endpoint's answers while the client waits: expected, not refusals worth a record.
POLLING_ERRORS = frozenset({"authorization_pending", "slow_down"})
# Parameters of §7.1 this server does not take, and what to do instead.
_NOT_SUPPORTED = {
    "login_hint_token": "identify the person with login_hint (their bastion username)",
    "id_token_hint": "identify the person with login_hint (their bastion username)",
    "request": "send the parameters themselves; signed authentication requests are not supported",
    "user_code": "user codes are not supported (backchannel_user_code_parameter_supported is false)",
    "client_notification_token": "only the poll mode is supported: poll the token endpoint",
}


def metadata_fields(settings_endpoint: Callable[[str], str]) -> dict[str, Any]:
    """The authorization server metadata of CIBA Core 1.0 §4 (the grant type itself is in
    ``grant_types_supported`` with the others)."""
    return {
        "backchannel_authentication_endpoint": settings_endpoint("bc-authorize"),
        "backchannel_token_delivery_modes_supported": ["poll"],
        "backchannel_user_code_parameter_supported": False,
    }


def _is_username(value: str) -> bool:
    """Whether ``value`` could name a user at all (and so be looked up: PostgreSQL refuses a
    NUL character in a statement, a refusal the client should not turn into a 500)."""
    try:
        validate_username(value)
    except UserError:
        return False
    return True


def _is_request_id(value: str) -> bool:
    """Whether ``value`` could be the id of a request's page (as `new_secret` makes them)."""
    return 0 < len(value) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_") for c in value)


def binding_message_problem(message: str, most: int) -> str | None:
    """Why ``message`` cannot be shown to the person as a binding message, or None. It is shown
    on the page next to the approve button: no control or format characters (a line break or a
    right-to-left override would fake a line of the page or turn round what follows, a
    zero-width character would hide a difference from what the application shows)."""
    if not message.strip():
        return "binding_message, when given, must not be empty"
    if len(message) > most:
        return f"binding_message has {len(message)} characters; at most {most} are allowed"
    if not all(map(visible, message)):
        return (
            "binding_message must be printable text: no control, format,"
            " bidirectional-override, zero-width or other invisible characters"
        )
    return None


def answer_purpose(request_id: str) -> str:
    """What the answer form's CSRF token is made for (`bastion.oauth.csrf`, bound to the
    person's session): this one request, so neither a form of another session nor one of
    another request is accepted."""
    return f"bc-approve:{request_id}"


class BackchannelAuthentication:
    """The three parts of CIBA poll mode: the request, the person's page, the token."""

    def __init__(self, server: AuthorizationServer) -> None:
        self.server = server
        self.settings = server.settings
        self.limits = server.settings.ciba
        self.store = server.store
        self.audit = server.audit

    def url(self, request_id: str) -> str:
        """The page where the person answers the request ``request_id``."""
        return self.settings.endpoint(f"bc-approve/{request_id}")

    # POST /bc-authorize (§7), from an authenticated client; in a worker thread.

    def request(self, client: Client, form: Mapping[str, str]) -> dict[str, Any]:
        """Validate an authentication request (§7.1, §7.2) and keep it; the acknowledgement of
        §7.3, or the error of §13."""
        if CIBA_GRANT_TYPE not in client.grant_types or client.is_public:
            raise UnauthorizedClient(
                f"this client is not registered for the {CIBA_GRANT_TYPE} grant (a confidential"
                " client registers it in grant_types)"
            )
        for name, instead in _NOT_SUPPORTED.items():
            if name in form:
                raise InvalidRequest(f"{name} is not supported: {instead}")
        username = form.get("login_hint")
        if not username:
            raise InvalidRequest("login_hint is required: the bastion username of the person")
        resource = self.settings.requested_resource(form)
        scope = self._scope(form.get("scope"), resource.scopes, client)
        binding_message = form.get("binding_message")
        if binding_message is not None:
            problem = binding_message_problem(
                binding_message, self.limits.max_binding_message_chars
            )
            if problem:
                raise OAuthError("invalid_binding_message", problem)
        seconds = self._expiry(form.get("requested_expiry"))
        if not _is_username(username) or self.store.user_password_hash(username) is None:
            raise OAuthError(
                "unknown_user_id",
                f"login_hint {username[:128]!r} is not an active user of this server",
            )
        now = self.server.clock()
        auth_req_id = new_secret()
        pending = BackchannelRequest(
            request_id=new_secret(16),
            client_id=client.client_id,
            username=username,
            resource=resource.uri,
            scope=scope,
            binding_message=binding_message,
            created_at=now,
            expires_at=now + seconds,
            interval_seconds=self.limits.interval_seconds,
            status="pending",
            answered_at=None,
            grant_id=None,
        )
        if not self.store.save_backchannel_request(
            pending, auth_req_id, self.limits.max_pending_per_client, now
        ):
            raise OAuthError(
                "access_denied",
                f"this client has {self.limits.max_pending_per_client} requests waiting for an"
                " answer already ([oauth.ciba] max_pending_per_client); wait for them to be"
                " answered or to expire",
                status=403,
            )
        self.audit.record(
            "ciba.requested",
            subject=username,
            client_id=client.client_id,
            request_id=pending.request_id,
            resource=pending.resource,
            scope=scope,
            binding_message=binding_message,
            expires_at=pending.expires_at,
        )
        return {
            "auth_req_id": auth_req_id,
            "expires_in": seconds,
            "interval": pending.interval_seconds,
        }

    def _scope(
        self, requested: str | None, resource_scopes: tuple[str, ...], client: Client
    ) -> str:
        """The scopes asked for (§7.1: required), within the resource's and, when the client
        registered a scope, within that. ``openid`` is allowed and dropped: no ID token."""
        wanted = [s for s in dict.fromkeys((requested or "").split()) if s != "openid"]
        if not wanted:
            raise InvalidScope(
                f"scope is required: the scopes wanted on the resource, among {list(resource_scopes)}"
            )
        allowed = set(resource_scopes)
        if client.scope is not None:
            allowed &= set(client.scope.split())
        refused = [s for s in wanted if s not in allowed]
        if refused:
            raise InvalidScope(
                f"scopes {refused} are not available to this client for this resource;"
                f" available: {sorted(allowed)}"
            )
        return " ".join(wanted)

    def _expiry(self, requested: str | None) -> int:
        """How long the request waits: ``requested_expiry`` (§7.1) if given, at most
        max_request_seconds, else request_seconds."""
        if requested is None:
            return self.limits.request_seconds
        if not (requested.isascii() and requested.isdigit()) or not requested.strip("0"):
            raise InvalidRequest(
                f"requested_expiry must be a positive whole number of seconds, got {requested[:20]!r}"
            )
        most = self.limits.max_request_seconds
        # More than 10 digits is more than any limit (and Python refuses to read 4,300 or more).
        return min(int(requested), most) if len(requested) <= 10 else most

    # The token endpoint's CIBA grant (§10.1, errors §11); in a worker thread.

    def exchange(
        self,
        client: Client,
        form: Mapping[str, str],
        issue: Callable[[Grant, Client, str, bool], dict[str, Any]],
    ) -> dict[str, Any]:
        """Answer one poll: the token once the person approved (issued by ``issue``, the token
        endpoint's own), else the error that says where the request stands."""
        auth_req_id = form.get("auth_req_id")
        if not auth_req_id:
            raise InvalidRequest("auth_req_id is required")
        found = self.store.backchannel_request(auth_req_id)
        if found is None or found.client_id != client.client_id:
            raise InvalidGrant("the auth_req_id is unknown, or was issued to another client")
        if found.status == "issued":
            raise InvalidGrant(
                "the auth_req_id was already exchanged for a token; it is single use: make a"
                " new request at the backchannel authentication endpoint"
            )
        now = self.server.clock()
        if found.expires_at <= now:
            raise OAuthError(
                "expired_token",
                "the auth_req_id has expired without an approval; make a new request",
            )
        interval = self.store.poll_backchannel_request(auth_req_id, now, SLOW_DOWN_STEP)
        if interval is not None:
            raise OAuthError(
                "slow_down",
                f"polled too soon: wait at least {interval} seconds between polls from now on",
            )
        if found.status == "pending":
            raise OAuthError(
                "authorization_pending",
                f"{found.username} has not answered yet; poll again after"
                f" {found.interval_seconds} seconds",
            )
        if found.status == "denied":
            raise OAuthError("access_denied", f"{found.username} denied the request")
        if self.store.user_password_hash(found.username) is None:
            raise OAuthError(
                "access_denied", f"{found.username} is no longer an active user of this server"
            )
        resource = form.get("resource")
        if resource is not None and resource != found.resource:
            raise InvalidTarget(
                f"resource {resource!r} differs from {found.resource!r}, the resource approved"
            )
        grant = Grant(
            grant_id=uuid.uuid4().hex,
            client_id=client.client_id,
            username=found.username,
            resource=found.resource,
            scope=found.scope,
            created_at=now,
            expires_at=now + self.limits.grant_seconds,
            revoked_at=None,
            # The sign-in of the session the person answered from, as a consent's grant has.
            auth_time=found.auth_time,
            sign_in=found.sign_in,
        )
        with self.store.db.transaction():
            spent = self.store.spend_backchannel_request(
                auth_req_id, client.client_id, grant.grant_id, now
            )
            if spent:
                try:
                    # Refused if the person was disabled since approving, or all their grants
                    # were revoked since the sign-in they approved from (that ended the
                    # session; an answer from it, given meanwhile, counts no more than a
                    # consent would): the request is then left unspent, and refused again.
                    self.store.create_grant(grant, authorized_at=found.auth_time)
                except GrantRefused as refused:
                    raise OAuthError("access_denied", f"{refused}; make a new request") from None
                response = issue(grant, client, grant.scope, True)
        if not spent:
            raise InvalidGrant(
                "the auth_req_id was already exchanged for a token; it is single use"
            )
        self.audit.record(
            "token.issued",
            subject=found.username,
            client_id=client.client_id,
            grant_id=grant.grant_id,
            grant_type=CIBA_GRANT_TYPE,
            request_id=found.request_id,
            resource=grant.resource,
            scope=grant.scope,
        )
        return response

    # The person's page: GET and POST /bc-approve/<request_id> (§8, the "authentication device").

    async def page(self, request: Request) -> Response:
        request_id = request.path_params["request_id"]
        form: dict[str, str] | None = None
        if request.method == "POST":
            raw = await request.form()
            form = {k: str(v) for k, v in raw.items()}
        return await run_in_threadpool(
            self._page,
            request_id,
            read_cookie(request, self.settings, SESSION_COOKIE),
            form,
            client_address(request),
        )

    def _page(
        self, request_id: str, session: str | None, form: dict[str, str] | None, address: str | None
    ) -> Response:
        now = self.server.clock()
        login = self.store.session_login(session, now) if session else None
        if login is None or session is None:
            here = f"{self.settings.issuer_path}/bc-approve/{request_id}"
            sign_in = f"{self.settings.issuer_path}/sign-in?{urlencode({'next': here})}"
            return pages.message_page(
                "Sign in to answer",
                "An application asks for your approval. Sign in to bastion to see the request"
                " and answer it.",
                200 if form is None else 403,
                link=(sign_in, "Sign in"),
            )
        username = login.username
        suspended = self.server.refuse_person(username)
        if suspended is not None:
            # Signed in, but the kill switch holds them: they see and answer nothing.
            if form is not None:
                self.audit.record(
                    "ciba.answer_refused",
                    subject=username,
                    request_id=request_id if _is_request_id(request_id) else None,
                    reason="suspended",
                    address=address,
                )
            return pages.message_page("Account suspended", suspended, 403)
        found = (
            self.store.backchannel_request_by_id(request_id) if _is_request_id(request_id) else None
        )
        if found is None:
            return pages.message_page("Unknown request", "There is no such request.", 404)
        if found.username != username:
            # Signed in: a row of its own, under the name of who tried.
            self.audit.record(
                "ciba.answer_refused",
                subject=username,
                client_id=found.client_id,
                request_id=found.request_id,
                reason="another_user",
                address=address,
            )
            return pages.message_page(
                "Not your request",
                "This request asks another person for approval; only they can see and answer"
                " it. Sign in as them, or ask them to.",
                403,
            )
        client = self.store.client(found.client_id)
        if client is None or client.revoked_at is not None:
            return pages.message_page(
                "Request withdrawn", "The application that asked has been revoked.", 410
            )
        if form is not None:
            return self._answer(found, client, session, login, form, address, now)
        if found.status != "pending":
            return pages.message_page("Already answered", self._state(found, client), 409)
        if found.expires_at <= now:
            return pages.message_page(
                "Request expired", "This request expired before it was answered.", 410
            )
        return self._request_page(found, client, session, username, now)

    def _answer(
        self,
        found: BackchannelRequest,
        client: Client,
        session: str,
        login: SessionLogin,
        form: dict[str, str],
        address: str | None,
        now: float,
    ) -> Response:
        username = login.username
        if not self.server.form_tokens.valid(
            form.get("csrf_token", ""),
            answer_purpose(found.request_id),
            session,
            self.settings.session_seconds,
        ):
            self.server.refusals.record(
                "ciba.answer_refused", address=address, reason="csrf", client_id=client.client_id
            )
            return pages.message_page(
                "Answer refused",
                "The form is missing its CSRF token, or comes from another page or sign-in."
                " Open the request again and answer there.",
                403,
            )
        decision = form.get("decision")
        if decision not in ("approve", "deny"):
            return pages.message_page("Answer refused", "The answer must be approve or deny.", 400)
        status = "approved" if decision == "approve" else "denied"
        if not self.store.answer_backchannel_request(found.request_id, login, status, now):
            again = self.store.backchannel_request_by_id(found.request_id) or found
            if again.status == "pending":
                return pages.message_page(
                    "Request expired", "This request expired before it was answered.", 410
                )
            return pages.message_page("Already answered", self._state(again, client), 409)
        self.audit.record(
            f"ciba.{status}",
            subject=username,
            client_id=client.client_id,
            request_id=found.request_id,
            resource=found.resource,
            scope=found.scope,
            channel="web",
        )
        if status == "approved":
            # Approving is consenting: the first person to consent to an agent owns it.
            record_first_owner(self.server.facts, client.client_id, username, f"consent:{username}")
            return pages.message_page(
                "Approved",
                f"{readable(client.client_name)} may now get its access token. You can close this page.",
            )
        return pages.message_page(
            "Denied",
            f"{readable(client.client_name)} was told that you denied it. You can close this page.",
        )

    def _request_page(
        self, found: BackchannelRequest, client: Client, session: str, username: str, now: float
    ) -> Response:
        resource = self.settings.resource(found.resource)
        return pages.backchannel_request_page(
            action=self.url(found.request_id),
            csrf_token=self.server.form_tokens.token(answer_purpose(found.request_id), session),
            signed_in=signed_in_as(self.server, session, username),
            client_name=client.client_name,
            client_verified=client.vouched_for,
            binding_message=found.binding_message,
            resource_name=resource.name if resource is not None else "",
            resource_uri=found.resource,
            scopes=[
                pages.ScopeShown(s, resource.describe(s) if resource is not None else None)
                for s in found.scope.split()
            ],
            expires_in_minutes=max(1, math.ceil((found.expires_at - now) / 60)),
        )

    @staticmethod
    def _state(found: BackchannelRequest, client: Client) -> str:
        if found.status == "denied":
            return f"You denied this request of {readable(client.client_name)}."
        return f"You approved this request of {readable(client.client_name)}."

    # For the approvals list page: what waits for a person.

    def pending_for(self, username: str) -> list[dict[str, Any]]:
        """The requests waiting for ``username``'s answer, oldest first, as the approvals list
        shows them (reads the database: call it in a worker thread)."""
        now = self.server.clock()
        shown = []
        for found in self.store.pending_backchannel_requests(username, now):
            client = self.store.client(found.client_id)
            if client is None or client.revoked_at is not None:
                continue
            shown.append(
                {
                    "id": found.request_id,
                    "client_id": client.client_id,
                    "client_name": client.client_name,
                    "binding_message": found.binding_message,
                    "resource": found.resource,
                    "scope": found.scope,
                    "expires_at": found.expires_at,
                    "url": self.url(found.request_id),
                }
            )
        return shown
