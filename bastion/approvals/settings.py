"""The ``[approvals]`` table of bastion.toml: how long holds last and wait, and who is told.

```toml
[approvals]
expiry_seconds = 600        # a request not answered (or an approval not used) by then expires;
                            # the policy may shorten it (approval_expires)
wait_seconds = 20           # how long a held HTTP request waits for an answer before it is
                            # answered approval_pending (the client retries)
retry_after_seconds = 5     # what approval_pending tells the client to wait before retrying
max_window_minutes = 480    # no time-bounded grant is longer, whatever the policy allows
stranded_sweep_seconds = 30 # how often each server closes pending requests nobody may answer
                            # any more (an approver disabled, suspended or removed meanwhile)
stranded_sweep_limit = 100  # the most pending requests one such pass looks at
max_pending_per_agent = 20  # calls one user's agent may have waiting for people at once;
                            # past it, a new one is refused (approval_limit), nobody asked
webhook_attempts = 5        # POSTs per webhook notification before it is given up
webhook_backoff_seconds = 1 # the wait after the first failed attempt, doubled after each next
webhook_timeout_seconds = 5 # one attempt is abandoned (and retried) after this long
webhook_queue_size = 1000   # notifications a process sends at once; more wait in the database

[[approvals.webhooks]]
url = "https://chat.example.com/hooks/abc"   # told of every new request (signed, retried);
                                            # or url_env = "VAR": the URL from the environment
secret_env = "BASTION_WEBHOOK_SECRET"       # the HMAC key (16 bytes or more), read from this
                                            # environment variable
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from bastion.server.config import ConfigError
from bastion.webhooks import (
    MIN_SECRET_BYTES,
    SettingsError,
    Webhook,
    WebhookDelivery,
    delivery_settings,
    positive_seconds,
    webhook_label,
)

__all__ = ["MIN_SECRET_BYTES", "ApprovalSettings", "Webhook", "webhook_label"]


# The longest `max_window_minutes` (a year): the windows are kept in INTEGER columns, 32 bits on
# PostgreSQL.
MAX_WINDOW_MINUTES = 525_600
# The most pending requests one pass of the stranded sweep looks at, whatever the setting says:
# each costs a reading of the policy, and a pass holds one worker thread while it runs.
MAX_SWEEP_LIMIT = 10_000
# The most ``max_pending_per_agent`` may be set to.
MAX_PENDING_PER_AGENT = 1_000_000


@dataclass(frozen=True)
class ApprovalSettings(WebhookDelivery):
    expiry_seconds: float = 600.0
    wait_seconds: float = 20.0
    retry_after_seconds: float = 5.0
    max_window_minutes: int = 480
    stranded_sweep_seconds: float = 30.0
    stranded_sweep_limit: int = 100
    # Calls one user's agent has waiting for people at once; past it, a new one is refused.
    max_pending_per_agent: int = 20

    @classmethod
    def from_mapping(
        cls, table: dict[str, Any], env: dict[str, str] | None = None
    ) -> ApprovalSettings:
        env = dict(os.environ if env is None else env)
        known = set(cls.__dataclass_fields__)
        for key in table:
            if key not in known:
                raise ConfigError(
                    f"unknown key [approvals].{key}; known keys: {', '.join(sorted(known))}"
                )
        values: dict[str, Any] = {}
        for key in (
            "expiry_seconds",
            "wait_seconds",
            "retry_after_seconds",
            "stranded_sweep_seconds",
        ):
            if key in table:
                values[key] = _checked(
                    positive_seconds,
                    f"approvals.{key}",
                    table[key],
                    allow_zero=key == "wait_seconds",
                )
        values.update(_checked(delivery_settings, "approvals", table, env))
        for key, least, most, unit in (
            ("max_window_minutes", 0, MAX_WINDOW_MINUTES, "minutes"),  # at most a year
            ("stranded_sweep_limit", 1, MAX_SWEEP_LIMIT, "requests"),
            ("max_pending_per_agent", 1, MAX_PENDING_PER_AGENT, "requests"),
        ):
            if key in table:
                value = table[key]
                if type(value) is not int or not least <= value <= most:
                    raise ConfigError(
                        f"approvals.{key} must be a whole number of {unit} from {least} to"
                        f" {most}, got {value!r}"
                    )
                values[key] = value
        return cls(**values)


def _checked(parse: Any, *args: Any, **kwargs: Any) -> Any:
    """A shared webhook setting's parser, its refusal reported as a configuration error."""
    try:
        return parse(*args, **kwargs)
    except SettingsError as e:
        raise ConfigError(str(e)) from None
