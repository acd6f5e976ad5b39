"""The ``[approvals]`` table of bastion.toml: how long holds last and wait, and who is told.

```toml
[approvals]
expiry_seconds = 600        # a request not answered (or an approval not used) by then expires;
                            # the policy may shorten it (approval_expires)
wait_seconds = 20           # how long a held HTTP request waits for an answer before it is
                            # answered approval_pending (the client retries)
retry_after_seconds = 5     # what approval_pending tells the client to wait before retrying
max_window_minutes = 480    # no time-bounded grant is longer, whatever the policy allows
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

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Any

import httpx

from bastion.server.config import ConfigError


@dataclass(frozen=True)
class Webhook:
    """One receiver. Its URL is a credential too (a chat tool's incoming-webhook URL lets whoever
    holds it post to the channel): records, logs and reprs show its `label` instead."""

    url: str = field(repr=False)
    secret: bytes = field(repr=False)

    @property
    def label(self) -> str:
        return webhook_label(self.url)

    def __repr__(self) -> str:
        return f"Webhook({self.label})"


def webhook_label(url: str) -> str:
    """How a webhook's URL is shown and recorded: its origin and a fingerprint, never its path
    or query (where chat tools put the token): ``https://hooks.slack.com/…#3f9a0c21d4e5``."""
    fingerprint = hashlib.sha256(url.encode()).hexdigest()[:12]
    try:
        parsed = httpx.URL(url)
        origin = f"{parsed.scheme}://{parsed.netloc.decode('ascii')}"  # no user or password
    except httpx.InvalidURL:
        origin = "?"
    return f"{origin}/…#{fingerprint}"


@dataclass(frozen=True)
class ApprovalSettings:
    expiry_seconds: float = 600.0
    wait_seconds: float = 20.0
    retry_after_seconds: float = 5.0
    max_window_minutes: int = 480
    webhooks: tuple[Webhook, ...] = ()
    # Attempts per webhook delivery, and the first delay between them (doubled each time).
    webhook_attempts: int = 5
    webhook_backoff_seconds: float = 1.0
    webhook_timeout_seconds: float = 5.0
    # Deliveries one process holds in memory at once (sending, or waiting to retry); more wait
    # in the database's outbox until there is room.
    webhook_queue_size: int = 1000

    @classmethod
    def from_mapping(
        cls, table: dict[str, Any], env: dict[str, str] | None = None
    ) -> ApprovalSettings:
        env = dict(os.environ if env is None else env)
        known = {
            "expiry_seconds",
            "wait_seconds",
            "retry_after_seconds",
            "max_window_minutes",
            "webhooks",
            "webhook_attempts",
            "webhook_backoff_seconds",
            "webhook_timeout_seconds",
            "webhook_queue_size",
        }
        for key in table:
            if key not in known:
                raise ConfigError(
                    f"unknown key [approvals].{key}; known keys: {', '.join(sorted(known))}"
                )
        values: dict[str, Any] = {}
        for key in ("expiry_seconds", "wait_seconds", "retry_after_seconds"):
            if key in table:
                values[key] = _positive(
                    f"approvals.{key}", table[key], allow_zero=key == "wait_seconds"
                )
        for key in ("webhook_backoff_seconds", "webhook_timeout_seconds"):
            if key in table:
                values[key] = _positive(f"approvals.{key}", table[key])
        for key in ("max_window_minutes", "webhook_attempts", "webhook_queue_size"):
            if key in table:
                value = table[key]
                if type(value) is not int or value < (0 if key == "max_window_minutes" else 1):
                    raise ConfigError(f"approvals.{key} must be a whole number, got {value!r}")
                values[key] = value
        hooks: list[Webhook] = []
        for i, hook in enumerate(table.get("webhooks") or ()):
            hooks.append(_webhook(f"approvals.webhooks[{i}]", hook, env, hooks))
        values["webhooks"] = tuple(hooks)
        return cls(**values)


# A shorter signing secret could be guessed from one signed notification, offline.
MIN_SECRET_BYTES = 16


def _webhook(where: str, hook: Any, env: dict[str, str], before: list[Webhook]) -> Webhook:
    """One ``[[approvals.webhooks]]`` table. Its URL may come from the environment as well as
    its secret: a chat tool's incoming-webhook URL is itself a credential (whoever has it can
    post to the channel)."""
    if not isinstance(hook, dict):
        raise ConfigError(f'{where}: needs url = "https://..." (or url_env) and secret_env')
    if "secret" in hook:
        raise ConfigError(
            f"{where}: the signing secret belongs in an environment variable named by"
            " secret_env, not in a file"
        )
    unknown = sorted(set(hook) - {"url", "url_env", "secret_env"})
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]}; known keys: secret_env, url, url_env"
        )
    if ("url" in hook) == ("url_env" in hook):
        raise ConfigError(f'{where}: needs url = "https://..." or url_env, one of the two')
    if "url_env" in hook:
        name = hook["url_env"]
        if not isinstance(name, str) or not env.get(name):
            raise ConfigError(
                f"{where}.url_env must name an environment variable that holds the webhook's"
                f" URL ({name!r} is not set)"
            )
        url, named = env[name], f"{where}.url_env ({name})"
    else:
        url, named = hook["url"], f"{where}.url"
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise ConfigError(f"{named} must be an http(s) URL")
    try:
        host = httpx.URL(url).host
    except httpx.InvalidURL as e:
        raise ConfigError(f"{named} is not a valid URL: {e}") from None
    if not host:
        raise ConfigError(f"{named} has no host")
    if any(known.url == url for known in before):
        raise ConfigError(f"{named} names the same URL as an earlier webhook")
    name = hook.get("secret_env")
    if not isinstance(name, str) or not env.get(name):
        raise ConfigError(
            f"{where}.secret_env must name an environment variable that holds the"
            f" webhook's signing secret ({name!r} is not set)"
        )
    secret = env[name].encode()
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{where}.secret_env: the secret in {name} is {len(secret)} bytes; a webhook's"
            f" signing secret must be at least {MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32`)"
        )
    return Webhook(url, secret)


def _positive(key: str, value: Any, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be greater than 0, got {value!r}")
    return float(value)
