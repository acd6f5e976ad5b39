"""The ``[gateway]`` table of bastion.toml: the upstream MCP servers and the gateway's limits.

```toml
[gateway]
public_url = "https://mcp.example.com"   # where clients reach bastion; default: the OAuth issuer
allowed_origins = ["https://app.example.com"]   # browser pages that may call /mcp/, with CORS
                                          # (default: the origin of public_url only)
redis_url = "redis://127.0.0.1:6379/0"    # rate-limit counters shared by processes (optional;
                                          # redis+cluster://host:port for a Redis Cluster)

[[gateway.upstreams]]
name = "desk"                            # served at /mcp/desk
command = "python"                       # a stdio server ...
args = ["server.py"]
env = { DESK_DB = "desk.db" }
cwd = "examples/quickstart"

[[gateway.upstreams]]
name = "files"
url = "http://127.0.0.1:9000/mcp"        # ... or a Streamable HTTP server
headers = { Authorization = "Bearer ${FILES_KEY}" }   # bastion's own credential, from the env
scopes = ["files:read"]                  # asked for in the 401 challenge
session = "per_user"                     # one upstream session per user (default "shared")

[[gateway.upstreams]]
name = "tracker"
url = "https://tracker.example.com/mcp"
auth = "per_user"                        # each user's own OAuth token (docs/identity.md), on
                                         # upstream sessions per user (session's default here)
oauth = { scopes = ["issues:read"] }     # issuer, client_id, client_secret: optional

[[gateway.trusted_issuers]]              # an identity provider's access tokens are accepted too
issuer = "https://login.example.com"     # (every key: docs/identity.md)
audiences = { desk = "api://desk" }      # the aud it uses for each server it may be used for
```
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bastion.connections.settings import ConnectionSettingsError, UpstreamOAuth
from bastion.egress import cleartext_problem, url_syntax_problem
from bastion.environment import expand
from bastion.gateway.follows import LEASE_SECONDS
from bastion.gateway.sessions import MAX_SUBSCRIPTIONS_PER_USER
from bastion.gateway.tool_pins import PIN_MODES
from bastion.http_fields import field_name_problem, field_value_problem
from bastion.identity.trusted_issuers import TrustedIssuer, parse_trusted_issuers
from bastion.origins import listed_origins
from bastion.redaction import safe_url
from bastion.redis_client import CLUSTER_SCHEMES
from bastion.server.config import ConfigError

# Methods served beyond tools, resources and prompts, each decided as ``connect`` (completions
# also as ``get`` of the prompt or ``read`` of the resource template they complete).
DEFAULT_PASS_METHODS = (
    "ping",
    "notifications/initialized",
    "notifications/cancelled",
    "logging/setLevel",
    "completion/complete",
)
# How clients' requests map onto upstream sessions (docs/gateway.md, "Upstream sessions").
SESSION_MODES = ("shared", "per_user", "per_client_session")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class UpstreamConfig:
    """One upstream MCP server: a stdio command or a Streamable HTTP URL."""

    name: str
    command: str = ""
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = ""
    url: str = ""
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    # Plain http beyond the loopback (`bastion.egress.cleartext_problem`), said by the operator.
    allow_http: bool = False
    scopes: tuple[str, ...] = ()
    timeout: float = 60.0
    # "none": only ``headers``; "per_user": each user's own OAuth token (`oauth`).
    auth: str = "none"
    oauth: UpstreamOAuth | None = None
    # "shared": one upstream session for every client; "per_user": one per user;
    # "per_client_session": one per client MCP session (see `bastion.gateway.upstream_sessions`).
    session: str = "shared"
    # Upstream sessions this upstream may have open at once (per_user, per_client_session).
    max_sessions: int = 256
    # An upstream session unused for this long is closed (per_user, per_client_session).
    session_idle_seconds: float = 900.0
    # Tool pins (`bastion.gateway.tool_pins`): "off"; "first_use": the first whole tool list is
    # trusted, a tool that changes or appears later is held until an operator accepts it;
    # "review": every tool is held until accepted.
    pin_tools: str = "off"
    # Prompt pins, as ``pin_tools`` for prompts (their name, title, description and arguments);
    # as ``pin_tools`` unless set.
    pin_prompts: str = "off"
    # Under pins, a call naming a tool (prompt) the last list of its upstream session lacked
    # reads the list again, at most once per this many seconds per upstream session.
    pin_relist_seconds: float = 5.0
    # A stdio upstream's processes are given this long to end at each step of their stop: its
    # own, at its stdin's end and then at SIGTERM, before SIGKILL; and what it leaves of its
    # process group when it ends, between that group's SIGTERM and SIGKILL.
    stop_grace_seconds: float = 2.0

    @property
    def transport(self) -> str:
        return "stdio" if self.command else "http"


@dataclass(frozen=True)
class GatewayConfig:
    upstreams: tuple[UpstreamConfig, ...] = ()
    public_url: str = ""
    max_body_bytes: int = 1_048_576
    pass_methods: tuple[str, ...] = DEFAULT_PASS_METHODS
    # Idle legacy-era sessions are forgotten after this many seconds.
    session_idle_seconds: float = 3600.0
    # Rate-limit counters shared by every bastion process using this Redis; "" = in-process.
    redis_url: str = ""
    # Keys are "<redis_prefix>:ratelimit:...", so deployments can share one Redis.
    redis_prefix: str = "bastion"
    # How long one Redis command (or connection attempt) may take before what needs it is
    # refused (fail closed): a Redis that hangs holds each call at most this long.
    redis_timeout_seconds: float = 1.0
    # Origins (scheme://host[:port]) whose pages may send requests to /mcp/, answered with CORS
    # there and at the OAuth endpoints a browser client calls (bastion.cors); empty: only the
    # origin of the gateway's own public URL. A request with no Origin header is not a page's.
    allowed_origins: tuple[str, ...] = ()
    # Session labels (bastion.delegation.labels): a label set is forgotten this many seconds
    # after its last label was recorded; it holds at most label_max labels; this process keeps
    # at most label_max_sets sets (when it keeps them itself, without Redis).
    label_ttl_seconds: int = 86_400
    label_max: int = 256
    label_max_sets: int = 100_000
    # The longest tool name, prompt name or resource URI a client may send: each becomes a key of
    # what the gateway keeps (decision records, behaviour counters, rate-limit windows,
    # subscriptions), so one longer is refused (-32602) before anything is decided or kept.
    max_name_chars: int = 2048
    # Schema steps one tool call's arguments may take to check against its inputSchema
    # (`bastion.gateway.input_types`); more: the call is refused, its types unchecked.
    max_argument_checks: int = 100_000
    # Resources one user may follow on one server at once (resources/subscribe in every session,
    # subscriptions/listen streams), all their agents together; one more is refused (-32602).
    max_subscriptions_per_user: int = MAX_SUBSCRIPTIONS_PER_USER
    # With redis_url, each follow is a leased entry in Redis (`bastion.gateway.follows`), renewed
    # every third of this while it lives: a process that dies frees its places after this long.
    subscription_lease_seconds: float = LEASE_SECONDS
    # An upstream's errors on requests no decision names (lists, pass_methods) are logged once
    # per window of this many seconds per server, method, user, agent and code, then counted
    # (`bastion.gateway.refusals.UpstreamErrorLog`); at most upstream_error_log_max_keys keys
    # are counted at a time, the rest per server.
    upstream_error_log_seconds: float = 60.0
    upstream_error_log_max_keys: int = 1000
    # Identity providers whose JWT access tokens the gateway accepts too (docs/identity.md).
    trusted_issuers: tuple[TrustedIssuer, ...] = ()

    def upstream(self, name: str) -> UpstreamConfig | None:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        return None

    @classmethod
    def from_mapping(
        cls, table: Mapping[str, Any], env: Mapping[str, str] | None = None
    ) -> GatewayConfig:
        env = os.environ if env is None else env
        known = {
            "upstreams",
            "public_url",
            "max_body_bytes",
            "pass_methods",
            "session_idle_seconds",
            "redis_url",
            "redis_prefix",
            "redis_timeout_seconds",
            "allowed_origins",
            "label_ttl_seconds",
            "label_max",
            "label_max_sets",
            "max_name_chars",
            "max_argument_checks",
            "max_subscriptions_per_user",
            "subscription_lease_seconds",
            "upstream_error_log_seconds",
            "upstream_error_log_max_keys",
            "trusted_issuers",
        }
        _only(table, known, "gateway")
        upstreams = tuple(
            _upstream(i, u, env) for i, u in enumerate(_list(table, "upstreams", "gateway"))
        )
        names = [u.name for u in upstreams]
        if len(set(names)) != len(names):
            raise ConfigError("[[gateway.upstreams]]: each name may appear only once")
        public_url = str(table.get("public_url", "")).rstrip("/")
        if public_url and not public_url.startswith(("http://", "https://")):
            raise ConfigError(f"gateway.public_url must be an http(s) URL, got {public_url!r}")
        if public_url and (problem := url_syntax_problem(public_url)):
            raise ConfigError(f"gateway.public_url {problem}, got {public_url!r}")
        pass_methods = table.get("pass_methods", list(DEFAULT_PASS_METHODS))
        if not isinstance(pass_methods, list) or not all(isinstance(m, str) for m in pass_methods):
            raise ConfigError("gateway.pass_methods must be a list of method names")
        redis_url = _expand(str(table.get("redis_url", "")), env, "gateway.redis_url")
        schemes = ("redis", "rediss", "unix", *CLUSTER_SCHEMES)
        if redis_url and not redis_url.startswith(tuple(f"{scheme}://" for scheme in schemes)):
            raise ConfigError(
                "gateway.redis_url must be a redis://, rediss:// or unix:// URL, or"
                f" redis+cluster:// (rediss+cluster://) for a Redis Cluster, got {safe_url(redis_url)!r}"
            )
        redis_prefix = table.get("redis_prefix", "bastion")
        if not isinstance(redis_prefix, str) or not _NAME.fullmatch(redis_prefix):
            raise ConfigError("gateway.redis_prefix: letters, digits, '.', '_' or '-'")
        try:
            origins = listed_origins(table.get("allowed_origins", []), "gateway.allowed_origins")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        try:
            trusted = parse_trusted_issuers(table.get("trusted_issuers", []), set(names), env)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return cls(
            upstreams=upstreams,
            trusted_issuers=trusted,
            allowed_origins=origins,
            redis_url=redis_url,
            redis_prefix=redis_prefix,
            redis_timeout_seconds=_seconds(table, "redis_timeout_seconds", 1.0, "gateway"),
            public_url=public_url,
            max_body_bytes=_whole(table, "max_body_bytes", 1_048_576, "gateway"),
            pass_methods=tuple(pass_methods),
            session_idle_seconds=_seconds(table, "session_idle_seconds", 3600, "gateway"),
            label_ttl_seconds=_whole(table, "label_ttl_seconds", 86_400, "gateway"),
            label_max=_whole(table, "label_max", 256, "gateway"),
            label_max_sets=_whole(table, "label_max_sets", 100_000, "gateway"),
            max_name_chars=_whole(table, "max_name_chars", 2048, "gateway"),
            max_argument_checks=_whole(table, "max_argument_checks", 100_000, "gateway"),
            max_subscriptions_per_user=_whole(
                table, "max_subscriptions_per_user", MAX_SUBSCRIPTIONS_PER_USER, "gateway"
            ),
            subscription_lease_seconds=_seconds(
                table, "subscription_lease_seconds", LEASE_SECONDS, "gateway"
            ),
            upstream_error_log_seconds=_seconds(table, "upstream_error_log_seconds", 60, "gateway"),
            upstream_error_log_max_keys=_whole(
                table, "upstream_error_log_max_keys", 1000, "gateway"
            ),
        )


def _only(table: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {where}.{unknown[0]}; known keys: {', '.join(sorted(known))}"
        )


def _list(table: Mapping[str, Any], key: str, where: str) -> list:
    value = table.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{where}.{key} must be an array of tables ([[{where}.{key}]])")
    return value


def _whole(table: Mapping[str, Any], key: str, default: int, where: str) -> int:
    """A count (bytes, labels, sessions, Redis's whole seconds), refused unless whole, >= 1."""
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}.{key} must be a whole number >= 1, got {value!r}")
    return value


def _seconds(table: Mapping[str, Any], key: str, default: float, where: str) -> float:
    """A time in seconds, fractions kept; refused unless finite and > 0."""
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ConfigError(f"{where}.{key} must be a positive number of seconds, got {value!r}")
    return float(value)


def _strings(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigError(f"{where} must be a table of strings")
    return dict(value)


def _expand(value: str, env: Mapping[str, str], where: str) -> str:
    return expand(value, env, where, ConfigError)


def _header(name: str, value: str, where: str) -> str:
    """A header bastion sends the upstream, refused here rather than at the first call; its
    value (a credential, often, from the environment) stripped of leading and trailing spaces
    and tabs, and never named in the message."""
    problem = field_name_problem(name) or field_value_problem(value)
    if problem:
        raise ConfigError(f"{where} {problem}")
    return value.strip(" \t")


def _upstream(index: int, value: Any, env: Mapping[str, str]) -> UpstreamConfig:
    where = f"gateway.upstreams[{index}]"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: a table with name and command or url")
    _only(
        value,
        {
            "name",
            "command",
            "args",
            "env",
            "cwd",
            "url",
            "headers",
            "allow_http",
            "scopes",
            "timeout",
            "auth",
            "oauth",
            "session",
            "max_sessions",
            "session_idle_seconds",
            "pin_tools",
            "pin_prompts",
            "pin_relist_seconds",
            "stop_grace_seconds",
        },
        where,
    )
    name = value.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"{where}.name: letters, digits, '.', '_' or '-' (it is the URL path /mcp/<name>)"
        )
    command, url = value.get("command", ""), value.get("url", "")
    if bool(command) == bool(url):
        raise ConfigError(f"{where} ({name}): give either command (stdio) or url (Streamable HTTP)")
    if url and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        raise ConfigError(f"{where}.url must be an http(s) URL, got {url!r}")
    if url and (problem := url_syntax_problem(url)):
        raise ConfigError(f"{where}.url {problem}, got {url!r}")
    allow_http = value.get("allow_http", False)
    if not isinstance(allow_http, bool):
        raise ConfigError(f"{where}.allow_http must be true or false, got {allow_http!r}")
    if url and not allow_http and (problem := cleartext_problem(url)):
        raise ConfigError(
            f"{where}.url {problem}, got {url!r}; an upstream on a network trusted with what"
            f" the gateway sends it (its credentials, users' tokens) may be named over plain"
            f" http with {where}.allow_http = true"
        )
    args = value.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ConfigError(f"{where}.args must be a list of strings")
    program_env = {
        k: _expand(v, env, f"{where}.env.{k}")
        for k, v in _strings(value.get("env", {}), f"{where}.env").items()
    }
    _check_program(where, command, args, program_env, value.get("cwd", ""))
    scopes = value.get("scopes", [])
    if not isinstance(scopes, list) or not all(isinstance(s, str) and " " not in s for s in scopes):
        raise ConfigError(f"{where}.scopes must be a list of scope names")
    headers = {
        k: _header(k, _expand(v, env, f"{where}.headers.{k}"), f"{where}.headers.{k} ({name})")
        for k, v in _strings(value.get("headers", {}), f"{where}.headers").items()
    }
    if any(k.lower() in ("host", "content-length", "mcp-session-id") for k in headers):
        raise ConfigError(f"{where}.headers may not set Host, Content-Length or Mcp-Session-Id")
    auth = value.get("auth", "none")
    if auth not in ("none", "per_user"):
        raise ConfigError(f'{where}.auth must be "none" or "per_user", got {auth!r}')
    oauth = None
    if auth == "per_user":
        if not url:
            raise ConfigError(f'{where} ({name}): auth = "per_user" needs a url (Streamable HTTP)')
        if any(k.lower() == "authorization" for k in headers):
            raise ConfigError(f'{where}.headers may not set Authorization with auth = "per_user"')
        table = value.get("oauth", {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}.oauth must be a table")
        table = dict(table)
        if isinstance(table.get("client_secret"), str):
            table["client_secret"] = _expand(table["client_secret"], env, f"{where}.oauth")
        try:
            oauth = UpstreamOAuth.from_mapping(table, f"{where}.oauth")
        except ConnectionSettingsError as e:
            raise ConfigError(str(e)) from None
    elif "oauth" in value:
        raise ConfigError(f'{where}.oauth is read only with auth = "per_user"')
    # Each user's token goes on upstream sessions of that user's only.
    session = value.get("session", "per_user" if auth == "per_user" else "shared")
    if session not in SESSION_MODES:
        raise ConfigError(
            f"{where}.session must be one of {', '.join(SESSION_MODES)}, got {session!r}"
        )
    if auth == "per_user" and session == "shared":
        raise ConfigError(
            f'{where} ({name}): auth = "per_user" needs session = "per_user" (the default) or'
            ' "per_client_session": a shared upstream session cannot carry each user\'s own'
            " token"
        )
    if command and session != "shared":
        raise ConfigError(
            f"{where} ({name}): session = {session!r} needs a Streamable HTTP upstream (url); a"
            " stdio upstream is one process, shared by every client"
        )
    if url and "stop_grace_seconds" in value:
        raise ConfigError(
            f"{where}.stop_grace_seconds is read only for a stdio upstream (command): bastion"
            " starts no process for a url"
        )
    pin_tools = _pin_mode(value, "pin_tools", "off", where)
    pin_prompts = _pin_mode(value, "pin_prompts", pin_tools, where)
    return UpstreamConfig(
        name=name,
        command=str(command),
        args=tuple(args),
        env=program_env,
        cwd=str(value.get("cwd", "")),
        url=str(url),
        headers=headers,
        allow_http=allow_http,
        scopes=tuple(scopes),
        timeout=_seconds(value, "timeout", 60, where),
        auth=auth,
        oauth=oauth,
        session=session,
        max_sessions=_whole(value, "max_sessions", 256, where),
        session_idle_seconds=_seconds(value, "session_idle_seconds", 900, where),
        pin_tools=pin_tools,
        pin_prompts=pin_prompts,
        pin_relist_seconds=_seconds(value, "pin_relist_seconds", 5, where),
        stop_grace_seconds=_seconds(value, "stop_grace_seconds", 2, where),
    )


def _check_program(
    where: str, command: Any, args: list[str], env: Mapping[str, str], cwd: Any
) -> None:
    """A stdio upstream's command line, environment and directory, refused here rather than
    when the process is started at the first call: a NUL ends a C string (the operating system
    cannot take one), and an environment variable's name is neither empty nor holds ``=``."""
    if not isinstance(command, str) or not isinstance(cwd, str):
        raise ConfigError(f"{where}.command and {where}.cwd must be strings")
    for key, text in (
        ("command", command),
        ("cwd", cwd),
        *((f"args[{i}]", a) for i, a in enumerate(args)),
    ):
        if "\0" in text:
            raise ConfigError(f"{where}.{key} holds a NUL character, which no program can be given")
    for key, text in env.items():
        if not key or "=" in key or "\0" in key:
            raise ConfigError(f"{where}.env: {key!r} is not an environment variable name")
        if "\0" in text:
            raise ConfigError(
                f"{where}.env.{key} holds a NUL character, which no program can be given"
            )


def _pin_mode(value: dict[str, Any], key: str, default: str, where: str) -> str:
    mode = value.get(key, default)
    if mode not in PIN_MODES:
        raise ConfigError(
            f"{where}.{key} must be one of {', '.join(map(repr, PIN_MODES))}, got {mode!r}"
        )
    return mode
