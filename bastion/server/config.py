"""Server configuration: `bastion.toml`, then ``BASTION_*`` environment variables over it.

Every key, its default and its meaning is listed in docs/operations.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from bastion.http_fields import field_value_problem
from bastion.policy.limits import DEFAULT_LIMITS, PolicyLimits
from bastion.server.request_authority import AllowedHosts

if TYPE_CHECKING:
    from bastion.delegation.tasks import TaskSettings
    from bastion.outbound_proxy import OutboundProxy

DEFAULT_CONFIG_FILE = "bastion.toml"
# The tables a configuration file holds; anything else in it is refused (a misspelt [gateway]
# would otherwise run the server without a gateway). All but [server] are held whole, each read
# by its part.
TABLES = ("server", "oauth", "gateway", "approvals", "signals", "tasks", "identity")
# The choices of log_level (uvicorn's and logging's names).
LOG_LEVELS = ("debug", "info", "warning", "error")
# The choices of decision_log.
DECISION_LOGS = ("memory", "database")
MAX_PORT = 65535


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # A SQLite file path, or a postgresql:// URL.
    database: str = "bastion.db"
    # Loaded into the store at start when the store holds no policy yet.
    policy_file: str = ""
    # Request bodies larger than this are refused with 413 while they are read; bulk import,
    # the OAuth endpoints and pages, and the gateway ([gateway].max_body_bytes) have their own.
    max_body_bytes: int = 1_048_576
    # An import peaks at about 30 times its body in memory (docs/security.md, Known limits).
    max_import_bytes: int = 64 * 1_048_576
    max_oauth_body_bytes: int = 64 * 1024
    # Objects and arrays nested deeper than this in a JSON body are refused (/v1, OAuth, gateway).
    max_json_depth: int = 64
    # Seconds for a request's head (line and headers) and, separately, its whole body to arrive.
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    # A request head larger than this is refused with 431.
    max_header_bytes: int = 64 * 1024
    # Connections (and requests in progress) beyond this are answered 503.
    max_connections: int = 1000
    # Seconds an idle keep-alive connection stays open between requests.
    keep_alive_timeout: float = 5.0
    # Trust X-Forwarded-For / X-Forwarded-Proto only with proxy_headers, and only from these
    # addresses (comma-separated, or "*"): by default no client can name its own address.
    proxy_headers: bool = False
    forwarded_allow_ips: str = ""
    # TLS terminated by bastion itself: a PEM certificate chain and its (unencrypted) PEM key;
    # both or neither (docs/operations.md, "TLS"). Without them, plain HTTP behind a proxy.
    tls_certificate: str = ""
    tls_key: str = ""
    # The HTTP proxy bastion's requests to other parties go through (http:// or https://
    # [user:password@]host:port; CONNECT tunnels, inside TLS to an https:// proxy), and the
    # host names and IP networks reached directly
    # (comma-separated); the loopback always is (bastion.outbound_proxy, docs/operations.md).
    egress_proxy: str = field(default="", repr=False)
    egress_no_proxy: str = ""
    # The URL clients reach this server at (https; http only on loopback): the AuthZEN PDP
    # identifier and the base of its endpoint URLs. Empty: the URL of each metadata request.
    public_url: str = ""
    # AuthZEN (docs/authzen.md): evaluations in one /access/v1/evaluations request, and results
    # in one page of a search.
    authzen_max_evaluations: int = 1000
    authzen_max_page: int = 1000
    # How long a decision with at_least=<seq> may wait for this replica to catch up.
    consistency_timeout: float = 2.0
    # How often a replica polls the change log when no notification arrives.
    poll_interval: float = 0.05
    # A replica that has not confirmed it is current with the database for this long refuses
    # to decide (503; the gateway refuses calls) rather than decide on old facts.
    max_staleness_seconds: float = 5.0
    # A replica whose clock is further than this from the database's (PostgreSQL; checked at
    # start and every second) is not ready and decides nothing until it is back within
    # (docs/operations.md, "Clocks").
    max_clock_skew_seconds: float = 2.0
    # A file where this replica keeps a snapshot of the facts, read at start so that it is ready
    # in seconds (docs/operations.md, "Fact snapshots"); empty: none, facts loaded from the
    # database. Written every fact_snapshot_interval seconds while the facts change, and on stop.
    fact_snapshot_path: str = ""
    fact_snapshot_interval: float = 300.0
    # The row of a fact whose expiry passed more than this many seconds ago is deleted by the
    # server, hourly (decisions leave it out from its expiry on); the wait covers the clocks
    # of replicas and writers that differ (docs/operations.md, "Audit retention").
    fact_expired_grace_seconds: float = 3600.0
    # Audit events and gateway decision records older than this are deleted (0: kept for ever).
    audit_retention_days: float = 90.0
    # How often the server logs the audit trail's chain heads as a checkpoint line (when they
    # moved): what `bastion audit verify --checkpoint` checks the database against.
    audit_checkpoint_seconds: float = 60.0
    # Gateway decision records held in memory while the database cannot take them.
    decision_records_buffer: int = 100_000
    # A local directory where each process journals its decisions until their records are
    # stored, the gateway's and (decision_log = "database") the decision service's, so that one
    # killed outright loses none (docs/operations.md, "Decision journal"). Empty: beside a SQLite
    # database (<file>.decisions), and bastion-decisions in the working directory with PostgreSQL.
    decision_journal_dir: str = ""
    # Force the journal to the disk (fsync) at each flush of the decision records (every 0.2 s),
    # on the record writer's thread: a power loss or an operating system crash then loses the
    # decisions of the last flush's 0.2 s at most, not every line the kernel had not written out.
    decision_journal_fsync: bool = True
    # Decisions remembered per process for /v1/decisions/{id}.
    decision_log_size: int = 10_000
    # Where the decision service's decisions are kept for /v1/decisions/{id}: "memory" (the
    # last decision_log_size of this process), or "database" too, so that any process on it
    # reads and explains one later (`bastion.audit.decision_log`).
    decision_log: str = "memory"
    # Policy size limits and the evaluation budget (see `PolicyLimits`, docs/policy-language.md).
    policy_max_bytes: int = DEFAULT_LIMITS.policy_max_bytes
    policy_max_rules: int = DEFAULT_LIMITS.policy_max_rules
    policy_max_rule_literals: int = DEFAULT_LIMITS.policy_max_rule_literals
    policy_max_nesting: int = DEFAULT_LIMITS.policy_max_nesting
    policy_max_term_size: int = DEFAULT_LIMITS.policy_max_term_size
    policy_max_compiled_literals: int = DEFAULT_LIMITS.policy_max_compiled_literals
    evaluation_max_steps: int = DEFAULT_LIMITS.evaluation_max_steps
    evaluation_max_milliseconds: int = DEFAULT_LIMITS.evaluation_max_milliseconds
    evaluation_max_depth: int = DEFAULT_LIMITS.evaluation_max_depth
    evaluation_max_term_size: int = DEFAULT_LIMITS.evaluation_max_term_size
    explanation_max_steps: int = DEFAULT_LIMITS.explanation_max_steps
    # Refuse every policy with a warning (a predicate nothing defines, a type no block
    # declares), by every way one is put in force (/v1, /api, rollback), as `bastion policy
    # check --strict` does: a misspelt guardrail never fires. Off: Oso Cloud's policies load.
    policy_strict: bool = False
    # Oso Cloud's API (/api, docs/oso-cloud.md): the most facts one get answers, the most rows
    # one query answers, the page size list answers at most, the most facts one typed delete
    # expands to; and the most context facts one request may send.
    oso_api_max_results: int = 10_000
    oso_api_max_context_facts: int = 100
    log_level: str = "info"
    # One log line per request (uvicorn's access log).
    access_log: bool = False
    # Answer /v1/authorize and its batch inside the HTTP protocol when all they need is in
    # memory (bastion.server.direct); false: every request through the ASGI application.
    direct_decisions: bool = True
    # Run the gateway's POST /mcp/<server> from the HTTP protocol, past the application's
    # middleware (bastion.server.direct_gateway); false: through the ASGI application.
    direct_gateway: bool = True
    # Read from the environment only: an admin key accepted besides the stored ones.
    admin_key: str = field(default="", repr=False)
    # The [oauth] table, handed to the authorization server as it is.
    oauth: dict[str, Any] = field(default_factory=dict)
    # The [gateway] table, read by bastion.gateway.config (issue 5).
    gateway: dict[str, Any] = field(default_factory=dict)
    # The [approvals] table, read by bastion.approvals.settings (docs/approvals.md).
    approvals: dict[str, Any] = field(default_factory=dict)
    # The [signals] table, one sub-table per part (docs/signals.md): [signals.ssf] (read by
    # bastion.signals.settings), [signals.api] (bastion.signals.store.SignalSettings),
    # [signals.posture] (bastion.signals.posture.PostureSettings), [signals.behavior]
    # (bastion.signals.behavior.BehaviorSettings) and [signals.alerts]
    # (bastion.signals.alerts.AlertSettings).
    signals: dict[str, Any] = field(default_factory=dict)
    # The [tasks] table (bastion.delegation.tasks.TaskSettings, docs/delegation.md).
    tasks: dict[str, Any] = field(default_factory=dict)
    # The [identity] table: OpenID providers people log in through
    # (bastion.identity.oidc_login.IdentitySettings, docs/identity.md).
    identity: dict[str, Any] = field(default_factory=dict)
    # Not a setting: the file these were read from ("" when none was), which messages name.
    file: str = field(default="", compare=False)
    # A connection closed while the client may still be sending (a refused body, a refused
    # head) is shut for writing, then what still comes is read and dropped for at most this
    # many seconds and bytes before it is closed, so that the client reads the answer rather
    # than a reset (bastion.server.lingering_close). 0 seconds: closed at once. nginx lingers
    # up to 5 s; 2 s is ample to read an answer of a few hundred bytes, and 1 MiB lets a client
    # that sends a body of twice its limit, or a small one behind a refused head, finish it.
    linger_timeout: float = 2.0
    max_linger_bytes: int = 1_048_576
    # The host names and addresses (each with a port, or any port) requests may name in Host,
    # else 421 (bastion.server.request_authority.AllowedHosts, docs/operations.md, "The names
    # bastion answers to"). Empty: every host, as before the setting.
    allowed_hosts: tuple[str, ...] = ()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        *,
        env: dict[str, str] | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> ServerConfig:
        """Defaults, then the TOML file (if it exists), then ``BASTION_*``, then ``overrides``.

        An explicitly named file must exist; the default ``bastion.toml`` may be absent.
        """
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        # Where each value came from, for the message that refuses it.
        sources: dict[str, str] = {}
        file = Path(path or environment_value(env, "BASTION_CONFIG") or DEFAULT_CONFIG_FILE)
        read = file.exists()
        if read:
            try:
                data = tomllib.loads(file.read_text(encoding="utf-8"))
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{file}: {e}") from None
            except OSError as e:  # a directory, a file this user may not read
                raise ConfigError(f"{file}: {e.strerror or e}") from None
            except UnicodeDecodeError as e:
                raise ConfigError(
                    f"{file}: not UTF-8 text ({e.reason} at byte {e.start})"
                ) from None
            for key, value in data.items():
                if key not in TABLES or not isinstance(value, dict):
                    what = f"table [{key}]" if isinstance(value, dict) else f"key {key!r}"
                    raise ConfigError(
                        f"{file}: unknown {what} at the top of the file; it holds the tables "
                        + ", ".join(f"[{t}]" for t in TABLES)
                        + " (a server setting goes in [server])"
                    )
            server = data.get("server", {})
            if "admin_key" in server:
                raise ConfigError(
                    f"{file}: admin_key belongs in the BASTION_ADMIN_KEY environment variable,"
                    " not in a file"
                )
            values.update(server)
            sources.update(dict.fromkeys(server, f"{file} [server]"))
            for table in TABLES[1:]:
                if table in data:
                    values[table] = data[table]
        elif path is not None:
            raise ConfigError(f"configuration file {file} does not exist")
        names = [f.name for f in fields(cls) if f.name not in (*TABLES, "file")]
        for name in names:
            variable = f"BASTION_{name.upper()}"
            value = environment_value(env, variable)
            if value is not None:
                values[name] = value
                sources[name] = variable
        values.update(overrides or {})
        sources.update(dict.fromkeys(overrides or {}, "the command line"))
        config = cls()
        checked = {}
        for key, value in values.items():
            if key in TABLES[1:]:
                checked[key] = _coerce(key, value, dict)
                continue
            source = sources.get(key, "")
            if key not in names:
                raise ConfigError(
                    f"{source}: unknown key {key}; known keys: {', '.join(sorted(names))}"
                )
            try:
                checked[key] = _coerce(key, value, type(getattr(config, key)))
                _check_value(key, checked[key])
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
        config = replace(config, **checked, file=str(file) if read else "")
        config.check()
        return config

    @property
    def named(self) -> str:
        """The configuration as a message names it: its file, when one was read."""
        return self.file or "the configuration"

    @contextmanager
    def reading(self, table: str) -> Iterator[None]:
        """Around the code that reads ``[table]`` (each table is read by the part of bastion it
        configures): a value it refuses (`ValueError`, `TypeError`) is a `ConfigError` that
        names the file and the table, however that part words it."""
        try:
            yield
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{self.named} [{table}]: {e}") from None

    def check(self) -> None:
        """Refuse limits that would let nothing through, or everything."""
        unknown = sorted(set(self.signals) - set(SIGNALS_TABLES))
        if unknown:
            raise ConfigError(
                f"unknown table [signals.{unknown[0]}]; known: "
                + ", ".join(f"[signals.{t}]" for t in SIGNALS_TABLES)
            )
        for f in fields(self):
            if f.name not in (*TABLES, "file"):
                _check_value(f.name, getattr(self, f.name))
        if self.proxy_headers and not self.forwarded_allow_ips.strip():
            raise ConfigError(
                "proxy_headers = true needs forwarded_allow_ips: the addresses of the proxies"
                " whose X-Forwarded-For is trusted (see docs/security.md)"
            )
        if bool(self.tls_certificate) != bool(self.tls_key):
            raise ConfigError(
                "tls_certificate and tls_key go together: give both (a PEM certificate chain and"
                " its key) to serve HTTPS, or neither to serve HTTP behind a TLS proxy"
            )
        if self.public_url:
            _check_public_url(self.public_url)
        allowed = self.host_allowlist()
        if allowed is not None:
            for key, url in (
                ("public_url", self.public_url),
                ("[oauth] issuer", self.oauth.get("issuer")),
                ("[gateway] public_url", self.gateway.get("public_url")),
            ):
                authority = _url_authority(url)
                if authority is not None and not allowed.admits(authority):
                    raise ConfigError(
                        f"{key} {url!r} is at {authority.decode()}, which allowed_hosts does not"
                        " list: add it, or every request at that URL is refused (421)"
                    )
        self.outbound_proxy()
        try:
            self.policy_limits()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        from bastion.signals.behavior import BehaviorSettings

        with self.reading("signals.behavior"):
            BehaviorSettings.from_table(self.signals.get("behavior", {}))
        self.task_settings()

    def host_allowlist(self) -> AllowedHosts | None:
        """``allowed_hosts`` prepared for the HTTP protocol, or None when it is empty (every
        host is answered; nothing is looked up)."""
        if not self.allowed_hosts:
            return None
        try:
            return AllowedHosts(self.allowed_hosts)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def outbound_proxy(self) -> OutboundProxy | None:
        """The proxy ``egress_proxy`` and ``egress_no_proxy`` name (`ConfigError` for one that
        cannot be used, naming it without its password), or None."""
        from bastion.outbound_proxy import parse_outbound_proxy

        try:
            return parse_outbound_proxy(self.egress_proxy, self.egress_no_proxy)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def task_settings(self) -> TaskSettings:
        """The [tasks] table read (`bastion.delegation.tasks.TaskSettings`)."""
        from bastion.delegation.tasks import TaskSettings

        with self.reading("tasks"):
            return TaskSettings.from_mapping(self.tasks)

    def decision_journal_directory(self) -> str:
        """`decision_journal_dir`, or its default for the database."""
        if self.decision_journal_dir:
            return self.decision_journal_dir
        from bastion.db import is_postgres, sqlite_file

        if is_postgres(self.database):
            return "bastion-decisions"
        return sqlite_file(self.database).path + ".decisions"

    def usable_decision_journal_directory(self, journalling: str) -> str:
        """`decision_journal_directory`, made if it is missing; `ConfigError` naming who journals
        there (``journalling``: "the gateway") if this user cannot write to it. Fail closed: a
        process that could lose its decisions to a kill takes none."""
        folder = self.decision_journal_directory()
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(f"{folder} is not writable by this user")
        except OSError as e:
            raise ConfigError(
                f"decision_journal_dir: {journalling} journals its decisions in {folder!r}"
                f" (docs/operations.md, 'Decision journal'), which cannot be used: {e}"
            ) from None
        return folder

    def policy_limits(self) -> PolicyLimits:
        """The limits on policies and on each evaluation, from the ``policy_*``,
        ``evaluation_*`` and ``explanation_*`` keys."""
        return PolicyLimits(**{name: getattr(self, name) for name in PolicyLimits.__slots__})


# The sub-tables of [signals], each read by its part (docs/signals.md).
SIGNALS_TABLES = ("ssf", "api", "posture", "behavior", "alerts")

_POSITIVE = (
    "consistency_timeout",
    "poll_interval",
    "max_body_bytes",
    "max_import_bytes",
    "max_oauth_body_bytes",
    "max_json_depth",
    "header_timeout",
    "body_timeout",
    "max_header_bytes",
    "max_linger_bytes",
    "max_connections",
    "keep_alive_timeout",
    "max_staleness_seconds",
    "max_clock_skew_seconds",
    "fact_snapshot_interval",
    "audit_checkpoint_seconds",
    "decision_records_buffer",
    "authzen_max_evaluations",
    "authzen_max_page",
    "oso_api_max_results",
    "oso_api_max_context_facts",
)


def environment_value(env: Mapping[str, str], name: str) -> str | None:
    """The variable ``name``, None when it is unset. Set but empty is refused, naming it: it is
    a value someone meant to give (``BASTION_DATABASE=${DB}`` with no DB), and read as unset it
    would run on a database, a port or a file nobody chose."""
    value = env.get(name)
    if value == "":
        raise ConfigError(f"{name} is set but empty: give it a value, or unset it")
    return value


# The commands a deployment is set up with before its first `bastion serve` (docs/operations.md,
# "Admin commands and the database"): they create the database, saying so. Every other command
# refuses a database that is not there, where it would make a new, empty one on a mistyped path.
CREATING_COMMANDS = frozenset(
    {("keys", "create"), ("policy", "push"), ("users", "create"), ("clients", "create")}
)


def command_database(args: argparse.Namespace, config: ServerConfig | None = None) -> str:
    """The database an admin command works on: ``--database``, else BASTION_DATABASE, else the
    configuration's (``config``, or the one ``--config`` names, read only when needed). It must
    be there, unless the command is one of `CREATING_COMMANDS`."""
    from bastion.db import existing_database, is_postgres, sqlite_file

    url = getattr(args, "database", None)
    if url is None:
        url = environment_value(os.environ, "BASTION_DATABASE")
    if url is None:
        url = (config or ServerConfig.load(getattr(args, "config", None))).database
    command = getattr(args, "command", None)
    if (command, getattr(args, f"{command}_command", None)) not in CREATING_COMMANDS:
        return existing_database(url)
    if not is_postgres(url) and not os.path.exists(path := sqlite_file(url)[0]):
        print(f"bastion: no database at {path}; creating it", file=sys.stderr)
    return url


def _check_public_url(url: str) -> None:
    from bastion.egress import url_syntax_problem

    if problem := url_syntax_problem(url):
        raise ConfigError(f"public_url {problem}, got {url!r}")
    parts = urlsplit(url)
    loopback = parts.hostname in ("localhost", "127.0.0.1", "::1")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise ConfigError(f"public_url: {url!r} must be an https URL (http only on loopback)")
    if not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"public_url: {url!r} must be a URL with a host, no query or fragment")


def _url_authority(url: object) -> bytes | None:
    """The authority a client sends as Host for ``url`` (host and port as given), or None for
    a URL that has none (its own reader refuses it)."""
    if not isinstance(url, str) or not url:
        return None
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    host = f"[{host}]" if ":" in host else host
    return (host if port is None else f"{host}:{port}").encode()


def _check_value(key: str, value: Any) -> None:
    """Refuse a value of ``key`` that is out of its range: a limit that would let nothing
    through, or everything (an infinite header_timeout is no slowloris defence; a poll_interval
    of 0 spins a CPU; nan compares false with everything and passes any check written as ``<``)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if key in _POSITIVE and not value > 0:
        raise ConfigError(f"{key} must be greater than 0, got {value!r}")
    if key == "port" and not 0 <= value <= MAX_PORT:
        raise ConfigError(f"port must be from 0 to {MAX_PORT}, got {value!r}")
    if key == "log_level" and value not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    if key == "decision_log" and value not in DECISION_LOGS:
        raise ConfigError(f"decision_log must be one of {', '.join(DECISION_LOGS)}, got {value!r}")
    if key == "decision_log_size" and value < 0:
        raise ConfigError(f"decision_log_size must be 0 (keep none) or more, got {value}")
    if key == "linger_timeout" and value < 0:
        raise ConfigError(
            f"linger_timeout must be 0 (close at once) or more seconds, got {value!r}"
        )
    if key == "fact_expired_grace_seconds" and value < 0:
        raise ConfigError(f"fact_expired_grace_seconds must be 0 or more seconds, got {value!r}")
    if key == "audit_retention_days" and value < 0:
        raise ConfigError("audit_retention_days must be a number of days, 0 to keep everything")
    if key == "allowed_hosts" and value:
        try:
            AllowedHosts(value)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if key == "admin_key" and (problem := field_value_problem(value)):
        # Compared with the key a client sends in Authorization, which cannot hold it.
        raise ConfigError(f"admin_key {problem}")
    if key == "database":
        from bastion.db import DatabaseSettingError, is_postgres, sqlite_file

        if not is_postgres(value):
            try:
                sqlite_file(value)
            except DatabaseSettingError as e:
                raise ConfigError(f"database: {e}") from None


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table")
        return value
    if kind is tuple:
        # A list in the file; comma-separated in the environment.
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, list | tuple) and all(isinstance(item, str) for item in items):
            return tuple(item.strip() for item in items)
        raise ConfigError(f"{key} must be a list of strings, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return str(value).lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    try:
        if kind is int and not isinstance(value, bool | float):  # 1.5 is not rounded to 1
            return int(value)
        if kind is float and not isinstance(value, bool):
            return float(value)
        if kind is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    what = {int: "a whole number", float: "a number", str: "a string"}.get(kind, kind.__name__)
    raise ConfigError(f"{key} must be {what}, got {value!r}")
