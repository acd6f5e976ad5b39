"""Logging in to bastion through the company's OpenID provider: bastion's authorization server as
an OpenID Connect relying party (OpenID Connect Core 1.0 §3.1, the authorization code flow).

Each provider of ``[[identity.providers]]`` is found by OpenID Connect Discovery 1.0 (read again
when its lifetime ends: `bastion.oauth.remote_metadata`); a login sends the browser to it with
its ``acr_values`` when set, and PKCE S256 (RFC 7636), a ``state`` and a ``nonce``, all kept on
the server under the digest of ``state`` and bound to the browser's cookie, usable once and for a
few minutes. The answer comes back to the provider's own redirect URI, where ``state`` is spent
first (a replay finds nothing), the RFC 9207 ``iss`` must name that provider when sent (and must
be sent when the provider says it sends it: mix-up defence), and the code is exchanged once,
bastion's client authenticated as the provider announces it takes (its secret, or its own key:
``private_key_jwt``, `bastion.identity.client_key`). The ID token is checked as Core §3.1.3.7
says, with joserfc: an asymmetric ``alg`` of the provider's list that the provider announces in
its discovery document (never ``none``, never an HMAC), the signature by the provider's JWKS,
``iss`` exactly, ``aud`` holding the client id (and ``azp`` being it when there are several
audiences), ``exp``, ``iat``, the ``nonce``, ``acr`` among ``required_acr`` when that is set, and
``at_hash`` when it holds one, and its ``acr`` and ``amr`` well formed when present: how the
person signed in, kept with the session and the grant (`bastion.oauth.sign_in_context`). A
multi-tenant provider (Entra ID's ``/organizations``: its discovery document's ``issuer`` is a
template holding ``{tenantid}``) is taken only with ``tenants`` listed: an ID token's ``tid`` must
be one of them and its ``iss`` the template with that ``tid``, and the person's account is
(provider, tenant, sub), a ``sub`` being unique only within its tenant. The
person then resumes what they came for (the MCP client's authorization request: consent, code,
token; or a page of bastion) as after a password login.

Claims map to the user id (namespaced per provider by default) and, by configuration, to facts
(`FactMapping`), which each login puts in step with the claims and which expire when the person
stops logging in.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import anyio
import httpx
from joserfc import jws
from joserfc.errors import JoseError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion import untrusted_json
from bastion.constant_time import same
from bastion.facts.model import Entity, FactError, fact_from_json, fact_to_json
from bastion.facts.store import StoredFact, check_storable
from bastion.http_caching import KeptAnswers
from bastion.identity.accounts import MIGRATIONS, account_taken, bound_elsewhere
from bastion.identity.client_key import METHOD as PRIVATE_KEY_JWT
from bastion.identity.client_key import client_assertion
from bastion.identity.id_token import (
    ANNOUNCED,
    check_acr,
    check_at_hash,
    check_auth_time,
    check_claims,
    expected_issuer,
    sign_in_context,
    signed_claims,
    signing_algorithms,
)
from bastion.identity.providers import (
    PROVIDERS_TABLE,
    IdentitySettings,
    LoginRefused,
    OpenIDProvider,
    ProviderUnavailable,
    url_problem,
)
from bastion.identity.tenants import issuer_template, tenant_account, tenant_issuer
from bastion.names import UNVERIFIED_EMAIL, readable, vouched_for
from bastion.oauth import pages, pkce
from bastion.oauth.client_assertion import jwks_problem
from bastion.oauth.jwks import (
    FetchLimits,
    HeaderRefused,
    RemoteDocumentError,
    RemoteKeySets,
    fetch,
    fetch_json_answer,
    protected_header,
)
from bastion.oauth.remote_metadata import RemoteMetadata
from bastion.oauth.sign_in import (
    CSRF_PURPOSE,
    FORM_SECONDS,
    browser_cookie,
    local_path,
    set_session_cookie,
    start_session,
)
from bastion.oauth.sign_in_context import SignInContext
from bastion.oauth.store import digest, new_secret
from bastion.oauth.throttle import client_address

if TYPE_CHECKING:
    from bastion.oauth.server import AuthorizationServer

log = logging.getLogger("bastion.identity.oidc_login")

# The ID token and the token endpoint's answer: far larger than any real one.
MAX_ID_TOKEN_CHARS = 16_384
# The longest user id made from a claim (a bastion username is at most 128 characters).
MAX_USER_ID = 128


@dataclass(frozen=True)
class _Endpoints:
    authorization: str
    token: str
    jwks_uri: str
    userinfo: str  # "" when the provider has no UserInfo endpoint
    sends_iss: bool  # authorization_response_iss_parameter_supported (RFC 9207 §3)
    # The provider's ``algorithms`` it announces for ID tokens (`signing_algorithms`).
    algorithms: tuple[str, ...]
    # How bastion authenticates at the token endpoint (`_client_authentication`), and for
    # private_key_jwt the alg and aud of its assertions.
    client_auth: str
    assertion_alg: str | None
    assertion_audience: str
    # A multi-tenant provider's issuer template (its metadata's issuer, holding {tenantid});
    # None: the provider's issuer is its own (`expected_issuer`).
    issuer_template: str | None = None

    def answer_issuers(self, provider: OpenIDProvider) -> frozenset[str]:
        """The RFC 9207 ``iss`` an authorization response of ``provider`` may name: its issuer,
        or each listed tenant's."""
        if self.issuer_template is None:
            return frozenset((provider.issuer,))
        return frozenset(tenant_issuer(self.issuer_template, t) for t in provider.tenants)


@dataclass(frozen=True)
class _LoginState:
    provider: str
    browser_digest: str
    nonce: str
    code_verifier: str
    request_id: str | None
    next_path: str | None
    max_age: int | None  # asked of the provider (Core §3.1.2.1); None: not asked


class OpenIDLogin:
    """The provider logins of one authorization server: `routes` to mount, `choices` for the
    login pages, and `passwords_allowed` for its password forms."""

    def __init__(
        self,
        settings: IdentitySettings,
        server: AuthorizationServer,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.server = server
        self.clock = server.clock
        self.transport = transport
        self.db = server.db
        self.db.migrate("identity", MIGRATIONS)
        # Told (provider id, account sub, user) on the event loop after each sign-in committed;
        # each must return at once and never raise (the server composes the Shared Signals
        # receiver's here, which adds the account to its streams: identity/ never calls
        # signals/).
        self.on_signed_in: list[Callable[[str, str, str], None]] = []
        self._metadata = {
            p.id: RemoteMetadata.of(
                p,
                FetchLimits.of_issuer(p, PROVIDERS_TABLE),
                functools.partial(self._discover, p),
                table=PROVIDERS_TABLE,
                peer=p.id,
                clock=self.clock,
            )
            for p in settings.providers
        }
        # The key set, token and UserInfo endpoints are named by the provider's discovery
        # document, not by the operator: reached only where its allow_private_addresses allows.
        self._key_sets = {
            p.id: RemoteKeySets(
                FetchLimits.of_issuer_metadata(p, PROVIDERS_TABLE),
                check=jwks_problem,
                clock=self.clock,
                transport=transport,
            )
            for p in settings.providers
        }

    @property
    def passwords_allowed(self) -> bool:
        return self.settings.local_passwords

    def choices(self) -> list[tuple[str, str]]:
        """(the URL a login form posts to, the provider's name) for each provider."""
        base = self.server.settings.issuer_path
        return [(f"{base}/login/{p.id}", p.shown_name) for p in self.settings.providers]

    def redirect_uri(self, provider: OpenIDProvider) -> str:
        """The provider's own redirect URI at bastion, to register at the provider."""
        return self.server.settings.endpoint(f"login/{provider.id}/callback")

    def routes(self) -> list[Route]:
        prefix = self.server.settings.issuer_path
        return [
            self.server.form_route(f"{prefix}/login/{{provider}}", self.start),
            Route(f"{prefix}/login/{{provider}}/callback", self.callback, methods=["GET"]),
        ]

    # -- starting a login ------------------------------------------------------------------

    async def start(self, request: Request) -> Response:
        """``POST <issuer>/login/<provider>`` from a login page: the form names what to resume
        (an authorization request, or ``next`` for the sign-in page) and carries its CSRF token;
        the browser is sent to the provider."""
        provider = self.settings.provider(request.path_params["provider"])
        if provider is None:
            return pages.error_page("invalid_request", "no such identity provider", 404)
        form = await request.form()
        browser = browser_cookie(request, self.server)
        try:
            request_id, next_path, max_age = await self._resumed(request, form, browser)
            endpoints = await self._provider_endpoints(provider)
        except LoginRefused as refused:
            return await self._refused(request, provider, refused)
        except ProviderUnavailable as down:
            return await self._unavailable(request, provider, down)
        verifier = new_secret(48)  # 64 base64url characters (RFC 7636 §4.1)
        challenge = pkce.s256(verifier)
        state, nonce = new_secret(), new_secret()
        login = _LoginState(
            provider.id, digest(browser), nonce, verifier, request_id, next_path or None, max_age
        )
        await run_in_threadpool(self._save_state, state, login)
        query = {
            "response_type": "code",
            "client_id": provider.client_id,
            "redirect_uri": self.redirect_uri(provider),
            "scope": " ".join(provider.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        if max_age is not None:
            # The client asked for a recent sign-in (a step-up): the provider's session must not
            # stand in for it. Checked against the ID token's auth_time (`check_auth_time`);
            # prompt=login as well for 0, for providers that act on prompt and not on max_age.
            query["max_age"] = str(max_age)
            if max_age == 0:
                query["prompt"] = "login"
        if provider.acr_values:
            # Core §3.1.2.1: a voluntary claim; the ID token's acr is checked when required_acr
            # is set (`check_acr`), whatever the provider made of this.
            query["acr_values"] = " ".join(provider.acr_values)
        separator = "&" if "?" in endpoints.authorization else "?"
        return pages.redirect(f"{endpoints.authorization}{separator}{urlencode(query)}")

    async def _resumed(
        self, request: Request, form, browser: str
    ) -> tuple[str | None, str, int | None]:
        """What the login resumes, once the form's CSRF token and the browser are checked: an
        authorization request's id, or a local path of bastion's pages; and the request's
        ``max_age`` (`PendingAuthorization.max_age`)."""
        csrf = str(form.get("csrf_token", ""))
        request_id = str(form.get("request_id", ""))
        if request_id:
            pending = await run_in_threadpool(self.server.store.pending, request_id, self.clock())
            if pending is None:
                raise LoginRefused(
                    "unknown_request", "This authorization request is unknown or expired."
                )
            if not (
                csrf
                and browser
                and same(csrf, pending.csrf_token)
                and same(digest(browser), pending.browser_digest)
            ):
                raise LoginRefused(
                    "csrf", "The form is missing its CSRF token or comes from another browser.", 403
                )
            return request_id, "", pending.max_age
        next_path = local_path(str(form.get("next", "")))
        if next_path is None:
            raise LoginRefused(
                "next", "The address to go to after signing in must be a page of this server."
            )
        if not self.server.form_tokens.valid(csrf, CSRF_PURPOSE, browser, FORM_SECONDS):
            raise LoginRefused(
                "csrf", "This form expired or came from another page. Sign in again.", 403
            )
        return None, next_path, None

    def _save_state(self, state: str, login: _LoginState) -> None:
        now = self.clock()
        self.db.execute("DELETE FROM identity_login_states WHERE expires_at < ?", (now,))
        self.db.execute(
            "INSERT INTO identity_login_states (state_digest, provider, browser_digest, nonce,"
            " code_verifier, request_id, next_path, max_age, expires_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                digest(state),
                login.provider,
                login.browser_digest,
                login.nonce,
                login.code_verifier,
                login.request_id,
                login.next_path,
                login.max_age,
                now + self.settings.login_seconds,
            ),
        )

    def _spend_state(self, state: str) -> _LoginState | None:
        """The login ``state`` names, deleted as it is read: a second answer finds nothing."""
        rows = self.db.execute(
            "DELETE FROM identity_login_states WHERE state_digest = ? AND expires_at > ?"
            " RETURNING provider, browser_digest, nonce, code_verifier, request_id, next_path,"
            " max_age",
            (digest(state), self.clock()),
        )
        return _LoginState(*rows[0]) if rows else None

    # -- the provider's answer -------------------------------------------------------------

    async def callback(self, request: Request) -> Response:
        """``GET <issuer>/login/<provider>/callback``: the provider's authorization response."""
        provider = self.settings.provider(request.path_params["provider"])
        if provider is None:
            return pages.error_page("invalid_request", "no such identity provider", 404)
        try:
            return await self._answered(request, provider)
        except LoginRefused as refused:
            return await self._refused(request, provider, refused)
        except ProviderUnavailable as down:
            return await self._unavailable(request, provider, down)

    async def _answered(self, request: Request, provider: OpenIDProvider) -> Response:
        query = request.query_params
        repeated = sorted({k for k in query if len(query.getlist(k)) > 1})
        if repeated:
            raise LoginRefused("request", f"The answer repeats {readable(', '.join(repeated))}.")
        state = query.get("state", "")
        if not state:
            raise LoginRefused("state", "The provider's answer has no state: start again.")
        login = await run_in_threadpool(self._spend_state, state)
        if login is None:
            raise LoginRefused(
                "state", "This login is unknown, expired or already used: start again."
            )
        browser = browser_cookie(request, self.server)
        if not (browser and same(digest(browser), login.browser_digest)):
            raise LoginRefused("browser", "This login was started in another browser.", 403)
        if login.provider != provider.id:
            raise LoginRefused(
                "mix_up", "This answer comes back for another provider than the one asked.", 403
            )
        endpoints = await self._provider_endpoints(provider)
        iss = query.get("iss")
        if iss is not None and iss not in endpoints.answer_issuers(provider):
            raise LoginRefused(
                "mix_up",
                f"The answer comes from {readable(iss)}, not {provider.issuer}."
                if endpoints.issuer_template is None
                else f"The answer comes from {readable(iss)}, the issuer of none of the tenants"
                f" taken ({PROVIDERS_TABLE} tenants).",
            )
        if iss is None and endpoints.sends_iss:
            raise LoginRefused("mix_up", "The answer lacks the iss its provider always sends.")
        if error := query.get("error"):
            # Anyone can send a browser here with any error text: shown (and recorded) as
            # `readable` shows what others wrote, escaped and cut, never as it came.
            described = query.get("error_description")
            raise LoginRefused(
                "provider_error",
                f"The provider refused: {readable(error)}"
                + (f" ({readable(described)})" if described else ""),
                403,
            )
        code = query.get("code")
        if not code:
            raise LoginRefused("code", "The provider's answer has no code.")
        answer = await self._redeem(provider, endpoints, code, login.code_verifier)
        id_token = answer.get("id_token")
        if not isinstance(id_token, str) or len(id_token) > MAX_ID_TOKEN_CHARS:
            raise LoginRefused("id_token", "The provider sent no usable ID token.")
        claims, tenant = await self._verified_claims(
            provider, endpoints, id_token, login.nonce, answer.get("access_token")
        )
        if iss is not None and iss != claims["iss"]:
            # A multi-tenant provider's answer names one tenant's issuer, its ID token another's.
            raise LoginRefused(
                "mix_up",
                f"The answer comes from {readable(iss)}, and its ID token from"
                f" {readable(claims['iss'])}.",
            )
        check_auth_time(claims, login.max_age, self.clock(), provider.leeway_seconds)
        check_acr(claims, provider.required_acr)
        # The ID token's own, before UserInfo adds anything: an unsigned answer does not say
        # how the person signed in.
        sign_in = sign_in_context(claims)
        if provider.userinfo:
            # The ID token's own claims win: UserInfo only adds what it lacks.
            claims = {**await self._userinfo(provider, endpoints, answer, claims["sub"]), **claims}
        account = tenant_account(claims["sub"], tenant)
        username = await run_in_threadpool(
            self._signed_in, provider, claims, request, tenant, account
        )
        for told in self.on_signed_in:
            try:
                told(provider.id, account, username)
            except Exception:  # the person is signed in whatever a listener does
                log.exception("a sign-in's listener failed; the sign-in stands")
        return await self._resume(request, login, username, sign_in)

    async def _redeem(
        self, provider: OpenIDProvider, endpoints: _Endpoints, code: str, verifier: str
    ) -> dict[str, Any]:
        """The token endpoint's answer for ``code`` (Core §3.1.3.1), within the limits."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri(provider),
            "code_verifier": verifier,
        }
        headers = {"Accept": "application/json"}
        if endpoints.client_auth == "client_secret_basic":
            # RFC 6749 §2.3.1: each part form-encoded before the Basic encoding.
            pair = f"{quote(provider.client_id, safe='')}:{quote(provider.client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        else:
            form["client_id"] = provider.client_id
            if endpoints.client_auth == "client_secret_post":
                form["client_secret"] = provider.client_secret
            elif endpoints.client_auth == PRIVATE_KEY_JWT:
                # A signature: on a worker thread, as every one bastion makes.
                form.update(
                    await anyio.to_thread.run_sync(
                        client_assertion,
                        provider.client_key,
                        provider.client_id,
                        endpoints.assertion_audience,
                        endpoints.assertion_alg,
                        self.clock(),
                    )
                )
        status, answer = await self._call(
            provider, "token endpoint", endpoints.token, form, headers
        )
        error = answer.get("error") if isinstance(answer, dict) else None
        if status in (400, 401) and error == "invalid_client":
            # RFC 6749 §5.2: bastion's own credentials are refused. The person can do nothing
            # about it; the page says what an administrator checks.
            described = answer.get("error_description")
            raise LoginRefused(
                "client_auth",
                f"{provider.shown_name} refused bastion's own credentials at its token endpoint"
                f" (invalid_client{': ' + readable(str(described)) if described else ''}):"
                " nobody can sign in through it until an administrator fixes"
                f" {_credentials(endpoints.client_auth)}.",
                502,
            )
        if status == 400 and isinstance(answer, dict):
            # RFC 6749 §5.2: the code is refused (used, expired, not for this client).
            raise LoginRefused("code", f"The provider refused the code: {readable(repr(error))}.")
        if status != 200:
            raise ProviderUnavailable(f"its token endpoint answered HTTP {status}")
        if not isinstance(answer, dict):
            raise ProviderUnavailable("its token endpoint sent no JSON object")
        return answer

    async def _userinfo(
        self, provider: OpenIDProvider, endpoints: _Endpoints, answer: dict, sub: str
    ) -> dict[str, Any]:
        """The UserInfo endpoint's claims (Core §5.3), for providers that put the claims of
        scopes there rather than in the ID token; its ``sub`` must be the ID token's (§5.3.4)."""
        token = answer.get("access_token")
        if not endpoints.userinfo or not isinstance(token, str):
            raise ProviderUnavailable("it has no userinfo_endpoint, or sent no access token")
        headers = {"Accept": "application/json", "Authorization": f"Bearer {token}"}
        status, claims = await self._call(
            provider, "userinfo endpoint", endpoints.userinfo, None, headers
        )
        if status != 200 or not isinstance(claims, dict):
            raise ProviderUnavailable(f"its userinfo endpoint answered HTTP {status}")
        if claims.get("sub") != sub:
            raise LoginRefused("userinfo", "The provider's UserInfo is about someone else (sub).")
        return claims

    async def _call(
        self,
        provider: OpenIDProvider,
        what: str,
        url: str,
        form: dict[str, str] | None,
        headers: dict[str, str],
    ) -> tuple[int, Any]:
        """POST ``form`` (or GET, without one) to one of the endpoints the provider's discovery
        document names, within its deadline and size cap, no redirects followed, and only at
        the addresses its ``allow_private_addresses`` allows (`FetchLimits.of_issuer_metadata`);
        (status, the JSON body or None)."""
        limits = FetchLimits.of_issuer_metadata(provider, PROVIDERS_TABLE)
        method = "POST" if form is not None else "GET"
        try:
            status, body = await fetch(
                method, url, limits, self.transport, data=form, headers=headers
            )
        except RemoteDocumentError as exc:
            raise ProviderUnavailable(f"its {what} {exc}") from None
        try:
            return status, untrusted_json.loads(body)
        except untrusted_json.JsonRefused as exc:
            if status == 200:
                raise ProviderUnavailable(f"its {what} sent no JSON: {exc}") from None
            return status, None

    async def _verified_claims(
        self,
        provider: OpenIDProvider,
        endpoints: _Endpoints,
        id_token: str,
        nonce: str,
        access_token: Any,
    ) -> tuple[dict[str, Any], str | None]:
        """The ID token's claims once checked as OpenID Connect Core §3.1.3.7 says, and its
        ``at_hash`` against ``access_token`` when it has one (§3.1.3.8); and its tenant, of a
        multi-tenant provider (`expected_issuer`), else None."""
        try:
            header = protected_header(jws.extract_compact(id_token.encode("ascii")))
        except HeaderRefused as e:
            raise LoginRefused("id_token", f"The ID token's {readable(str(e))}") from None
        except (JoseError, UnicodeError, ValueError):
            raise LoginRefused("id_token", "The ID token is not a signed JWT.") from None
        alg = header.get("alg")
        if alg not in endpoints.algorithms:
            raise LoginRefused(
                "alg",
                f"The ID token's alg {readable(repr(alg))} is not one of"
                f" {list(endpoints.algorithms)} (those of [[identity.providers]] algorithms"
                f" that the provider announces in {ANNOUNCED}).",
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise LoginRefused("kid", "The ID token's kid is not a string.")
        try:
            keys = await self._key_sets[provider.id].keys(endpoints.jwks_uri, kid)
        except RemoteDocumentError as exc:
            raise ProviderUnavailable(f"its key set {exc}") from None
        claims = await anyio.to_thread.run_sync(signed_claims, id_token, keys, kid, alg)
        issuer, tenant = expected_issuer(claims, provider, endpoints.issuer_template)
        check_claims(claims, provider, nonce, self.clock(), self.settings.login_seconds, issuer)
        check_at_hash(claims, access_token, alg)
        return claims, tenant

    # -- the person, their facts and the session -------------------------------------------

    def _signed_in(
        self,
        provider: OpenIDProvider,
        claims: dict[str, Any],
        request: Request,
        tenant: str | None,
        account: str,
    ) -> str:
        """In a worker thread (the database): the user (created on first login), the facts of
        the claims put in step, the audit record. ``account`` is the person's at the provider
        (`bastion.identity.tenants.tenant_account`). Returns the username."""
        value = claims.get(provider.user_claim)
        if not isinstance(value, str) or not value:
            raise LoginRefused(
                "claims", f"The ID token has no {provider.user_claim!r} claim to name the user."
            )
        if not vouched_for(claims, provider.user_claim):
            raise LoginRefused("claims", UNVERIFIED_EMAIL)
        username = provider.user_name(value, tenant)
        if len(username) > MAX_USER_ID or not username.isprintable():
            raise LoginRefused("claims", "The user id from the provider is not a usable name.")
        if problem := self.server.store.user_name_problem(username):
            raise LoginRefused("claims", f"The user id from the provider, {problem}.")
        now = self.clock()
        user = Entity("User", username)
        wanted: list[tuple] = []
        for mapping in provider.facts:
            wanted.extend(mapping.facts(user, claims))
        wanted = list(dict.fromkeys(wanted))
        for fact in wanted:
            try:
                check_storable(fact)
            except FactError as e:
                raise LoginRefused(
                    "claims", f"A claim of the provider makes no usable fact: {e}"
                ) from None
        with self.db.transaction():
            # The account is the person's whose sub first signed in to it: a user_claim other
            # than sub (an email, a login name) can pass to another person of the provider,
            # who would otherwise sign in as the first, with their grants, facts, approvals
            # and upstream connections. It stays theirs when they sign in under another name
            # (their address changed, and the old one may be given to someone else). Released
            # only by an administrator (`release_account`).
            if bound_elsewhere(self.db, provider.id, username, account, now) is not None:
                raise LoginRefused(
                    "account_taken", account_taken(username, provider.shown_name), 403
                )
            made = self.db.execute(
                "INSERT INTO oauth_users (username, password_hash, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT (username) DO NOTHING RETURNING username",
                # Not an Argon2 hash: no password ever matches it.
                (username, f"!identity:{provider.id}", now),
            )
            if made:
                self.server.store.user_made()
            disabled = self.db.execute(
                "SELECT disabled_at FROM oauth_users WHERE username = ?", (username,)
            )[0][0]
            if disabled is not None:
                raise LoginRefused("disabled", "This account is disabled.", 403)
            suspended = self.server.refuse_person(username)
            if suspended is not None:
                raise LoginRefused("suspended", suspended, 403)
            rows = self.db.execute(
                "SELECT facts FROM identity_accounts WHERE provider = ? AND subject = ?",
                (provider.id, account),
            )
            before = [fact_from_json(f) for f in json.loads(rows[0][0])] if rows else []
            # A fact an administrator wrote (it never expires) and this provider did not is
            # theirs: a login neither gives it an expiry nor removes it.
            wanted = [
                f
                for f in wanted
                if f in before or not any(s.expires_at is None for s in self.server.facts.get(f))
            ]
            self.db.execute(
                "INSERT INTO identity_accounts (provider, subject, username, facts, last_login_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (provider, subject) DO UPDATE SET"
                " username = excluded.username, facts = excluded.facts,"
                " last_login_at = excluded.last_login_at",
                (
                    provider.id,
                    account,
                    username,
                    json.dumps([fact_to_json(f) for f in wanted]),
                    now,
                ),
            )
        gone = [f for f in before if f not in wanted]
        if wanted or gone:
            self.server.facts.apply(
                [StoredFact(f, now + self.settings.fact_seconds) for f in wanted],
                gone,
                actor=f"identity:{provider.id}",
            )
        self.server.audit.record(
            "login.succeeded",
            subject=username,
            provider=provider.id,
            address=client_address(request),
            facts=len(wanted),
            facts_removed=len(gone),
            **({} if tenant is None else {"tenant": tenant}),
        )
        return username

    async def _resume(
        self, request: Request, login: _LoginState, username: str, sign_in: SignInContext
    ) -> Response:
        """What the person came for, signed in (as ``sign_in`` says, kept with the session and
        the grant): the authorization request (consent or code) or the page of bastion."""
        settings = self.server.settings
        if login.request_id is not None:
            pending = await run_in_threadpool(
                self.server.store.pending, login.request_id, self.clock()
            )
            if pending is None or not same(pending.browser_digest, login.browser_digest):
                raise LoginRefused(
                    "unknown_request",
                    "The application's request expired while you signed in: return to the"
                    " application and start again.",
                )
            client = await self.server.find_client(pending.client_id, client_address(request))
            if client is None or client.revoked_at is not None:
                raise LoginRefused("client", "The application is unknown or revoked.", 403)
            response = await run_in_threadpool(
                self.server.authorization.resume_signed_in, pending, client, username, sign_in
            )
        else:
            next_path = local_path(login.next_path or "")
            if next_path is None:  # checked when the login started; checked again here
                raise LoginRefused("next", "The address to go to is not a page of this server.")
            response = pages.redirect(next_path)
        session = await run_in_threadpool(start_session, self.server, request, username, sign_in)
        set_session_cookie(response, settings, session)
        return response

    # -- the provider's metadata -----------------------------------------------------------

    async def _provider_endpoints(self, provider: OpenIDProvider) -> _Endpoints:
        """The provider's endpoints from its OpenID Connect Discovery document, read again when
        its lifetime ends, the last good one kept through a short outage (`RemoteMetadata`):
        one read at a time, a failure not tried again for ``jwks_refetch_seconds`` (anyone can
        press a login button)."""
        try:
            return await self._metadata[provider.id].get()
        except RemoteDocumentError as exc:
            raise ProviderUnavailable(str(exc)) from None

    async def _discover(
        self, provider: OpenIDProvider, answers: KeptAnswers
    ) -> tuple[_Endpoints, float | None]:
        """The endpoints of the provider's discovery document, each check passed, and the
        lifetime its headers give; `RemoteDocumentError` for a document that cannot be had or
        fails a check (it never replaces a good one)."""
        uri = f"{provider.issuer.rstrip('/')}/.well-known/openid-configuration"
        limits = FetchLimits.of_issuer(provider, PROVIDERS_TABLE)
        try:
            document, lifetime = await fetch_json_answer(uri, limits, self.transport, answers)
        except RemoteDocumentError as exc:
            raise RemoteDocumentError(f"its discovery document {uri} {exc}") from None
        if not isinstance(document, dict):
            raise RemoteDocumentError(f"{uri} is not the metadata of {provider.issuer}")
        template = issuer_template(
            provider.issuer, provider.tenants, uri, document.get("issuer"), PROVIDERS_TABLE
        )
        found = {}
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            problem = url_problem(document.get(name))
            if problem:
                raise RemoteDocumentError(f"its metadata has no usable {name}: {problem}")
            found[name] = document[name]
        userinfo = document.get("userinfo_endpoint") or ""
        if userinfo and url_problem(userinfo):
            raise RemoteDocumentError(f"its metadata has no usable userinfo_endpoint: {userinfo!r}")
        if provider.userinfo and not userinfo:
            raise RemoteDocumentError("it has no userinfo_endpoint, and userinfo = true")
        methods = document.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            raise RemoteDocumentError("it does not support PKCE S256")
        client_auth = _client_authentication(provider, document)
        assertion_alg = None
        if client_auth == PRIVATE_KEY_JWT:
            assertion_alg = _assertion_algorithm(provider, document)
        endpoints = _Endpoints(
            found["authorization_endpoint"],
            found["token_endpoint"],
            found["jwks_uri"],
            userinfo,
            document.get("authorization_response_iss_parameter_supported") is True,
            signing_algorithms(document, provider.algorithms),
            client_auth,
            assertion_alg,
            # OpenID Connect Core §9: the aud SHOULD be the token endpoint's URL; the issuer is
            # what draft-ietf-oauth-rfc7523bis asks for, and what some providers will want.
            provider.issuer
            if provider.client_assertion_audience == "issuer"
            else found["token_endpoint"],
            template,
        )
        return endpoints, lifetime

    # -- refusals ----------------------------------------------------------------------------

    async def _refused(
        self, request: Request, provider: OpenIDProvider, refused: LoginRefused
    ) -> Response:
        await run_in_threadpool(
            functools.partial(
                self.server.refusals.record,
                "login.refused",
                address=client_address(request),
                reason=refused.reason,
                provider=provider.id,
                description=refused.message,
            )
        )
        return pages.message_page("Cannot sign in", refused.message, refused.status)

    async def _unavailable(
        self, request: Request, provider: OpenIDProvider, down: ProviderUnavailable
    ) -> Response:
        await run_in_threadpool(
            functools.partial(
                self.server.refusals.record,
                "login.refused",
                address=client_address(request),
                reason="provider_unavailable",
                provider=provider.id,
                description=str(down),
            )
        )
        response = pages.message_page(
            "Cannot sign in",
            f"{provider.shown_name} cannot be reached now, so nobody can sign in through it:"
            f" {down}. Try again in a moment.",
            503,
        )
        response.headers["Retry-After"] = "5"
        return response


AUTH_METHODS_ANNOUNCED = "token_endpoint_auth_methods_supported"
ASSERTION_ALGS_ANNOUNCED = "token_endpoint_auth_signing_alg_values_supported"


def _names(document: Mapping[str, Any], member: str) -> list[str] | None:
    """The list of names ``member`` of a discovery document holds, None when it is left out;
    `RemoteDocumentError` when it is not a list of names."""
    value = document.get(member)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RemoteDocumentError(
            f"its metadata's {member} is not a list of names: {readable(repr(value))}"
        )
    return value


def _client_authentication(provider: OpenIDProvider, document: Mapping[str, Any]) -> str:
    """How bastion authenticates at the provider's token endpoint: its
    ``token_endpoint_auth_method``, which must be one the provider announces (Discovery 1.0 §3,
    ``token_endpoint_auth_methods_supported``; when left out, anything configured is tried);
    unset, client_secret_basic, or client_secret_post where only that is announced.
    ``none`` is not checked: providers seldom list it, and public clients use it."""
    announced = _names(document, AUTH_METHODS_ANNOUNCED)
    method = provider.token_endpoint_auth_method
    if announced is None or method == "none":
        return method or "client_secret_basic"
    if method is None:
        method = next(
            (m for m in ("client_secret_basic", "client_secret_post") if m in announced), None
        )
        if method is None:
            raise RemoteDocumentError(
                f"its token endpoint takes no client secret ({AUTH_METHODS_ANNOUNCED}:"
                f" {readable(repr(announced[:10]))}): set token_endpoint_auth_method to one of"
                f" them ({PROVIDERS_TABLE})"
            )
        return method
    if method not in announced:
        raise RemoteDocumentError(
            f"its token endpoint does not take {method} ({AUTH_METHODS_ANNOUNCED}:"
            f" {readable(repr(announced[:10]))}; {PROVIDERS_TABLE} token_endpoint_auth_method)"
        )
    return method


def _assertion_algorithm(provider: OpenIDProvider, document: Mapping[str, Any]) -> str:
    """The alg of bastion's client assertions to the provider: the first its key signs with
    that the provider announces (Discovery 1.0 §3,
    ``token_endpoint_auth_signing_alg_values_supported``; left out: the key's first)."""
    key = provider.client_key
    assert key is not None  # private_key_jwt has one (`bastion.identity.providers`)
    announced = _names(document, ASSERTION_ALGS_ANNOUNCED)
    alg = key.algorithm(announced)
    if alg is None:
        raise RemoteDocumentError(
            f"it takes client assertions signed with {readable(repr(announced[:10]))}"
            f" ({ASSERTION_ALGS_ANNOUNCED}), none of {list(key.algorithms)}, those of the key"
            f" of {key.file} ({PROVIDERS_TABLE} client_key_file, client_assertion_alg)"
        )
    return alg


def _credentials(method: str) -> str:
    """What an administrator checks when the provider refuses bastion's client."""
    if method == PRIVATE_KEY_JWT:
        return (
            f"{PROVIDERS_TABLE} client_id and client_key_file, or the public key registered for"
            " bastion at the provider (`bastion identity client-jwks` prints it)"
        )
    if method == "none":
        return f"{PROVIDERS_TABLE} client_id, or make bastion's client at the provider public"
    return f"{PROVIDERS_TABLE} client_id and client_secret ({method})"


def compose(server: AuthorizationServer, table: Any, env: Mapping[str, str]) -> OpenIDLogin | None:
    """The provider logins of ``server`` from the ``[identity]`` table, attached to it; None
    when no provider is configured."""
    settings = IdentitySettings.from_mapping(table, env)
    if not settings.providers:
        return None
    # The private keys of private_key_jwt: read here, at start, before the event loop runs.
    settings = settings.with_keys()
    login = OpenIDLogin(settings, server)
    server.external_login = login
    return login
