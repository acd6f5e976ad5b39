"""Server configuration: `bastion.toml`, then ``BASTION_*`` environment variables over it.

Every key, its default and its meaning is listed in docs/operations.md.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bastion.policy.limits import DEFAULT_LIMITS, PolicyLimits

DEFAULT_CONFIG_FILE = "bastion.toml"


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
    # Requests larger than this are refused with 413 (bulk import has its own limit).
    max_body_bytes: int = 1_048_576
    max_import_bytes: int = 512 * 1_048_576
    # How long a decision with at_least=<seq> may wait for this replica to catch up.
    consistency_timeout: float = 2.0
    # How often a replica polls the change log when no notification arrives.
    poll_interval: float = 0.05
    # A replica that has not confirmed it is current with the database for this long refuses
    # to decide (503; the gateway refuses calls) rather than decide on old facts.
    max_staleness_seconds: float = 5.0
    # Audit events and gateway decision records older than this are deleted (0: kept for ever).
    audit_retention_days: float = 90.0
    # Gateway decision records held in memory while the database cannot take them.
    decision_records_buffer: int = 100_000
    # Decisions remembered per process for /v1/decisions/{id}.
    decision_log_size: int = 10_000
    # Policy size limits and the evaluation budget (see `PolicyLimits`, docs/policy-language.md).
    policy_max_bytes: int = DEFAULT_LIMITS.policy_max_bytes
    policy_max_rules: int = DEFAULT_LIMITS.policy_max_rules
    policy_max_rule_literals: int = DEFAULT_LIMITS.policy_max_rule_literals
    policy_max_nesting: int = DEFAULT_LIMITS.policy_max_nesting
    policy_max_term_size: int = DEFAULT_LIMITS.policy_max_term_size
    policy_max_compiled_literals: int = DEFAULT_LIMITS.policy_max_compiled_literals
    evaluation_max_steps: int = DEFAULT_LIMITS.evaluation_max_steps
    evaluation_max_depth: int = DEFAULT_LIMITS.evaluation_max_depth
    evaluation_max_term_size: int = DEFAULT_LIMITS.evaluation_max_term_size
    log_level: str = "info"
    # One log line per request (uvicorn's access log).
    access_log: bool = False
    # Read from the environment only: an admin key accepted besides the stored ones.
    admin_key: str = field(default="", repr=False)
    # The [oauth] table, handed to the authorization server as it is.
    oauth: dict[str, Any] = field(default_factory=dict)
    # The [gateway] table, read by bastion.gateway.config (issue 5).
    gateway: dict[str, Any] = field(default_factory=dict)

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
        file = Path(path or env.get("BASTION_CONFIG") or DEFAULT_CONFIG_FILE)
        if file.exists():
            try:
                data = tomllib.loads(file.read_text())
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{file}: {e}") from None
            server = data.get("server", {})
            if "admin_key" in server:
                raise ConfigError(
                    f"{file}: admin_key belongs in the BASTION_ADMIN_KEY environment variable,"
                    " not in a file"
                )
            values.update(server)
            if "oauth" in data:
                values["oauth"] = data["oauth"]
            if "gateway" in data:
                values["gateway"] = data["gateway"]
        elif path is not None:
            raise ConfigError(f"configuration file {file} does not exist")
        names = {f.name: f for f in fields(cls)}
        for name in names:
            if name in ("oauth", "gateway"):
                continue
            var = f"BASTION_{name.upper()}"
            if var in env:
                values[name] = env[var]
        values.update(overrides or {})
        config = cls()
        checked = {}
        for key, value in values.items():
            if key not in names:
                raise ConfigError(
                    f"unknown key [server].{key}; known keys: {', '.join(sorted(names))}"
                )
            checked[key] = _coerce(key, value, type(getattr(config, key)))
        config = replace(config, **checked)
        _check_bounds(config)
        try:
            config.policy_limits()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return config

    def policy_limits(self) -> PolicyLimits:
        """The limits on policies and on each evaluation, from the ``policy_*`` and
        ``evaluation_*`` keys."""
        return PolicyLimits(**{name: getattr(self, name) for name in PolicyLimits.__slots__})


def _check_bounds(config: ServerConfig) -> None:
    if not (math.isfinite(config.max_staleness_seconds) and config.max_staleness_seconds > 0):
        raise ConfigError("max_staleness_seconds must be a positive number of seconds")
    if not (math.isfinite(config.audit_retention_days) and config.audit_retention_days >= 0):
        raise ConfigError("audit_retention_days must be a number of days, 0 to keep everything")
    if config.decision_records_buffer < 1:
        raise ConfigError("decision_records_buffer must be at least 1")


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table")
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return str(value).lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    try:
        if kind is int and not isinstance(value, bool):
            return int(value)
        if kind is float and not isinstance(value, bool):
            return float(value)
        if kind is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{key} must be a {kind.__name__}, got {value!r}")
