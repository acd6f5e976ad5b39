"""Logging in to bastion through the company's OpenID provider: bastion's authorization server as
an OpenID Connect relying party (OpenID Connect Core 1.0 §3.1, the authorization code flow).

Each provider of ``[[identity.providers]]`` is found by OpenID Connect Discovery 1.0; a login
sends the browser to it with PKCE S256 (RFC 7636), a ``state`` and a ``nonce``, all kept on the
server under the digest of ``state`` and bound to the browser's cookie, usable once and for a
few minutes. The answer comes back to the provider's own redirect URI, where ``state`` is spent
first (a replay finds nothing), the RFC 9207 ``iss`` must name that provider when sent (and must
be sent when the provider says it sends it: mix-up defence), and the code is exchanged once. The
ID token is checked as Core §3.1.3.7 says, with joserfc: an asymmetric ``alg`` of the provider's
list (never ``none``, never an HMAC), the signature by the provider's JWKS, ``iss`` exactly,
``aud`` holding the client id (and ``azp`` being it when there are several audiences), ``exp``,
``iat`` and the ``nonce``. The person then resumes what they came for (the MCP client's
authorization request: consent, code, token; or a page of bastion) as after a password login.

Claims map to the user id (namespaced per provider by default) and, by configuration, to facts
(`FactMapping`), which each login puts in step with the claims and which expire when the person
stops logging in.
"""

from __future__ import annotations

import base64
import functools
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import anyio
import httpx
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from bastion import untrusted_json
from bastion.facts.model import Entity, fact_from_json, fact_to_json
from bastion.facts.store import StoredFact
from bastion.oauth import pages, pkce
from bastion.oauth.client_assertion import ASYMMETRIC_ALGORITHMS, jwks_problem, jwks_uri_problem
from bastion.oauth.jwks import FetchLimits, RemoteDocumentError, RemoteKeySets, fetch_json
from bastion.oauth.sign_in import (
    BROWSER_COOKIE,
    CSRF_PURPOSE,
    FORM_SECONDS,
    SESSION_COOKIE,
    local_path,
    set_cookie,
)
from bastion.oauth.store import digest, new_secret
from bastion.oauth.throttle import client_address

if TYPE_CHECKING:
    from bastion.oauth.server import AuthorizationServer

_MIGRATIONS = [
    """
    CREATE TABLE identity_login_states (
        state_digest TEXT PRIMARY KEY,
        provider TEXT NOT NULL,
        browser_digest TEXT NOT NULL,
        nonce TEXT NOT NULL,
        code_verifier TEXT NOT NULL,
        request_id TEXT,
        next_path TEXT,
        expires_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE identity_accounts (
        provider TEXT NOT NULL,
        subject TEXT NOT NULL,
        username TEXT NOT NULL,
        facts TEXT NOT NULL,
        last_login_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (provider, subject)
    );
    """,
]

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PROVIDER_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
# The ID token and the token endpoint's answer: far larger than any real one.
MAX_ID_TOKEN_CHARS = 16_384
# The longest user id made from a claim (a bastion username is at most 128 characters).
MAX_USER_ID = 128
# Values of one claim turned into facts at one login; more are refused (a claim this large is a
# mistake of the mapping or of the provider).
MAX_FACT_VALUES = 500
_PREDICATES = ("has_role", "has_relation")
_PROVIDER_KEYS = {
    "id",
    "name",
    "issuer",
    "client_id",
    "client_secret",
    "scopes",
    "user_claim",
    "user_prefix",
    "algorithms",
    "token_endpoint_auth_method",
    "leeway_seconds",
    "timeout_seconds",
    "max_document_bytes",
    "jwks_cache_seconds",
    "jwks_refetch_seconds",
    "userinfo",
    "facts",
}
_IDENTITY_KEYS = {"providers", "local_passwords", "fact_seconds", "login_seconds"}


class IdentityConfigError(ValueError):
    """A value of the ``[identity]`` table that cannot be used; the message names its key."""


class ProviderUnavailable(Exception):
    """The provider's metadata, keys or token endpoint cannot be had now: nobody logs in."""


class LoginRefused(Exception):
    """A provider login that must not succeed: ``reason`` is recorded, ``message`` shown."""

    def __init__(self, reason: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status


@dataclass(frozen=True)
class FactMapping:
    """One ``[[identity.providers.facts]]`` table: each value of ``claim`` (a string or a list
    of strings) becomes ``has_role(User, name, resource)`` or ``has_relation(resource, name,
    User)``; ``{value}`` in ``name`` or in the resource's id stands for the claim's value."""

    claim: str
    predicate: str
    name: str
    resource_type: str
    resource_id: str
    values: tuple[str, ...] | None = None  # None: every value; else only these

    def facts(self, user: Entity, claims: Mapping[str, Any]) -> list[tuple]:
        found = claims.get(self.claim)
        if isinstance(found, str):
            found = [found]
        if not isinstance(found, list):
            return []
        values = [v for v in found if isinstance(v, str) and v]
        if len(values) > MAX_FACT_VALUES:
            raise LoginRefused(
                "claims",
                f"the claim {self.claim!r} holds more than {MAX_FACT_VALUES} values",
            )
        if self.values is not None:
            values = [v for v in values if v in self.values]
        out = []
        for value in dict.fromkeys(values):
            name = self.name.replace("{value}", value)
            resource = Entity(self.resource_type, self.resource_id.replace("{value}", value))
            if self.predicate == "has_role":
                out.append(("has_role", user, name, resource))
            else:
                out.append(("has_relation", resource, name, user))
        return out


@dataclass(frozen=True)
class OpenIDProvider:
    """One ``[[identity.providers]]`` table (docs/identity.md)."""

    id: str
    issuer: str
    client_id: str
    client_secret: str = field(default="", repr=False)
    name: str = ""
    scopes: tuple[str, ...] = ("openid",)
    user_claim: str = "sub"
    user_prefix: str = ""
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256", "EdDSA")
    token_endpoint_auth_method: str = "client_secret_basic"
    leeway_seconds: int = 30
    timeout_seconds: int = 5
    max_document_bytes: int = 65536
    jwks_cache_seconds: int = 300
    jwks_refetch_seconds: int = 30
    # Read the UserInfo endpoint too (its claims complete the ID token's).
    userinfo: bool = False
    facts: tuple[FactMapping, ...] = ()

    @property
    def shown_name(self) -> str:
        return self.name or self.id


@dataclass(frozen=True)
class IdentitySettings:
    """The ``[identity]`` table: the providers, whether local passwords are kept beside them,
    how long facts from claims last after the last login, and how long a login may take."""

    providers: tuple[OpenIDProvider, ...] = ()
    local_passwords: bool = True
    fact_seconds: int = 7 * 24 * 3600
    login_seconds: int = 600

    def provider(self, provider_id: str) -> OpenIDProvider | None:
        return next((p for p in self.providers if p.id == provider_id), None)

    @classmethod
    def from_mapping(cls, table: Any, env: Mapping[str, str]) -> IdentitySettings:
        """Read ``[identity]``; `IdentityConfigError` names the key at fault. ``${NAME}`` in a
        client secret is taken from ``env``."""
        if not isinstance(table, Mapping):
            raise IdentityConfigError("identity: a table")
        unknown = sorted(set(table) - _IDENTITY_KEYS)
        if unknown:
            raise IdentityConfigError(
                f"unknown key identity.{unknown[0]}; known keys: {', '.join(sorted(_IDENTITY_KEYS))}"
            )
        raw = table.get("providers", [])
        if not isinstance(raw, list):
            raise IdentityConfigError("identity.providers must be an array of tables")
        providers = tuple(_provider(i, p, env) for i, p in enumerate(raw))
        ids = [p.id for p in providers]
        if len(set(ids)) != len(ids):
            raise IdentityConfigError("identity.providers: each id may appear only once")
        local = table.get("local_passwords", not providers)
        if not isinstance(local, bool):
            raise IdentityConfigError("identity.local_passwords: true or false")
        if not local and not providers:
            raise IdentityConfigError(
                "identity.local_passwords = false needs at least one provider: nobody could log in"
            )
        numbers = {
            key: _whole(f"identity.{key}", table.get(key, default), 1)
            for key, default in (("fact_seconds", 7 * 24 * 3600), ("login_seconds", 600))
        }
        return cls(providers=providers, local_passwords=local, **numbers)


def _whole(where: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= 2**31:
        raise IdentityConfigError(f"{where}: a whole number from {minimum} to 2**31, got {value!r}")
    return value


def _text(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise IdentityConfigError(f"{where} must be a non-empty string")
    return value


def _expand(where: str, value: str, env: Mapping[str, str]) -> str:
    def sub(match: re.Match) -> str:
        if match.group(1) not in env:
            raise IdentityConfigError(
                f"{where} names ${{{match.group(1)}}} but the environment has no {match.group(1)}"
            )
        return env[match.group(1)]

    return _ENV.sub(sub, value)


def _url_problem(value: Any) -> str | None:
    problem = jwks_uri_problem(value)  # https, or http to a loopback address; no fragment
    return problem.replace("jwks_uri must be", "must be") if problem else None


def _provider(index: int, table: Any, env: Mapping[str, str]) -> OpenIDProvider:
    where = f"identity.providers[{index}]"
    if not isinstance(table, Mapping):
        raise IdentityConfigError(f"{where}: a table with id, issuer and client_id")
    unknown = sorted(set(table) - _PROVIDER_KEYS)
    if unknown:
        raise IdentityConfigError(
            f"unknown key {where}.{unknown[0]}; known keys: {', '.join(sorted(_PROVIDER_KEYS))}"
        )
    provider_id = table.get("id")
    if not isinstance(provider_id, str) or not _PROVIDER_ID.fullmatch(provider_id):
        raise IdentityConfigError(
            f"{where}.id: 1 to 32 lowercase letters, digits or '-' (it is in the redirect URI),"
            f" got {provider_id!r}"
        )
    issuer = table.get("issuer")
    problem = _url_problem(issuer)
    if problem:
        raise IdentityConfigError(f"{where}.issuer: {problem}")
    values: dict[str, Any] = {
        "id": provider_id,
        "issuer": issuer,
        "client_id": _text(f"{where}.client_id", table.get("client_id")),
        "user_prefix": f"{provider_id}:",
    }
    if "client_secret" in table:
        values["client_secret"] = _expand(
            f"{where}.client_secret", _text(f"{where}.client_secret", table["client_secret"]), env
        )
    for key in ("name", "user_claim"):
        if key in table:
            values[key] = _text(f"{where}.{key}", table[key])
    if "user_prefix" in table:
        if not isinstance(table["user_prefix"], str) or len(table["user_prefix"]) > 64:
            raise IdentityConfigError(f"{where}.user_prefix: a string of at most 64 characters")
        values["user_prefix"] = table["user_prefix"]
    scopes = table.get("scopes", ["openid"])
    if (
        not isinstance(scopes, list)
        or "openid" not in scopes
        or not all(isinstance(s, str) and s and " " not in s for s in scopes)
    ):
        raise IdentityConfigError(
            f'{where}.scopes: a list of scope names holding "openid", got {scopes!r}'
        )
    values["scopes"] = tuple(dict.fromkeys(scopes))
    algorithms = table.get("algorithms", list(OpenIDProvider.algorithms))
    if (
        not isinstance(algorithms, list)
        or not algorithms
        or any(a not in ASYMMETRIC_ALGORITHMS for a in algorithms)
    ):
        raise IdentityConfigError(
            f"{where}.algorithms: a non-empty list of {list(ASYMMETRIC_ALGORITHMS)} (asymmetric"
            f" only), got {algorithms!r}"
        )
    values["algorithms"] = tuple(algorithms)
    method = table.get("token_endpoint_auth_method", "client_secret_basic")
    if method not in ("client_secret_basic", "client_secret_post", "none"):
        raise IdentityConfigError(
            f"{where}.token_endpoint_auth_method: client_secret_basic, client_secret_post or"
            f" none, got {method!r}"
        )
    if method != "none" and not values.get("client_secret"):
        raise IdentityConfigError(
            f"{where}.client_secret is required with {method} (e.g. client_secret ="
            ' "${IDP_SECRET}")'
        )
    values["token_endpoint_auth_method"] = method
    for key in (
        "leeway_seconds",
        "timeout_seconds",
        "max_document_bytes",
        "jwks_cache_seconds",
        "jwks_refetch_seconds",
    ):
        if key in table:
            values[key] = _whole(f"{where}.{key}", table[key], 0 if key == "leeway_seconds" else 1)
    userinfo = table.get("userinfo", False)
    if not isinstance(userinfo, bool):
        raise IdentityConfigError(f"{where}.userinfo: true or false")
    values["userinfo"] = userinfo
    raw = table.get("facts", [])
    if not isinstance(raw, list):
        raise IdentityConfigError(f"{where}.facts must be an array of tables")
    values["facts"] = tuple(_fact_mapping(f"{where}.facts[{i}]", m) for i, m in enumerate(raw))
    return OpenIDProvider(**values)


def _fact_mapping(where: str, table: Any) -> FactMapping:
    keys = {"claim", "predicate", "name", "resource", "values"}
    if not isinstance(table, Mapping):
        raise IdentityConfigError(f"{where}: a table with claim, predicate, name and resource")
    unknown = sorted(set(table) - keys)
    if unknown:
        raise IdentityConfigError(f"unknown key {where}.{unknown[0]}; known: {sorted(keys)}")
    predicate = table.get("predicate", "has_role")
    if predicate not in _PREDICATES:
        raise IdentityConfigError(f"{where}.predicate: one of {list(_PREDICATES)}")
    resource = _text(f"{where}.resource", table.get("resource"))
    kind, colon, ident = resource.partition(":")
    if not (colon and re.fullmatch(r"[A-Z][A-Za-z0-9_]*", kind) and ident):
        raise IdentityConfigError(
            f'{where}.resource: "Type:id", e.g. "Org:acme" or "Group:{{value}}", got {resource!r}'
        )
    values = table.get("values")
    if values is not None and (
        not isinstance(values, list) or not all(isinstance(v, str) and v for v in values)
    ):
        raise IdentityConfigError(f"{where}.values: a list of claim values")
    return FactMapping(
        claim=_text(f"{where}.claim", table.get("claim")),
        predicate=predicate,
        name=_text(f"{where}.name", table.get("name")),
        resource_type=kind,
        resource_id=ident,
        values=tuple(values) if values is not None else None,
    )


@dataclass(frozen=True)
class _Endpoints:
    authorization: str
    token: str
    jwks_uri: str
    userinfo: str  # "" when the provider has no UserInfo endpoint
    sends_iss: bool  # authorization_response_iss_parameter_supported (RFC 9207 §3)


@dataclass(frozen=True)
class _LoginState:
    provider: str
    browser_digest: str
    nonce: str
    code_verifier: str
    request_id: str | None
    next_path: str | None


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
        self.db.migrate("identity", _MIGRATIONS)
        self._endpoints: dict[str, _Endpoints] = {}
        self._key_sets = {
            p.id: RemoteKeySets(
                FetchLimits(
                    timeout_seconds=p.timeout_seconds,
                    max_bytes=p.max_document_bytes,
                    cache_seconds=p.jwks_cache_seconds,
                    refetch_seconds=p.jwks_refetch_seconds,
                    max_cached=4,
                ),
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
            Route(f"{prefix}/login/{{provider}}", self.start, methods=["POST"]),
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
        browser = request.cookies.get(BROWSER_COOKIE, "")
        try:
            request_id, next_path = await self._resumed(request, form, browser)
            endpoints = await self._provider_endpoints(provider)
        except LoginRefused as refused:
            return await self._refused(request, provider, refused)
        except ProviderUnavailable as down:
            return await self._unavailable(request, provider, down)
        verifier = new_secret(48)  # 64 base64url characters (RFC 7636 §4.1)
        challenge = pkce.s256(verifier)
        state, nonce = new_secret(), new_secret()
        login = _LoginState(
            provider.id, digest(browser), nonce, verifier, request_id, next_path or None
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
        separator = "&" if "?" in endpoints.authorization else "?"
        return RedirectResponse(
            f"{endpoints.authorization}{separator}{urlencode(query)}",
            status_code=303,
            headers={"Cache-Control": "no-store"},
        )

    async def _resumed(self, request: Request, form, browser: str) -> tuple[str | None, str]:
        """What the login resumes, once the form's CSRF token and the browser are checked: an
        authorization request's id, or a local path of bastion's pages."""
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
                and hmac.compare_digest(csrf, pending.csrf_token)
                and hmac.compare_digest(digest(browser), pending.browser_digest)
            ):
                raise LoginRefused(
                    "csrf", "The form is missing its CSRF token or comes from another browser.", 403
                )
            return request_id, ""
        next_path = local_path(str(form.get("next", "")))
        if next_path is None:
            raise LoginRefused(
                "next", "The address to go to after signing in must be a page of this server."
            )
        if not self.server.form_tokens.valid(csrf, CSRF_PURPOSE, browser, FORM_SECONDS):
            raise LoginRefused(
                "csrf", "This form expired or came from another page. Sign in again.", 403
            )
        return None, next_path

    def _save_state(self, state: str, login: _LoginState) -> None:
        now = self.clock()
        self.db.execute("DELETE FROM identity_login_states WHERE expires_at < ?", (now,))
        self.db.execute(
            "INSERT INTO identity_login_states (state_digest, provider, browser_digest, nonce,"
            " code_verifier, request_id, next_path, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                digest(state),
                login.provider,
                login.browser_digest,
                login.nonce,
                login.code_verifier,
                login.request_id,
                login.next_path,
                now + self.settings.login_seconds,
            ),
        )

    def _spend_state(self, state: str) -> _LoginState | None:
        """The login ``state`` names, deleted as it is read: a second answer finds nothing."""
        rows = self.db.execute(
            "DELETE FROM identity_login_states WHERE state_digest = ? AND expires_at > ?"
            " RETURNING provider, browser_digest, nonce, code_verifier, request_id, next_path",
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
            raise LoginRefused("request", f"The answer repeats {repeated}.")
        state = query.get("state", "")
        if not state:
            raise LoginRefused("state", "The provider's answer has no state: start again.")
        login = await run_in_threadpool(self._spend_state, state)
        if login is None:
            raise LoginRefused(
                "state", "This login is unknown, expired or already used: start again."
            )
        browser = request.cookies.get(BROWSER_COOKIE, "")
        if not (browser and hmac.compare_digest(digest(browser), login.browser_digest)):
            raise LoginRefused("browser", "This login was started in another browser.", 403)
        if login.provider != provider.id:
            raise LoginRefused(
                "mix_up", "This answer comes back for another provider than the one asked.", 403
            )
        endpoints = await self._provider_endpoints(provider)
        iss = query.get("iss")
        if iss is not None and iss != provider.issuer:
            raise LoginRefused("mix_up", f"The answer comes from {iss!r}, not {provider.issuer}.")
        if iss is None and endpoints.sends_iss:
            raise LoginRefused("mix_up", "The answer lacks the iss its provider always sends.")
        if query.get("error"):
            raise LoginRefused(
                "provider_error",
                f"The provider refused: {query.get('error')}"
                + (
                    f" ({query.get('error_description')})" if query.get("error_description") else ""
                ),
                403,
            )
        code = query.get("code")
        if not code:
            raise LoginRefused("code", "The provider's answer has no code.")
        answer = await self._redeem(provider, endpoints, code, login.code_verifier)
        id_token = answer.get("id_token")
        if not isinstance(id_token, str) or len(id_token) > MAX_ID_TOKEN_CHARS:
            raise LoginRefused("id_token", "The provider sent no usable ID token.")
        claims = await self._verified_claims(provider, endpoints, id_token, login.nonce)
        if provider.userinfo:
            # The ID token's own claims win: UserInfo only adds what it lacks.
            claims = {**await self._userinfo(provider, endpoints, answer, claims["sub"]), **claims}
        username = await run_in_threadpool(self._signed_in, provider, claims, request)
        return await self._resume(request, login, username)

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
        if provider.token_endpoint_auth_method == "client_secret_basic":
            # RFC 6749 §2.3.1: each part form-encoded before the Basic encoding.
            pair = f"{quote(provider.client_id, safe='')}:{quote(provider.client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        else:
            form["client_id"] = provider.client_id
            if provider.token_endpoint_auth_method == "client_secret_post":
                form["client_secret"] = provider.client_secret
        status, answer = await self._call(
            provider, "token endpoint", endpoints.token, form, headers
        )
        if status == 400 and isinstance(answer, dict):
            # RFC 6749 §5.2: the code is refused (used, expired, not for this client).
            raise LoginRefused("code", f"The provider refused the code: {answer.get('error')!r}.")
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
        """POST ``form`` (or GET, without one) to one of the provider's endpoints, within its
        deadline and size cap, no redirects followed; (status, the JSON body or None)."""
        try:
            with anyio.fail_after(provider.timeout_seconds):
                async with (
                    httpx.AsyncClient(
                        follow_redirects=False, transport=self.transport, trust_env=False
                    ) as http,
                    http.stream(
                        "POST" if form is not None else "GET", url, data=form, headers=headers
                    ) as response,
                ):
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > provider.max_document_bytes:
                            raise ProviderUnavailable(
                                f"its {what} sent more than {provider.max_document_bytes} bytes"
                            )
        except TimeoutError:
            raise ProviderUnavailable(
                f"its {what} did not answer within {provider.timeout_seconds} s"
            ) from None
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"its {what} cannot be reached: {exc}") from None
        try:
            return response.status_code, untrusted_json.loads(bytes(body))
        except untrusted_json.JsonRefused:
            return response.status_code, None

    async def _verified_claims(
        self, provider: OpenIDProvider, endpoints: _Endpoints, id_token: str, nonce: str
    ) -> dict[str, Any]:
        """The ID token's claims once checked as OpenID Connect Core §3.1.3.7 says."""
        try:
            header = dict(jws.extract_compact(id_token.encode("ascii")).headers())
        except (JoseError, UnicodeError, ValueError):
            raise LoginRefused("id_token", "The ID token is not a signed JWT.") from None
        alg = header.get("alg")
        if alg not in provider.algorithms:
            raise LoginRefused(
                "alg", f"The ID token's alg {alg!r} is not one of {list(provider.algorithms)}."
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise LoginRefused("kid", "The ID token's kid is not a string.")
        try:
            keys = await self._key_sets[provider.id].keys(endpoints.jwks_uri, kid)
        except RemoteDocumentError as exc:
            raise ProviderUnavailable(f"its key set {exc}") from None
        claims = await anyio.to_thread.run_sync(_signed_claims, id_token, keys, kid, alg)
        _check_claims(claims, provider, nonce, self.clock(), self.settings.login_seconds)
        return claims

    # -- the person, their facts and the session -------------------------------------------

    def _signed_in(self, provider: OpenIDProvider, claims: dict[str, Any], request: Request) -> str:
        """In a worker thread (the database): the user (created on first login), the facts of
        the claims put in step, the audit record. Returns the username."""
        value = claims.get(provider.user_claim)
        if not isinstance(value, str) or not value:
            raise LoginRefused(
                "claims", f"The ID token has no {provider.user_claim!r} claim to name the user."
            )
        username = f"{provider.user_prefix}{value}"
        if len(username) > MAX_USER_ID or not username.isprintable():
            raise LoginRefused("claims", "The user id from the provider is not a usable name.")
        now = self.clock()
        user = Entity("User", username)
        wanted: list[tuple] = []
        for mapping in provider.facts:
            wanted.extend(mapping.facts(user, claims))
        wanted = list(dict.fromkeys(wanted))
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO oauth_users (username, password_hash, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT (username) DO NOTHING",
                # Not an Argon2 hash: no password ever matches it.
                (username, f"!identity:{provider.id}", now),
            )
            disabled = self.db.execute(
                "SELECT disabled_at FROM oauth_users WHERE username = ?", (username,)
            )[0][0]
            if disabled is not None:
                raise LoginRefused("disabled", "This account is disabled.", 403)
            rows = self.db.execute(
                "SELECT facts FROM identity_accounts WHERE provider = ? AND subject = ?",
                (provider.id, claims["sub"]),
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
                    claims["sub"],
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
        )
        return username

    async def _resume(self, request: Request, login: _LoginState, username: str) -> Response:
        """What the person came for, signed in: the authorization request (consent or code) or
        the page of bastion."""
        settings = self.server.settings
        if login.request_id is not None:
            pending = await run_in_threadpool(
                self.server.store.pending, login.request_id, self.clock()
            )
            if pending is None or not hmac.compare_digest(
                pending.browser_digest, login.browser_digest
            ):
                raise LoginRefused(
                    "unknown_request",
                    "The application's request expired while you signed in: return to the"
                    " application and start again.",
                )
            client = await self.server.find_client(pending.client_id, client_address(request))
            if client is None or client.revoked_at is not None:
                raise LoginRefused("client", "The application is unknown or revoked.", 403)
            response = await run_in_threadpool(
                self.server.authorization.resume_signed_in, pending, client, username
            )
        else:
            next_path = local_path(login.next_path or "")
            if next_path is None:  # checked when the login started; checked again here
                raise LoginRefused("next", "The address to go to is not a page of this server.")
            response = RedirectResponse(
                next_path, status_code=303, headers={"Cache-Control": "no-store"}
            )
        session = await run_in_threadpool(
            self.server.store.create_session, username, self.clock(), settings.session_seconds
        )
        set_cookie(response, settings, SESSION_COOKIE, session, settings.session_seconds)
        return response

    # -- the provider's metadata -----------------------------------------------------------

    async def _provider_endpoints(self, provider: OpenIDProvider) -> _Endpoints:
        """The provider's endpoints from its OpenID Connect Discovery document (read once per
        process; a failure is not remembered)."""
        known = self._endpoints.get(provider.id)
        if known is not None:
            return known
        uri = f"{provider.issuer.rstrip('/')}/.well-known/openid-configuration"
        limits = FetchLimits(provider.timeout_seconds, provider.max_document_bytes)
        try:
            document = await fetch_json(uri, limits, self.transport)
        except RemoteDocumentError as exc:
            raise ProviderUnavailable(f"its discovery document {uri} {exc}") from None
        # OpenID Connect Discovery §4.3: the document names the very issuer asked.
        if not isinstance(document, dict) or document.get("issuer") != provider.issuer:
            raise ProviderUnavailable(f"{uri} is not the metadata of {provider.issuer}")
        found = {}
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            problem = _url_problem(document.get(name))
            if problem:
                raise ProviderUnavailable(f"its metadata has no usable {name}: {problem}")
            found[name] = document[name]
        userinfo = document.get("userinfo_endpoint") or ""
        if userinfo and _url_problem(userinfo):
            raise ProviderUnavailable(f"its metadata has no usable userinfo_endpoint: {userinfo!r}")
        if provider.userinfo and not userinfo:
            raise ProviderUnavailable("it has no userinfo_endpoint, and userinfo = true")
        methods = document.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            raise ProviderUnavailable("it does not support PKCE S256")
        endpoints = _Endpoints(
            found["authorization_endpoint"],
            found["token_endpoint"],
            found["jwks_uri"],
            userinfo,
            document.get("authorization_response_iss_parameter_supported") is True,
        )
        self._endpoints[provider.id] = endpoints
        return endpoints

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


def _signed_claims(token: str, keys: KeySet, kid: str | None, alg: str) -> dict[str, Any]:
    """In a worker thread: the claims once the signature is checked with the one key the
    header names (or the provider's only key)."""
    if kid is not None:
        candidates = [k for k in keys.keys if k.kid == kid]
    else:
        candidates = list(keys.keys) if len(keys.keys) == 1 else []
    if len(candidates) != 1:
        raise LoginRefused("kid", "The ID token is not signed by a key of the provider.")
    try:
        return dict(jwt.decode(token, candidates[0], algorithms=[alg]).claims)
    except (JoseError, ValueError):
        raise LoginRefused("signature", "The ID token's signature is not the provider's.") from None


def _number(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LoginRefused("claims", f"The ID token's {name!r} is missing or not a number.")
    return value


def _check_claims(
    claims: dict[str, Any], provider: OpenIDProvider, nonce: str, now: float, login_seconds: int
) -> None:
    """OpenID Connect Core §3.1.3.7, steps 2 to 11 that apply to the code flow."""
    if claims.get("iss") != provider.issuer:
        raise LoginRefused("iss", f"The ID token is from {claims.get('iss')!r}, not the provider.")
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if provider.client_id not in audiences:
        raise LoginRefused("aud", "The ID token is not for bastion (aud).")
    azp = claims.get("azp")
    if (len(audiences) > 1 or azp is not None) and azp != provider.client_id:
        raise LoginRefused("azp", "The ID token is for several parties and azp is not bastion.")
    leeway = provider.leeway_seconds
    if now > _number(claims, "exp") + leeway:
        raise LoginRefused("expired", "The ID token has expired.")
    issued_at = _number(claims, "iat")
    if issued_at > now + leeway or issued_at < now - login_seconds - leeway:
        raise LoginRefused("iat", "The ID token was not issued during this login (iat).")
    got = claims.get("nonce")
    if not isinstance(got, str) or not hmac.compare_digest(got, nonce):
        raise LoginRefused("nonce", "The ID token's nonce is not this login's.")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 255:
        raise LoginRefused("claims", "The ID token has no usable sub.")


def compose(server: AuthorizationServer, table: Any, env: Mapping[str, str]) -> OpenIDLogin | None:
    """The provider logins of ``server`` from the ``[identity]`` table, attached to it; None
    when no provider is configured."""
    settings = IdentitySettings.from_mapping(table, env)
    if not settings.providers:
        return None
    login = OpenIDLogin(settings, server)
    server.external_login = login
    return login
