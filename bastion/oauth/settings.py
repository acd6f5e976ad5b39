"""Configuration of the authorization server: the ``[oauth]`` table of bastion.toml."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from bastion.egress import PrivateAllowance, private_allowance, url_syntax_problem
from bastion.oauth.errors import InvalidTarget
from bastion.origins import listed_origins

REGISTRATION_POLICIES = ("open", "initial_access_token", "closed")


# An absolute URI's scheme and authority (RFC 3986 §3).
_SCHEME_AND_HOST = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*")


def resource_key(uri: str) -> str:
    """``uri`` as resource indicators are compared (RFC 8707 §2): scheme and host without case
    (RFC 3986 §6.2.2.1), as the MCP authorization specification's "Canonical Server URI" asks
    ("implementations SHOULD accept uppercase scheme and host components"); the path, query and
    anything with user information exactly. Case is ASCII's alone, as in a URI: a host spelt
    with another character (the Kelvin sign, which ``str.lower`` makes a "k") is compared
    exactly, never taken for the ASCII host it lowers to."""
    head = _SCHEME_AND_HOST.match(uri)
    if head is None or "@" in head[0] or not head[0].isascii():
        return uri
    return head[0].lower() + uri[head.end() :]


def same_resource(a: str, b: str) -> bool:
    """Whether two resource indicators name the same resource (`resource_key`)."""
    return a == b or resource_key(a) == resource_key(b)


class SettingsError(ValueError):
    """A configuration value that cannot be used, with the key that holds it."""


@dataclass(frozen=True)
class ProtectedResource:
    """One resource server (usually an MCP server URL) tokens may be issued for (RFC 8707)."""

    uri: str
    scopes: tuple[str, ...]
    name: str = ""
    # (scope, what it lets a client do), shown on the consent page; scopes without one show their name.
    scope_descriptions: tuple[tuple[str, str], ...] = ()

    def describe(self, scope: str) -> str | None:
        """What ``scope`` lets a client do, in words for the person asked to consent, or None."""
        return dict(self.scope_descriptions).get(scope)


@dataclass(frozen=True)
class ClientMetadataDocumentSettings:
    """Fetching client ID metadata documents (a ``client_id`` that is an https URL)."""

    enabled: bool = True
    # One deadline for all of a fetch: resolving, connecting, TLS, headers and body.
    timeout_seconds: float = 5.0
    max_bytes: int = 5120
    # A valid document is kept as long as its Cache-Control (max-age, no-store, no-cache) or
    # Expires says, but never longer than cache_seconds, nor shorter than min_cache_seconds:
    # its host chooses those headers, and no-store must not make every request a fetch.
    cache_seconds: int = 300
    min_cache_seconds: int = 5
    # A URL whose fetch or document failed is not fetched again for this long.
    failure_cache_seconds: int = 30
    max_concurrent_fetches_per_host: int = 2
    # Fetches in progress from all hosts together: anyone may start one (an /authorize naming a
    # document URL), and names under a wildcard DNS record are as many hosts as one likes.
    max_concurrent_fetches: int = 16
    # Distinct document URLs of one host remembered (cached) at a time.
    max_documents_per_host: int = 20
    # Entries of each cache (documents, failures) per process.
    max_cached_documents: int = 10_000
    # Non-public addresses a document may be fetched from (`bastion.egress.private_allowance`):
    # none, all (true), or those of the networks listed.
    allow_private_addresses: PrivateAllowance = False
    ca_file: str | None = None


@dataclass(frozen=True)
class LoginSettings:
    """How the login form is throttled (``[oauth.login]``; `bastion/oauth/throttle.py`)."""

    # Failures of one username, or from one address, before each further attempt must wait.
    max_failures_per_user: int = 5
    max_failures_per_address: int = 20
    # The first wait, doubled at each further failure up to max_backoff_seconds.
    backoff_seconds: int = 30
    max_backoff_seconds: int = 900
    # A counter whose last failure is older than this starts again from zero.
    failure_window_seconds: int = 3600
    # Failed sign-ins one pending authorization request survives; then it must start again.
    max_failures_per_request: int = 3
    # Argon2id hashes computed at once per process (each takes ~64 MiB); more are answered "busy".
    max_concurrent_password_checks: int = 4


@dataclass(frozen=True)
class OpenRegistrationSettings:
    """Limits on open dynamic registration (``[oauth.open_registration]``)."""

    # Registrations from one address per window.
    max_per_address: int = 20
    window_seconds: int = 3600
    # Open-registered clients that have no grant yet, in total.
    max_unused_clients: int = 1000
    # An open-registered (or metadata-document) client with no grant is deleted after this long.
    unused_client_seconds: int = 24 * 3600


@dataclass(frozen=True)
class RefusalAuditSettings:
    """How refusals of unauthenticated requests are aggregated (``[oauth.refusal_audit]``;
    `bastion/audit/refusals.py`)."""

    window_seconds: int = 60
    max_keys: int = 1000
    # How often a running server writes the repeats counted in windows still open, so that a
    # process killed outright (kill -9, the OOM killer) loses at most this long of them.
    repeat_write_seconds: int = 5


@dataclass(frozen=True)
class BackchannelSettings:
    """OpenID CIBA in poll mode (``[oauth.ciba]``; `bastion/oauth/ciba.py`)."""

    # How long an auth_req_id waits for the person (its expires_in), unless the client asks
    # for less or more with requested_expiry, which may not exceed max_request_seconds.
    request_seconds: int = 300
    max_request_seconds: int = 1800
    # The least time between two polls of the token endpoint; each poll that comes sooner
    # answers slow_down and adds 5 s to it for that request (CIBA Core 1.0 §11).
    interval_seconds: int = 5
    # The binding_message the person sees on the page and the agent shows on its side.
    max_binding_message_chars: int = 100
    # What a person approved lasts this long: refresh tokens end with it.
    grant_seconds: int = 3600
    # Requests one client may have waiting for an answer at once.
    max_pending_per_client: int = 20


@dataclass(frozen=True)
class ClientAssertionSettings:
    """``private_key_jwt`` client authentication (``[oauth.client_assertion]``;
    `bastion/oauth/client_assertion.py`)."""

    # The most an assertion may live (exp - iat, and exp - now): its jti is kept that long.
    max_lifetime_seconds: int = 300
    # The signing algorithms accepted (asymmetric only).
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256", "EdDSA")
    # Fetching a client's jwks_uri: one deadline for all of it, the most bytes read.
    jwks_timeout_seconds: int = 5
    jwks_max_bytes: int = 65536
    # A fetched key set is used this long; a kid it lacks (a rotation) fetches it again, at
    # most once every jwks_refetch_seconds.
    jwks_cache_seconds: int = 300
    jwks_refetch_seconds: int = 30
    # Key sets of distinct jwks_uris kept per process.
    jwks_max_cached: int = 1000
    # The non-public addresses (private, loopback, link-local...) the jwks_uri of a client
    # registered at /register (its registrant's choice) may be fetched from: none, all (true),
    # or those of the networks listed. An administrator's client is fetched as given either way.
    allow_private_addresses: PrivateAllowance = False


@dataclass(frozen=True)
class DPoPSettings:
    """DPoP proofs (RFC 9449) at the token endpoint and the gateway (``[oauth.dpop]``;
    `bastion/oauth/dpop.py`)."""

    # How old a proof may be (now - iat), beyond the leeway: its jti is kept that long.
    max_age_seconds: int = 60
    # The largest proof accepted, in characters.
    max_proof_chars: int = 8192
    # The signing algorithms accepted (asymmetric only).
    algorithms: tuple[str, ...] = ("ES256", "RS256", "PS256", "EdDSA")
    # Require a server nonce in every proof (RFC 9449 §8, §9); a nonce is good for one period
    # and the next.
    require_nonce: bool = False
    nonce_seconds: int = 300


@dataclass(frozen=True)
class OAuthSettings:
    issuer: str
    resources: tuple[ProtectedResource, ...]
    key_dir: str
    registration: str = "open"
    initial_access_tokens: tuple[str, ...] = ()
    access_token_seconds: int = 300
    refresh_token_seconds: int = 30 * 24 * 3600
    code_seconds: int = 60
    session_seconds: int = 8 * 3600
    leeway_seconds: int = 30
    client_metadata: ClientMetadataDocumentSettings = field(
        default_factory=ClientMetadataDocumentSettings
    )
    login: LoginSettings = field(default_factory=LoginSettings)
    open_registration: OpenRegistrationSettings = field(default_factory=OpenRegistrationSettings)
    refusal_audit: RefusalAuditSettings = field(default_factory=RefusalAuditSettings)
    ciba: BackchannelSettings = field(default_factory=BackchannelSettings)
    client_assertion: ClientAssertionSettings = field(default_factory=ClientAssertionSettings)
    dpop: DPoPSettings = field(default_factory=DPoPSettings)
    # Token exchange (RFC 8693, `bastion/oauth/token_exchange.py`): how long an exchanged token
    # lives (never past its subject token's exp), and the most delegations one chain may hold.
    exchanged_token_seconds: int = 300
    max_delegation_depth: int = 4
    # Enterprise-managed authorization (ID-JAG, `bastion/oauth/jwt_bearer.py`): the identity
    # providers whose ID-JAGs the jwt-bearer grant takes; none: the grant is not offered.
    id_jag: Any = None  # IdJagSettings
    # The web origins whose pages may call the endpoints a browser-based client calls, with
    # CORS (`bastion.cors`); those of ``[gateway] allowed_origins`` may too.
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.id_jag is None:
            from bastion.oauth.jwt_bearer import IdJagSettings

            object.__setattr__(self, "id_jag", IdJagSettings())

    @property
    def issuer_path(self) -> str:
        """The issuer's path without a trailing slash ('' for an issuer at the host root)."""
        return urlsplit(self.issuer).path.rstrip("/")

    def endpoint(self, name: str) -> str:
        return f"{self.issuer.rstrip('/')}/{name}"

    def resource(self, uri: str) -> ProtectedResource | None:
        """The configured resource ``uri`` names: the one spelled so, else the one it names with
        its scheme and host in another case (`resource_key`); None when it names none, or two
        (two configured URIs that differ in case alone), never a guess between them."""
        for resource in self.resources:
            if resource.uri == uri:
                return resource
        matches = [r for r in self.resources if same_resource(r.uri, uri)]
        return matches[0] if len(matches) == 1 else None

    def requested_resource(self, form: Mapping[str, str]) -> ProtectedResource:
        """The protected resource a request names in ``resource`` (RFC 8707), which it must
        name, and which must be one of this server's; else `InvalidTarget`."""
        uri = form.get("resource")
        if not uri:
            raise InvalidTarget("resource (RFC 8707) is required: the protected resource wanted")
        resource = self.resource(uri)
        if resource is None:
            raise InvalidTarget(f"resource {uri!r} is not a protected resource of this server")
        return resource

    @property
    def scopes_supported(self) -> list[str]:
        seen: dict[str, None] = {}
        for resource in self.resources:
            for scope in resource.scopes:
                seen[scope] = None
        return list(seen)

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any]) -> OAuthSettings:
        """Build settings from the ``[oauth]`` table; every wrong value names its key."""
        known = {
            "issuer",
            "resources",
            "key_dir",
            "registration",
            "initial_access_tokens",
            "access_token_seconds",
            "refresh_token_seconds",
            "code_seconds",
            "session_seconds",
            "leeway_seconds",
            "client_metadata",
            "login",
            "open_registration",
            "refusal_audit",
            "ciba",
            "client_assertion",
            "dpop",
            "exchanged_token_seconds",
            "max_delegation_depth",
            "id_jag",
            "allowed_origins",
        }
        unknown = sorted(set(table) - known)
        if unknown:
            raise SettingsError(f"oauth: unknown keys {unknown}; known keys are {sorted(known)}")
        issuer = _issuer(table.get("issuer"))
        resources = tuple(_resource(i, r) for i, r in enumerate(table.get("resources") or []))
        if not resources:
            raise SettingsError(
                "oauth.resources: configure at least one protected resource, e.g."
                ' [[oauth.resources]] uri = "https://mcp.example.com/mcp" scopes = ["tools:read"]'
            )
        if len({r.uri for r in resources}) != len(resources):
            raise SettingsError("oauth.resources: each uri may appear only once")
        key_dir = table.get("key_dir")
        if not isinstance(key_dir, str) or not key_dir:
            raise SettingsError(
                "oauth.key_dir: a directory for the private signing keys is required"
            )
        registration = table.get("registration", "open")
        if registration not in REGISTRATION_POLICIES:
            raise SettingsError(
                f"oauth.registration: {registration!r} is not one of {list(REGISTRATION_POLICIES)}"
            )
        tokens = table.get("initial_access_tokens", [])
        if not isinstance(tokens, list) or not all(
            isinstance(t, str) and len(t) >= 16 for t in tokens
        ):
            raise SettingsError(
                "oauth.initial_access_tokens: a list of strings of at least 16 characters"
            )
        if registration == "initial_access_token" and not tokens:
            raise SettingsError(
                "oauth.initial_access_tokens: required when registration = 'initial_access_token'"
            )
        numbers = {}
        for key, default in (
            ("access_token_seconds", 300),
            ("refresh_token_seconds", 30 * 24 * 3600),
            ("code_seconds", 60),
            ("session_seconds", 8 * 3600),
            ("leeway_seconds", 30),
            ("exchanged_token_seconds", 300),
            ("max_delegation_depth", 4),
        ):
            value = table.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SettingsError(f"oauth.{key}: a whole number >= 0, got {value!r}")
            numbers[key] = value
        if numbers["access_token_seconds"] == 0 or numbers["code_seconds"] == 0:
            raise SettingsError("oauth.access_token_seconds and oauth.code_seconds must be > 0")
        if numbers["exchanged_token_seconds"] == 0:
            raise SettingsError("oauth.exchanged_token_seconds must be > 0")
        if numbers["max_delegation_depth"] > 16:
            raise SettingsError(
                "oauth.max_delegation_depth: at most 16 (0 turns token exchange off),"
                f" got {numbers['max_delegation_depth']}"
            )
        ciba = _limits("ciba", table.get("ciba", {}), BackchannelSettings)
        if ciba.request_seconds > ciba.max_request_seconds:
            raise SettingsError(
                f"oauth.ciba.request_seconds ({ciba.request_seconds}) may not exceed"
                f" oauth.ciba.max_request_seconds ({ciba.max_request_seconds})"
            )
        if ciba.grant_seconds < numbers["access_token_seconds"]:
            raise SettingsError(
                f"oauth.ciba.grant_seconds ({ciba.grant_seconds}) may not be shorter than"
                f" oauth.access_token_seconds ({numbers['access_token_seconds']}): an access token"
                " would outlive what the person approved"
            )
        try:
            origins = listed_origins(table.get("allowed_origins", []), "oauth.allowed_origins")
        except ValueError as e:
            raise SettingsError(str(e)) from None
        return cls(
            issuer=issuer,
            resources=resources,
            key_dir=key_dir,
            registration=registration,
            initial_access_tokens=tuple(tokens),
            client_metadata=_client_metadata(table.get("client_metadata") or {}),
            login=_limits("login", table.get("login", {}), LoginSettings),
            open_registration=_limits(
                "open_registration", table.get("open_registration", {}), OpenRegistrationSettings
            ),
            refusal_audit=_limits(
                "refusal_audit", table.get("refusal_audit", {}), RefusalAuditSettings
            ),
            ciba=ciba,
            client_assertion=_client_assertion(table.get("client_assertion", {})),
            dpop=_dpop(table.get("dpop", {})),
            id_jag=_id_jag(table.get("id_jag", {})),
            allowed_origins=origins,
            **numbers,
        )


def _issuer(value: Any) -> str:
    if not isinstance(value, str):
        raise SettingsError('oauth.issuer: required, e.g. issuer = "https://auth.example.com"')
    if problem := url_syntax_problem(value):
        # It is in headers (WWW-Authenticate) and links bastion sends: refused here, not there.
        raise SettingsError(f"oauth.issuer {problem}, got {value!r}")
    parts = urlsplit(value)
    loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise SettingsError(f"oauth.issuer: {value!r} must be an https URL (http only on loopback)")
    if parts.query or parts.fragment:
        raise SettingsError(f"oauth.issuer: {value!r} must have no query or fragment (RFC 8414 §2)")
    return value.rstrip("/")


def _resource(index: int, value: Any) -> ProtectedResource:
    where = f"oauth.resources[{index}]"
    if not isinstance(value, Mapping):
        raise SettingsError(f"{where}: a table with uri and scopes")
    uri = value.get("uri")
    if not isinstance(uri, str) or urlsplit(uri).scheme not in ("https", "http"):
        raise SettingsError(f"{where}.uri: an absolute http(s) URL, got {uri!r}")
    if urlsplit(uri).fragment:
        raise SettingsError(f"{where}.uri: must have no fragment (RFC 8707 §2)")
    scopes = value.get("scopes", [])
    if not isinstance(scopes, list) or not all(
        isinstance(s, str) and s and " " not in s for s in scopes
    ):
        raise SettingsError(f"{where}.scopes: a list of scope names without spaces")
    name = value.get("name", "")
    if not isinstance(name, str) or len(name) > 200:
        raise SettingsError(
            f"{where}.name: a name of at most 200 characters, shown on the consent page"
        )
    descriptions = value.get("scope_descriptions", {})
    if not isinstance(descriptions, Mapping):
        raise SettingsError(
            f'{where}.scope_descriptions: a table, e.g. {{ "{scopes[0] if scopes else "tools:read"}"'
            ' = "Read the tools" }'
        )
    for scope, text in descriptions.items():
        if scope not in scopes:
            raise SettingsError(
                f"{where}.scope_descriptions: {scope!r} is not one of this resource's scopes {scopes}"
            )
        if not isinstance(text, str) or not text.strip() or len(text) > 200:
            raise SettingsError(
                f"{where}.scope_descriptions.{scope}: a description of 1 to 200 characters"
            )
    unknown = sorted(set(value) - {"uri", "scopes", "name", "scope_descriptions"})
    if unknown:
        raise SettingsError(f"{where}: unknown keys {unknown}")
    return ProtectedResource(
        uri=uri,
        scopes=tuple(scopes),
        name=name.strip(),
        scope_descriptions=tuple((s, descriptions[s].strip()) for s in scopes if s in descriptions),
    )


def _client_metadata(value: Any) -> ClientMetadataDocumentSettings:
    if not isinstance(value, Mapping):
        raise SettingsError("oauth.client_metadata: a table")
    defaults = ClientMetadataDocumentSettings()
    allowed = set(defaults.__dataclass_fields__)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise SettingsError(f"oauth.client_metadata: unknown keys {unknown}")
    merged = {**defaults.__dict__, **dict(value)}
    if not isinstance(merged["enabled"], bool):
        raise SettingsError("oauth.client_metadata.enabled: true or false")
    merged["allow_private_addresses"] = _private(
        "oauth.client_metadata.allow_private_addresses", merged["allow_private_addresses"]
    )
    if not _is_number(merged["timeout_seconds"]) or merged["timeout_seconds"] <= 0:
        raise SettingsError("oauth.client_metadata.timeout_seconds: a number of seconds > 0")
    for key in (
        "max_bytes",
        "cache_seconds",
        "min_cache_seconds",
        "failure_cache_seconds",
        "max_concurrent_fetches_per_host",
        "max_concurrent_fetches",
        "max_documents_per_host",
        "max_cached_documents",
    ):
        minimum = 0 if key.endswith("_seconds") and key != "min_cache_seconds" else 1
        _whole(f"oauth.client_metadata.{key}", merged[key], minimum)
    if merged["ca_file"] is not None and not isinstance(merged["ca_file"], str):
        raise SettingsError("oauth.client_metadata.ca_file: a file path")
    merged["ca_file"] = merged["ca_file"] or None
    return ClientMetadataDocumentSettings(**merged)


def _client_assertion(value: Any) -> ClientAssertionSettings:
    from bastion.oauth.client_assertion import algorithms_problem

    if not isinstance(value, Mapping):
        raise SettingsError("oauth.client_assertion: a table")
    others = ("algorithms", "allow_private_addresses")
    numbers = {k: v for k, v in value.items() if k not in others}
    settings = _limits("client_assertion", numbers, ClientAssertionSettings)
    algorithms = value.get("algorithms", list(settings.algorithms))
    if problem := algorithms_problem(algorithms):
        raise SettingsError(f"oauth.client_assertion.algorithms: {problem}")
    private = _private(
        "oauth.client_assertion.allow_private_addresses",
        value.get("allow_private_addresses", False),
    )
    return ClientAssertionSettings(
        **{
            **settings.__dict__,
            "algorithms": tuple(algorithms),
            "allow_private_addresses": private,
        }
    )


def _private(setting: str, value: Any) -> PrivateAllowance:
    try:
        return private_allowance(value, setting)
    except ValueError as e:
        raise SettingsError(str(e)) from None


def _dpop(value: Any) -> DPoPSettings:
    from bastion.oauth.client_assertion import algorithms_problem

    if not isinstance(value, Mapping):
        raise SettingsError("oauth.dpop: a table")
    numbers = {k: v for k, v in value.items() if k not in ("algorithms", "require_nonce")}
    settings = _limits("dpop", numbers, DPoPSettings)
    require_nonce = value.get("require_nonce", False)
    if not isinstance(require_nonce, bool):
        raise SettingsError(f"oauth.dpop.require_nonce: true or false, got {require_nonce!r}")
    algorithms = value.get("algorithms", list(settings.algorithms))
    if problem := algorithms_problem(algorithms):
        raise SettingsError(f"oauth.dpop.algorithms: {problem}")
    return DPoPSettings(
        **{
            **settings.__dict__,
            "algorithms": tuple(algorithms),
            "require_nonce": require_nonce,
        }
    )


def _id_jag(value: Any) -> Any:
    from bastion.oauth.jwt_bearer import IdJagSettings

    try:
        return IdJagSettings.from_mapping(value)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def _limits(name: str, value: Any, kind: type) -> Any:
    """A table of limits, each a whole number >= 1, with the dataclass ``kind``'s defaults."""
    if not isinstance(value, Mapping):
        raise SettingsError(f"oauth.{name}: a table")
    defaults = kind()
    unknown = sorted(set(value) - set(defaults.__dataclass_fields__))
    if unknown:
        raise SettingsError(
            f"oauth.{name}: unknown keys {unknown}; known keys are"
            f" {sorted(defaults.__dataclass_fields__)}"
        )
    for key, number in value.items():
        _whole(f"oauth.{name}.{key}", number, 1)
    return kind(**{**defaults.__dict__, **dict(value)})


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _whole(key: str, value: Any, minimum: int) -> int:
    """A whole number of at least ``minimum`` (and at most 2**31, far above any sane limit)."""
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= 2**31:
        raise SettingsError(f"{key}: a whole number from {minimum} to 2**31, got {value!r}")
    return value
