"""The OAuth 2.1 authorization server for MCP clients: composes the endpoints into Starlette
routes under the issuer's path. Each endpoint's rules live in the module of its standard."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion import untrusted_json
from bastion.agents.identity import owners
from bastion.audit.refusals import RefusalLog
from bastion.db import Database, DatabaseUnavailable, first_line
from bastion.facts.model import Entity
from bastion.facts.store import FactStore
from bastion.http_fields import media_type
from bastion.oauth import introspection, pages, registration, revocation
from bastion.oauth.access_token import IssuedAccessToken, mint_access_token
from bastion.oauth.authorize import AuthorizationEndpoint
from bastion.oauth.ciba import POLLING_ERRORS, BackchannelAuthentication
from bastion.oauth.client_assertion import ClientAssertions
from bastion.oauth.client_auth import authenticate_client
from bastion.oauth.client_metadata_document import (
    ClientMetadataDocumentError,
    ClientMetadataDocuments,
    is_client_id_url,
)
from bastion.oauth.csrf import FormTokens, foreign_origin
from bastion.oauth.dpop import HEADER as DPOP_HEADER
from bastion.oauth.dpop import NONCE_HEADER, DPoPProofs, UseDPoPNonce
from bastion.oauth.errors import InvalidGrant, InvalidRequest, InvalidTarget, OAuthError
from bastion.oauth.keys import KeyRing, deployment_secret
from bastion.oauth.metadata import authorization_server_metadata, metadata_path
from bastion.oauth.settings import OAuthSettings
from bastion.oauth.sign_in import SignInEndpoint, SignOutEndpoint
from bastion.oauth.store import Client, Grant, OAuthStore
from bastion.oauth.throttle import (
    LoginThrottle,
    PasswordCheckSlots,
    client_address,
    counted_address,
)
from bastion.oauth.token_exchange import (
    DelegationPolicy,
    RequestOrigin,
    TaskBinder,
)
from bastion.oauth.tokens import TokenEndpoint
from bastion.oauth.verifier import TokenVerifier
from bastion.retries import Outage
from bastion.signals.suspensions import Suspensions, describe, token_principals

if TYPE_CHECKING:
    from bastion.identity.oidc_login import OpenIDLogin

log = logging.getLogger("bastion.oauth.server")

FORM_TOKEN_KEY = "form-tokens.key"
DPOP_NONCE_KEY = "dpop-nonces.key"
LOGIN_COUNTER_KEY = "login-counters.key"
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def json_response(body: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=_NO_STORE)


def error_response(error: OAuthError) -> JSONResponse:
    response = json_response(error.as_dict(), error.status)
    if isinstance(error, UseDPoPNonce):
        response.headers[NONCE_HEADER] = error.nonce
    if error.status == 401:
        scheme = "Bearer" if error.error == "invalid_token" else "Basic"
        response.headers["WWW-Authenticate"] = f'{scheme} error="{error.error}"'
    return response


# The parameters that name a token's target (RFC 8707 ``resource``, RFC 8693 ``audience``).
_TARGETS = frozenset({"resource", "audience"})


async def _form(request: Request) -> dict[str, str]:
    """A token-style request body: form-encoded, each parameter at most once (RFC 6749 §3.2)."""
    if media_type(request.headers.get("content-type", "")) != "application/x-www-form-urlencoded":
        raise InvalidRequest("the body must be application/x-www-form-urlencoded")
    # The body's size is capped while it arrives ([server].max_oauth_body_bytes), in front of
    # these routes, by bastion.server.request_limits.
    form = await request.form()
    repeated = sorted({k for k in form if len(form.getlist(k)) > 1})
    if repeated and set(repeated) <= _TARGETS:
        # RFC 8707 §2 and RFC 8693 §2.1 let these repeat, a token for every target named;
        # bastion's tokens are for one, and "invalid_target ... SHOULD be used" (§2.2.2).
        raise InvalidTarget(
            f"{' and '.join(repeated)} named more than once: a bastion token is for one resource"
        )
    if repeated:
        raise InvalidRequest(f"parameters {repeated} must appear at most once")
    return {k: str(v) for k, v in form.items()}


class SuspendedGrant(InvalidGrant):
    """The kill switch's refusal at ``/token``: `InvalidGrant` to the client, and the user, the
    agents of the chain and the one suspended kept for its audit row (`_token_refused`)."""

    def __init__(
        self, suspended: Entity, subject: str, agents: Sequence[str], owned: str | None = None
    ) -> None:
        # ``owned``: the agent acting as itself whose owner is the one suspended.
        whose = "" if owned is None else f", the owner of agent {owned!r} (which acts as itself),"
        super().__init__(
            f"{describe(suspended)}{whose} is suspended (the kill switch): no token is issued"
            " until an operator resumes it"
        )
        self.suspended = suspended
        self.subject = subject
        self.agents = tuple(agents)


class FactsOutOfDate(OAuthError):
    """This replica's facts (and so its view of the kill switch) may be missing a change made
    through another one: 503 ``temporarily_unavailable``, never a token or an answer that may
    be out of date."""

    def __init__(self) -> None:
        super().__init__(
            "temporarily_unavailable",
            "this server's copy of the facts (the kill switch among them) is behind the"
            " database; retry in a moment",
            503,
        )


class AuthorizationServer:
    """bastion's authorization server over one database. Mount `routes()` at the host root."""

    def __init__(
        self,
        settings: OAuthSettings | Mapping[str, Any],
        db: Database,
        clock: Callable[[], float] = time.time,
        max_json_depth: int = untrusted_json.DEFAULT_MAX_DEPTH,
    ) -> None:
        if not isinstance(settings, OAuthSettings):
            # The [oauth] table as read from bastion.toml.
            settings = OAuthSettings.from_mapping(settings)
        self.settings = settings
        # [server].max_json_depth: how deep a registration request's JSON may nest.
        self.max_json_depth = max_json_depth
        self.db = db
        self.clock = clock
        self.store = OAuthStore(db, clock)
        # Agent identities (owner, parent) are facts: the change log takes them to replicas.
        self.facts = FactStore(db)
        self.audit = self.store.audit
        self.refusals = RefusalLog(
            self.audit,
            window_seconds=settings.refusal_audit.window_seconds,
            max_keys=settings.refusal_audit.max_keys,
            clock=clock,
        )
        # Introspection answers (`bastion.oauth.introspection`), counted as refusals are, with
        # the same settings but keys of their own: neither pushes the other into the overflow.
        self.introspections = RefusalLog(
            self.audit,
            window_seconds=settings.refusal_audit.window_seconds,
            max_keys=settings.refusal_audit.max_keys,
            clock=clock,
        )
        self.keys = KeyRing(
            self.store,
            settings.key_dir,
            retain_seconds=settings.access_token_seconds + settings.leeway_seconds,
            clock=clock,
        )
        self.verifier = TokenVerifier(
            issuer=settings.issuer,
            keys=self.keys,
            store=self.store,
            audit=self.audit,
            clock=clock,
            leeway_seconds=settings.leeway_seconds,
            refusals=self.refusals,
        )
        self.login_throttle = LoginThrottle(
            self.store,
            settings.login,
            clock,
            lambda: deployment_secret(settings.key_dir, LOGIN_COUNTER_KEY),
        )
        self.password_checks = PasswordCheckSlots(settings.login.max_concurrent_password_checks)
        self.documents = ClientMetadataDocuments(settings.client_metadata, clock)
        # private_key_jwt: the audiences an assertion may name, the issuer first.
        self.assertions = ClientAssertions(
            settings.client_assertion,
            db,
            audiences=(settings.issuer, settings.endpoint("token")),
            leeway_seconds=settings.leeway_seconds,
            clock=clock,
        )
        # DPoP (RFC 9449): proofs at the token endpoint and the gateway, bound refresh tokens.
        self.dpop = DPoPProofs(
            settings.dpop,
            db,
            leeway_seconds=settings.leeway_seconds,
            clock=clock,
            nonce_secret=lambda: deployment_secret(settings.key_dir, DPOP_NONCE_KEY),
        )
        # The CSRF tokens of forms no stored request holds a token for (sign-in, approvals),
        # under a secret of the deployment (read at start: `read_deployment_secrets`).
        self.form_tokens = FormTokens(
            lambda: deployment_secret(settings.key_dir, FORM_TOKEN_KEY), clock
        )
        self.authorization = AuthorizationEndpoint(self)
        self._sign_in = SignInEndpoint(self)
        self._sign_out = SignOutEndpoint(self)
        self._tokens = TokenEndpoint(self)
        # Token exchange (RFC 8693): the policy that decides delegations, composed by
        # bastion.server.app from the gateway (None: every exchange is refused), and the
        # tasks a delegated token may be bound to (None: a ``task`` parameter is refused).
        self.delegation: DelegationPolicy | None = None
        self.tasks: TaskBinder | None = None
        # The kill switch: this replica's view of the suspensions (`bastion.signals.
        # suspensions`), composed by bastion.server.app. No token is issued to, and
        # introspection answers inactive for, a suspended user or agent. None: no replica.
        self.suspensions: Suspensions | None = None
        # How current that view is, from the same replica: whether its facts are past the
        # staleness bound, and None while every fact change it has heard of is applied, else
        # an awaitable of whether that happens in time (`Replica.heard_not_applied`). Asked
        # before every token request and introspection, as the gateway asks before a message.
        self.facts_stale: Callable[[], bool] = lambda: False
        self.facts_heard: Callable[[], Awaitable[bool] | None] = lambda: None
        # OpenID CIBA: `pending_for(username)` lists what waits for a person's answer.
        self.ciba = BackchannelAuthentication(self)
        # Logins through the company's OpenID providers (`bastion.identity.oidc_login`),
        # composed by bastion.server.app from [identity]; None: local passwords only.
        self.external_login: OpenIDLogin | None = None
        self._last_housekeeping = 0.0

    async def find_client(self, client_id: str, address: str | None = None) -> Client | None:
        """A registered client, or the client a metadata document URL describes (fetched).

        A document seen for the first time is an open registration, asked for from ``address``:
        its copy is kept within the limits of ``[oauth.open_registration]``. With documents
        turned off, that copy (kept for admins to list and revoke) is no client: it is used
        only as the document is, fetched again as its cache headers say (within
        ``min_cache_seconds`` and ``cache_seconds``: `ClientMetadataDocuments`)."""
        client = await run_in_threadpool(self.store.client, client_id)
        if (
            client is not None
            and client.source == "metadata_document"
            and not self.settings.client_metadata.enabled
        ):
            raise ClientMetadataDocumentError(
                client_id,
                "client ID metadata documents are turned off on this server"
                " ([oauth.client_metadata] enabled = false)",
            )
        if not (is_client_id_url(client_id) and self.settings.client_metadata.enabled):
            return client
        if client is not None and client.revoked_at is not None:
            return client
        fetched = await self.documents.client(client_id)
        # Keep a copy in the clients table so an admin can list and revoke it.
        if client is None:
            await self._save_open_registration(address, fetched)
        elif replace(fetched, created_at=client.created_at) != client:
            await run_in_threadpool(self.store.save_client, fetched)
        return fetched

    def housekeeping(self) -> None:
        """Delete expired rows, self-registered clients that never got a grant and old login
        failure counters, and write the counts of closed refusal and introspection windows (those
        of open ones: `write_counts_forever`); at most once a minute (called on the request path
        of the token, registration, login and introspection endpoints)."""
        now = self.clock()
        if now - self._last_housekeeping < 60:
            return
        self._last_housekeeping = now
        try:
            self.store.purge_expired(now, keep_seconds=self.settings.leeway_seconds + 3600)
            self.store.forget_unused_clients(
                now - self.settings.open_registration.unused_client_seconds
            )
            self.login_throttle.forget_old()
            self.assertions.forget_expired(now)
            self.refusals.flush()
            self.introspections.flush()
        except DatabaseUnavailable:
            # Best effort, after the answer is made: a token already issued is still answered.
            self._last_housekeeping = 0.0

    def suspended(self, user: str, agents: Sequence[str]) -> Entity | None:
        """The token's user, or agent of its chain (``agents``, the one it is issued to last),
        that the kill switch holds, if any. `FactsOutOfDate` (503) while this replica's facts
        are past the staleness bound: a suspension made through another replica may be
        missing from its view."""
        if self.suspensions is None:
            return None
        if self.facts_stale():
            raise FactsOutOfDate()
        return self.suspensions.first(token_principals(user, agents))

    async def facts_current(self) -> None:
        """Before a request that asks the kill switch (or the facts): every fact change this
        replica has heard of is applied first, as for the gateway's messages (a suspension
        committed through another replica is in its view by the time its client can send
        anything here); `FactsOutOfDate` if that does not happen in time, or the facts are
        past the staleness bound."""
        heard = self.facts_heard()
        if (heard is not None and not await heard) or self.facts_stale():
            raise FactsOutOfDate()

    def _refuse_disabled_owner(self, subject: str, agents: Sequence[str]) -> None:
        """`InvalidGrant` when no person is in the chain (an agent acting as itself, or what it
        delegated) and the owner of one of its agents is disabled: an agent never outlasts the
        person who owns it. Disabling revokes such an agent's grants (`OAuthStore.disable_user`);
        this refuses new ones until the owner is enabled again, read in the transaction that
        makes the grant (`OAuthStore.owner_disabled`), so that a disable racing it finds it."""
        if subject not in agents:
            return  # a person's chain: bounded by that person
        for agent in dict.fromkeys(agents):
            for owner in owners(self.facts, agent):
                if self.store.owner_disabled(owner):
                    raise InvalidGrant(
                        f"user {owner!r}, the owner of agent {agent!r} (which acts as itself),"
                        " is disabled: no token is issued until the owner is enabled again"
                    )

    def refuse_person(self, username: str) -> str | None:
        """Why ``username`` may not sign in, consent or approve anything now, or None: the kill
        switch holds them. One sentence for every page of bastion's (sign-in, consent, a CIBA
        answer); it is shown only to whoever proved to be them (their password, their session).
        Asked of this replica's view as it stands, as the approvals ask it (never a 503 for
        staleness): a suspension made through another replica holds here once it is applied."""
        if self.suspensions is None or self.suspensions.first((Entity("User", username),)) is None:
            return None
        return (
            f"The account {username!r} is suspended (the kill switch): it cannot sign in,"
            " consent or approve anything until an administrator resumes it."
        )

    def issue_access_token(
        self,
        grant: Grant,
        *,
        subject: str,
        agents: Sequence[str],
        scope: str,
        now: float,
        seconds: int,
        extra: Mapping[str, Any] | None = None,
    ) -> IssuedAccessToken:
        """Mint and record an access token of ``grant`` for ``subject`` and the agents of its
        chain (the last one is its ``client_id``). Every grant of the token endpoint issues
        through here, so the kill switch is checked once for all of them: a suspended user or
        agent gets `InvalidGrant`, raised inside the caller's transaction (a refresh token or
        code stays unused, usable again once resumed)."""
        suspended = self.suspended(subject, agents)
        if suspended is not None:
            owned = None
            if suspended not in token_principals(subject, agents) and self.suspensions:
                owned = next(
                    (a for a in agents if suspended in self.suspensions.owners(Entity("Agent", a))),
                    None,
                )
            raise SuspendedGrant(suspended, subject, agents, owned)
        self._refuse_disabled_owner(subject, agents)
        for _ in range(2):
            access = mint_access_token(
                self.keys,
                issuer=self.settings.issuer,
                subject=subject,
                client_id=agents[-1],
                resource=grant.resource,
                scope=scope,
                now=now,
                seconds=seconds,
                auth_time=grant.auth_time,  # a refresh keeps the time of the sign-in it came from
                sign_in=grant.sign_in,  # and how it was made
                extra=extra,
            )
            if self.store.save_access_token(
                access.jti, grant.grant_id, access.expires_at, access.token, access.kid
            ):
                return access
            # The key this process signs with was retired elsewhere (the CLI, another
            # replica) since it read the key table: read it again, and sign with the current key.
            self.keys.forget()
        raise OAuthError(
            "temporarily_unavailable",
            "the signing keys changed while this token was signed; retry in a moment",
            503,
        )

    def revoke_grant(self, grant: Grant, reason: str, *, actor: str) -> bool:
        """Revoke ``grant`` and all it issued, recorded with ``reason`` and ``actor``
        (`OAuthStore.revoke_grant`); False if it was revoked already (nothing recorded then)."""
        return self.store.revoke_grant(grant.grant_id, self.clock(), reason, actor=actor)

    async def write_counts_forever(self) -> None:
        """The background task: every ``[oauth.refusal_audit] repeat_write_seconds``, write
        the refusal and introspection counts of windows still open (`RefusalLog.write_progress`,
        in a worker thread), so a process killed outright loses at most that long of them. A
        database away is said once, not at every round, and once that counts are written again."""
        rounds = [(self.refusals, Outage(log)), (self.introspections, Outage(log))]
        while True:
            await asyncio.sleep(self.settings.refusal_audit.repeat_write_seconds)
            for counts, outage in rounds:
                if not counts.counting:
                    continue  # idle: no thread woken for nothing
                try:
                    await run_in_threadpool(counts.write_progress)
                except Exception as e:
                    # Kept in memory (`RefusalLog`), written by a later round.
                    outage.failed("counted refusals not written (%s); trying again", first_line(e))
                else:
                    outage.ended("counted refusals are written again")

    def read_deployment_secrets(self) -> None:
        """Read the deployment secrets this server's requests will use (each made the first
        time: `deployment_secret`), at start: read at a first sign-in or DPoP proof instead,
        their files were read, and written, on the event loop. `OSError` or `ValueError` (the
        file's path and what to do) for one that cannot be made or read."""
        self.form_tokens.read_secret()
        if self.passwords_allowed:
            self.login_throttle.read_secret()
        if self.settings.dpop.require_nonce:
            self.dpop.read_nonce_secret()

    def close(self) -> None:
        """At shutdown: write the refusal and introspection counts of windows still open."""
        try:
            self.refusals.flush(everything=True)
        finally:
            self.introspections.flush(everything=True)

    @property
    def passwords_allowed(self) -> bool:
        """Whether local users may sign in with a password ([identity].local_passwords)."""
        return self.external_login is None or self.external_login.passwords_allowed

    def login_choices(self) -> list[tuple[str, str]]:
        """(form action, name) of each identity provider the login pages offer."""
        return self.external_login.choices() if self.external_login is not None else []

    def form_route(
        self,
        path: str,
        endpoint: Callable[[Request], Awaitable[Response]],
        methods: Sequence[str] = ("POST",),
    ) -> Route:
        """The route of a page of bastion's that takes a form (sign-in, login, consent, a CIBA
        answer, approvals, alerts, connections): a POST another site's page sent (its
        ``Origin`` is not the issuer's: `foreign_origin`) is refused with 403 before
        ``endpoint`` sees it, and recorded (aggregated: it proves nothing). Every page's form
        route is made here; the APIs (``/token``, ``/v1``, the gateway) are not pages."""

        async def same_origin_only(request: Request) -> Response:
            origin = (
                foreign_origin(request, self.settings.issuer) if request.method == "POST" else None
            )
            if origin is None:
                return await endpoint(request)
            await run_in_threadpool(
                functools.partial(
                    self.refusals.record,
                    "page.origin_refused",
                    address=client_address(request),
                    reason="origin",
                    origin=origin,
                    path=request.url.path[:200],
                )
            )
            return pages.message_page(
                "Form refused",
                "This form was sent from another site, not from bastion's own page, so nothing"
                " was done. If you meant to, open the page at bastion and send it from there.",
                403,
            )

        return Route(path, same_origin_only, methods=list(methods), name=endpoint.__name__)

    def routes(self) -> list[Route]:
        prefix = self.settings.issuer_path
        provider_logins = self.external_login.routes() if self.external_login is not None else []
        return provider_logins + [
            Route(metadata_path(self.settings), self._metadata, methods=["GET"]),
            Route(f"{prefix}/jwks.json", self._jwks, methods=["GET"]),
            Route(f"{prefix}/register", self._register, methods=["POST"]),
            Route(f"{prefix}/authorize", self.authorization.authorize, methods=["GET"]),
            self.form_route(f"{prefix}/authorize/login", self.authorization.login),
            self.form_route(f"{prefix}/authorize/consent", self.authorization.consent),
            Route(f"{prefix}/sign-in", self._sign_in.page, methods=["GET"]),
            self.form_route(f"{prefix}/sign-in", self._sign_in.submit),
            self.form_route(f"{prefix}/sign-out", self._sign_out.page, ["GET", "POST"]),
            Route(f"{prefix}/token", self._token, methods=["POST"]),
            Route(f"{prefix}/bc-authorize", self._backchannel_authorize, methods=["POST"]),
            self.form_route(f"{prefix}/bc-approve/{{request_id}}", self.ciba.page, ["GET", "POST"]),
            Route(f"{prefix}/revoke", self._revoke, methods=["POST"]),
            Route(f"{prefix}/introspect", self._introspect, methods=["POST"]),
        ]

    def cross_origin_paths(self) -> frozenset[str]:
        """The endpoints a browser-based client fetches during discovery and authorization,
        which answer the pages of the allowed origins with CORS (`bastion.cors`): the metadata,
        the keys, /register, /token and /revoke. Not the pages (a person navigates to them),
        nor /introspect and /bc-authorize (called by servers)."""
        prefix = self.settings.issuer_path
        return frozenset(
            (
                metadata_path(self.settings),
                *(f"{prefix}/{name}" for name in ("jwks.json", "register", "token", "revoke")),
            )
        )

    async def _metadata(self, request: Request) -> Response:
        return JSONResponse(authorization_server_metadata(self.settings))

    async def _jwks(self, request: Request) -> Response:
        jwks = await run_in_threadpool(self.keys.jwks)
        if not jwks["keys"]:
            await run_in_threadpool(self.keys.signer)
            jwks = await run_in_threadpool(self.keys.jwks)
        return JSONResponse(jwks, headers={"Cache-Control": "public, max-age=60"})

    async def _register(self, request: Request) -> Response:
        try:
            body = await request.body()
            values = registration.validate_client_metadata(
                registration.parse_registration_body(body, self.max_json_depth), self.settings
            )
            authorization = request.headers.get("authorization", "")
            scheme, _, token = authorization.partition(" ")
            initial_token = token.strip() if scheme.lower() == "bearer" else None
            is_open = registration.check_registration_allowed(self.settings, values, initial_token)
            registered = registration.new_client(values, source="dynamic", now=self.clock())
            if is_open:
                await self._save_open_registration(client_address(request), registered.client)
            else:
                await run_in_threadpool(self.store.save_client, registered.client)
        except OAuthError as error:
            response = error_response(error)
            if isinstance(error, registration.RegistrationLimited):
                response.headers["Retry-After"] = str(error.retry_after)
            return response
        await run_in_threadpool(
            functools.partial(
                self.audit.record,
                "client.registered",
                address=client_address(request),
                client_id=registered.client.client_id,
                client_name=registered.client.client_name,
                auth_method=registered.client.token_endpoint_auth_method,
            )
        )
        return json_response(registered.response(), 201)

    async def _save_open_registration(self, requester: str | None, client: Client) -> None:
        """Save a client registered without an initial access token (or first named by a
        metadata document), asked for from ``requester``, within the limits of
        ``[oauth.open_registration]``; raise `RegistrationLimited` (429) past them."""
        limits, now = self.settings.open_registration, self.clock()
        address = counted_address(requester)
        refusal = await run_in_threadpool(
            functools.partial(
                self.store.save_open_registration,
                client,
                address,
                now,
                window_seconds=limits.window_seconds,
                max_per_address=limits.max_per_address,
                max_unused=limits.max_unused_clients,
            )
        )
        if refusal is not None:
            await run_in_threadpool(
                functools.partial(
                    self.refusals.record,
                    "registration.refused",
                    address=address,
                    reason=refusal.limit,
                    client_name=client.client_name,
                )
            )
            raise registration.open_registration_refused(refusal, limits, now)
        await run_in_threadpool(self.housekeeping)

    async def _token(self, request: Request) -> Response:
        # A CIBA client polls: its "not yet" answers are not refusals worth a record.
        pairs = request.headers.items()
        headers = {k.lower(): v for k, v in pairs}
        repeated = (
            frozenset(k for k, n in Counter(k.lower() for k, _ in pairs).items() if n > 1)
            if len(headers) != len(pairs)
            else frozenset()
        )
        origin = RequestOrigin(client_address(request) or "", headers, repeated)
        return await self._client_request(
            request,
            functools.partial(
                self._tokens.exchange,
                origin=origin,
                dpop_proofs=tuple(request.headers.getlist(DPOP_HEADER)),
            ),
            "token.refused",
            quiet=POLLING_ERRORS,
        )

    async def _backchannel_authorize(self, request: Request) -> Response:
        """OpenID CIBA §7: a client asks for a person's approval (`bastion.oauth.ciba`)."""
        return await self._client_request(request, self.ciba.request, "ciba.refused")

    async def _client_request(
        self,
        request: Request,
        work: Callable[[Client, dict[str, str]], dict[str, Any]],
        refused_kind: str,
        quiet: Collection[str] = (),
        facts_current: bool = True,
    ) -> Response:
        """A form-encoded request of an authenticated client (the token, CIBA, introspection
        and revocation endpoints' way): ``work(client, form)`` in a worker thread answers it,
        once this replica's facts are current unless ``facts_current`` is False; a refusal is
        recorded as ``refused_kind`` unless its error is in ``quiet``. Facts are checked before
        the client is authenticated: a replica that will refuse (behind, or its clock off)
        spends no client assertion's jti, so the same request is good on another replica."""
        form: dict[str, str] = {}
        client: Client | None = None
        try:
            form = await _form(request)
            if facts_current:
                await self.facts_current()
            client = await authenticate_client(
                request.headers.get("authorization"),
                form,
                functools.partial(self.find_client, address=client_address(request)),
                self.assertions,
            )
            body = await run_in_threadpool(work, client, form)
            await run_in_threadpool(self.housekeeping)
        except OAuthError as error:
            if error.error not in quiet:
                await run_in_threadpool(
                    functools.partial(
                        self._token_refused, request, form, client, error, kind=refused_kind
                    )
                )
            return error_response(error)
        return json_response(body)

    def _token_refused(
        self,
        request: Request,
        form: dict[str, str],
        client: Client | None,
        error: OAuthError,
        kind: str = "token.refused",
    ) -> None:
        """A confidential client that proved its secret keeps a row per refusal; any other
        request (no client, a wrong secret, a public client anyone can name) is aggregated."""
        if getattr(error, "audited", False):
            return  # recorded with more detail where it was refused (a token exchange)
        if isinstance(error, SuspendedGrant):
            # Rare and security-relevant, and the request proved a grant (a code, a refresh
            # token, a client's secret): a row each, naming the user and agent, never counted
            # in with a public client's other invalid_grants.
            self.audit.record(
                kind,
                subject=error.subject,
                client_id=error.agents[-1],
                address=client_address(request),
                reason="suspended",
                suspended=repr(error.suspended),
                agents=list(error.agents),
                grant_type=form.get("grant_type"),
                error=error.error,
                description=error.description,
            )
            return
        detail = {
            "grant_type": form.get("grant_type"),
            "error": error.error,
            "description": error.description,
        }
        if client is not None and not client.is_public:
            self.audit.record(
                kind,
                client_id=client.client_id,
                address=client_address(request),
                **detail,
            )
            return
        self.refusals.record(
            kind,
            address=client_address(request),
            reason=error.error,
            client_id=client.client_id if client is not None else None,
            claimed_client_id=form.get("client_id"),
            **detail,
        )

    async def _revoke(self, request: Request) -> Response:
        def revoke(client: Client, form: dict[str, str]) -> dict[str, Any]:
            revocation.revoke(self, client, form, client_address(request))
            return {}

        # A revocation is not held back by facts that may be behind: it only takes away.
        return await self._client_request(
            request, revoke, "revocation.refused", facts_current=False
        )

    async def _introspect(self, request: Request) -> Response:
        """RFC 7662: its refusals (a client not allowed to, a wrong secret, no token) are
        audited as ``introspection.refused``; its answers, active or not, as
        ``token.introspected`` (`bastion.oauth.introspection`)."""
        return await self._client_request(
            request,
            functools.partial(introspection.introspect, self, address=client_address(request)),
            "introspection.refused",
        )
