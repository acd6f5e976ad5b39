"""The ``[signals.ssf]`` table of bastion.toml: which Shared Signals transmitters bastion trusts,
how their events reach it (RFC 8935 push, RFC 8936 poll) and what each event does.

```toml
[signals.ssf]
push_url = ""                   # where transmitters push (default: the issuer + /ssf/events)
max_body_bytes = 65536          # a pushed SET larger than this is refused (413)
clock_skew_seconds = 60         # a SET issued further in the future is refused
max_event_age_seconds = 3600    # a SET issued longer ago is refused (stale)
jti_retention_seconds = 86400   # jtis remembered (replay refused); >= the age limit + the skew
jwks_refresh_seconds = 60       # an unknown kid (or a failed fetch of the JWKS or the
                                # metadata) fetches again at most this often
jwks_max_keys = 20              # a JWKS with more keys is refused
algorithms = ["RS256", "PS256", "ES256", "EdDSA"]   # never none, never HS*

[[signals.ssf.transmitters]]
name = "idp"
issuer = "https://idp.example.com"          # the SETs' iss, exactly
configuration_url = ""                       # default: issuer + /.well-known/ssf-configuration
audience = "https://bastion.example.com"     # must be in each SET's aud
delivery = "push"                            # or "poll"
bearer_env = "BASTION_SSF_IDP_BEARER"        # bastion's credential at the transmitter's
                                             # stream management and poll endpoints
push_token_env = "BASTION_SSF_IDP_PUSH"      # push only: the bearer the transmitter must send
poll_interval_seconds = 30
max_events = 100
fact_expiry_seconds = 0                      # facts written from events expire (0: never)
devices = false                              # true: its events set Device facts (an MDM's)
linked_accounts = ""                         # an [[identity.providers]] id: its accounts
                                             # linked to users are subjects too (iss_sub)
subjects_sync_seconds = 60                   # a round of subjects added/removed at the
                                             # transmitter this often (sign-ins: at once)
metadata_cache_seconds = 3600                # its metadata is read again after this (less
                                             # if its Cache-Control says)
metadata_stale_seconds = 86400               # the last good one is used this long past that
                                             # while none can be read (0: not at all)
# allow_private_addresses = ["10.1.0.0/16"]  # the non-public addresses the endpoints its
                                             # metadata and stream name may be at (or true,
                                             # false); unset: all if configuration_url is on
                                             # one, else none
[signals.ssf.transmitters.users]             # RFC 9493 subjects -> bastion users, explicitly
"email:sam@example.com" = "sam"
"iss_sub:https://idp.example.com|00u1" = "sam"
"opaque:7f2c" = "sam"
"phone_number:+12025550123" = "sam"         # also account:, did:, uri: (RFC 9493 §3.2)
[signals.ssf.transmitters.effects]           # per event type: revoke, disable, fact, record
"https://schemas.openid.net/secevent/caep/event-type/credential-change" = "record"
```
"""

from __future__ import annotations

import math
import os
import string
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from bastion.egress import PrivateAllowance, cleartext_problem, private_allowance
from bastion.http_fields import field_value_problem
from bastion.oauth.remote_metadata import METADATA_CACHE_SECONDS, METADATA_STALE_SECONDS

CAEP = "https://schemas.openid.net/secevent/caep/event-type/"
RISC = "https://schemas.openid.net/secevent/risc/event-type/"
SSF = "https://schemas.openid.net/secevent/ssf/event-type/"
OAUTH = "https://schemas.openid.net/secevent/oauth/event-type/"
VERIFICATION = SSF + "verification"
STREAM_UPDATED = SSF + "stream-updated"

EFFECTS = ("revoke", "disable", "fact", "record")
DEFAULT_EFFECTS: dict[str, str] = {
    CAEP + "session-revoked": "revoke",
    CAEP + "credential-change": "revoke",
    CAEP + "device-compliance-change": "fact",
    CAEP + "assurance-level-change": "fact",
    CAEP + "token-claims-change": "fact",
    # CAEP 1.0 §3.8: a user's or device's risk level (LOW, MEDIUM, HIGH), for the policy.
    CAEP + "risk-level-change": "fact",
    # The same revocations in RISC's and the OAuth event types' words (Google's Cross-Account
    # Protection sends these): recorded and ignored, they left the user's access standing.
    RISC + "sessions-revoked": "revoke",
    RISC + "account-credential-change-required": "revoke",
    OAUTH + "tokens-revoked": "revoke",
    RISC + "account-disabled": "disable",
    RISC + "account-purged": "disable",
    RISC + "credential-compromise": "disable",
    # RISC 1.0: recorded with the users-table line it would need; no mapping is changed
    # (`bastion.signals.ssf.SsfReceiver._identifier_changed`).
    RISC + "identifier-changed": "record",
}
# Fact effects exist only for the events that carry a value to record.
FACT_EVENTS = {e for e, effect in DEFAULT_EFFECTS.items() if effect == "fact"}
# The users table's key prefixes: RFC 9493 §3.2's simple formats (`bastion.signals.subjects`).
SUBJECT_FORMATS = ("email", "iss_sub", "opaque", "phone_number", "account", "did", "uri")
# Algorithms a SET may be signed with: asymmetric only (no shared secret, no `none`).
ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
              "EdDSA")  # fmt: skip


class SignalsConfigError(ValueError):
    """A ``[signals.ssf]`` value that cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class Transmitter:
    name: str
    issuer: str
    configuration_url: str
    audience: str
    delivery: str
    bearer: str = field(repr=False)
    push_token: str = field(repr=False)
    poll_interval_seconds: float = 30.0
    max_events: int = 100
    fact_expiry_seconds: float = 0.0
    users: dict[str, str] = field(default_factory=dict)
    effects: dict[str, str] = field(default_factory=dict)
    # Whether its events set devices' facts: a device is named without any mapping, so only a
    # transmitter that manages devices (the MDM) may say one is compliant, or is not. None: not
    # stated, taken as false and said at start (`SsfReceiver.start`).
    devices: bool | None = None
    # The non-public addresses the endpoints its metadata and stream name (key set, stream
    # management, poll) may be reached at (`bastion.egress.private_allowance`); None: all if
    # configuration_url is itself on one, else none (`bastion.egress.metadata_allowance`).
    allow_private_addresses: PrivateAllowance | None = None
    # An ``[[identity.providers]]`` id: the accounts of that provider linked to users (signed
    # in) are subjects of this transmitter as ``iss_sub`` of the provider's issuer, added to the
    # stream and mapped to their users (`linked_issuer` holds that issuer).
    linked_accounts: str = ""
    linked_issuer: str = ""
    # How often the stream's subjects are brought in step (SSF 1.0 §8.1.3): added, removed,
    # and those that failed tried again.
    subjects_sync_seconds: float = 60.0
    # Its configuration metadata is read again after at most this long (less when its headers
    # say), and the last good one is used this long past that while a new one cannot be had
    # (`bastion.oauth.remote_metadata`).
    metadata_cache_seconds: float = METADATA_CACHE_SECONDS
    metadata_stale_seconds: float = METADATA_STALE_SECONDS

    def effect(self, event_type: str) -> str:
        """What an event of this type does: the override, the default, else ``record``."""
        return self.effects.get(event_type) or DEFAULT_EFFECTS.get(event_type, "record")


@dataclass(frozen=True)
class SsfSettings:
    transmitters: tuple[Transmitter, ...] = ()
    push_url: str = ""
    max_body_bytes: int = 65536
    clock_skew_seconds: float = 60.0
    max_event_age_seconds: float = 3600.0
    jti_retention_seconds: float = 86400.0
    jwks_refresh_seconds: float = 60.0
    jwks_max_keys: int = 20
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256", "EdDSA")

    @classmethod
    def from_table(
        cls,
        table: dict[str, Any],
        *,
        issuer: str = "",
        env: dict[str, str] | None = None,
        providers: dict[str, str] | None = None,
    ) -> SsfSettings:
        """The settings of a ``[signals.ssf]`` table; `SignalsConfigError` names what is wrong.
        ``providers``: the ``[[identity.providers]]`` ids and their issuers, which a
        transmitter's ``linked_accounts`` may name."""
        env = dict(os.environ if env is None else env)
        if not isinstance(table, dict):
            raise SignalsConfigError("[signals.ssf] must be a table")
        known = set(cls.__dataclass_fields__)
        for key in table:
            if key not in known:
                raise SignalsConfigError(
                    f"unknown key [signals.ssf].{key}; known keys: {', '.join(sorted(known))}"
                )
        values: dict[str, Any] = {}
        for key in ("max_body_bytes", "jwks_max_keys"):
            if key in table:
                values[key] = _positive(f"[signals.ssf].{key}", table[key], int)
        for key in (
            "clock_skew_seconds",
            "max_event_age_seconds",
            "jti_retention_seconds",
            "jwks_refresh_seconds",
        ):
            if key in table:
                values[key] = _positive(f"[signals.ssf].{key}", table[key], float)
        if "algorithms" in table:
            algs = table["algorithms"]
            if not isinstance(algs, list) or not algs:
                raise SignalsConfigError("[signals.ssf].algorithms must be a non-empty list")
            for alg in algs:
                if alg not in ASYMMETRIC:
                    raise SignalsConfigError(
                        f"[signals.ssf].algorithms: {alg!r} is not allowed; SETs are verified"
                        f" with public keys only: choose among {', '.join(ASYMMETRIC)}"
                    )
            values["algorithms"] = tuple(algs)
        push_url = table.get("push_url") or (f"{issuer.rstrip('/')}/ssf/events" if issuer else "")
        values["push_url"] = str(push_url)
        settings = cls(**values)
        # A SET may be dated clock_skew_seconds ahead of its receipt, and so stays fresh that
        # much longer than max_event_age_seconds after it: its jti is kept until it is stale.
        fresh_for = settings.max_event_age_seconds + settings.clock_skew_seconds
        if settings.jti_retention_seconds < fresh_for:
            raise SignalsConfigError(
                "[signals.ssf].jti_retention_seconds must be at least max_event_age_seconds +"
                f" clock_skew_seconds ({fresh_for:g}): a SET old enough to be forgotten must be"
                " old enough to be refused as stale, and one may be dated clock_skew_seconds ahead"
            )
        raw = table.get("transmitters", [])
        if not isinstance(raw, list):
            raise SignalsConfigError("[[signals.ssf.transmitters]] must be an array of tables")
        transmitters = tuple(_transmitter(i, t, env, providers or {}) for i, t in enumerate(raw))
        names = [t.name for t in transmitters]
        issuers = [t.issuer for t in transmitters]
        if len(set(names)) != len(names) or len(set(issuers)) != len(issuers):
            raise SignalsConfigError(
                "each [[signals.ssf.transmitters]] needs its own name and issuer"
            )
        tokens = [t.push_token for t in transmitters if t.delivery == "push"]
        if len(set(tokens)) != len(tokens):
            raise SignalsConfigError("each push transmitter needs its own push token")
        if any(t.delivery == "push" for t in transmitters) and not settings.push_url:
            raise SignalsConfigError(
                "[signals.ssf].push_url is needed for push delivery (or an [oauth] issuer)"
            )
        return SsfSettings(**{**settings.__dict__, "transmitters": transmitters})


def _positive(key: str, value: Any, kind: type) -> Any:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = kind(value)
    except (TypeError, ValueError):
        raise SignalsConfigError(f"{key} must be a positive number, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise SignalsConfigError(f"{key} must be a positive number, got {value!r}")
    return number


def _at_least_zero(key: str, value: Any) -> float:
    """A number of seconds that may be 0 (``metadata_stale_seconds``: the last good metadata
    not used at all past its lifetime)."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value == 0:
        return 0.0
    try:
        return _positive(key, value, float)
    except SignalsConfigError:
        raise SignalsConfigError(f"{key} must be 0 or a positive number, got {value!r}") from None


def _secret(where: str, key: str, t: dict, env: dict[str, str]) -> str:
    var = t.get(key)
    if not var:
        return ""
    value = env.get(str(var), "")
    # A bearer token, sent in Authorization (bearer_env) or compared with the one a transmitter
    # sends there (push_token_env): one HTTP cannot carry would fail every request.
    if problem := field_value_problem(value):
        raise SignalsConfigError(f"{where}.{key}: the environment variable {var} {problem}")
    value = value.strip(" \t")
    if len(value) < 16:
        raise SignalsConfigError(
            f"{where}.{key}: the environment variable {var} must hold a secret of 16 characters"
            " or more"
        )
    return value


# The keys of one ``[[signals.ssf.transmitters]]`` table.
TRANSMITTER_KEYS = frozenset({
    "name", "issuer", "configuration_url", "audience", "delivery", "bearer_env",
    "push_token_env", "poll_interval_seconds", "max_events", "fact_expiry_seconds", "users",
    "effects", "allow_private_addresses", "devices", "linked_accounts", "subjects_sync_seconds",
    "metadata_cache_seconds", "metadata_stale_seconds",
})  # fmt: skip


def from_config(config: Any, issuer: str) -> SsfSettings:
    """The settings of a `bastion.server.config.ServerConfig`'s ``[signals.ssf]`` table, its
    ``linked_accounts`` checked against its ``[[identity.providers]]`` (the server's and the
    commands' one reading)."""
    providers: dict[str, str] = {}
    many_tenants: set[str] = set()
    for p in (config.identity or {}).get("providers") or []:
        if isinstance(p, dict) and isinstance(p.get("id"), str):
            providers[p["id"]] = str(p.get("issuer", ""))
            if "tenants" in p:
                many_tenants.add(p["id"])
    with config.reading("signals.ssf"):
        settings = SsfSettings.from_table(config.signals["ssf"], issuer=issuer, providers=providers)
        for t in settings.transmitters:
            if t.linked_accounts in many_tenants:
                # Its accounts are (tenant, sub) and each tenant is its own issuer: no one
                # iss_sub subject names them (not built).
                raise SignalsConfigError(
                    f"transmitter {t.name}: linked_accounts cannot name {t.linked_accounts}, a"
                    " provider with tenants (each tenant is its own issuer); list its people in"
                    " users instead"
                )
        return settings


def _transmitter(i: int, t: Any, env: dict[str, str], providers: dict[str, str]) -> Transmitter:
    where = f"[[signals.ssf.transmitters]] #{i + 1}"
    if not isinstance(t, dict):
        raise SignalsConfigError(f"{where} must be a table")
    for key in t:
        if key not in TRANSMITTER_KEYS:
            raise SignalsConfigError(
                f"{where}: unknown key {key}; known: {', '.join(sorted(TRANSMITTER_KEYS))}"
            )
    for key in ("name", "issuer", "audience"):
        if not isinstance(t.get(key), str) or not t[key]:
            raise SignalsConfigError(f"{where} needs {key} (a string)")
    issuer = t["issuer"]
    problem = cleartext_problem(issuer)
    if problem:
        raise SignalsConfigError(f"{where}.issuer {problem}, got {issuer!r}")
    parts = urlsplit(issuer)
    configuration_url = t.get("configuration_url") or (
        # SSF 1.0 §7.2.1: the well-known path goes between the host and the issuer's path.
        f"{parts.scheme}://{parts.netloc}/.well-known/ssf-configuration{parts.path.rstrip('/')}"
    )
    problem = cleartext_problem(configuration_url)
    if problem:
        raise SignalsConfigError(f"{where}.configuration_url {problem}, got {configuration_url!r}")
    delivery = t.get("delivery", "push")
    if delivery not in ("push", "poll"):
        raise SignalsConfigError(f"{where}.delivery must be push or poll, got {delivery!r}")
    push_token = _secret(where, "push_token_env", t, env)
    if delivery == "push" and not push_token:
        raise SignalsConfigError(
            f"{where}: push delivery needs push_token_env, the environment variable holding the"
            " bearer token the transmitter must send (bastion refuses pushes without it)"
        )
    bearer = _secret(where, "bearer_env", t, env)
    users = t.get("users", {})
    if not isinstance(users, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in users.items()
    ):
        raise SignalsConfigError(f"{where}.users must map subjects to user names")
    for key in users:
        fmt = key.partition(":")[0]
        if fmt not in SUBJECT_FORMATS or ":" not in key:
            raise SignalsConfigError(
                f"{where}.users: {key!r} must start with one of"
                f" {', '.join(f + ':' for f in SUBJECT_FORMATS)}"
            )
    users = {normal_subject_key(k): v for k, v in users.items()}
    effects = t.get("effects", {})
    if not isinstance(effects, dict):
        raise SignalsConfigError(f"{where}.effects must be a table of event type = effect")
    for event, effect in effects.items():
        if effect not in EFFECTS:
            raise SignalsConfigError(
                f"{where}.effects[{event!r}] = {effect!r}: use one of {', '.join(EFFECTS)}"
            )
        if effect == "fact" and event not in FACT_EVENTS:
            raise SignalsConfigError(
                f"{where}.effects[{event!r}]: only {', '.join(sorted(FACT_EVENTS))} become facts"
            )
    devices = t.get("devices")
    if devices is not None and not isinstance(devices, bool):
        raise SignalsConfigError(f"{where}.devices must be true or false, got {devices!r}")
    private = None
    if "allow_private_addresses" in t:
        try:
            private = private_allowance(
                t["allow_private_addresses"], f"{where}.allow_private_addresses"
            )
        except ValueError as e:
            raise SignalsConfigError(str(e)) from None
    linked = t.get("linked_accounts", "")
    if not isinstance(linked, str) or (linked and linked not in providers):
        raise SignalsConfigError(
            f"{where}.linked_accounts must name an [[identity.providers]] id"
            f" ({', '.join(sorted(providers)) or 'none is configured'}), got {linked!r}"
        )
    linked_issuer = providers.get(linked, "") if linked else ""
    if linked and "|" in linked_issuer:
        # The iss_sub key's first "|" ends the issuer (`bastion.signals.subjects.simple_key`).
        raise SignalsConfigError(f"{where}.linked_accounts: the provider's issuer holds '|'")
    return Transmitter(
        name=t["name"],
        issuer=issuer,
        configuration_url=configuration_url,
        audience=t["audience"],
        delivery=delivery,
        bearer=bearer,
        push_token=push_token,
        poll_interval_seconds=_positive(
            f"{where}.poll_interval_seconds", t.get("poll_interval_seconds", 30.0), float
        ),
        max_events=_positive(f"{where}.max_events", t.get("max_events", 100), int),
        fact_expiry_seconds=(
            _positive(f"{where}.fact_expiry_seconds", t["fact_expiry_seconds"], float)
            if t.get("fact_expiry_seconds")
            else 0.0
        ),
        users=users,
        effects=dict(effects),
        allow_private_addresses=private,
        devices=devices,
        linked_accounts=linked,
        linked_issuer=linked_issuer,
        subjects_sync_seconds=_positive(
            f"{where}.subjects_sync_seconds", t.get("subjects_sync_seconds", 60.0), float
        ),
        metadata_cache_seconds=_positive(
            f"{where}.metadata_cache_seconds",
            t.get("metadata_cache_seconds", METADATA_CACHE_SECONDS),
            float,
        ),
        metadata_stale_seconds=_at_least_zero(
            f"{where}.metadata_stale_seconds",
            t.get("metadata_stale_seconds", METADATA_STALE_SECONDS),
        ),
    )


# Only A-Z: str.lower() also makes the Kelvin sign (U+212A) a "k", so "\u212aim@example.com",
# an address anyone might hold at the transmitter, would be kim's.
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def normal_subject_key(key: str) -> str:
    """How a subject is looked up in ``users``: emails compare without ASCII case; any other
    character compares as it is."""
    fmt, _, rest = key.partition(":")
    return f"email:{rest.translate(_ASCII_LOWER)}" if fmt == "email" else key
